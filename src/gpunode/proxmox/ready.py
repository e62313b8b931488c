"""Wait until a freshly provisioned guest can be deployed: SSH answers with the node's
key and cloud-init has finished its first boot (it installs packages and restarts sshd
late, which would cut the first connections a deploy opens)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpunode.proxmox.errors import PveError


class NotReady(PveError):
    """The guest did not become reachable over SSH in time."""


def wait_ready(p: Any, key: Path | None, timeout_s: float,
               progress: Callable[[str], None] | None = None) -> float:
    """Connect as the node's user, run ``cloud-init status --wait``, then connect once more
    (sshd may have restarted). Returns the seconds waited; raises NotReady."""
    import paramiko

    say = progress or (lambda _m: None)
    c = p.connection
    started = time.monotonic()
    last = "no answer"
    finished = False
    while True:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            client.connect(c.address, port=c.port, username=c.user,
                           key_filename=str(key) if key else None, timeout=10,
                           banner_timeout=10, auth_timeout=10, allow_agent=key is None,
                           look_for_keys=key is None)
            if finished:
                return time.monotonic() - started
            say(f"SSH answers on {c.address}:{c.port}; waiting for cloud-init to finish")
            _, out, _ = client.exec_command("cloud-init status --wait >/dev/null 2>&1; "
                                            "echo gpunode-ready", timeout=timeout_s)
            if b"gpunode-ready" in out.read():
                finished = True
                continue
            last = "cloud-init status did not finish"
        except (paramiko.SSHException, OSError, EOFError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        finally:
            client.close()
        waited = time.monotonic() - started
        if waited >= timeout_s:
            raise NotReady(f"{p.name}: SSH to {c.user}@{c.address}:{c.port} not ready after "
                           f"{waited:.0f} s ({last})")
        time.sleep(3)
