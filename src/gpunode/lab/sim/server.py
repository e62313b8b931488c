"""SIMULATION: static HTTP server for the lab's www root (apt repositories, Python index).

Binds to IPv4 loopback only (127.0.0.0/8; default 127.0.0.1) and refuses any other
address. Guests reach it through qemu's host alias: http://10.0.2.2:<port>/.

- `serving(root, port=0)`: context manager running the server in a thread (tests).
- `start(root, port, state_dir)` / `stop(state_dir)`: a background process with a pid
  file in the lab state dir (`sim-http.json`) and an access log (`sim-http.log`).
- `python -m gpunode.lab.sim.server --root DIR --port N [--log FILE]`: foreground.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

from gpunode.lab.errors import LabError
from gpunode.lab.paths import default_state_dir
from gpunode.lab.sim.repo import default_port, default_www_root

DEFAULT_HOST = "127.0.0.1"
STATE_NAME = "sim-http.json"
LOG_NAME = "sim-http.log"


def check_bind_address(host: str) -> str:
    """Return host if it is an IPv4 loopback address; otherwise raise LabError."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise LabError(
            f"sim HTTP server: bind address {host!r} is not an IP address; the lab serves on "
            "IPv4 loopback only, use 127.0.0.1."
        ) from None
    if ip.version != 4 or not ip.is_loopback:
        raise LabError(
            f"sim HTTP server: refusing to bind {host}; the lab serves on IPv4 loopback only "
            "(127.0.0.0/8), use 127.0.0.1. Guests reach it as http://10.0.2.2:<port>/."
        )
    return host


class _Handler(SimpleHTTPRequestHandler):
    log_file: IO[str] | None = None
    log_lock = threading.Lock()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.log_file is None:
            return
        line = f"{self.address_string()} - [{self.log_date_time_string()}] {format % args}\n"
        with self.log_lock:
            self.log_file.write(line)
            self.log_file.flush()


def make_server(
    root: Path | str, port: int, host: str = DEFAULT_HOST, log: IO[str] | None = None
) -> ThreadingHTTPServer:
    check_bind_address(host)
    root = Path(root)
    if not root.is_dir():
        raise LabError(f"sim HTTP server: www root {root} does not exist; build it first "
                       "(gpunode.lab.sim.prepare()).")
    handler = type("SimHandler", (_Handler,), {"log_file": log})
    try:
        server = ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(root)))
    except OSError as exc:
        raise LabError(
            f"sim HTTP server: cannot listen on {host}:{port}: {exc.strerror}; choose another "
            "port (GPUNODE_LAB_HTTP_PORT) or stop what uses it."
        ) from None
    server.daemon_threads = True
    return server


@contextlib.contextmanager
def serving(
    root: Path | str, port: int = 0, host: str = DEFAULT_HOST, log_path: Path | None = None
) -> Iterator[str]:
    """Serve root in a background thread; yields the base URL (http://127.0.0.1:PORT)."""
    log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
    server = make_server(root, port, host, log)
    thread = threading.Thread(target=server.serve_forever, name="sim-http", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        if log:
            log.close()


# ------------------------------------------------------------------ background process


def _state_file(state_dir: Path) -> Path:
    return state_dir / STATE_NAME


def _is_our_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"gpunode.lab.sim.server" in cmdline


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _reap_orphans(port: int) -> list[int]:
    """Stop mirror servers on `port` whose lab is gone (its state dir was removed, or its
    state file names another process): what a killed test session leaves behind. Returns
    their pids."""
    reaped = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        pid = int(proc_dir.name)
        try:
            argv = [a.decode(errors="replace") for a in
                    (proc_dir / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if "gpunode.lab.sim.server" not in argv or "--port" not in argv or "--log" not in argv:
            continue
        if argv[argv.index("--port") + 1] != str(port):
            continue
        sdir = Path(argv[argv.index("--log") + 1]).parent
        try:
            owner = json.loads(_state_file(sdir).read_text()).get("pid")
        except (OSError, ValueError, AttributeError):
            owner = None
        if owner == pid:
            continue  # a live lab's server: leave it to that lab
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
        reaped.append(pid)
    deadline = time.monotonic() + 5
    while any(_is_our_process(pid) for pid in reaped) and time.monotonic() < deadline:
        time.sleep(0.05)
    return reaped


def status(state_dir: Path | None = None) -> dict[str, Any] | None:
    """The running background server's record (pid, port, root, url, log), or None."""
    path = _state_file(state_dir or default_state_dir())
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not _is_our_process(int(info.get("pid", 0))):
        return None
    return info


def start(
    root: Path | str | None = None,
    port: int | None = None,
    state_dir: Path | None = None,
    host: str = DEFAULT_HOST,
) -> dict[str, Any]:
    """Start the server as a background process (or reuse the one already serving root)."""
    check_bind_address(host)
    sdir = state_dir or default_state_dir()
    www = Path(root) if root else default_www_root()
    port = port or default_port()
    running = status(sdir)
    if running:
        if running["port"] == port and running["root"] == str(www.resolve()):
            return running
        raise LabError(
            f"sim HTTP server already runs (pid {running['pid']}, port {running['port']}, "
            f"root {running['root']}); stop it first: gpunode.lab.sim.server.stop()."
        )
    if not www.is_dir():
        raise LabError(f"sim HTTP server: www root {www} does not exist; build it first "
                       "(gpunode.lab.sim.prepare()).")
    if _answers(host, port) and (not _reap_orphans(port) or _answers(host, port)):
        raise LabError(f"sim HTTP server: {host}:{port} is already in use by another program; "
                       "set GPUNODE_LAB_HTTP_PORT to a free port.")
    sdir.mkdir(parents=True, exist_ok=True)
    log_path = sdir / LOG_NAME
    cmd = [sys.executable, "-m", "gpunode.lab.sim.server", "--root", str(www), "--port",
           str(port), "--host", host, "--log", str(log_path)]
    with open(log_path, "a", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 10
    while not _answers(host, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.terminate()
            tail = log_path.read_text(errors="replace").splitlines()[-5:]
            raise LabError(f"sim HTTP server did not start on {host}:{port}; see {log_path}: "
                           + " | ".join(tail))
        time.sleep(0.05)
    info = {"pid": proc.pid, "port": port, "host": host, "root": str(www.resolve()),
            "url": f"http://{host}:{port}", "log": str(log_path)}
    _state_file(sdir).write_text(json.dumps(info) + "\n")
    return info


def stop(state_dir: Path | None = None, timeout: float = 5.0) -> bool:
    """Stop the background server recorded in the state dir; True if one was stopped."""
    sdir = state_dir or default_state_dir()
    info = status(sdir)
    _state_file(sdir).unlink(missing_ok=True)
    if not info:
        return False
    pid = int(info["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _is_our_process(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    if _is_our_process(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpunode.lab.sim.server",
        description="SIMULATION: serve the lab www root on IPv4 loopback.",
    )
    parser.add_argument("--root", type=Path, default=None, help="www root (default: lab cache)")
    parser.add_argument("--port", type=int, default=None,
                        help="TCP port (default: $GPUNODE_LAB_HTTP_PORT or 18087)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="IPv4 loopback address")
    parser.add_argument("--log", type=Path, default=None, help="access log file")
    args = parser.parse_args(argv)
    try:
        log = open(args.log, "a", encoding="utf-8") if args.log else None  # noqa: SIM115
        server = make_server(args.root or default_www_root(), args.port or default_port(),
                             args.host, log)
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
