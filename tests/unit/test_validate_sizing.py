"""`gpunode validate` runs the sizing planner on services whose model config is local."""

from pathlib import Path

import yaml
from typer.testing import CliRunner

from gpunode.cli.main import app

MODELS = Path(__file__).resolve().parent.parent / "fixtures" / "models"


def site_with(tmp_path: Path, model: str, gpus: int, tp: int, **extra) -> Path:
    service = {"name": "svc", "model": str(MODELS / model), "gpus": list(range(gpus)),
               "tensor_parallel_size": tp, **extra}
    site = {"nodes": {"gpu01": {"connection": {"address": "gpu01"},
                                "gpus": {"count": gpus}, "vllm": {"services": [service]}}}}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(site))
    return path


def run(path: Path):
    return CliRunner().invoke(app, ["validate", "--site", str(path)])


def test_rejects_qwen32b_at_tp3(tmp_path):
    result = run(site_with(tmp_path, "qwen2.5-32b-instruct", 3, 3, max_model_len=8192))
    assert result.exit_code == 2, result.output
    assert "nodes.gpu01.vllm.services[0]" in result.output
    assert "attention heads" in result.output


def test_rejects_llama70b_bf16_on_two_a6000(tmp_path):
    result = run(site_with(tmp_path, "llama-3.1-70b-instruct", 2, 2, max_model_len=8192))
    assert result.exit_code == 2, result.output
    assert "GiB" in result.output


def test_accepts_llama70b_awq_tp2_32k(tmp_path):
    result = run(site_with(tmp_path, "llama-3.1-70b-instruct-awq", 2, 2, max_model_len=32768,
                           quantization="awq_marlin"))
    assert result.exit_code == 0, result.output
    assert "valid" in result.output
