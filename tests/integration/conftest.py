"""Fixtures for integration tests: real lab VMs under qemu (gpunode.lab), Debian 12 unless
a fixture says otherwise.

- `lab` (session): a Lab in `.lab/pytest/run-<pid>/` (gitignored), or in
  `$GPUNODE_TEST_LAB_DIR` when set (kept afterwards, for debugging). qemu processes are tied
  to the pytest process (they die with it, even on SIGKILL), reaped at teardown, on SIGTERM
  and at exit; run directories of dead sessions are reaped and removed at start.
- `lab_vm` (session): one shared VM (2 vCPUs, 2 GiB, 2 NUMA nodes, guest port 8000
  forwarded). Tests that change it say so and leave it usable.
- `fresh_vm` (function): a pristine VM (reset to the base image) for tests that break things.
- `converged_lab` (session): `labgpu1` converged by the pyinfra deploy, and `paransible`
  converged by the Ansible one in the background meanwhile (see ConvergedLab), both on
  Ubuntu 24.04 (convergence.CONVERGED_OS; `$GPUNODE_TEST_CONVERGED_OS` picks another lab OS).

Missing lab dependencies fail the session with the command to run; they never skip.
After the session, any qemu left behind by this run fails it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

import pytest

from gpunode.lab import deps, qemu
from gpunode.lab.core import VM, Lab, qemu_pids
from gpunode.lab.errors import LabError

REPO = Path(__file__).resolve().parents[2]
RUNS = REPO / ".lab" / "pytest"
SHARED_VM = "labvm"
FRESH_VM = "fresh"

_labs: list[Lab] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
    # The parity test goes last: the Ansible deploy it compares runs in the background
    # while the other tests use the pyinfra-converged VM.
    items.sort(key=lambda item: Path(str(item.fspath)).name == "test_ansible_parity.py")


def _reap_all() -> None:
    for the_lab in _labs:
        with contextlib.suppress(Exception):
            the_lab.down_all()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Stop the VMs and end the session (SystemExit inside a test would only fail that
    test, and the session would go on starting VMs)."""
    _reap_all()
    raise KeyboardInterrupt(f"signal {signum}")


def _pid_alive(pid: int) -> bool:
    return qemu.qemu_cmdline(pid) is not None


def _reap_dead_runs() -> None:
    """Run directories of sessions that no longer exist: stop their qemu, delete them."""
    if not RUNS.is_dir():
        return
    for d in RUNS.glob("run-*"):
        pid = d.name.removeprefix("run-")
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        with contextlib.suppress(Exception):
            Lab(d).down_all()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    try:
        deps.ensure(install=False)
    except LabError as exc:
        pytest.fail(f"lab dependencies missing: {exc}", pytrace=False)
    fixed = os.environ.get("GPUNODE_TEST_LAB_DIR")
    _reap_dead_runs()
    run_dir = Path(fixed) if fixed else RUNS / f"run-{os.getpid()}"
    the_lab = Lab(run_dir, tie_to_parent=True)
    the_lab.down_all()  # leftovers of an interrupted run in a fixed directory
    _labs.append(the_lab)
    atexit.register(_reap_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        yield the_lab
    finally:
        the_lab.down_all()
        from gpunode.lab.sim import server

        with contextlib.suppress(Exception):
            server.stop(the_lab.dir)  # the simulated mirrors' server, if a test started it
        if not fixed:
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def lab_vm(lab: Lab) -> VM:
    try:
        return lab.up(SHARED_VM, cpus=2, memory_mib=2048, numa=2, forward=[8000])
    except LabError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def fresh_vm(lab: Lab) -> Iterator[VM]:
    try:
        if FRESH_VM in lab.names():
            lab.down(FRESH_VM)
            lab.reset(FRESH_VM)
        vm = lab.up(FRESH_VM, cpus=2, memory_mib=2048, numa=2)
    except LabError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield vm
    lab.down(FRESH_VM)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No qemu of this run may outlive the session: report and kill any, fail the run."""
    for the_lab in _labs:
        the_lab.down_all()
        left = qemu_pids(the_lab.dir)
        if left:
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            print(f"\nERROR: qemu processes {left} of lab {the_lab.dir} outlived the test "
                  "session (killed now)")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- two identical lab VMs converged at the same time: one by pyinfra, one by Ansible ---

CONVERGED_VM = "labgpu1"
ANSIBLE_VM = "paransible"
CONVERGED_SHAPE = {"cpus": 2, "memory_mib": 3072, "numa": 2, "disk_gib": 8}
TINY_MODEL = "/var/lib/vllm/models/tiny-sim"
class ConvergedLab:
    """Two fresh, identical lab VMs with the simulated NVIDIA stack. `labgpu1` is converged
    here by `gpunode deploy` (pyinfra); `paransible` by `gpunode deploy --engine ansible`,
    started at the same moment and left running in the background, so the suite pays for the
    two fresh deploys once. The deploy and checks tests use `labgpu1`; the Ansible parity test
    (ordered last) waits for `paransible` and compares it with the dump of `labgpu1` taken
    here, before any test changed it."""

    def __init__(self, lab: Lab):
        import yaml
        from convergence import converged_os, gpunode_cli, pyinfra, state_dump

        from gpunode.inventory import load_site
        from gpunode.lab import labsite

        self.lab = lab
        self.name = CONVERGED_VM
        self.os, self.os_fallback = converged_os()
        self.facts = labsite.prepare_lab(lab.dir)
        # Started from this (the main) thread: a qemu dies with the thread that started it.
        for name in (CONVERGED_VM, ANSIBLE_VM):
            lab.up(name, wait=False, os_name=self.os, **CONVERGED_SHAPE)
        with ThreadPoolExecutor(2) as pool:
            self.vm, self.ansible_vm = pool.map(self._ready, (CONVERGED_VM, ANSIBLE_VM))
        self.site = labsite.write_lab_site(lab, self.facts, lab.dir / "site.yaml")
        self.site_doc = yaml.safe_load(self.site.read_text())
        site = load_site(self.site)
        self.profile, self.ansible_profile = site.nodes[self.name], site.nodes[ANSIBLE_VM]
        self._ansible_log = lab.dir / "ansible-deploy.log"
        self._ansible_started = time.monotonic()
        with self._ansible_log.open("w") as log:
            self._ansible = subprocess.Popen(
                [sys.executable, "-m", "gpunode.cli.main", "deploy", ANSIBLE_VM, "--site",
                 str(self.site), "--engine", "ansible"], cwd=REPO, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._ansible_seconds: float | None = None
        threading.Thread(target=self._time_ansible, daemon=True).start()
        try:
            boot_before = self.boot_id()
            self.first_rc, self.first_results, self.first_seconds = pyinfra(self.site,
                                                                                [self.name])
            self.boot_ids = (boot_before, self.boot_id())
            self.pyinfra_check = gpunode_cli("check", self.name, "--site", str(self.site))
            self.pyinfra_dump = (state_dump(self.vm, self.profile) if self.first_rc == 0
                                 else None)
        except BaseException:
            self.stop_ansible()
            raise

    def _ready(self, name: str) -> VM:
        from gpunode.lab import labsite

        vm = self.lab.wait_ssh(name)
        labsite.prepare_guest(vm, models=(TINY_MODEL,))
        return vm

    def _time_ansible(self) -> None:
        self._ansible.wait()
        self._ansible_seconds = time.monotonic() - self._ansible_started

    def ansible_deploy(self, timeout: float = 2400) -> tuple[int, str, float]:
        """Wait for the background Ansible deploy: (exit code, output, seconds it took)."""
        rc = self._ansible.wait(timeout=max(1.0, timeout - (time.monotonic()
                                                            - self._ansible_started)))
        while self._ansible_seconds is None:
            time.sleep(0.1)
        return rc, self._ansible_log.read_text(), self._ansible_seconds

    def stop_ansible(self) -> None:
        if self._ansible.poll() is None:
            self._ansible.kill()
            self._ansible.wait()

    def boot_id(self) -> str:
        return self.vm.check("cat /proc/sys/kernel/random/boot_id").strip()


@pytest.fixture(scope="session")
def converged_lab(lab: Lab) -> Iterator[ConvergedLab]:
    try:
        converged = ConvergedLab(lab)
    except LabError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        if converged.first_rc != 0:
            pytest.fail(f"the first deploy of {CONVERGED_VM} failed: "
                        f"{converged.first_results[CONVERGED_VM].errors}", pytrace=False)
        print(f"\nfresh deploy of {CONVERGED_VM} ({converged.os}): "
              f"{converged.first_seconds:.0f} s (while {ANSIBLE_VM} was converged by Ansible)"
              + (f"; {converged.os_fallback}" if converged.os_fallback
                 else ""))
        yield converged
    finally:
        converged.stop_ansible()


# --- pvesim backed by lab VMs (gpunode.lab.pvesim; SIMULATION of the Proxmox VE API) ---

@pytest.fixture(scope="session")
def pvesim_vms(lab: Lab) -> Iterator[object]:
    """A PVE 9 pvesim in its own process whose `start` boots lab VMs (named pve-<vmid>) in
    the session's lab directory; the lab base image is importable as
    `local:import/debian-12-lab.qcow2`. Unit-level fixtures: tests/pvesim_fixtures.py."""
    from gpunode.lab import image
    from gpunode.lab.pvesim.server import PveSim

    pve = PveSim(lab.dir, version="9", vms=True)
    try:
        pve.start()
        pve.import_image(image.ensure_image(), "debian-12-lab.qcow2")
    except (RuntimeError, LabError) as exc:
        pve.stop()
        pytest.fail(f"pvesim did not start: {exc}", pytrace=False)
    yield pve
    pve.stop()
