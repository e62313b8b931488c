"""vLLM sizing: will a model fit, at which tensor-parallel size, with which settings.

Pure functions over a model's ``config.json`` and GPU memory figures; no network, no GPU.
See :mod:`gpunode.sizing.planner` for the memory model, constants and verdict rules.
"""

from gpunode.sizing.gpus import CUDA_RESERVED_MIB, KNOWN_GPUS, GpuSpec, lookup_gpu, parse_gpus
from gpunode.sizing.planner import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    Finding,
    Overheads,
    Plan,
    Recommendation,
    check_model_service,
    check_service,
    kv_bytes_per_token,
    options,
    plan,
    recommend,
    valid_tp_sizes,
    weight_bytes,
)
from gpunode.sizing.shape import (
    ModelConfigError,
    ModelConfigNotFound,
    ModelShape,
    QuantConfig,
    SizingError,
    find_model_config,
    load_model_config,
    shape_from_config,
)
from gpunode.sizing.vllm_log import Calibration, VllmMemoryLog, calibrate, parse_vllm_log

__all__ = [
    "CUDA_RESERVED_MIB",
    "DEFAULT_GPU_MEMORY_UTILIZATION",
    "KNOWN_GPUS",
    "Calibration",
    "Finding",
    "GpuSpec",
    "ModelConfigError",
    "ModelConfigNotFound",
    "ModelShape",
    "Overheads",
    "Plan",
    "QuantConfig",
    "Recommendation",
    "SizingError",
    "VllmMemoryLog",
    "calibrate",
    "check_model_service",
    "check_service",
    "find_model_config",
    "kv_bytes_per_token",
    "load_model_config",
    "lookup_gpu",
    "options",
    "parse_gpus",
    "parse_vllm_log",
    "plan",
    "recommend",
    "shape_from_config",
    "valid_tp_sizes",
    "weight_bytes",
]
