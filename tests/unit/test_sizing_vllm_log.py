"""vLLM start-up memory lines (real captures) and overhead calibration."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpunode.sizing import (
    GpuSpec,
    Overheads,
    SizingError,
    calibrate,
    load_model_config,
    lookup_gpu,
    parse_vllm_log,
    plan,
)
from gpunode.sizing.planner import GIB

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LOGS = FIXTURES / "sizing"
MODELS = FIXTURES / "models"


def test_parse_real_tp2_log():
    log = parse_vllm_log((LOGS / "vllm-0.10.2-tp2-h200.log").read_text())
    assert log.available_kv_gib == (44.59, 44.59)
    assert log.kv_cache_tokens == 973_760
    assert log.concurrency_tokens == 262_144
    assert log.max_concurrency == 14.77
    assert log.model_loading_gib == (74.2812, 74.2812)
    assert log.num_gpu_blocks == 7162
    assert log.found and log.min_available_kv_gib == 44.59


def test_parse_real_single_gpu_log_with_docker_prefix():
    log = parse_vllm_log((LOGS / "vllm-0.11.0rc2-single.log").read_text())
    assert log.available_kv_gib == (109.86,)
    assert log.kv_cache_tokens == 205_696
    assert (log.concurrency_tokens, log.max_concurrency) == (4096, 50.05)
    assert log.model_loading_gib == ()
    assert log.num_gpu_blocks == 89994


def test_parse_merged_line_of_newer_builds_and_restarts():
    text = (
        "(APIServer pid=1) INFO 01-01 00:00:00 [api_server.py:1] vLLM API server version 0.30.0\n"
        "(Worker pid=2) INFO [gpu_worker.py:1] Available KV cache memory: 10.00 GiB\n"
        "(APIServer pid=9) INFO 01-01 00:10:00 [api_server.py:1] vLLM API server version 0.33.0\n"
        "(Worker pid=10) INFO [gpu_worker.py:1] Available KV cache memory: 22.5 GiB\n"
        "(EngineCore pid=11) INFO [kv_cache_utils.py:1] GPU KV cache size: 147,456 tokens, "
        "Maximum concurrency for 32,768 tokens per request: 4.50x\n"
    )
    log = parse_vllm_log(text)
    assert log.available_kv_gib == (22.5,)  # only the last start-up
    assert (log.kv_cache_tokens, log.concurrency_tokens, log.max_concurrency) == (
        147_456,
        32_768,
        4.5,
    )


def test_parse_without_memory_lines():
    log = parse_vllm_log("INFO: Application startup complete.\n")
    assert not log.found and log.min_available_kv_gib is None


def test_calibrate_real_log_uses_measured_weights():
    # Simulated GPU total for the capture's H200s (no H200 capture in research/): 140 GiB.
    gpu = GpuSpec("H200 (simulated total)", 143_819, 143_360)
    cal = calibrate((LOGS / "vllm-0.10.2-tp2-h200.log").read_text(), gpu, tp=2, gpu_memory_utilization=0.9)
    assert cal.weights_measured and cal.weights_gib == 74.281
    assert cal.overhead_gib == pytest.approx(140 * 0.9 - 74.2812 - 44.59, abs=1e-3)
    assert cal.measured_bytes_per_token == pytest.approx(44.59 * GIB / 973_760)
    ov = cal.overheads()
    assert ov.tp1_gib == Overheads().tp1_gib and ov.tp_multi_gib == cal.overhead_gib


def test_calibrate_round_trip_recovers_overhead():
    """Simulated start-up: a log written from a plan with a known 3.1 GiB overhead."""
    shape = load_model_config(MODELS / "llama-3.1-70b-instruct-awq")
    gpu = lookup_gpu("A6000")
    truth = plan(shape, gpu, 2, 2, 32768, 0.92, overheads=Overheads(tp_multi_gib=3.1))
    kv_gib = truth.kv_bytes_per_gpu / GIB
    log = (
        f"(Worker_TP0 pid=1) INFO [gpu_worker.py:298] Available KV cache memory: {kv_gib:.2f} GiB\n"
        f"(Worker_TP1 pid=2) INFO [gpu_worker.py:298] Available KV cache memory: {kv_gib:.2f} GiB\n"
        f"(EngineCore_DP0 pid=3) INFO [kv_cache_utils.py:1028] GPU KV cache size: "
        f"{truth.capacity_tokens:,} tokens\n"
    )
    cal = calibrate(log, gpu, tp=2, gpu_memory_utilization=0.92, shape=shape)
    assert not cal.weights_measured
    assert cal.overhead_gib == pytest.approx(3.1, abs=0.01)
    assert cal.planned_bytes_per_token == truth.kv_bytes_per_token_per_gpu
    assert cal.measured_bytes_per_token == pytest.approx(truth.kv_bytes_per_token_per_gpu, rel=0.01)
    corrected = plan(shape, gpu, 2, 2, 32768, 0.92, overheads=cal.overheads())
    assert corrected.capacity_tokens == pytest.approx(truth.capacity_tokens, rel=0.01)


def test_calibrate_errors():
    gpu = lookup_gpu("A6000")
    with pytest.raises(SizingError, match="Available KV cache memory"):
        calibrate("nothing", gpu, 1, 0.9)
    with pytest.raises(SizingError, match="Model loading took"):
        calibrate("Available KV cache memory: 4.00 GiB", gpu, 1, 0.9)
