"""Lab VM lifecycle without real VMs: a fake qemu (a small Python script that speaks just
enough QMP) stands in, so faults (unknown VM, port clash, stale pid files, a guest that never
reaches SSH, qemu failing at start) are exercised quickly and without TCG."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gpunode.lab import core, qemu
from gpunode.lab.core import VM, Lab
from gpunode.lab.errors import LabError, LabInputError

FAKE_QEMU = r'''#!{python}
"""Fake qemu-system-x86_64 for unit tests: pid file, serial output, a QMP socket."""
import json, os, socket, sys, time
args = sys.argv[1:]
def opt(name):
    return args[args.index(name) + 1]
mode = os.environ.get("FAKE_QEMU_MODE", "hang")
if mode == "fail":
    print("qemu-system-x86_64: Could not set up host forwarding rule 'tcp:127.0.0.1:2222-:22'",
          file=sys.stderr)
    sys.exit(1)
open(opt("-pidfile"), "w").write(str(os.getpid()))
with open(opt("-serial").removeprefix("file:"), "a") as f:
    f.write("BdsDxe: loading Boot0001\nfake guest: kernel panic - not syncing\n")
path = opt("-qmp").removeprefix("unix:").split(",")[0]
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(4)
while True:
    conn, _ = srv.accept()
    fh = conn.makefile("rwb")
    fh.write(b'{"QMP": {"version": {}, "capabilities": []}}\n'); fh.flush()
    for line in fh:
        cmd = json.loads(line).get("execute")
        ret = {"status": "running"} if cmd == "query-status" else {}
        fh.write(json.dumps({"return": ret}).encode() + b"\n"); fh.flush()
        if cmd == "quit":
            sys.exit(0)
    conn.close()
'''


@pytest.fixture
def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "bin" / "qemu-system-x86_64"
    path.parent.mkdir()
    path.write_text(FAKE_QEMU.replace("{python}", sys.executable))
    path.chmod(0o755)
    monkeypatch.setenv("GPUNODE_LAB_ACCEL", "tcg")

    def fake_disk(self: Lab, cfg: core.VMConfig) -> None:  # no image, no ISO tools needed
        d = self.vm_dir(cfg.name)
        for f in ("disk.qcow2", "seed.iso", "OVMF_VARS.fd"):
            (d / f).write_text(f"fake {f} {cfg.instance_id}\n")

    monkeypatch.setattr(Lab, "_fresh_disk", fake_disk)
    return path


@pytest.fixture
def lab(tmp_path: Path, fake_qemu: Path) -> Lab:
    the_lab = Lab(tmp_path / "state", qemu_binary=str(fake_qemu), tie_to_parent=True)
    yield the_lab
    the_lab.down_all()


def _alive(pid: int) -> bool:
    return qemu.qemu_cmdline(pid) is not None


def test_up_without_ssh_starts_and_down_reaps(lab: Lab) -> None:
    vm = lab.up("node1", wait=False)
    assert vm.running and vm.pid and _alive(vm.pid)
    assert vm.address == "127.0.0.1" and vm.user == "gpunode"
    assert lab.vm("node1").state == "running"
    lab.down("node1")
    assert not _alive(vm.pid)
    assert lab.vm("node1").state == "stopped"
    assert not (lab.vm_dir("node1") / "qemu.pid").exists()


def test_guest_that_never_reaches_ssh_is_killed_with_serial_tail(lab: Lab) -> None:
    with pytest.raises(LabError) as err:
        lab.up("node1", timeout=2)
    msg = str(err.value)
    assert "did not answer SSH" in msg and "its qemu was stopped" in msg
    assert "kernel panic - not syncing" in msg  # the serial log's last lines
    assert "serial.log" in msg
    assert lab.vm("node1").state == "stopped"
    assert not _running_fakes(lab)


def test_qemu_failing_at_start_reports_its_error(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "fail")
    with pytest.raises(LabError) as err:
        lab.up("node1", wait=False)
    assert "Could not set up host forwarding rule" in str(err.value)
    assert "node1" in str(err.value)
    assert not _running_fakes(lab)


def test_unknown_vm_name_is_input_error_listing_known(lab: Lab) -> None:
    lab.up("node1", wait=False)
    for call in (lambda: lab.down("nope"), lambda: lab.vm("nope"), lambda: lab.reset("nope"),
                 lambda: lab.reboot("nope"), lambda: lab.snapshot("nope", "s1")):
        with pytest.raises(LabInputError) as err:
            call()
        assert "no lab VM named 'nope'" in str(err.value) and "node1" in str(err.value)


def test_unknown_snapshot(lab: Lab) -> None:
    with pytest.raises(LabInputError, match="no snapshot named 'gone'"):
        lab.fork("gone", "node2")


@pytest.mark.parametrize("name", ["", "Node1", "1node", "a_b", "x" * 40, "../etc"])
def test_invalid_names(lab: Lab, name: str) -> None:
    with pytest.raises(LabInputError, match="invalid lab VM name"):
        lab.up(name, wait=False)


@pytest.mark.parametrize("kw,text", [
    ({"cpus": 0}, "cpus=0"), ({"memory_mib": 100}, "memory=100"), ({"numa": 0}, "numa=0"),
    ({"numa": 5, "memory_mib": 512}, "less than 128 MiB per node"), ({"disk_gib": 1}, "disk=1"),
])
def test_invalid_sizes(lab: Lab, kw: dict[str, int], text: str) -> None:
    with pytest.raises(LabInputError, match=text):
        lab.up("node1", wait=False, **kw)
    assert lab.names() == []


def test_port_clash_with_other_process(lab: Lab) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(LabError, match=f"127.0.0.1:{port} .* in use by another process"):
            lab.up("node1", ssh_port=port, wait=False)
        with pytest.raises(LabError, match=f"127.0.0.1:{port} .* in use by another process"):
            lab.up("node2", forward={8000: port}, wait=False)
    assert not _running_fakes(lab)


def test_port_clash_with_other_vm_and_distinct_ports(lab: Lab) -> None:
    a = lab.up("node1", forward=[8000], wait=False)
    b = lab.up("node2", forward=[8000], wait=False)
    ports = [a.ssh_port, b.ssh_port, a.forwards[8000], b.forwards[8000]]
    assert len(set(ports)) == 4
    with pytest.raises(LabError, match="already assigned to lab VM 'node1'"):
        lab.up("node3", ssh_port=a.ssh_port, wait=False)


def test_stale_pid_file_of_dead_process_is_cleaned(lab: Lab) -> None:
    vm = lab.up("node1", wait=False)
    lab.down("node1")
    pidfile = lab.vm_dir("node1") / "qemu.pid"
    pidfile.write_text(str(vm.pid))  # a killed run left it behind
    assert lab.vm("node1").state == "stopped"
    assert not pidfile.exists()


def test_stale_pid_file_pointing_at_unrelated_process_is_not_killed(lab: Lab) -> None:
    lab.up("node1", wait=False)
    lab.down("node1")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pidfile = lab.vm_dir("node1") / "qemu.pid"
        pidfile.write_text(str(other.pid))
        assert [v.state for v in lab.status()] == ["stopped"]
        lab.down_all()
        assert other.poll() is None, "an unrelated process was killed"
        assert not pidfile.exists()
    finally:
        other.kill()
        other.wait()


def test_leftover_qemu_from_killed_run_is_reaped_by_down_all(lab: Lab, tmp_path: Path,
                                                             fake_qemu: Path) -> None:
    vm = lab.up("node1", wait=False)
    # A new process (a new Lab object) finds the VM through its pid file and stops it.
    other = Lab(tmp_path / "state", qemu_binary=str(fake_qemu))
    assert other.vm("node1").state == "running"
    assert other.down_all() == ["node1"]
    deadline = time.monotonic() + 5
    while _alive(vm.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(vm.pid)


def test_write_site_merges_into_base(lab: Lab, tmp_path: Path) -> None:
    lab.up("node1", wait=False)
    lab.up("node2", wait=False)
    lab.up("node3", wait=False)
    lab.down("node3")
    base = {"site": {"name": "t"}, "groups": {"lab": {"tuning": {}}},
            "nodes": {"node1": {"groups": ["gpu"], "role": "x",
                                "connection": {"address": "10.9.9.9"}}}}
    out = lab.write_site(tmp_path / "site.yaml", base)
    doc = yaml.safe_load(out.read_text())
    n1, n2 = doc["nodes"]["node1"], doc["nodes"]["node2"]
    assert n1["groups"] == ["gpu"] and n1["role"] == "x"
    assert n1["connection"] == {"address": "127.0.0.1", "port": lab.vm("node1").ssh_port,
                                "user": "gpunode", "key": str(lab.key_path), "become": True}
    assert n2["groups"] == ["lab"]
    assert "node3" not in doc["nodes"]  # stopped
    assert doc["site"] == {"name": "t"}
    assert base["nodes"]["node1"]["connection"] == {"address": "10.9.9.9"}  # not mutated
    no_group = lab.site({"nodes": {}})
    assert "groups" not in no_group["nodes"]["node2"]


def test_interrupted_session_sigterm_leaves_no_qemu(tmp_path: Path, fake_qemu: Path) -> None:
    """A process holding a lab (tie_to_parent) that is killed takes its qemu with it."""
    script = (
        "import sys, time; from pathlib import Path; from gpunode.lab.core import Lab\n"
        "def fake_disk(self, cfg):\n"
        "    for f in ('disk.qcow2', 'seed.iso', 'OVMF_VARS.fd'):\n"
        "        (self.vm_dir(cfg.name) / f).write_text('fake')\n"
        "Lab._fresh_disk = fake_disk\n"
        f"lab = Lab({str(tmp_path / 's')!r}, qemu_binary={str(fake_qemu)!r}, "
        "tie_to_parent=True)\n"
        "vm = lab.up('node1', wait=False); print(vm.pid, flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, GPUNODE_LAB_ACCEL="tcg"))
    try:
        pid = int(proc.stdout.readline())  # type: ignore[union-attr]
        assert _alive(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)
        assert Lab(tmp_path / "s").vm("node1").state == "stopped"  # stale pid file cleaned
    finally:
        proc.kill()


def _running_fakes(lab: Lab) -> list[int]:
    return core.qemu_pids(lab.dir)


def test_missing_qemu_says_how_to_install(tmp_path: Path, fake_qemu: Path) -> None:
    lab = Lab(tmp_path / "s", qemu_binary=str(tmp_path / "nope" / "qemu-system-x86_64"))
    with pytest.raises(LabError, match="is not installed; run `gpunode lab deps --install`"):
        lab.up("node1", wait=False)


@pytest.fixture()
def fake_qemu_img(monkeypatch: pytest.MonkeyPatch) -> None:
    """`snapshot` puts a new overlay above the frozen (here: fake) disk with qemu-img."""
    real_run = subprocess.run

    def run(argv: list[str], *a: object, **kw: object) -> object:
        if argv and argv[0] == "qemu-img":
            Path(argv[-1]).write_text("fake overlay\n")
            return subprocess.CompletedProcess(argv, 0, "", "")
        return real_run(argv, *a, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(core.subprocess, "run", run)


def fork_of_snapshot_without(lab: Lab, key: str, **up: object) -> VM:
    """A fork of a snapshot whose metadata lacks `key` (as one written before it existed)."""
    lab.up("base", wait=False, **up)  # type: ignore[arg-type]
    lab.down("base")
    lab.snapshot("base", "old")
    meta_path = lab.snapshot_path("old").with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    del meta[key]
    meta_path.write_text(json.dumps(meta))
    return lab.fork("old", "child", wait=False)
