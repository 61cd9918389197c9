"""The page scan's one product, the int8 query codes against a block of int8 page codes, done three
ways; a search worker times each on its own CPU at start-up and scans with the fastest.

Which is fastest depends on the instruction set more than on anything else: torch's `_int_mm` runs
49,152 page tokens in 1.6 ms where oneDNN has AVX-512 VNNI, and took 127 ms on an AVX2-only EPYC,
where a float32 product through BLAS took 7.4 ms. fbgemm's int8 GEMM (the one behind torch's
dynamically quantized Linear) has kernels for AVX2 as well as AVX-512. Every kernel gives the
product in the units of the codes, so the rest of the scan does not know which one ran.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

log = logging.getLogger(__name__)

TIMING_TOKENS = 20  # a typical query's token count
PREFER_INT8_BELOW = 0.6


class Int8:
    """`torch._int_mm`: exact, in int32."""

    name = "int8"
    recheck = 0  # pages scored again with the exact product, beyond those read back (workers.search.scan)
    bytes_per_code = 1  # memory held per int8 code, the kernel's own form included

    def prepare(self, block: torch.Tensor) -> Any:
        return block.T

    def product(self, query: torch.Tensor, prepared: Any) -> torch.Tensor:
        return torch._int_mm(query, prepared)


class Float32:
    """BLAS on the codes as float32: exact (the sums stay under 2**24), 4 bytes read per code."""

    name = "float32"
    recheck = 0
    bytes_per_code = 1

    def prepare(self, block: torch.Tensor) -> Any:
        return block

    def product(self, query: torch.Tensor, prepared: Any) -> torch.Tensor:
        return query.float() @ prepared.float().T


class Fbgemm:
    """fbgemm's u8 x s8 GEMM on weights packed once per block. It quantizes the query again, to
    7 bits on x86 (its AVX2 kernel would saturate 16-bit sums with 8): about 1% off, so more
    pages are scored again with the exact product before any is read back."""

    name = "fbgemm"
    recheck = 16
    bytes_per_code = 2  # the codes, and the same again packed

    def prepare(self, block: torch.Tensor) -> Any:
        weights = torch._make_per_tensor_quantized_tensor(block.contiguous(), 1.0, 0)
        return torch.ops.quantized.linear_prepack(weights, None)

    def product(self, query: torch.Tensor, prepared: Any) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(query.float(), prepared, True)


Kernel = Int8 | Float32 | Fbgemm
KERNELS: dict[str, Kernel] = {kernel.name: kernel for kernel in (Int8(), Float32(), Fbgemm())}


def _available() -> list[str]:
    names = ["int8", "float32"]
    if "fbgemm" in torch.backends.quantized.supported_engines:
        names.append("fbgemm")
    return names


def time_kernels(block_tokens: int, dim: int, threads: int = 1, repeats: int = 7) -> dict[str, float]:
    """Milliseconds per block product for each kernel this torch has, run as the scan runs them:
    `threads` blocks at once, one per thread (what one core's memory bandwidth and caches give a
    kernel depends on what the others do). The kernels take turns, and each keeps its best of
    `repeats`: on a shared machine other work only ever adds time."""
    generator = torch.Generator().manual_seed(0)
    blocks = [
        torch.randint(-127, 128, (block_tokens, dim), dtype=torch.int8, generator=generator) for _ in range(threads)
    ]
    query = torch.randint(-127, 128, (TIMING_TOKENS, dim), dtype=torch.int8, generator=generator)
    prepared = {}
    for name in _available():
        kernel = KERNELS[name]
        try:
            prepared[name] = [kernel.prepare(block) for block in blocks]
            kernel.product(query, prepared[name][0])
        except (RuntimeError, AttributeError, NotImplementedError) as exc:  # torch deprecates quantized tensors
            log.warning("page scan kernel %s does not run here: %s", name, exc)
            prepared.pop(name, None)
    runs: dict[str, list[float]] = {name: [] for name in prepared}
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            for name, blocks_prepared in prepared.items():
                started = time.perf_counter()
                list(pool.map(KERNELS[name].product, [query] * threads, blocks_prepared))
                runs[name].append((time.perf_counter() - started) * 1000 / threads)
    timings = {name: min(times) for name, times in runs.items()}
    return timings


def choose(setting: str, block_tokens: int, threads: int = 1, dim: int = 128) -> tuple[Kernel, dict[str, float]]:
    """The kernel `setting` names, or for `auto` the fastest here, and the timings behind the
    choice. int8 stays unless another kernel takes under PREFER_INT8_BELOW of its time: fbgemm holds
    every code twice (packed as well), and its inexact products cost a recheck, which a product
    slightly faster loses again."""
    if setting != "auto":
        if setting not in _available():
            raise ValueError(f"EMBEDQ_SCAN_KERNEL={setting} is not available here; choose from {_available()}")
        return KERNELS[setting], {}
    timings = time_kernels(block_tokens, dim, threads)
    name = min(timings, key=timings.get)
    if "int8" in timings and timings[name] > PREFER_INT8_BELOW * timings["int8"]:
        name = "int8"
    log.info(
        "page scan kernel: %s on %s (ms per %d-token block, %d at once: %s)",
        name,
        torch.backends.cpu.get_cpu_capability(),
        block_tokens,
        threads,
        ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
    )
    return KERNELS[name], timings
