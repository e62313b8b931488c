"""pvesim as its own process: `gpunode lab pvesim up|status|token create|down`, and the
subprocess mode of PveSim (driven through proxmoxer)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from proxmoxer import ProxmoxAPI

from gpunode.lab.pvesim.server import PveSim, read_endpoint


def _gpunode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpunode.lab.cli", "pvesim", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_up_status_token_down(tmp_path: Path) -> None:
    d = str(tmp_path)
    try:
        up = _gpunode("up", "--no-vms", "--version", "8.4", "--state-dir", d)
        assert up.returncode == 0, up.stderr
        assert "SIMULATION of PVE 8.4" in up.stdout and "https://127.0.0.1:" in up.stdout
        st = _gpunode("status", "--json", "--state-dir", d)
        ep = json.loads(st.stdout)
        assert st.returncode == 0 and ep["version"] == "8.4" and ep["host"] == "127.0.0.1"
        secret_file = tmp_path / "tok.secret"
        tok = _gpunode("token", "create", "ci@pve", "auto", "--acl", "/vms:PVEVMAdmin",
                       "--out", str(secret_file), "--state-dir", d)
        assert tok.returncode == 0, tok.stderr
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = secret_file.read_text().strip()
        assert secret not in tok.stdout
        api = ProxmoxAPI(ep["host"], port=ep["port"], user="ci@pve", token_name="auto",
                         token_value=secret, verify_ssl=ep["ca"])
        assert api.version.get()["release"] == "8.4"
        assert api.nodes(ep["node"]).qemu.get() == []
        assert stat.S_IMODE((tmp_path / "pvesim" / "root-password").stat().st_mode) == 0o600
    finally:
        down = _gpunode("down", "--state-dir", d)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert read_endpoint(tmp_path) is None
    st = _gpunode("status", "--state-dir", d)
    assert st.returncode == 1 and "not running" in st.stdout


def test_cli_refuses_unknown_version(tmp_path: Path) -> None:
    res = _gpunode("up", "--no-vms", "--version", "7.4", "--state-dir", str(tmp_path))
    assert res.returncode == 2 and "9 or 8.4" in res.stderr


def test_pvesim_subprocess_is_tied_to_the_test_and_stops(tmp_path: Path) -> None:
    with PveSim(tmp_path, version="9") as pve:
        pid = pve.endpoint.pid
        assert pid != os.getpid()
        assert pve.api().version.get()["version"].startswith("9.")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
