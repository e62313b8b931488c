"""Reading config.json: local dirs, the local Hugging Face cache, quantization configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gpunode.sizing import (
    ModelConfigError,
    ModelConfigNotFound,
    QuantConfig,
    SizingError,
    find_model_config,
    load_model_config,
    lookup_gpu,
    parse_gpus,
    shape_from_config,
)
from gpunode.sizing.planner import GIB, kv_bytes_per_token, weight_bytes

MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"
COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"


def test_head_dim_explicit_and_derived():
    explicit = load_model_config(MODELS / "llama-3.1-8b-instruct")
    derived = load_model_config(MODELS / "llama-3.1-70b-instruct")
    assert "head_dim" in explicit.raw and explicit.head_dim == 128
    assert "head_dim" not in derived.raw and derived.head_dim == 8192 // 64
    # An explicit head_dim wins over hidden/heads (e.g. Qwen3 / Gemma style configs).
    cfg = dict(explicit.raw, head_dim=256)
    assert shape_from_config(cfg).head_dim == 256
    assert kv_bytes_per_token(shape_from_config(cfg)) == 2 * kv_bytes_per_token(explicit)


def test_missing_kv_heads_means_mha():
    cfg = dict(load_model_config(MODELS / "llama-3.1-8b-instruct").raw)
    del cfg["num_key_value_heads"]
    s = shape_from_config(cfg)
    assert s.num_key_value_heads == 32
    assert kv_bytes_per_token(s) == 2 * 32 * 32 * 128 * 2


def test_config_file_path_and_names():
    s = load_model_config(MODELS / "mixtral-8x7b-instruct-v0.1" / "config.json")
    assert s.name == "mixtral-8x7b-instruct-v0.1"
    assert s.num_experts == 8 and s.num_experts_per_tok == 2
    assert s.sliding_window is None
    assert s.max_model_len_default == 32768


def test_qwen_sliding_window_disabled_and_default_len():
    s = load_model_config(MODELS / "qwen2.5-32b-instruct")
    assert s.sliding_window is None  # use_sliding_window: false
    assert s.max_model_len_default == 32768
    yarn = dict(
        s.raw,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    )
    assert shape_from_config(yarn).max_model_len_default == 131072


def _hf_cache(tmp_path: Path, repo: str = "meta-llama/Llama-3.1-8B-Instruct") -> Path:
    hub = tmp_path / "hf" / "hub"
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    for commit, src in ((COMMIT_A, "llama-3.1-8b-instruct"), (COMMIT_B, "llama-3.1-70b-instruct")):
        snap = repo_dir / "snapshots" / commit
        snap.mkdir(parents=True)
        shutil.copy(MODELS / src / "config.json", snap / "config.json")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT_A)
    (repo_dir / "refs" / "v70").write_text(COMMIT_B + "\n")
    return tmp_path / "hf"


def test_hf_cache_layout_and_revisions(tmp_path, monkeypatch):
    hf_home = _hf_cache(tmp_path)
    repo = "meta-llama/Llama-3.1-8B-Instruct"
    assert load_model_config(repo, hf_home=hf_home).num_hidden_layers == 32
    assert load_model_config(repo, hf_home=hf_home, revision=COMMIT_B).num_hidden_layers == 80
    assert load_model_config(repo, hf_home=hf_home, revision="v70").num_hidden_layers == 80
    # the hub directory itself is accepted, and HF_HOME from the environment
    assert load_model_config(repo, hf_home=hf_home / "hub").num_hidden_layers == 32
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    assert load_model_config(repo).num_hidden_layers == 32
    with pytest.raises(ModelConfigNotFound, match="revision 'nope'"):
        load_model_config(repo, revision="nope")
    assert find_model_config(repo, revision="c" * 40) is None


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelConfigNotFound) as exc:
        load_model_config("org/absent", hf_home=tmp_path)
    msg = str(exc.value)
    assert "org/absent" in msg and str(tmp_path) in msg and "download" in msg
    assert find_model_config(tmp_path / "nothing-here") is None


def test_unusable_config_errors(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="cannot read"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4096}))
    with pytest.raises(ModelConfigError, match="num_hidden_layers"):
        load_model_config(tmp_path)


@pytest.mark.parametrize(
    ("qc", "expected"),
    [
        (
            {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True},
            QuantConfig("awq", 4, 128, True),
        ),
        (
            {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False},
            QuantConfig("gptq", 4, 32, True),
        ),
        ({"quant_method": "gptq", "bits": 8, "group_size": -1}, QuantConfig("gptq", 8, -1, True)),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, QuantConfig("fp8", 8)),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {
                    "group_0": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}
                },
            },
            QuantConfig("fp8", 8),
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {
                    "group_0": {
                        "weights": {
                            "num_bits": 4,
                            "type": "int",
                            "strategy": "group",
                            "group_size": 128,
                            "symmetric": True,
                        }
                    }
                },
            },
            QuantConfig("compressed-tensors", 4, 128, False),
        ),
        (
            {"quant_method": "bitsandbytes", "load_in_4bit": True},
            QuantConfig("bitsandbytes", 4, None, False, 0.5),
        ),
    ],
)
def test_quantization_configs(qc, expected):
    cfg = dict(load_model_config(MODELS / "llama-3.1-8b-instruct").raw, quantization_config=qc)
    assert shape_from_config(cfg).quant == expected


def test_bits_per_weight():
    assert QuantConfig("awq", 4, 128, True).bits_per_weight() == pytest.approx(4.15625)
    assert QuantConfig("gptq", 4, 32, True).bits_per_weight() == pytest.approx(4.625)
    assert QuantConfig("fp8", 8).bits_per_weight() == 8
    # FP8 weight-only on Ampere (Marlin W8A16): the 8B stores ~1 byte per linear weight
    s = load_model_config(MODELS / "llama-3.1-8b-instruct")
    fp8 = weight_bytes(s, QuantConfig("fp8", 8)) / GIB
    expected = (s.quantizable_params() + 2 * s.unquantized_params()) / GIB
    assert fp8 == pytest.approx(expected, rel=5e-3)  # + per-channel scales


def test_unknown_quant_method_is_reported():
    cfg = dict(
        load_model_config(MODELS / "llama-3.1-8b-instruct").raw,
        quantization_config={"quant_method": "exl9"},
    )
    with pytest.raises(ModelConfigError, match="exl9"):
        shape_from_config(cfg, source="x/config.json")


def test_mla_and_hybrid_are_flagged_approximate():
    cfg = dict(
        load_model_config(MODELS / "llama-3.1-8b-instruct").raw,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
    )
    s = shape_from_config(cfg)
    assert s.is_mla and s.approximate
    assert kv_bytes_per_token(s, "auto", 4) == 32 * (512 + 64) * 2


# -- GPUs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "count", "mib"),
    [
        ("2xA6000", "NVIDIA RTX A6000", 2, 49140),
        ("A6000", "NVIDIA RTX A6000", 1, 49140),
        ("4 x NVIDIA RTX A6000", "NVIDIA RTX A6000", 4, 49140),
        ("8xh100", "NVIDIA H100 80GB", 8, 81559),
        ("2xa100-80gb", "NVIDIA A100 80GB", 2, 81920),
        ("1xl40s", "NVIDIA L40S", 1, 46068),
        ("2x49140MiB", "GPU with 49140 MiB", 2, 49140),
    ],
)
def test_parse_gpus(text, name, count, mib):
    gpu, n = parse_gpus(text)
    assert (gpu.name, n, gpu.memory_mib) == (name, count, mib)


def test_gpu_usable_memory():
    a6000 = lookup_gpu("rtx a6000")
    assert a6000.usable_mib == 48681  # 47.54 GiB, what CUDA reports
    assert lookup_gpu("a6000-ecc").usable_mib == 46068 - 450  # "Reserved : 450 MiB"
    assert lookup_gpu("h100").usable_mib == 81079  # nvidia-smi -q Free on an idle H100
    assert lookup_gpu("l40s").usable_mib == 46068 - 459  # default reservation
    assert not a6000.has_fp8_compute and lookup_gpu("l40s").has_fp8_compute
    assert lookup_gpu("NVIDIA RTX A6000", ecc=True).memory_mib == 46068
    assert lookup_gpu("NVIDIA RTX A6000", ecc=False) is a6000
    assert lookup_gpu("h100", ecc=True).memory_mib == 81559


@pytest.mark.parametrize("text", ["", "0xA6000", "2xA7000", "a100", "2x100MiB"])
def test_parse_gpus_rejects(text):
    with pytest.raises(SizingError):
        parse_gpus(text)
