"""Read vLLM's start-up memory lines and correct the planner's overhead constant.

vLLM (V1 engine, 0.10-0.33) logs per worker ``Available KV cache memory: 44.59 GiB`` and
from the engine core ``GPU KV cache size: 973,760 tokens`` and ``Maximum concurrency for
262,144 tokens per request: 14.77x`` (research/captures.md §8.1/§8.2); each worker also
logs ``Model loading took 74.2812 GiB``. Newer builds join the two engine lines into one;
the patterns here match either form, with any journald/docker prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gpunode.sizing.gpus import GpuSpec
from gpunode.sizing.planner import (
    GIB,
    Overheads,
    kv_bytes_per_token,
    weight_bytes,
)
from gpunode.sizing.shape import ModelShape, QuantConfig, SizingError

__all__ = ["Calibration", "VllmMemoryLog", "calibrate", "parse_vllm_log"]

_AVAILABLE = re.compile(r"Available KV cache memory:\s*([\d.]+)\s*GiB")
_TOKENS = re.compile(r"GPU KV cache size:\s*([\d,]+)\s*tokens")
_CONCURRENCY = re.compile(r"Maximum concurrency for\s*([\d,]+)\s*tokens per request:\s*([\d.]+)x")
_LOADING = re.compile(r"Model loading took\s*([\d.]+)\s*GiB")
_BLOCKS = re.compile(r"num_gpu_blocks is:\s*(\d+)")


@dataclass(frozen=True)
class VllmMemoryLog:
    """What one vLLM start-up logged about memory (lists: one entry per worker line)."""

    available_kv_gib: tuple[float, ...] = ()
    kv_cache_tokens: int | None = None
    concurrency_tokens: int | None = None
    max_concurrency: float | None = None
    model_loading_gib: tuple[float, ...] = ()
    num_gpu_blocks: int | None = None

    @property
    def found(self) -> bool:
        return bool(self.available_kv_gib) or self.kv_cache_tokens is not None

    @property
    def min_available_kv_gib(self) -> float | None:
        """The smallest worker figure: vLLM sizes every rank's pool by the smallest."""
        return min(self.available_kv_gib) if self.available_kv_gib else None


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def parse_vllm_log(text: str) -> VllmMemoryLog:
    """Extract the memory lines from a vLLM start-up log (the last start-up if several)."""
    # Keep only the last start-up: a restart logs "Available KV cache memory" again.
    starts = [m.start() for m in re.finditer(r"vLLM API server version", text)]
    if len(starts) > 1:
        text = text[starts[-1] :]
    avail = [float(m.group(1)) for m in _AVAILABLE.finditer(text)]
    tokens = [_int(m.group(1)) for m in _TOKENS.finditer(text)]
    conc = list(_CONCURRENCY.finditer(text))
    loading = [float(m.group(1)) for m in _LOADING.finditer(text)]
    blocks = [int(m.group(1)) for m in _BLOCKS.finditer(text)]
    return VllmMemoryLog(
        available_kv_gib=tuple(avail),
        kv_cache_tokens=tokens[-1] if tokens else None,
        concurrency_tokens=_int(conc[-1].group(1)) if conc else None,
        max_concurrency=float(conc[-1].group(2)) if conc else None,
        model_loading_gib=tuple(loading),
        num_gpu_blocks=blocks[-1] if blocks else None,
    )


@dataclass(frozen=True)
class Calibration:
    """A measured overhead for one node/GPU/TP, and how the planner compared."""

    overhead_gib: float
    tp: int
    available_kv_gib: float
    weights_gib: float
    weights_measured: bool
    budget_gib: float
    kv_cache_tokens: int | None
    measured_bytes_per_token: float | None
    planned_bytes_per_token: int | None

    def overheads(self, base: Overheads | None = None) -> Overheads:
        """``base`` with this TP class's constant replaced by the measured one."""
        base = base or Overheads()
        if self.tp <= 1:
            return Overheads(tp1_gib=self.overhead_gib, tp_multi_gib=base.tp_multi_gib)
        return Overheads(tp1_gib=base.tp1_gib, tp_multi_gib=self.overhead_gib)


def calibrate(
    log: str | VllmMemoryLog,
    gpu: GpuSpec,
    tp: int,
    gpu_memory_utilization: float,
    shape: ModelShape | None = None,
    quant: QuantConfig | None = None,
    kv_cache_dtype: str = "auto",
) -> Calibration:
    """Overhead that explains a real start-up: ``budget − weights/GPU − available KV``.

    Weights come from the ``Model loading took`` line when logged, else from ``shape``.
    With ``shape`` the KV bytes per token measured (available KV / tokens) are returned
    next to the planner's figure, a check of the KV formula for that model.
    """
    parsed = parse_vllm_log(log) if isinstance(log, str) else log
    available = parsed.min_available_kv_gib
    if available is None:
        raise SizingError(
            "no 'Available KV cache memory: X GiB' line in the vLLM log; give the log of a "
            "complete start-up (journalctl -u vllm@NAME -b)"
        )
    if parsed.model_loading_gib:
        weights, measured = max(parsed.model_loading_gib), True
    elif shape is not None:
        weights, measured = weight_bytes(shape, quant or shape.quant) / tp / GIB, False
    else:
        raise SizingError(
            "the vLLM log has no 'Model loading took X GiB' line; pass the model shape so "
            "the weights per GPU can be computed"
        )
    budget = gpu.usable_bytes * gpu_memory_utilization / GIB
    overhead = budget - weights - available
    measured_bpt = None
    if parsed.kv_cache_tokens:
        measured_bpt = available * GIB / parsed.kv_cache_tokens
    planned_bpt = kv_bytes_per_token(shape, kv_cache_dtype, tp) if shape is not None else None
    return Calibration(
        overhead_gib=round(overhead, 3),
        tp=tp,
        available_kv_gib=available,
        weights_gib=round(weights, 3),
        weights_measured=measured,
        budget_gib=round(budget, 3),
        kv_cache_tokens=parsed.kv_cache_tokens,
        measured_bytes_per_token=measured_bpt,
        planned_bytes_per_token=planned_bpt,
    )
