"""Make `import torchvision` work where PyPI's CUDA-built torchvision meets a CPU-only torch.

That torchvision fails at import because its C++ ops (`torchvision::nms`, `qnms`) are missing
from the CPU torch, and its fake-tensor registrations need their schemas. colpali-engine imports
torchvision but never calls those ops, so declaring the schemas is enough. Applied only when the
plain import fails in exactly that way.
"""

from __future__ import annotations

import importlib
import sys

_MISSING_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # the torch.library.Library must outlive the import, or the schemas vanish


def ensure_torchvision() -> None:
    global _library
    try:
        importlib.import_module("torchvision")
        return
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _MISSING_OP_SCHEMAS.values():
        _library.define(schema)
    importlib.import_module("torchvision")
