"""The vLLM stand-in (SIMULATION): flag table, parsing, GPU checks, HTTP behaviour, wheel."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpunode.lab.sim import gpus as simgpus

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "src/gpunode/lab/sim/vllm_standin"
SMI = REPO / "src/gpunode/lab/sim/guest/nvidia-smi"
BOOT = REPO / "src/gpunode/lab/sim/guest/gpunode-sim-boot"
MODPROBE = REPO / "src/gpunode/lab/sim/guest/nvidia-modprobe"
#: The project's copy of vLLM 0.33.0's `serve` flag list (source: tests/fixtures/vllm/README.md).
FLAGS_FILE = REPO / "tests/fixtures/vllm/serve_flags-0.33.0.txt"
ENV_FILE = REPO / "tests/fixtures/vllm/env_vars-0.33.0.txt"
KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def standin():
    sys.path.insert(0, str(STANDIN))
    try:
        import vllm.cli
        import vllm.serve_flags

        yield vllm
    finally:
        sys.path.remove(str(STANDIN))
        for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
            del sys.modules[name]


@pytest.fixture
def guest(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc/gpunode-sim").mkdir(parents=True)
    (root / "etc/gpunode-sim/gpus.json").write_text(simgpus.to_json(simgpus.default_a6000x2()))
    inst = root / "usr/lib/gpunode-sim/installed"
    inst.mkdir(parents=True)
    (inst / "driver").write_text("580.95.05\n")
    (inst / "kmod").write_text("580.95.05 open\n")
    (root / "etc/modprobe.d").mkdir()
    (root / "etc/modprobe.d/nvidia-blacklists-nouveau.conf").write_text("blacklist nouveau\n")
    env = dict(os.environ, GPUNODE_SIM_ROOT=str(root))
    subprocess.run([sys.executable, str(BOOT)], env=env, check=True)
    # what the GPU settings unit does before any vLLM unit starts (ExecStartPre=+ as root)
    subprocess.run([sys.executable, str(MODPROBE), "-u", "-c=0"], env=env, check=True)
    return root


def _env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "CUDA_VISIBLE_DEVICES")}
    env.update(
        GPUNODE_SIM_ROOT=str(root),
        GPUNODE_SIM_NVIDIA_SMI=str(SMI),
        GPUNODE_SIM_VLLM_LOAD_SECONDS="1.0",
        PYTHONPATH=str(STANDIN),
    )
    env.update(extra)
    return env


def _vllm(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vllm.cli", "serve", *args],
        capture_output=True,
        text=True,
        env=_env(root, **env),
        timeout=60,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------- flags


def test_flag_table_matches_the_vllm_flag_list(standin) -> None:
    want = [ln.strip() for ln in FLAGS_FILE.read_text().splitlines() if ln.strip()]
    assert list(standin.serve_flags.SERVE_FLAGS) == want


def test_every_flag_is_accepted(standin) -> None:
    sample = {"bool": [], "list": ["a"], "json": ["{}"], "int": ["1"], "float": ["0.5"]}
    for flag, kind in standin.serve_flags.SERVE_FLAGS.items():
        if kind == "help":
            continue
        value = sample.get(kind, ["8k" if flag == "--max-model-len" else "x"])
        ns = standin.cli.parse_serve(["m", flag, *value])
        assert getattr(ns, flag[2:].replace("-", "_")) is not None, flag
        if kind == "bool":
            ns = standin.cli.parse_serve(["m", "--no-" + flag[2:]])
            assert getattr(ns, flag[2:].replace("-", "_")) is False


def test_parse_forms_and_config_file(standin, tmp_path: Path) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        "model: meta-llama/Llama-3.1-8B-Instruct\n"
        "max_model_len: 16384\n"
        "gpu-memory-utilization: 0.9\n"
        "enable_prefix_caching: false\n"
        "enforce-eager: true\n"
        "served_model_name: [a, b]\n"
        "compilation_config: {mode: 3}\n"
    )
    ns = standin.cli.parse_serve(["--config", str(cfg), "--max_model_len", "32K", "-tp", "2"])
    assert ns.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert ns.max_model_len == 32768  # CLI after --config wins; K = 1024
    assert ns.gpu_memory_utilization == 0.9
    assert ns.enable_prefix_caching is False and ns.enforce_eager is True
    assert ns.served_model_name == ["a", "b"]
    assert ns.compilation_config == {"mode": 3}
    assert ns.tensor_parallel_size == 2
    ns = standin.cli.parse_serve(["m", "--compilation-config.mode", "3", "--max-model-len=32k"])
    assert ns.compilation_config == {"mode": 3} and ns.max_model_len == 32000


def test_unknown_flags_are_rejected_like_argparse(guest: Path, tmp_path: Path) -> None:
    r = _vllm(guest, "meta-llama/Llama-3.1-8B-Instruct", "--swap-space", "4")
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == "vllm serve: error: unrecognized arguments: --swap-space 4"
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("swap_space: 4\n")
    r = _vllm(guest, "--config", str(cfg))
    assert r.returncode == 2
    assert "unrecognized arguments: --swap-space 4" in r.stderr


# ----------------------------------------------------------------- GPU checks


def test_cuda_visible_devices_takes_indices_and_uuids_like_cuda(standin) -> None:
    cli = standin.cli
    gpus = [cli.Gpu(g.index, g.uuid, "NVIDIA RTX A6000", 49140, 0, 49140)
            for g in simgpus.default_a6000x2()]
    u0, u1 = gpus[0].uuid, gpus[1].uuid
    unknown = "GPU-00000000-0000-0000-0000-000000000000"
    assert cli.visible_gpus(gpus, None) == gpus
    assert cli.visible_gpus(gpus, f"{u1},{u0}") == [gpus[1], gpus[0]]  # in the listed order
    assert cli.visible_gpus(gpus, f"1,{u0}") == [gpus[1], gpus[0]]  # indices and UUIDs mixed
    # CUDA: enumeration stops at the first entry that names no device
    assert cli.visible_gpus(gpus, f"{u1},{unknown},{u0}") == [gpus[1]]
    assert cli.visible_gpus(gpus, "0,5,1") == [gpus[0]]
    assert cli.visible_gpus(gpus, "1,-1,0") == [gpus[1]]
    for nothing in ("", unknown, f"{unknown},0"):
        with pytest.raises(cli.StandinError, match="No CUDA GPUs are available"):
            cli.visible_gpus(gpus, nothing)
    # a unique UUID prefix: CUDA takes it, vLLM's NVML lookup by UUID does not
    with pytest.raises(cli.StandinError) as info:
        cli.visible_gpus(gpus, u1[:12])
    assert info.value.kind == "pynvml.NVMLError_NotFound"


def test_an_unknown_uuid_hides_the_devices_after_it(guest: Path) -> None:
    u0, u1 = (g.uuid for g in simgpus.default_a6000x2())
    unknown = "GPU-00000000-0000-0000-0000-000000000000"
    r = _vllm(guest, "m", "--api-key", KEY, "-tp", "2", CUDA_VISIBLE_DEVICES=f"{u0},{unknown},{u1}")
    assert r.returncode == 1
    assert "World size (2) is larger than the number of available GPUs (1)" in r.stdout
    assert "non-default args: {" in r.stdout and KEY not in r.stdout + r.stderr
    r = _vllm(guest, "m", CUDA_VISIBLE_DEVICES=unknown)
    assert r.returncode == 1 and "No CUDA GPUs are available" in r.stdout


def test_tensor_parallel_needs_enough_visible_gpus(guest: Path) -> None:
    uuid0 = simgpus.default_a6000x2()[0].uuid
    r = _vllm(guest, "m", "--tensor-parallel-size", "2", CUDA_VISIBLE_DEVICES=uuid0)
    assert r.returncode == 1
    assert "World size (2) is larger than the number of available GPUs (1)" in r.stdout
    r = _vllm(guest, "Qwen/Qwen2.5-32B-Instruct", "-tp", "3")
    assert r.returncode == 1
    assert "World size (3)" in r.stdout


def test_refuses_when_the_driver_is_not_usable(guest: Path) -> None:
    (guest / "usr/lib/gpunode-sim/installed/driver").write_text("580.105.08\n")  # no reboot
    r = _vllm(guest, "m")
    assert r.returncode == 1
    assert "Driver/library version mismatch" in r.stdout
    (guest / "run/gpunode-sim/loaded-kmod").unlink()
    r = _vllm(guest, "m")
    assert r.returncode == 1 and "couldn't communicate with the NVIDIA driver" in r.stdout


def test_refuses_when_device_nodes_are_missing(guest: Path) -> None:
    (guest / "dev/nvidia1").unlink()
    r = _vllm(guest, "m", CUDA_VISIBLE_DEVICES="1")
    assert r.returncode == 1
    assert "cannot open /dev/nvidia1" in r.stdout


def test_fails_as_cuda_does_without_the_uvm_node(guest: Path) -> None:
    """No /dev/nvidia-uvm and no nvidia-modprobe that can create it: cuInit fails with
    CUDA_ERROR_UNKNOWN (999) and torch's message."""
    for node in ("nvidia-uvm", "nvidia-uvm-tools"):
        (guest / "dev" / node).unlink()
    r = _vllm(guest, "m")
    assert r.returncode == 1
    assert "RuntimeError: CUDA unknown error - this may be due to an incorrectly set up" in r.stdout


def test_cuda_creates_the_uvm_node_through_nvidia_modprobe(guest: Path, standin, monkeypatch):
    """CUDA runs the (setuid) nvidia-modprobe -u -c=0 itself when the node is missing."""
    if os.geteuid() != 0 and "NoNewPrivs:\t1" in Path("/proc/self/status").read_text():
        pytest.skip("this test process runs under no_new_privs: the helper would refuse")
    (guest / "dev/nvidia-uvm").unlink()
    (guest / "usr/bin").mkdir(parents=True)
    (guest / "usr/bin/nvidia-modprobe").symlink_to(MODPROBE)
    monkeypatch.setenv("GPUNODE_SIM_ROOT", str(guest))
    standin.cli.ensure_uvm(str(guest))
    assert (guest / "dev/nvidia-uvm").exists()


def test_model_that_does_not_fit_fails_with_vllm_message(guest: Path) -> None:
    r = _vllm(guest, "meta-llama/Llama-3.1-70B-Instruct")
    assert r.returncode == 1
    assert "No available memory for the cache blocks" in r.stdout
    r = _vllm(guest, "meta-llama/Llama-3.1-8B-Instruct", "--gpu-memory-utilization", "0.5")
    assert r.returncode == 1
    assert "To serve at least one request with the models's max seq len (131072)" in r.stdout


# ----------------------------------------------------------------- the server


@pytest.fixture
def server(guest: Path) -> Iterator[tuple[int, subprocess.Popen[str], Path]]:
    port = _free_port()
    uuid1 = simgpus.default_a6000x2()[1].uuid
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.cli",
            "serve",
            "meta-llama/Llama-3.1-8B-Instruct",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            "llama8b",
            "--max-model-len",
            "32768",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(guest, VLLM_API_KEY=KEY, CUDA_VISIBLE_DEVICES=uuid1),
    )
    try:
        yield port, p, guest
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def _req(
    port: int,
    method: str,
    path: str,
    body: dict | None = None,
    key: str | None = None,
    scheme: str = "Bearer",
    timeout: float = 20,
) -> tuple[int, bytes]:
    for _ in range(100):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            headers = {"Content-Type": "application/json"}
            if key is not None:
                headers["Authorization"] = f"{scheme} {key}"
            c.request(method, path, body=json.dumps(body) if body else None, headers=headers)
            r = c.getresponse()
            data = r.read()
            c.close()
            return r.status, data
        except ConnectionRefusedError:
            time.sleep(0.1)
    raise AssertionError("server did not come up")


def test_server_end_to_end(server) -> None:
    port, proc, root = server
    t0 = time.monotonic()
    status, body = _req(port, "GET", "/health")
    assert (status, body) == (200, b"")
    assert time.monotonic() - t0 >= 0.5  # requests queue until the simulated load is done

    # API key: /v1 needs "Bearer <key>" (scheme case-insensitive); others are open
    assert _req(port, "GET", "/v1/models") == (401, b'{"error":"Unauthorized"}')
    assert _req(port, "GET", "/v1/models", key="wrong")[0] == 401
    assert _req(port, "GET", "/v1/models", key=KEY, scheme="Basic")[0] == 401
    status, body = _req(port, "GET", "/v1/models", key=KEY, scheme="bearer")
    assert status == 200
    models = json.loads(body)
    assert [m["id"] for m in models["data"]] == ["llama8b"]
    assert models["data"][0]["root"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert models["data"][0]["max_model_len"] == 32768
    assert _req(port, "GET", "/version") == (200, b'{"version":"0.33.0+gpunodesim"}')

    status, body = _req(
        port,
        "POST",
        "/v1/completions",
        {"model": "llama8b", "prompt": "Hello there", "max_tokens": 4},
        key=KEY,
    )
    doc = json.loads(body)
    assert status == 200 and doc["object"] == "text_completion"
    assert doc["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    assert doc["choices"][0]["finish_reason"] == "length"
    status, body = _req(port, "POST", "/v1/completions", {"model": "other", "prompt": "x"}, key=KEY)
    assert status == 404 and b"does not exist" in body

    status, body = _req(
        port,
        "POST",
        "/v1/chat/completions",
        {"model": "llama8b", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        key=KEY,
    )
    assert status == 200
    events = [e for e in body.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.startswith("SIMULATION")
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    status, body = _req(port, "GET", "/metrics")
    m = body.decode()
    assert status == 200
    assert 'vllm:num_requests_running{engine="0",model_name="llama8b"} 0.0' in m
    assert 'vllm:request_success_total{engine="0",finished_reason="length",model_name="llama8b"} 1.0' in m
    assert "# TYPE vllm:generation_tokens_total counter" in m

    # the GPU it runs on shows the memory in nvidia-smi; a second instance does not fit
    smi = subprocess.run(
        [sys.executable, str(SMI), "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        env=_env(root),
    ).stdout.split()
    assert int(smi[0]) < 100 < int(smi[1])
    apps = subprocess.run(
        [
            sys.executable,
            str(SMI),
            "--query-compute-apps=pid,process_name,gpu_uuid,used_memory",
            "--format=csv",
        ],
        capture_output=True,
        text=True,
        env=_env(root),
    ).stdout.splitlines()
    assert apps[0] == "pid, process_name, gpu_uuid, used_gpu_memory [MiB]"
    assert apps[1].startswith(f"{proc.pid}, VLLM::EngineCore, {simgpus.default_a6000x2()[1].uuid}, ")
    assert len(apps) == 2
    second = _vllm(
        root,
        "meta-llama/Llama-3.1-8B-Instruct",
        "--port",
        str(_free_port()),
        "--host",
        "127.0.0.1",
        CUDA_VISIBLE_DEVICES="1",
    )
    assert second.returncode == 1
    assert "is less than desired GPU memory utilization (0.92" in second.stdout

    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "Finished server process" in out
    assert "Available KV cache memory: " in out and "GPU KV cache size: " in out
    assert "Starting vLLM API server 0 on http://127.0.0.1:" in out
    assert KEY not in out


def test_wheel_builds(tmp_path: Path) -> None:
    # build from a copy: setuptools writes build/ and *.egg-info next to pyproject.toml
    src = tmp_path / "src"
    shutil.copytree(STANDIN, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    out = tmp_path / "wheels"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    wheels = [p.name for p in out.glob("*.whl")]
    assert wheels == ["vllm-0.33.0+gpunodesim-py3-none-any.whl"]
    with zipfile.ZipFile(out / wheels[0]) as z:
        names = set(z.namelist())
        meta = z.read("vllm-0.33.0+gpunodesim.dist-info/METADATA").decode()
        entry = z.read("vllm-0.33.0+gpunodesim.dist-info/entry_points.txt").decode()
    assert {"vllm/cli.py", "vllm/server.py", "vllm/serve_flags.py"} <= names
    assert "Requires-Dist: PyYAML" in meta
    assert "vllm = vllm.cli:main" in entry


def test_demo_client_reads_the_stream(server) -> None:
    """`make demo`'s chat client (gpunode.lab.demo.stream_chat) against the stand-in: a
    streamed chat completion read as server-sent events, as an OpenAI client reads it."""
    from gpunode.lab.demo import StepFailed, stream_chat

    port, _, _ = server
    assert _req(port, "GET", "/health")[0] == 200
    seen: list[str] = []
    chat = stream_chat(f"http://127.0.0.1:{port}", KEY, "llama8b", seen.append)
    assert chat.model == "llama8b" and chat.text.startswith("SIMULATION")
    assert chat.finish_reason in ("stop", "length")
    assert chat.chunks == len(seen) + 1                # the role chunk carries no text
    assert seen[-1] == chat.text and len(seen) > 3     # it arrived piece by piece
    with pytest.raises(StepFailed, match="HTTP 401"):
        stream_chat(f"http://127.0.0.1:{port}", "wrong", "llama8b", seen.append)


def test_the_products_flag_table_is_the_release_list_the_stand_in_accepts(standin) -> None:
    """gpunode validates extra_args and extra_env against gpunode.core.vllm_flags, loaded from
    src/gpunode/vllm-0.33.0.json; the stand-in's table is generated from that same file: both
    are vLLM 0.33.0's lists (tests/fixtures/vllm, the release's own output), so neither drifts."""
    from gpunode.core import vllm_flags

    source = json.loads((REPO / "src/gpunode" / vllm_flags.SOURCE).read_text())
    listed = [ln.strip() for ln in FLAGS_FILE.read_text().splitlines() if ln.strip()]
    envs = [ln.strip() for ln in ENV_FILE.read_text().splitlines() if ln.strip()]
    assert list(source["serve_flags"]) == listed
    assert source["env_vars"] == envs
    assert vllm_flags.SERVE_FLAGS == {f.removeprefix("--") for f in listed}
    assert vllm_flags.ENV_VARS == {e for e in envs if e.startswith("VLLM_")}
    assert vllm_flags.VLLM_VERSION == source["vllm"] == "0.33.0"
    assert standin.serve_flags.SERVE_FLAGS == source["serve_flags"]


def test_the_stand_ins_flag_table_is_what_the_generator_makes_of_the_source() -> None:
    """vllm/serve_flags.py is committed (the stand-in wheel cannot import gpunode) but only
    ever written by gen_serve_flags.py from gpunode's source file: nobody edits one alone."""
    spec = importlib.util.spec_from_file_location("gen_serve_flags",
                                                  STANDIN / "gen_serve_flags.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.SOURCE == REPO / "src/gpunode/vllm-0.33.0.json"
    committed = (STANDIN / "vllm/serve_flags.py").read_text()
    assert committed == gen.generate()
    assert "generated from src/gpunode/vllm-0.33.0.json" in committed.splitlines()[0]
    assert gen.main(["--check"]) == 0
    # the stand-in's own modules never reach for gpunode
    for path in (STANDIN / "vllm").glob("*.py"):
        assert not re.search(r"^\s*(from|import) gpunode", path.read_text(), re.M), path
