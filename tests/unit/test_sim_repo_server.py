"""SIMULATION equipment tests: the lab's loopback-only static HTTP server."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from gpunode.lab.errors import LabError
from gpunode.lab.sim import server


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.2.2", "192.168.1.10", "172.16.0.1",
                                  "8.8.8.8", "::1", "::", "localhost", ""])
def test_refuses_non_loopback_bind(host: str, tmp_path: Path) -> None:
    with pytest.raises(LabError, match="loopback"):
        server.check_bind_address(host)
    with pytest.raises(LabError):
        server.make_server(tmp_path, 0, host)


def test_accepts_ipv4_loopback() -> None:
    assert server.check_bind_address("127.0.0.1") == "127.0.0.1"
    assert server.check_bind_address("127.0.0.5") == "127.0.0.5"


def test_serving_serves_files_and_logs_to_file(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "www/dir").mkdir(parents=True)
    (tmp_path / "www/dir/Packages.gz").write_bytes(b"\x1f\x8bdata")
    log = tmp_path / "access.log"
    with server.serving(tmp_path / "www", 0, log_path=log) as url:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}/dir/Packages.gz") as resp:
            assert resp.read() == b"\x1f\x8bdata"
            assert resp.headers.get("Content-Encoding") is None  # apt must get raw bytes
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}/missing")
        assert err.value.code == 404
    captured = capsys.readouterr()
    assert "GET" not in captured.out + captured.err
    text = log.read_text()
    assert '"GET /dir/Packages.gz HTTP/1.1" 200' in text and "404" in text


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="does not exist"):
        server.make_server(tmp_path / "nope", 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_background_start_reuse_and_stop(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hi\n")
    state = tmp_path / "state"
    port = free_port()
    info = server.start(www, port, state)
    try:
        assert (state / server.STATE_NAME).is_file()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello.txt") as resp:
            assert resp.read() == b"hi\n"
        assert server.start(www, port, state)["pid"] == info["pid"]  # reused, not doubled
        with pytest.raises(LabError, match="already runs"):
            server.start(www, free_port(), state)
        assert "hello.txt" in (state / server.LOG_NAME).read_text()
    finally:
        assert server.stop(state) is True
    assert server.status(state) is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert server.stop(state) is False


def test_cli_refuses_wildcard_bind(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gpunode.lab.sim.server", "--root", str(tmp_path), "--port",
         "0", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "refusing to bind 0.0.0.0" in proc.stderr and "Traceback" not in proc.stderr


def test_a_server_left_by_a_removed_lab_is_replaced_but_a_live_labs_is_not(tmp_path: Path):
    """A killed test session leaves its server on the port and its lab directory is
    removed later: the next lab takes the port over. A live lab's server is never taken."""
    import shutil

    www = tmp_path / "www"
    www.mkdir()
    port = free_port()
    old_state, new_state = tmp_path / "old", tmp_path / "new"
    old = server.start(www, port, old_state)
    try:
        with pytest.raises(LabError, match="already in use"):
            server.start(www, port, new_state)  # the old lab is alive: its server stays
        assert server.status(old_state)["pid"] == old["pid"]
        shutil.rmtree(old_state)  # what reaping a dead session's run directory does
        new = server.start(www, port, new_state)
        assert new["pid"] != old["pid"]
        assert not Path(f"/proc/{old['pid']}").exists() or not server._is_our_process(old["pid"])
    finally:
        server.stop(new_state)
        server.stop(old_state)
