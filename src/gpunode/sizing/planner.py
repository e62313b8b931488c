"""vLLM memory planner: weights, KV cache, token capacity and a verdict per TP size.

Model of vLLM 0.33's budgeting (research/domain.md §4.3), per GPU of one service::

    budget   = cuda_total × gpu_memory_utilization
    kv       = budget − weights/TP − overhead(TP)
    capacity = kv / kv_bytes_per_token_per_gpu        (tokens, per replica)

Constants and rules (each overridable through :class:`Overheads` or arguments):

* ``overhead`` — activations of the profiling pass, CUDA-graph estimate, cuBLAS/NCCL
  workspaces: **2.0 GiB at TP=1, 2.5 GiB at TP>1** (NCCL buffers), domain.md §4.3/§4.4
  [inferred; correct per node with :func:`gpunode.sizing.vllm_log.calibrate`].
* Weights: 16-bit = 2 B/param; AWQ/GPTQ int``b`` with group ``g`` store
  ``b + (16 + b)/g`` bits per linear weight (scale fp16 + packed zero per group; AWQ int4
  g128 = 4.16 bits); FP8 (checkpoint or ``quantization=fp8``) = 1 B/linear weight, on
  Ampere through Marlin weight-only (W8A16); bitsandbytes NF4 = 4.5 bits (4.13 with double
  quant). Embeddings, lm_head, norms, routers stay 16-bit. MoE: all experts resident.
  Weights (including embeddings) are split evenly over TP ranks.
* KV bytes per token per GPU = ``2 × layers × max(1, kv_heads // TP) × head_dim × b``,
  ``b`` = 2 (auto/bf16/fp16) or 1 (fp8*). TP > kv_heads replicates KV heads. MLA models:
  ``layers × (kv_lora_rank + qk_rope_head_dim) × b``, not split by TP.
* Verdict: **fails** when the service cannot start (invalid TP, too few GPUs, weights
  and overhead exceed the budget, KV capacity < one ``max_model_len`` sequence,
  ``max_model_len`` beyond the model's limit, quantization mismatch); **tight** when it
  starts with little headroom: capacity < ``TIGHT_MIN_SEQS`` (2) full-length sequences,
  or ``gpu_memory_utilization`` > ``UTILIZATION_WARN`` (0.95: leaves < 5 % for the CUDA
  context and fragmentation; research advises a 10-20 % margin); else **fits**.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from gpunode.sizing.gpus import GpuSpec
from gpunode.sizing.shape import ModelShape, QuantConfig, SizingError

__all__ = [
    "DEFAULT_GPU_MEMORY_UTILIZATION",
    "DEFAULT_TARGET_CTX",
    "Finding",
    "KV_CACHE_DTYPES",
    "Overheads",
    "Plan",
    "Recommendation",
    "TIGHT_MIN_SEQS",
    "UTILIZATION_WARN",
    "check_model_service",
    "check_service",
    "effective_quant",
    "kv_bytes_per_token",
    "kv_heads_per_gpu",
    "options",
    "plan",
    "recommend",
    "tp_problems",
    "valid_tp_sizes",
    "weight_bytes",
]

GIB = 2**30
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92  # gpunode service default (vLLM alone: 0.90)
TIGHT_MIN_SEQS = 2.0
UTILIZATION_WARN = 0.95
DEFAULT_TARGET_CTX = 32768  # recommend(): context aimed at when none is asked for
AVG_REQUEST_TOKENS = 4096  # recommend(): typical tokens held per running sequence
MAX_NUM_SEQS_CAP = 256  # recommend(): upper bound for max_num_seqs
STANDARD_LENS = (131072, 65536, 32768, 16384, 8192, 4096, 2048)

# kv_cache_dtype values of vLLM 0.33 and their bytes per element (None: model dtype).
KV_CACHE_DTYPES: dict[str, int | None] = {
    "auto": None,
    "bfloat16": 2,
    "float16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "fp8_inc": 1,
    "fp8_ds_mla": 1,
}
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 2, "float": 2}
# quantization= values that only pick a kernel for a checkpoint's own method.
_QUANT_COMPAT = {
    "awq": {"awq", "awq_marlin"},
    "gptq": {"gptq", "gptq_marlin"},
    "fp8": {"fp8"},
    "bitsandbytes": {"bitsandbytes"},
    "compressed-tensors": {"compressed-tensors"},
}
# quantization= values vLLM can apply to an unquantized 16-bit checkpoint at load time.
_ONLINE_QUANT = {
    "fp8": QuantConfig("fp8", 8),
    "bitsandbytes": QuantConfig("bitsandbytes", 4, None, False, 32 / 64),
}

Level = Literal["error", "warning"]
Verdict = Literal["fits", "tight", "fails"]


@dataclass(frozen=True)
class Finding:
    """One problem: ``error`` means vLLM will not start; ``warning`` it starts, but..."""

    level: Level
    message: str
    code: str = ""

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


@dataclass(frozen=True)
class Overheads:
    """Per-GPU memory vLLM uses besides weights and KV cache (GiB)."""

    tp1_gib: float = 2.0
    tp_multi_gib: float = 2.5

    def for_tp(self, tp: int) -> float:
        return self.tp1_gib if tp <= 1 else self.tp_multi_gib


@dataclass(frozen=True)
class Plan:
    """The memory picture of one vLLM service (one replica of ``tp`` GPUs)."""

    model: str
    gpu: GpuSpec
    n_gpus: int
    tp: int
    max_model_len: int
    gpu_memory_utilization: float
    kv_cache_dtype: str
    quantization: str | None
    max_num_seqs: int | None
    weight_bytes_total: int
    weight_bytes_per_gpu: int
    overhead_bytes: int
    budget_bytes_per_gpu: int
    kv_bytes_per_gpu: int  # may be negative: the weights do not fit
    kv_bytes_per_token: int  # whole model
    kv_bytes_per_token_per_gpu: int
    capacity_tokens: int  # per replica
    tokens_per_seq: int  # max_model_len, capped by a sliding window
    replicas: int
    findings: tuple[Finding, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def verdict(self) -> Verdict:
        if self.errors:
            return "fails"
        return "tight" if self.warnings else "fits"

    @property
    def concurrency(self) -> float:
        """Full-length sequences the KV cache holds at once (vLLM's "Maximum concurrency")."""
        return self.capacity_tokens / self.tokens_per_seq if self.tokens_per_seq else 0.0

    def to_dict(self) -> dict[str, Any]:
        g = 1 / GIB
        return {
            "model": self.model,
            "gpu": self.gpu.name,
            "n_gpus": self.n_gpus,
            "tensor_parallel_size": self.tp,
            "replicas": self.replicas,
            "max_model_len": self.max_model_len,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "kv_cache_dtype": self.kv_cache_dtype,
            "quantization": self.quantization,
            "max_num_seqs": self.max_num_seqs,
            "weights_gib_total": round(self.weight_bytes_total * g, 2),
            "weights_gib_per_gpu": round(self.weight_bytes_per_gpu * g, 2),
            "overhead_gib_per_gpu": round(self.overhead_bytes * g, 2),
            "budget_gib_per_gpu": round(self.budget_bytes_per_gpu * g, 2),
            "kv_gib_per_gpu": round(self.kv_bytes_per_gpu * g, 2),
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_bytes_per_token_per_gpu": self.kv_bytes_per_token_per_gpu,
            "kv_capacity_tokens": self.capacity_tokens,
            "concurrency": round(self.concurrency, 2),
            "verdict": self.verdict,
            "notes": list(self.notes),
            "findings": [{"level": f.level, "code": f.code, "message": f.message} for f in self.findings],
        }


# -- building blocks --------------------------------------------------------------------------


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def effective_quant(shape: ModelShape, quantization: str | None) -> tuple[QuantConfig | None, list[Finding]]:
    """The weight quantization vLLM will use, and errors for impossible combinations."""
    findings: list[Finding] = []
    q = (quantization or "").strip().lower() or None
    if shape.quant is not None:
        if q is None or q in _QUANT_COMPAT.get(shape.quant.method, {shape.quant.method}):
            return shape.quant, findings
        findings.append(
            Finding(
                "error",
                f"quantization '{q}' does not match the checkpoint's quantization_config "
                f"('{shape.quant.method}'); drop quantization or set it to "
                + " or ".join(sorted(_QUANT_COMPAT.get(shape.quant.method, {shape.quant.method}))),
                "quantization-mismatch",
            )
        )
        return shape.quant, findings
    if q is None:
        return None, findings
    if q in _ONLINE_QUANT:
        return _ONLINE_QUANT[q], findings
    findings.append(
        Finding(
            "error",
            f"quantization '{q}' needs a checkpoint quantized with it, but {shape.name} has no "
            "quantization_config; use a pre-quantized model or quantization fp8/bitsandbytes",
            "quantization-needs-checkpoint",
        )
    )
    return None, findings


def weight_bytes(shape: ModelShape, quant: QuantConfig | None = None) -> int:
    """Bytes of all weights as loaded by vLLM (all experts for MoE)."""
    dense_b = _DTYPE_BYTES.get(shape.torch_dtype.removeprefix("torch."), 2)
    if quant is None:
        return shape.num_parameters * dense_b
    bits = quant.bits_per_weight(in_features=shape.hidden_size)
    return math.ceil(shape.quantizable_params() * bits / 8) + shape.unquantized_params() * 2


def kv_dtype_bytes(shape: ModelShape, kv_cache_dtype: str) -> int:
    key = (kv_cache_dtype or "auto").lower()
    if key not in KV_CACHE_DTYPES:
        raise SizingError(
            f"kv_cache_dtype '{kv_cache_dtype}' is not one vLLM 0.33 accepts; "
            f"use one of {', '.join(KV_CACHE_DTYPES)}"
        )
    b = KV_CACHE_DTYPES[key]
    return b if b is not None else _DTYPE_BYTES.get(shape.torch_dtype.removeprefix("torch."), 2)


def kv_heads_per_gpu(shape: ModelShape, tp: int) -> int:
    """KV heads each rank holds: split when kv_heads ≥ TP, else one replicated head."""
    return max(1, shape.num_key_value_heads // tp)


def kv_bytes_per_token(shape: ModelShape, kv_cache_dtype: str = "auto", tp: int = 1) -> int:
    """KV cache bytes per token on one GPU of a TP group (tp=1: the whole model)."""
    b = kv_dtype_bytes(shape, kv_cache_dtype)
    if shape.is_mla:
        return shape.num_hidden_layers * (shape.kv_lora_rank + (shape.qk_rope_head_dim or 0)) * b
    return 2 * shape.num_hidden_layers * kv_heads_per_gpu(shape, tp) * shape.head_dim * b


def tp_problems(shape: ModelShape, tp: int, quant: QuantConfig | None = None) -> list[Finding]:
    """Why vLLM would refuse this tensor-parallel size (empty list: it is valid)."""
    out: list[Finding] = []
    if tp < 1:
        return [Finding("error", f"tensor_parallel_size must be ≥ 1, got {tp}", "tp-invalid")]
    heads, kv = shape.num_attention_heads, shape.num_key_value_heads
    if heads % tp:
        valid = ", ".join(
            str(t)
            for t in range(1, min(heads, 64) + 1)
            if heads % t == 0 and (shape.is_mla or kv % t == 0 or t % kv == 0)
        )
        out.append(
            Finding(
                "error",
                f"tensor_parallel_size {tp} does not divide the {heads} attention heads of "
                f"{shape.name}; valid sizes: {valid}",
                "tp-heads",
            )
        )
    elif not shape.is_mla and kv % tp and tp % kv:
        out.append(
            Finding(
                "error",
                f"tensor_parallel_size {tp} neither divides nor is a multiple of the {kv} KV heads "
                f"of {shape.name}",
                "tp-kv-heads",
            )
        )
    if quant is not None and quant.group_size and quant.group_size > 0 and quant.bits < 8:
        inter = shape.moe_intermediate_size or shape.intermediate_size
        if tp > 1 and (inter % tp or (inter // tp) % quant.group_size):
            out.append(
                Finding(
                    "error",
                    f"with tensor_parallel_size {tp} the row-parallel MLP input ({inter}/{tp}) is "
                    f"not a multiple of the quantization group size {quant.group_size}",
                    "tp-group-size",
                )
            )
    return out


def valid_tp_sizes(shape: ModelShape, max_tp: int, quantization: str | None = None) -> list[int]:
    quant, _ = effective_quant(shape, quantization)
    return [t for t in range(1, max_tp + 1) if not tp_problems(shape, t, quant)]


# -- the plan -----------------------------------------------------------------------------------


def plan(
    shape: ModelShape,
    gpu: GpuSpec,
    n_gpus: int | None = None,
    tp: int = 1,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    kv_cache_dtype: str = "auto",
    quantization: str | None = None,
    max_num_seqs: int | None = None,
    overheads: Overheads | None = None,
) -> Plan:
    """Size one service: ``tp`` GPUs (of ``n_gpus`` available) serving ``shape``."""
    overheads = overheads or Overheads()
    n_gpus = tp if n_gpus is None else n_gpus
    if not 0 < gpu_memory_utilization <= 1:
        raise SizingError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    findings: list[Finding] = []
    quant, qf = effective_quant(shape, quantization)
    findings += qf
    findings += tp_problems(shape, tp, quant)
    tp_eff = max(tp, 1)
    if n_gpus < tp_eff:
        findings.append(
            Finding(
                "error",
                f"tensor_parallel_size {tp} needs {tp} GPUs but only {n_gpus} are available",
                "tp-gpus",
            )
        )

    default_len = shape.max_model_len_default
    mml = max_model_len or default_len
    if mml is None:
        raise SizingError(f"{shape.name}: config.json has no max_position_embeddings; give max_model_len")
    if default_len and mml > default_len:
        findings.append(
            Finding(
                "error",
                f"max_model_len {_fmt_int(mml)} exceeds the model's maximum "
                f"{_fmt_int(default_len)} "
                "(vLLM refuses it unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1); lower max_model_len",
                "max-model-len-limit",
            )
        )

    w_total = weight_bytes(shape, quant)
    w_gpu = math.ceil(w_total / tp_eff)
    overhead = int(overheads.for_tp(tp_eff) * GIB)
    budget = math.ceil(gpu.usable_bytes * gpu_memory_utilization)
    kv_gpu = budget - w_gpu - overhead
    per_tok_model = kv_bytes_per_token(shape, kv_cache_dtype, 1)
    per_tok_gpu = kv_bytes_per_token(shape, kv_cache_dtype, tp_eff)
    capacity = max(kv_gpu, 0) // per_tok_gpu
    tokens_per_seq = min(mml, shape.sliding_window) if shape.sliding_window else mml

    util_hint = "raise gpu_memory_utilization" if gpu_memory_utilization < 0.95 else ""
    if kv_gpu <= 0:
        hints = [
            h
            for h in (
                f"more GPUs (tensor_parallel_size > {tp})" if n_gpus > tp else "",
                "a quantized checkpoint (AWQ/GPTQ/FP8)" if quant is None else "",
                util_hint,
            )
            if h
        ]
        findings.append(
            Finding(
                "error",
                f"weights {_gib(w_gpu)}/GPU + overhead {_gib(overhead)} exceed the "
                f"{_gib(budget)} budget ({gpu.name}, {gpu.usable_mib} MiB × "
                f"{gpu_memory_utilization}); no room for KV cache"
                + (f"; try {' or '.join(hints)}" if hints else ""),
                "weights-exceed",
            )
        )
    elif capacity < tokens_per_seq:
        findings.append(
            Finding(
                "error",
                f"KV cache holds {_fmt_int(capacity)} tokens ({_gib(kv_gpu)}/GPU) but "
                f"max_model_len is {_fmt_int(mml)}; lower max_model_len to ≤ {_fmt_int(capacity)}"
                + (", raise tensor_parallel_size" if n_gpus > tp else "")
                + (", use kv_cache_dtype fp8" if kv_dtype_bytes(shape, kv_cache_dtype) > 1 else "")
                + (f" or {util_hint}" if util_hint else ""),
                "kv-too-small",
            )
        )
    elif capacity < TIGHT_MIN_SEQS * tokens_per_seq:
        findings.append(
            Finding(
                "warning",
                f"KV cache holds {_fmt_int(capacity)} tokens, only "
                f"{capacity / tokens_per_seq:.1f}× "
                f"max_model_len {_fmt_int(mml)}; long requests will queue — consider a lower "
                "max_model_len, kv_cache_dtype fp8 or more GPUs",
                "kv-tight",
            )
        )
    if gpu_memory_utilization > UTILIZATION_WARN:
        findings.append(
            Finding(
                "warning",
                f"gpu_memory_utilization {gpu_memory_utilization} leaves under "
                f"{(1 - gpu_memory_utilization) * 100:.0f}% of {gpu.name} for the CUDA context and "
                "other processes; start-up fails if anything else holds GPU memory",
                "utilization-high",
            )
        )
    if not shape.is_mla and tp_eff > shape.num_key_value_heads and not findings_have(findings, "tp-kv-heads"):
        findings.append(
            Finding(
                "warning",
                f"tensor_parallel_size {tp} > {shape.num_key_value_heads} KV heads: "
                "each KV head is "
                f"replicated {tp_eff // shape.num_key_value_heads}×, so extra GPUs add little KV "
                "capacity",
                "kv-replicated",
            )
        )
    for note in shape.approximate:
        findings.append(Finding("warning", f"{shape.name}: {note}", "approximate"))
    notes: list[str] = []
    if quant is not None and quant.method == "fp8" and not gpu.has_fp8_compute:
        notes.append(
            f"FP8 weights on {gpu.name} run weight-only (Marlin W8A16): 1 byte per weight, 16-bit compute"
        )
    if kv_dtype_bytes(shape, kv_cache_dtype) == 1 and not gpu.has_fp8_compute:
        notes.append(
            "FP8 KV cache without FP8 tensor cores: vLLM picks an attention backend that "
            "accepts it (Triton/FlashInfer); calibrated KV scales recommended for accuracy"
        )

    return Plan(
        model=shape.name,
        gpu=gpu,
        n_gpus=n_gpus,
        tp=tp,
        max_model_len=mml,
        gpu_memory_utilization=gpu_memory_utilization,
        kv_cache_dtype=kv_cache_dtype,
        quantization=quant.label if quant else None,
        max_num_seqs=max_num_seqs,
        weight_bytes_total=w_total,
        weight_bytes_per_gpu=w_gpu,
        overhead_bytes=overhead,
        budget_bytes_per_gpu=budget,
        kv_bytes_per_gpu=kv_gpu,
        kv_bytes_per_token=per_tok_model,
        kv_bytes_per_token_per_gpu=per_tok_gpu,
        capacity_tokens=capacity,
        tokens_per_seq=tokens_per_seq,
        replicas=max(n_gpus // tp_eff, 0),
        findings=tuple(findings),
        notes=tuple(notes),
    )


def findings_have(findings: list[Finding], code: str) -> bool:
    return any(f.code == code for f in findings)


def options(
    shape: ModelShape,
    gpu: GpuSpec,
    n_gpus: int,
    ctx: int | None = None,
    kv_cache_dtype: str = "auto",
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    quantization: str | None = None,
    max_num_seqs: int | None = None,
    overheads: Overheads | None = None,
) -> list[Plan]:
    """One plan per TP size 1..n_gpus (invalid sizes included, with their errors)."""
    if n_gpus < 1:
        raise SizingError(f"need at least one GPU, got {n_gpus}")
    return [
        plan(
            shape,
            gpu,
            n_gpus,
            tp,
            ctx,
            gpu_memory_utilization,
            kv_cache_dtype,
            quantization,
            max_num_seqs,
            overheads,
        )
        for tp in range(1, n_gpus + 1)
    ]


@dataclass(frozen=True)
class Recommendation:
    """Service settings the planner suggests, with the plan behind them."""

    plan: Plan | None
    settings: dict[str, Any] = field(default_factory=dict)
    replicas: int = 0
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.plan is not None and self.plan.verdict != "fails"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "settings": self.settings,
            "replicas": self.replicas,
            "notes": list(self.notes),
            "plan": self.plan.to_dict() if self.plan else None,
        }


def _suggest_max_num_seqs(capacity: int, ctx: int) -> int:
    """Sequences of typical length (min(ctx, 4096) tokens) that fit, capped at 256."""
    n = capacity // max(min(ctx, AVG_REQUEST_TOKENS), 1)
    n = max(1, min(n, MAX_NUM_SEQS_CAP))
    return n - n % 8 if n >= 16 else n


def recommend(
    shape: ModelShape,
    gpu: GpuSpec,
    n_gpus: int,
    ctx: int | None = None,
    kv_cache_dtype: str = "auto",
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    quantization: str | None = None,
    overheads: Overheads | None = None,
) -> Recommendation:
    """Pick the fewest GPUs per replica that hold ``ctx`` with headroom.

    Order: a plan that *fits* at the target context with the smallest TP; else the
    smallest-TP *tight* one; else the largest standard context (down to 2048) that fits.
    Target context: ``ctx``, or min(model maximum, 32768). Models that fit one GPU get
    TP=1 and one replica per GPU (data parallel beats TP over PCIe).
    """
    limit = shape.max_model_len_default or DEFAULT_TARGET_CTX
    target = ctx or min(limit, DEFAULT_TARGET_CTX)
    notes: list[str] = []
    if target > limit:
        notes.append(f"max_model_len {_fmt_int(target)} exceeds {shape.name}'s maximum {_fmt_int(limit)}")
        target = limit
    lens = [target] + [n for n in STANDARD_LENS if n < target]
    chosen: Plan | None = None
    for length in lens:
        plans = [
            p
            for p in options(
                shape,
                gpu,
                n_gpus,
                length,
                kv_cache_dtype,
                gpu_memory_utilization,
                quantization,
                None,
                overheads,
            )
            if not findings_have(list(p.errors), "tp-heads")
        ]
        chosen = next((p for p in plans if p.verdict == "fits"), None) or next(
            (p for p in plans if p.verdict == "tight"), None
        )
        if chosen is not None:
            if length != target:
                notes.append(
                    f"max_model_len {_fmt_int(target)} does not fit on {n_gpus}× "
                    f"{gpu.name}; lowered to {_fmt_int(length)}"
                )
            break
    if chosen is None:
        notes.append(
            f"{shape.name} does not fit on {n_gpus}× {gpu.name} at any TP size or "
            "context length ≥ 2048; use more or larger GPUs or a quantized checkpoint"
        )
        return Recommendation(None, {}, 0, tuple(notes))

    seqs = _suggest_max_num_seqs(chosen.capacity_tokens, chosen.tokens_per_seq)
    chosen = replace(chosen, max_num_seqs=seqs)
    replicas = n_gpus // chosen.tp
    if replicas > 1:
        notes.append(
            f"{replicas} replicas of TP={chosen.tp} (one service per GPU group); "
            "data parallel outperforms extra TP for a model that already fits"
        )
    if chosen.verdict == "tight":
        notes += [f.message for f in chosen.warnings]
    settings: dict[str, Any] = {
        "tensor_parallel_size": chosen.tp,
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_model_len": chosen.max_model_len,
        "max_num_seqs": seqs,
        "kv_cache_dtype": kv_cache_dtype,
    }
    if quantization:
        settings["quantization"] = quantization
    return Recommendation(chosen, settings, replicas, tuple(notes))


def check_service(
    shape: ModelShape,
    gpu: GpuSpec,
    tp: int = 1,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    kv_cache_dtype: str = "auto",
    quantization: str | None = None,
    n_gpus_on_service: int | None = None,
    max_num_seqs: int | None = None,
    overheads: Overheads | None = None,
) -> list[Finding]:
    """Validator entry point: findings for one configured service (errors = won't start).

    ``n_gpus_on_service`` may be a multiple of ``tp`` (data-parallel ranks of the same
    size); every rank is sized alike. Whether the count fits ``tp`` is not judged here:
    the profile's validator owns that rule.
    """
    n = tp if n_gpus_on_service is None else n_gpus_on_service
    try:
        p = plan(
            shape,
            gpu,
            n,
            tp,
            max_model_len,
            gpu_memory_utilization,
            kv_cache_dtype,
            quantization,
            max_num_seqs,
            overheads,
        )
    except SizingError as exc:
        return [Finding("error", str(exc), "invalid-input")]
    # How many GPUs a service lists is NodeProfile's rule (gpus lists exactly
    # tensor_parallel_size x the other parallel sizes); sizing judges memory only.
    return [f for f in p.findings if f.code != "tp-gpus"]


def check_model_service(
    model: str,
    gpu_name: str,
    tp: int = 1,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    kv_cache_dtype: str = "auto",
    quantization: str | None = None,
    n_gpus_on_service: int | None = None,
    max_num_seqs: int | None = None,
    revision: str | None = None,
    ecc: bool | None = None,
    hf_home: str | None = None,
    overheads: Overheads | None = None,
) -> list[Finding] | None:
    """:func:`check_service` from plain service fields; ``None`` when the model's
    config.json is not on this machine (the validator then skips sizing for it).

    An unknown GPU name or an unreadable config.json is reported as an error finding.
    """
    from gpunode.sizing.gpus import lookup_gpu
    from gpunode.sizing.shape import ModelConfigNotFound, load_model_config

    try:
        shape = load_model_config(model, hf_home=hf_home, revision=revision)
    except ModelConfigNotFound:
        return None
    except SizingError as exc:
        return [Finding("error", str(exc), "model-config")]
    try:
        gpu = lookup_gpu(gpu_name, ecc=ecc)
    except SizingError as exc:
        return [Finding("warning", f"sizing skipped: {exc}", "gpu-unknown")]
    return check_service(
        shape,
        gpu,
        tp,
        max_model_len,
        gpu_memory_utilization,
        kv_cache_dtype,
        quantization,
        n_gpus_on_service,
        max_num_seqs,
        overheads,
    )
