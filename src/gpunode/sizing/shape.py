"""Model shapes: what the planner needs from a Hugging Face ``config.json``.

Reads a local directory, a ``config.json`` file, or a model in a local Hugging Face
cache (``<hub>/models--org--name/snapshots/<commit>/config.json``). Never the network.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ModelConfigError",
    "ModelConfigNotFound",
    "ModelShape",
    "QuantConfig",
    "SizingError",
    "find_model_config",
    "hf_hub_cache_dir",
    "load_model_config",
    "shape_from_config",
]


class SizingError(ValueError):
    """Bad input to the sizing planner; the message says what and what to do."""


class ModelConfigNotFound(SizingError):
    """No config.json for the model on this machine."""


class ModelConfigError(SizingError):
    """A config.json exists but lacks what the planner needs."""


# Families whose MLP is not gated (two matrices instead of gate/up/down).
_UNGATED_MODEL_TYPES = frozenset(
    {"gpt2", "gpt_neox", "gptj", "falcon", "opt", "bloom", "starcoder2", "gpt_bigcode", "phi"}
)
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class QuantConfig:
    """Weight quantization of a checkpoint (or requested at load time).

    ``method`` is the vLLM quantization name family: ``awq``, ``gptq``, ``fp8``,
    ``bitsandbytes``, ``compressed-tensors``. ``bits`` is the stored width of a quantized
    linear weight; ``group_size`` the number of weights sharing one scale (``None`` for
    per-channel or per-tensor scales); ``zero_point`` whether a packed zero point is stored
    per group; ``extra_bits`` a per-weight overhead that is not a group scale (bitsandbytes
    block absmax).
    """

    method: str
    bits: int
    group_size: int | None = None
    zero_point: bool = False
    extra_bits: float = 0.0

    def bits_per_weight(self, in_features: int | None = None) -> float:
        """Average stored bits per quantized linear weight, scales and zeros included."""
        b = float(self.bits) + self.extra_bits
        group = self.group_size
        if group is None or group <= 0:
            # Per output channel: one scale per input row; negligible unless told the width.
            group = in_features or 0
        if group:
            b += (16.0 + (self.bits if self.zero_point else 0.0)) / group
        return b

    @property
    def label(self) -> str:
        if self.method in {"awq", "gptq"} or (self.method == "compressed-tensors" and self.bits < 8):
            g = f"-g{self.group_size}" if self.group_size and self.group_size > 0 else ""
            return f"{self.method}-int{self.bits}{g}"
        if self.method == "bitsandbytes":
            return f"bitsandbytes-{self.bits}bit"
        return self.method


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that decide its memory footprint."""

    name: str
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = None
    max_model_len_default: int | None = None
    torch_dtype: str = "bfloat16"
    quant: QuantConfig | None = None
    num_experts: int = 1
    num_experts_per_tok: int = 1
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int = 0
    sliding_window: int | None = None
    attention_bias: bool = False
    gated_mlp: bool = True
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    approximate: tuple[str, ...] = ()
    source: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # -- parameter counts ------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    def attention_linear_params(self) -> int:
        """q, k, v and o projections of one layer (weights only)."""
        h, hd = self.hidden_size, self.head_dim
        q = h * self.num_attention_heads * hd
        kv = 2 * h * self.num_key_value_heads * hd
        o = self.num_attention_heads * hd * h
        return q + kv + o

    def mlp_linear_params(self) -> int:
        """MLP (all experts resident for MoE) of one layer, weights only."""
        mats = 3 if self.gated_mlp else 2
        if self.is_moe:
            inter = self.moe_intermediate_size or self.intermediate_size
            experts = self.num_experts * mats * self.hidden_size * inter
            shared = mats * self.hidden_size * self.shared_expert_intermediate_size
            return experts + shared
        return mats * self.hidden_size * self.intermediate_size

    def quantizable_params(self) -> int:
        """Parameters of the decoder-layer linears: what AWQ/GPTQ/FP8 quantize."""
        return self.num_hidden_layers * (self.attention_linear_params() + self.mlp_linear_params())

    def unquantized_params(self) -> int:
        """Embeddings, lm_head, norms, biases and MoE routers: kept in 16-bit."""
        h, L = self.hidden_size, self.num_hidden_layers
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        norms = L * 2 * h + h
        bias = 0
        if self.attention_bias:
            bias = L * (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        router = L * h * self.num_experts if self.is_moe else 0
        return embed + norms + bias + router

    @property
    def num_parameters(self) -> int:
        return self.quantizable_params() + self.unquantized_params()

    @property
    def active_parameters(self) -> int:
        """Parameters used per token (MoE: top-k experts); informational."""
        if not self.is_moe:
            return self.num_parameters
        mats = 3 if self.gated_mlp else 2
        inter = self.moe_intermediate_size or self.intermediate_size
        inactive = (self.num_experts - self.num_experts_per_tok) * mats * self.hidden_size * inter
        return self.num_parameters - self.num_hidden_layers * inactive


# -- config.json → ModelShape -------------------------------------------------------------


def _req_int(cfg: dict[str, Any], key: str, where: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelConfigError(
            f"{where}: field '{key}' is missing or not a positive integer (got {value!r}); "
            "the planner needs it to size the model"
        )
    return value


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Multimodal wrappers keep the language model under ``text_config``."""
    text = cfg.get("text_config")
    if isinstance(text, dict) and "num_hidden_layers" not in cfg:
        merged = dict(text)
        for key in ("quantization_config", "torch_dtype", "tie_word_embeddings"):
            if key in cfg and key not in merged:
                merged[key] = cfg[key]
        return merged
    return cfg


def _parse_quant(qc: Any, where: str) -> QuantConfig | None:
    if not isinstance(qc, dict):
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method in {"awq", "awq_marlin"}:
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        group = int(qc.get("group_size", qc.get("q_group_size", 128)))
        return QuantConfig("awq", bits, group, bool(qc.get("zero_point", True)))
    if method in {"gptq", "gptq_marlin"}:
        bits = int(qc.get("bits", 4))
        group = int(qc.get("group_size", 128))
        # GPTQ checkpoints store packed qzeros for every group, symmetric or not.
        return QuantConfig("gptq", bits, group, True)
    if method in {"fp8", "fbgemm_fp8"}:
        return QuantConfig("fp8", 8, None, False)
    if method == "bitsandbytes":
        if qc.get("load_in_8bit"):
            return QuantConfig("bitsandbytes", 8, None, False)
        # NF4/FP4: one fp32 absmax per 64-weight block, or an 8-bit one with double quant.
        extra = 8 / 64 + 32 / (64 * 256) if qc.get("bnb_4bit_use_double_quant") else 32 / 64
        return QuantConfig("bitsandbytes", 4, None, False, extra)
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        for group in groups.values() if isinstance(groups, dict) else []:
            weights = group.get("weights") if isinstance(group, dict) else None
            if isinstance(weights, dict) and weights.get("num_bits"):
                bits = int(weights["num_bits"])
                gsize = weights.get("group_size")
                strategy = str(weights.get("strategy", ""))
                zp = not bool(weights.get("symmetric", True))
                if str(weights.get("type", "int")) == "float" and bits == 8:
                    return QuantConfig("fp8", 8, None, False)
                return QuantConfig(
                    "compressed-tensors",
                    bits,
                    int(gsize) if strategy == "group" and gsize else None,
                    zp,
                )
        raise ModelConfigError(
            f"{where}: quantization_config 'compressed-tensors' has no weight num_bits in "
            "config_groups; give --quantization explicitly or fix the config"
        )
    if method:
        raise ModelConfigError(
            f"{where}: quantization method '{method}' is not known to the planner "
            "(known: awq, gptq, fp8, bitsandbytes, compressed-tensors)"
        )
    return None


def _derived_max_len(cfg: dict[str, Any]) -> int | None:
    """vLLM's default max_model_len: max_position_embeddings, scaled for YaRN-style rope."""
    mpe = cfg.get("max_position_embeddings")
    if not isinstance(mpe, int):
        mpe = cfg.get("n_positions") or cfg.get("max_sequence_length") or cfg.get("seq_length")
    if not isinstance(mpe, int):
        return None
    rope = cfg.get("rope_scaling")
    if isinstance(rope, dict):
        kind = str(rope.get("rope_type", rope.get("type", "")))
        factor = rope.get("factor")
        # llama3/longrope/su configs already state the extended length.
        if kind not in {"", "default", "llama3", "longrope", "su", "mrope"} and isinstance(
            factor, int | float
        ):
            base = rope.get("original_max_position_embeddings", mpe) if kind == "yarn" else mpe
            return int(base * factor)
    return mpe


def shape_from_config(cfg: dict[str, Any], name: str = "model", source: str | None = None) -> ModelShape:
    """Build a :class:`ModelShape` from a parsed ``config.json``."""
    where = source or name
    full = cfg
    cfg = _text_config(cfg)
    approx: list[str] = []
    layers = _req_int(cfg, "num_hidden_layers", where)
    hidden = _req_int(cfg, "hidden_size", where)
    heads = _req_int(cfg, "num_attention_heads", where)
    kv_heads = cfg.get("num_key_value_heads") or heads
    if cfg.get("multi_query"):
        kv_heads = 1
    head_dim = cfg.get("head_dim")
    if not isinstance(head_dim, int) or head_dim <= 0:
        if hidden % heads:
            raise ModelConfigError(
                f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads "
                f"{heads} and no head_dim is given"
            )
        head_dim = hidden // heads
    inter = cfg.get("intermediate_size") or cfg.get("ffn_hidden_size") or 4 * hidden
    vocab = _req_int(cfg, "vocab_size", where)
    model_type = str(cfg.get("model_type", full.get("model_type", "unknown")))

    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
    experts = int(experts) if isinstance(experts, int) and experts > 1 else 1
    shared = 0
    moe_inter = cfg.get("moe_intermediate_size")
    if experts > 1:
        shared = int(cfg.get("shared_expert_intermediate_size") or 0)
        n_shared = cfg.get("n_shared_experts")
        if not shared and isinstance(n_shared, int) and n_shared > 0:
            shared = n_shared * int(moe_inter or inter)
        if (
            cfg.get("first_k_dense_replace")
            or cfg.get("mlp_only_layers")
            or (cfg.get("decoder_sparse_step", 1) not in (1, None))
        ):
            approx.append("some layers are dense MLP, counted as MoE: weights overestimated")

    window = cfg.get("sliding_window")
    if not isinstance(window, int) or window <= 0 or cfg.get("use_sliding_window") is False:
        window = None
    if window is not None and (cfg.get("layer_types") or cfg.get("sliding_window_pattern")):
        approx.append("mixed sliding/full attention layers: KV counted as all full attention")
        window = None
    if cfg.get("layers_block_type") or cfg.get("attn_type_list") or "mamba" in model_type:
        approx.append("hybrid attention/state-space layers: KV formula overestimates")
    kv_lora = cfg.get("kv_lora_rank")
    if isinstance(kv_lora, int):
        approx.append("MLA attention (latent KV): weight estimate is rough")

    tie = cfg.get("tie_word_embeddings", full.get("tie_word_embeddings", False))
    return ModelShape(
        name=name,
        model_type=model_type,
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=int(head_dim),
        intermediate_size=int(inter),
        vocab_size=vocab,
        tie_word_embeddings=bool(tie),
        max_position_embeddings=cfg.get("max_position_embeddings"),
        max_model_len_default=_derived_max_len(cfg),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        quant=_parse_quant(cfg.get("quantization_config"), where),
        num_experts=experts,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 1),
        moe_intermediate_size=int(moe_inter) if isinstance(moe_inter, int) else None,
        shared_expert_intermediate_size=shared,
        sliding_window=window,
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        gated_mlp=model_type not in _UNGATED_MODEL_TYPES,
        kv_lora_rank=kv_lora if isinstance(kv_lora, int) else None,
        qk_rope_head_dim=cfg.get("qk_rope_head_dim"),
        approximate=tuple(approx),
        source=source,
        raw=full,
    )


# -- locating config.json -------------------------------------------------------------------


def hf_hub_cache_dir(hf_home: str | os.PathLike[str] | None = None) -> Path:
    """The hub cache directory: ``hf_home/hub`` if given, else HF_HUB_CACHE, HF_HOME/hub,
    ~/.cache/huggingface/hub (same precedence as huggingface_hub)."""
    if hf_home is not None:
        base = Path(hf_home).expanduser()
        return base / "hub" if (base / "hub").is_dir() or not base.name == "hub" else base
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _cached_config(repo_id: str, hub: Path, revision: str | None) -> Path | None:
    repo_dir = hub / ("models--" + repo_id.replace("/", "--"))
    if not repo_dir.is_dir():
        return None
    snapshots = repo_dir / "snapshots"
    rev = revision or "main"
    if _HEX40.match(rev):
        commit = rev
    else:
        ref = repo_dir / "refs" / rev
        if ref.is_file():
            commit = ref.read_text().strip()
        elif revision is None and snapshots.is_dir() and len(list(snapshots.iterdir())) == 1:
            commit = next(snapshots.iterdir()).name
        else:
            return None
    path = snapshots / commit / "config.json"
    return path if path.is_file() else None


def find_model_config(
    path_or_repo_id: str | os.PathLike[str],
    hf_home: str | os.PathLike[str] | None = None,
    revision: str | None = None,
) -> Path | None:
    """Path of the model's config.json on this machine, or None."""
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        return p / "config.json" if (p / "config.json").is_file() else None
    if p.is_file():
        return p
    text = str(path_or_repo_id)
    if _REPO_ID.match(text):
        return _cached_config(text, hf_hub_cache_dir(hf_home), revision)
    return None


def load_model_config(
    path_or_repo_id: str | os.PathLike[str],
    hf_home: str | os.PathLike[str] | None = None,
    revision: str | None = None,
) -> ModelShape:
    """Read a model's shape from a local directory/file or the local HF cache.

    Raises :class:`ModelConfigNotFound` when there is no config.json on this machine and
    :class:`ModelConfigError` when it is unusable. Never touches the network.
    """
    path = find_model_config(path_or_repo_id, hf_home, revision)
    if path is None:
        rev = f" at revision '{revision}'" if revision else ""
        raise ModelConfigNotFound(
            f"no config.json for '{path_or_repo_id}'{rev}: not a local path and not in the "
            f"Hugging Face cache {hf_hub_cache_dir(hf_home)}; download it there first "
            "(e.g. `hf download <repo> config.json`) or pass a directory holding config.json"
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"{path}: cannot read config.json ({exc})") from None
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{path}: config.json is not a JSON object")
    name = str(path_or_repo_id)
    if Path(name).expanduser().exists():
        name = path.parent.name if path.name == "config.json" else path.stem
    return shape_from_config(cfg, name=name, source=str(path))
