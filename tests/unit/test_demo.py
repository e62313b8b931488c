"""`make demo` (gpunode.lab.demo) without VMs: how a failure, --keep, a leaked secret and the
progress view behave. The chain itself runs in `make demo`; the streamed chat client is
tested against the vLLM stand-in in test_sim_vllm.py."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from gpunode.lab import demo
from gpunode.lab.errors import LabError
from gpunode.lab.pvesim.backend import fixed_ssh_ports

CHAIN = ("lab", "pvesim", "provision", "guest", "deploy", "check", "chat")


def plain_console() -> Console:
    return Console(file=io.StringIO(), width=120, record=True, force_terminal=False)


def fake_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str | None = None,
              keep: bool = False) -> tuple[demo.Demo, list[str]]:
    """A Demo whose steps only record that they ran; `fail_at` raises there."""
    ran: list[str] = []
    d = demo.Demo("pyinfra", tmp_path / "state", keep, plain_console())

    def step(key: str):
        def fn(s: demo.Step) -> None:
            ran.append(key)
            if key == fail_at:
                raise demo.StepFailed(f"{key} broke")
            if key == "provision":
                d.provisioned = True
                d.pve = SimpleNamespace(url="https://127.0.0.1:8006/api2/json")
            s.detail = f"{key} done"
        return fn

    for key in (*CHAIN, "destroy", "teardown"):
        monkeypatch.setattr(d, key if key != "chat" else "chat_step", step(key))
    return d, ran


def output(d: demo.Demo) -> str:
    return d.console.export_text(clear=False)


def test_the_chain_runs_in_order_then_tears_down(tmp_path, monkeypatch) -> None:
    d, ran = fake_demo(tmp_path, monkeypatch)
    assert d.execute() == 0
    assert ran == [*CHAIN, "destroy", "teardown"]
    text = output(d)
    assert "gpunode demo (pyinfra): ok" in text
    for key in CHAIN:
        assert f"{key} done" in text


def test_a_failed_step_is_named_exits_1_and_still_tears_down(tmp_path, monkeypatch) -> None:
    d, ran = fake_demo(tmp_path, monkeypatch, fail_at="deploy")
    assert d.execute() == 1
    assert ran == ["lab", "pvesim", "provision", "guest", "deploy", "destroy", "teardown"]
    text = output(d)
    assert "demo failed at step deploy" in text and "deploy broke" in text
    assert "FAILED" in text and "not run" in text          # check and chat never ran


def test_nothing_to_destroy_before_provisioning(tmp_path, monkeypatch) -> None:
    d, ran = fake_demo(tmp_path, monkeypatch, fail_at="pvesim")
    assert d.execute() == 1
    assert ran == ["lab", "pvesim", "teardown"]
    assert d.by_key["destroy"].state == "skipped"


def test_a_teardown_failure_after_a_good_run_fails_the_demo(tmp_path, monkeypatch) -> None:
    d, ran = fake_demo(tmp_path, monkeypatch, fail_at="destroy")
    assert d.execute() == 1
    assert ran[-2:] == ["destroy", "teardown"]               # the teardown goes on
    assert "demo failed at step destroy" in output(d)


def test_an_unexpected_error_is_one_message_naming_the_step(tmp_path, monkeypatch) -> None:
    d, _ = fake_demo(tmp_path, monkeypatch)

    def boom(s: demo.Step) -> None:
        raise LabError("VM 'pve-201' did not answer SSH")

    monkeypatch.setattr(d, "guest", boom)
    assert d.execute() == 1
    assert "demo failed at step guest" in output(d)
    assert "LabError: VM 'pve-201' did not answer SSH" in output(d)


def test_keep_leaves_everything_up(tmp_path, monkeypatch) -> None:
    d, ran = fake_demo(tmp_path, monkeypatch, keep=True)
    assert d.execute() == 0
    assert ran == list(CHAIN)
    assert d.by_key["destroy"].state == d.by_key["teardown"].state == "skipped"
    assert "Left running (--keep)" in output(d) and "gpunode lab pvesim down" in output(d)


def test_a_secret_in_a_log_fails_the_run(tmp_path, monkeypatch) -> None:
    d, _ = fake_demo(tmp_path, monkeypatch)
    d.secrets.append("s3cr3t-value")

    def leaky(s: demo.Step) -> None:
        (d.logs / "99-check.log").write_text("token s3cr3t-value\n")

    monkeypatch.setattr(d, "check", leaky)
    assert d.execute() == 1
    assert "a secret appeared in:" in output(d) and "99-check.log" in output(d)
    assert "s3cr3t-value" not in output(d)


def test_no_secret_on_a_command_line(tmp_path) -> None:
    progress = demo.Progress(plain_console(), [])
    run = demo.Runner(progress, tmp_path, {}, ["s3cr3t-value"])
    with pytest.raises(demo.StepFailed, match="secret"):
        run(demo.Step("x", "x"), ["echo", "--key=s3cr3t-value"])


def test_runner_logs_the_output_and_shows_the_matching_lines(tmp_path) -> None:
    progress = demo.Progress(plain_console(), [])
    run = demo.Runner(progress, tmp_path, {"PATH": "/usr/bin:/bin"}, [])
    s = demo.Step("deploy", "Deploy")
    rc, text = run(s, [sys.executable, "-c", "print('-> Base | one'); print('noise')"],
                   activity=r"^-> ")
    assert rc == 0 and "noise" in text and s.log is not None and s.log.is_file()
    assert progress.activity == "-> Base | one"
    assert s.commands[0].startswith(f"{Path(sys.executable).name} -c ")   # the venv's tool


def test_plain_progress_says_start_end_and_still_in(monkeypatch) -> None:
    monkeypatch.setattr(demo, "HEARTBEAT_S", 0.05)
    console = plain_console()
    s = demo.Step("deploy", "Deploy the full stack")
    with demo.Progress(console, [s]) as progress, progress.step(s):
        progress.note("-> vLLM | Run vllm@tiny")
        time.sleep(0.2)
    text = console.export_text(clear=False)
    assert "▶ Deploy the full stack" in text
    assert "still in deploy" in text and "-> vLLM | Run vllm@tiny" in text
    assert "✓ Deploy the full stack" in text


def test_fixed_ssh_ports() -> None:
    assert fixed_ssh_ports("201=2390, 202=2391") == {201: 2390, 202: 2391}
    assert fixed_ssh_ports("") == {}
    with pytest.raises(LabError, match="PVESIM_SSH_PORTS"):
        fixed_ssh_ports("201:2390")
