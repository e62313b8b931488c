"""GPU memory figures the planner budgets with, and ``--gpus 2xA6000`` parsing."""

from __future__ import annotations

import re
from dataclasses import dataclass

from gpunode.sizing.shape import SizingError

__all__ = ["CUDA_RESERVED_MIB", "KNOWN_GPUS", "GpuSpec", "lookup_gpu", "parse_gpus"]

# nvidia-smi's memory.total minus what CUDA reports as the device total
# (torch.cuda.mem_get_info()[1], the figure vLLM multiplies by gpu_memory_utilization).
# `nvidia-smi -q` shows the difference as "FB Memory Usage / Reserved": 450 MiB on an
# RTX A6000 with ECC on (research/captures.md §5.1), 480 MiB on an H100 80GB
# (tests/fixtures/nvidia/h100_580.159.04/q.txt). RTX A6000 with ECC off: 49140 MiB vs
# PyTorch's "47.54 GiB total capacity" (48681 MiB) -> 459 MiB. That figure is the default
# for GPUs without their own [inferred].
CUDA_RESERVED_MIB = 459


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model. ``memory_mib`` is nvidia-smi's ``memory.total``; ``cuda_total_mib``
    the CUDA-visible total when measured (else ``memory_mib - CUDA_RESERVED_MIB``)."""

    name: str
    memory_mib: int
    cuda_total_mib: int | None = None
    compute_capability: str | None = None

    @property
    def usable_mib(self) -> int:
        if self.cuda_total_mib is not None:
            return self.cuda_total_mib
        return max(self.memory_mib - CUDA_RESERVED_MIB, 0)

    @property
    def usable_bytes(self) -> int:
        return self.usable_mib * 2**20

    @property
    def has_fp8_compute(self) -> bool:
        """FP8 tensor cores (Ada sm_89, Hopper sm_90 and newer); Ampere runs FP8 weight-only."""
        if not self.compute_capability:
            return False
        major, _, minor = self.compute_capability.partition(".")
        return (int(major), int(minor or 0)) >= (8, 9)


# Sources: research/captures.md (nvidia-smi captures) and domain.md §5.
KNOWN_GPUS: dict[str, GpuSpec] = {
    # 49140 MiB with ECC off (captures §1.1-1.4); CUDA total 47.54 GiB (PyTorch OOM text).
    "a6000": GpuSpec("NVIDIA RTX A6000", 49140, 48681, "8.6"),
    # ECC on: 46068 MiB, of which 450 MiB reserved (captures §1.5, §5.1).
    "a6000-ecc": GpuSpec("NVIDIA RTX A6000 (ECC on)", 46068, 46068 - 450, "8.6"),
    # L40S, ECC on: 46068 MiB (captures §3.3).
    "l40s": GpuSpec("NVIDIA L40S", 46068, None, "8.9"),
    # A100-SXM4-40GB: 40960 MiB (captures §1.8c).
    "a100-40gb": GpuSpec("NVIDIA A100 40GB", 40960, None, "8.0"),
    # A100 80GB: 81920 MiB (nominal 80 GiB; no capture in research/).
    "a100-80gb": GpuSpec("NVIDIA A100 80GB", 81920, None, "8.0"),
    # H100 80GB HBM3: 81559 MiB, 480 MiB reserved (captures §3.3; fixtures/nvidia q.txt).
    "h100-80gb": GpuSpec("NVIDIA H100 80GB", 81559, 81559 - 480, "9.0"),
    # RTX 3090: 24576 MiB (captures §1.7).
    "rtx3090": GpuSpec("NVIDIA GeForce RTX 3090", 24576, None, "8.6"),
}

_ALIASES = {
    "rtxa6000": "a6000",
    "a6000ecc": "a6000-ecc",
    "rtxa6000ecc": "a6000-ecc",
    "l40s": "l40s",
    "a10040gb": "a100-40gb",
    "a100sxm440gb": "a100-40gb",
    "a100pcie40gb": "a100-40gb",
    "a10080gb": "a100-80gb",
    "a100sxm480gb": "a100-80gb",
    "a100pcie80gb": "a100-80gb",
    "h100": "h100-80gb",
    "h10080gb": "h100-80gb",
    "h10080gbhbm3": "h100-80gb",
    "h100sxm": "h100-80gb",
    "3090": "rtx3090",
    "geforcertx3090": "rtx3090",
}

_MEM = re.compile(r"^(\d+(?:\.\d+)?)\s*(mib|gib|gb)$", re.IGNORECASE)
_COUNT = re.compile(r"^\s*(?:(\d+)\s*[x×*]\s*)?(.+?)\s*$", re.IGNORECASE)


def _key(name: str) -> str:
    text = name.lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]", "", text)


def lookup_gpu(name: str, ecc: bool | None = None) -> GpuSpec:
    """A known GPU by short or nvidia-smi name (``A6000``, ``NVIDIA RTX A6000``, ``h100``),
    or an ad-hoc one from a memory size (``48000MiB``, ``80GiB``: nvidia-smi figure).

    ``ecc=True`` picks the ECC-on memory figure where it differs (RTX A6000: 46068 MiB).
    """
    spec = _lookup(name)
    if ecc:
        for key, known in KNOWN_GPUS.items():
            if known is spec and f"{key}-ecc" in KNOWN_GPUS:
                return KNOWN_GPUS[f"{key}-ecc"]
    return spec


def _lookup(name: str) -> GpuSpec:
    text = name.strip()
    mem = _MEM.match(text.replace(" ", ""))
    if mem:
        value, unit = float(mem.group(1)), mem.group(2).lower()
        mib = int(value if unit == "mib" else value * 1024)
        if mib <= CUDA_RESERVED_MIB:
            raise SizingError(f"GPU memory '{name}' is too small to plan with")
        return GpuSpec(f"GPU with {mib} MiB", mib)
    key = _key(text)
    for k in KNOWN_GPUS:
        if key == _key(k):
            return KNOWN_GPUS[k]
    if key in _ALIASES:
        return KNOWN_GPUS[_ALIASES[key]]
    known = ", ".join(sorted(KNOWN_GPUS))
    hint = " (say a100-40gb or a100-80gb)" if key == "a100" else ""
    raise SizingError(
        f"unknown GPU '{name}'{hint}; known: {known}; or give the memory as nvidia-smi "
        "shows it, e.g. 2x49140MiB"
    )


def parse_gpus(text: str, ecc: bool | None = None) -> tuple[GpuSpec, int]:
    """Parse ``2xA6000`` / ``4x h100`` / ``A6000`` / ``2x49140MiB`` into (spec, count)."""
    m = _COUNT.match(text or "")
    if not m or not m.group(2):
        raise SizingError(f"cannot read GPUs '{text}'; write COUNTxNAME, e.g. 2xA6000")
    count = int(m.group(1) or 1)
    if count < 1:
        raise SizingError(f"GPU count in '{text}' must be at least 1")
    return lookup_gpu(m.group(2), ecc=ecc), count
