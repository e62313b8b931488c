"""Waiting for a provisioned guest's SSH before a rebuild deploys."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from gpunode.proxmox.ready import NotReady, wait_ready


def test_unreachable_guest_times_out_naming_user_address_and_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = SimpleNamespace(name="vm1", connection=SimpleNamespace(address="127.0.0.1", port=port,
                                                               user="gpunode"))
    seen: list[str] = []
    with pytest.raises(NotReady) as exc:
        wait_ready(p, None, timeout_s=1, progress=seen.append)
    assert f"gpunode@127.0.0.1:{port} not ready after" in str(exc.value)
    assert "Unable to connect" in str(exc.value)
    assert seen == []          # never got as far as SSH answering
