"""pytest fixtures for pvesim, the simulated Proxmox VE API (lab test equipment).

Import the fixtures you need into a test module (`from pvesim_fixtures import pvesim, ...`).

- `pvesim` / `pvesim84` (module): PVE 9 / PVE 8.4 served in-process (no lab VMs: `start`
  only marks a VM running; the agent answers "QEMU guest agent is not running").
- `pve_root` (module): proxmoxer API as root@pam (password ticket).
- `pve_token` (module): a privilege-separated token `ci@pve!auto` holding PVEVMAdmin on
  /vms, PVEMappingUser on /mapping/pci and PVEDatastoreUser on /storage.
- `wait_task(api, upid)`: blocks until the task ends and returns its status dict.

The VM-backed pvesim (its `start` boots lab VMs) is `pvesim_vms` in
tests/integration/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from proxmoxer.tools import Tasks

from gpunode.lab.pvesim.server import PveSim, Token

AUTH_FAIL_DELAY = 0.3
TOKEN_ACL = [("/vms", "PVEVMAdmin"), ("/mapping/pci", "PVEMappingUser"),
             ("/storage", "PVEDatastoreUser")]


def wait_task(api: Any, upid: str, timeout: float = 30) -> dict[str, Any]:
    status = Tasks.blocking_status(api, upid, timeout=timeout, polling_interval=0.05)
    assert status is not None, f"task {upid} did not end within {timeout} s"
    return status


def _start(tmp_path_factory: pytest.TempPathFactory, version: str) -> PveSim:
    # 401s come after AUTH_FAIL_DELAY (PVE: 3 s; shortened here to keep the tests quick)
    return PveSim(tmp_path_factory.mktemp(f"pvesim{version}"), version=version,
                  in_process=True, auth_fail_delay=AUTH_FAIL_DELAY).start()


@pytest.fixture(scope="module")
def pvesim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PveSim]:
    pve = _start(tmp_path_factory, "9")
    yield pve
    pve.stop()


@pytest.fixture(scope="module")
def pvesim84(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PveSim]:
    pve = _start(tmp_path_factory, "8.4")
    yield pve
    pve.stop()


@pytest.fixture(scope="module")
def pve_root(pvesim: PveSim) -> Any:
    return pvesim.api()


@pytest.fixture(scope="module")
def pve_token(pvesim: PveSim) -> Token:
    return pvesim.create_token("ci@pve", "auto", acl=TOKEN_ACL)
