"""`gpunode sizing` command (run through the sizing sub-app)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from gpunode.sizing.cli import app

MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def test_table_and_recommendation():
    res = run(str(MODELS / "llama-3.1-70b-instruct-awq"), "--gpus", "2xA6000", "--ctx", "32768")
    assert res.exit_code == 0, res.output
    assert "Recommended service settings" in res.output
    assert "tensor_parallel_size: 2" in res.output
    assert "max_model_len: 32768" in res.output
    assert "18.5 GiB" in res.output  # weights per GPU at TP=2


def test_json_output():
    res = run(
        str(MODELS / "qwen2.5-32b-instruct"),
        "--gpus",
        "4xA6000",
        "--kv-cache-dtype",
        "fp8",
        "--json",
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert [o["tensor_parallel_size"] for o in doc["options"]] == [1, 2, 3, 4]
    assert [o["verdict"] for o in doc["options"]] == ["fails", "fits", "fails", "fits"]
    assert doc["options"][1]["kv_bytes_per_token"] == 128 * 1024  # fp8: half of 256 KiB
    rec = doc["recommendation"]
    assert rec["ok"] and rec["settings"]["tensor_parallel_size"] == 2
    assert rec["settings"]["kv_cache_dtype"] == "fp8" and rec["replicas"] == 2


def test_nothing_fits_exits_1():
    res = run(str(MODELS / "llama-3.1-70b-instruct"), "--gpus", "1xA6000")
    assert res.exit_code == 1
    assert "No configuration fits" in res.output


def test_bad_input_exits_2_without_traceback(tmp_path):
    res = run(str(MODELS / "llama-3.1-8b-instruct"), "--gpus", "2xA7000")
    assert res.exit_code == 2 and "unknown GPU 'A7000'" in res.output
    assert "Traceback" not in res.output
    res = run("org/not-cached", "--hf-home", str(tmp_path))
    assert res.exit_code == 2 and "no config.json for 'org/not-cached'" in res.output
    res = run(str(MODELS / "llama-3.1-8b-instruct"), "--kv-cache-dtype", "int3")
    assert res.exit_code == 2 and "kv_cache_dtype 'int3'" in res.output


def test_ecc_flag_uses_the_smaller_memory():
    args = [str(MODELS / "llama-3.1-70b-instruct-awq"), "--gpus", "1xA6000", "--ctx", "8192", "--json"]
    off = json.loads(run(*args).output)
    on = json.loads(run(*args, "--ecc").output)
    assert on["gpus"]["memory_mib"] == 46068 and off["gpus"]["memory_mib"] == 49140
    assert on["options"][0]["kv_capacity_tokens"] < off["options"][0]["kv_capacity_tokens"]
