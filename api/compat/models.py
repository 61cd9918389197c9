"""Which served model answers the requests of a peer whose requests name none (TEI serves one
model, LAYRA's server one ColQwen2.5)."""

from __future__ import annotations

from common.errors import ModelNotFound
from common.registry import ModelSpec, Registry


def _named_or_first(registry: Registry, name: str, fits, setting: str, what: str) -> ModelSpec:
    if name:
        return registry.get(name)
    for spec in registry:
        if fits(spec):
            return spec
    raise ModelNotFound(f"No served model can answer {what} requests; set {setting}.", "model")


def tei_model(registry: Registry, name: str) -> ModelSpec:
    """EMBEDQ_COMPAT_TEI_MODEL, else the first served model that embeds text."""
    return _named_or_first(registry, name, lambda spec: "text" in spec.modalities, "EMBEDQ_COMPAT_TEI_MODEL", "TEI's")


def layra_model(registry: Registry, name: str) -> ModelSpec:
    """EMBEDQ_COMPAT_LAYRA_MODEL, else the first served late-interaction model that embeds images."""
    return _named_or_first(
        registry,
        name,
        lambda spec: spec.multivector and {"text", "image"} <= set(spec.modalities),
        "EMBEDQ_COMPAT_LAYRA_MODEL",
        "LAYRA's",
    )
