"""How `gpunode deploy` reads pyinfra: a host stopped by gpunode (unsupported OS, reboot
policy 'never') gets its reason as an error, its later operations do not run, the run
exits non-zero, and no traceback is printed. Runs real pyinfra against @local with
gpunode's own `fail` operation (which changes nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gpunode.cli.deploy import HostResult, read_pyinfra_output

DEPLOY = """\
import sys
sys.path.insert(0, {src!r})
from pyinfra.operations import server
from gpunode.engines.pyinfra import ops
ops.fail(name="Refuse an unsupported or unexpected OS",
         message="n1: the profile says ubuntu-24.04 but the host runs debian 12")
server.shell(name="Must not run", commands=["touch {marker}"])
"""


def test_a_stopped_host_reports_its_reason_and_runs_nothing_after(tmp_path: Path, repo: Path):
    marker = tmp_path / "ran"
    deploy = tmp_path / "deploy.py"
    deploy.write_text(DEPLOY.format(src=str(repo / "src"), marker=marker))
    pyinfra = Path(sys.executable).with_name("pyinfra")
    proc = subprocess.run([str(pyinfra), "-y", "@local", str(deploy)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    assert not marker.exists()
    results = {"@local": HostResult()}
    read_pyinfra_output(out.splitlines(), results)
    assert results["@local"].errors == [
        "Refuse an unsupported or unexpected OS: n1: the profile says ubuntu-24.04 but the "
        "host runs debian 12"]
    assert results["@local"].changed == []


def test_success_and_no_change_lines_are_counted_per_host():
    lines = ["--> Starting operation: Write /etc/a", "    [n1] Success", "    [n2] No changes",
             "--> Starting operation: Install x", "    [n1] No changes",
             "    [n2] E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by "
             "process 812 (python3)", "    [n2] Error: executed 0 commands"]
    results = {"n1": HostResult(), "n2": HostResult()}
    read_pyinfra_output(lines, results)
    assert results["n1"].changed == ["Write /etc/a"] and results["n1"].unchanged == 1
    assert results["n2"].errors == [
        "Install x: Error: executed 0 commands: E: Could not get lock "
        "/var/lib/dpkg/lock-frontend. It is held by process 812 (python3)"]


def test_an_unreachable_host_is_failed_with_pyinfras_reason(tmp_path: Path):
    """Real pyinfra, real inventory and deploy entry, against a closed port: the host is
    reported failed with the connector's message (it was "ok" with exit 1)."""
    from gpunode.cli.deploy import run_pyinfra

    site = tmp_path / "site.yaml"
    site.write_text("nodes:\n  gpu01:\n    connection: {address: 127.0.0.1, port: 9, "
                    "user: root}\n    os: debian-12\n")
    rc, results, _ = run_pyinfra(site, ["gpu01"], dry_run=True)
    assert rc == 1
    assert results["gpu01"].errors == [
        "connecting: Could not connect ([Errno None] Unable to connect to port 9 on "
        "127.0.0.1)"], results


def test_connect_errors_and_silent_hosts_of_a_failed_run_are_failures():
    from gpunode.cli import deploy as deploy_cli

    lines = ["--> Connecting to hosts...", "    [n1] Authentication error (key=x)",
             "--> Starting operation: Write /etc/a", "    [n2] Success"]
    results = {"n1": HostResult(), "n2": HostResult(), "n3": HostResult()}
    read_pyinfra_output(lines, results)
    assert results["n1"].errors == ["connecting: Authentication error (key=x)"]
    assert deploy_cli.CONNECT_ERROR.match("Could not resolve hostname (gaierror)")
    deploy_cli.fail_silent_hosts(0, results)
    assert results["n3"].errors == []
    deploy_cli.fail_silent_hosts(1, results)
    assert results["n3"].errors == ["pyinfra exited 1 before any operation ran on this host "
                                    "(run with -v for its output)"]
    assert results["n2"].errors == [] and results["n2"].changed == ["Write /etc/a"]
    assert results["n1"].errors == ["connecting: Authentication error (key=x)"]


def test_a_run_past_its_timeout_is_stopped_naming_the_operation(tmp_path: Path, monkeypatch):
    """The lab tests bound every pyinfra run: a hung one (paramiko waited an hour for a
    channel of a rebooting host) is killed and each host says where it was."""
    from gpunode.cli import deploy as deploy_cli

    script = "echo '--> Starting operation: Upgrade the driver'; exec sleep 60"
    monkeypatch.setattr(deploy_cli, "pyinfra_command",
                        lambda *a: (["sh", "-c", script], dict(os.environ)))
    rc, results, seconds = deploy_cli.run_pyinfra(tmp_path / "site.yaml", ["n1"],
                                                  timeout_s=1)
    assert rc != 0 and seconds < 30
    assert results["n1"].errors[0] == ("pyinfra was stopped after 1 s (the run's timeout), "
                                       "in: Upgrade the driver")


DRY = """--> Preparing operation files...
    Loading: deploy/gpu_node.py
    [gpu1] Ready: deploy/gpu_node.py

--> Detected changes:
    Operation                                   Change            Conditional Change
    Base | Write /etc/apt/apt.conf.d/99gpunode-apt   2 (gpu1, gpu2)    -
    Base | Install base packages                1 (gpu2)          -
    Tuning | Apply sysctls                      -                 -
    vLLM | Run vllm@tiny (waits for /health)   -                 1 (gpu1)

    Detected changes may not include every change pyinfra will execute.

--> Disconnecting from hosts...
"""


def test_a_dry_run_reads_the_changes_pyinfra_detected_per_host():
    """Was: `gpunode deploy --dry-run` passed -y with --dry, so pyinfra skipped its change
    detection and every node showed 0 changed."""
    from gpunode.cli.deploy import pyinfra_command

    results = {"gpu1": HostResult(), "gpu2": HostResult()}
    read_pyinfra_output(DRY.splitlines(), results)
    assert results["gpu1"].changed == ["Base | Write /etc/apt/apt.conf.d/99gpunode-apt",
                                       "vLLM | Run vllm@tiny (waits for /health)"]
    assert results["gpu2"].changed == ["Base | Write /etc/apt/apt.conf.d/99gpunode-apt",
                                       "Base | Install base packages"]
    cmd, _ = pyinfra_command(Path("site.yaml"), ["gpu1"], dry_run=True)
    assert "--dry" in cmd and "-y" not in cmd
    assert "-y" in pyinfra_command(Path("site.yaml"), ["gpu1"])[0]
