"""Lab VMs with an emulated IOMMU and GPU stand-ins (`iommu=True`): the qemu command line
and that the setting is kept by the VM (restart, snapshot, fork). No VM is booted: the
lifecycle runs against the fake qemu of test_lab_core."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_lab_core import fake_qemu, fake_qemu_img, fork_of_snapshot_without, lab  # noqa: F401

from gpunode.lab import core, qemu
from gpunode.lab.core import Lab

pytestmark = pytest.mark.usefixtures("fake_qemu_img")


def _spec(tmp_path: Path, **kw: object) -> qemu.MachineSpec:
    base: dict[str, object] = dict(
        name="pve", cpus=2, memory_mib=2048, numa=1, disk=tmp_path / "d.qcow2",
        seed=tmp_path / "s.iso", vars=tmp_path / "v.fd", serial_log=tmp_path / "serial.log",
        pidfile=tmp_path / "q.pid", qmp_socket=tmp_path / "q.qmp",
        qga_socket=tmp_path / "q.qga", ssh_port=2222, forwards={})
    base.update(kw)
    return qemu.MachineSpec(**base)  # type: ignore[arg-type]


def _devices(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]


def _props(dev: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in dev.split(",")[1:])


def test_default_vm_has_no_iommu_and_no_standins(tmp_path: Path) -> None:
    argv = qemu.build_argv(_spec(tmp_path), "tcg")
    joined = " ".join(argv)
    assert "intel-iommu" not in joined and "pcie-root-port" not in joined
    assert argv[argv.index("-machine") + 1] == "q35"


def test_iommu_comes_before_every_pci_device_with_interrupt_remapping(tmp_path: Path) -> None:
    argv = qemu.build_argv(_spec(tmp_path, iommu=True), "tcg")
    devices = _devices(argv)
    assert devices[0] == "intel-iommu,intremap=on"
    assert devices.count("intel-iommu,intremap=on") == 1
    # TCG: qemu's own irqchip, no split irqchip (a KVM setting), no eim (needs KVM).
    assert argv[argv.index("-machine") + 1] == "q35"
    assert "eim=on" not in " ".join(argv)
    # Every PCI device (also the disks, given by -drive if=virtio) comes after the IOMMU.
    assert argv.index("-device") < min(i for i, a in enumerate(argv) if a == "-drive"
                                       and "if=virtio" in argv[i + 1])


def test_kvm_gets_split_irqchip_for_interrupt_remapping(tmp_path: Path) -> None:
    argv = qemu.build_argv(_spec(tmp_path, iommu=True), "kvm")
    assert argv[argv.index("-machine") + 1] == "q35,kernel-irqchip=split"
    plain = qemu.build_argv(_spec(tmp_path), "kvm")
    assert plain[plain.index("-machine") + 1] == "q35"


def test_standins_sit_at_fixed_slots_behind_their_bridges(tmp_path: Path) -> None:
    devices = {_props(d).get("id"): d for d in _devices(
        qemu.build_argv(_spec(tmp_path, iommu=True), "tcg"))}
    by_role = {s.role: s for s in qemu.IOMMU_STANDINS}
    # GPU A: one multifunction slot (function 0 the GPU, function 1 its audio) alone behind
    # a root port on the root bus.
    rp_a = _props(devices["gpua_rp"])
    assert devices["gpua_rp"].startswith("pcie-root-port,")
    assert (rp_a["bus"], rp_a["addr"]) == ("pcie.0", "0x1c.0")
    gpu_a, audio = _props(devices["gpua"]), _props(devices["gpua_audio"])
    assert devices["gpua"].startswith(by_role["gpu-a"].qemu_device + ",")
    assert devices["gpua_audio"].startswith(by_role["gpu-a-audio"].qemu_device + ",")
    assert (gpu_a["bus"], gpu_a["addr"], gpu_a["multifunction"]) == ("gpua_rp", "0x0.0", "on")
    assert (audio["bus"], audio["addr"]) == ("gpua_rp", "0x0.1")
    # GPU B: behind a PCIe-to-PCI bridge, next to an unrelated device (one IOMMU group).
    rp_b, br = _props(devices["gpub_rp"]), _props(devices["gpub_br"])
    assert (rp_b["bus"], rp_b["addr"]) == ("pcie.0", "0x1d.0")
    assert devices["gpub_br"].startswith("pcie-pci-bridge,") and br["bus"] == "gpub_rp"
    assert devices["gpub"].startswith(by_role["gpu-b"].qemu_device + ",")
    assert devices["gpub_peer"].startswith(by_role["gpu-b-peer"].qemu_device + ",")
    assert _props(devices["gpub"])["bus"] == _props(devices["gpub_peer"])["bus"] == "gpub_br"
    # Distinct chassis/slot numbers for the two root ports (qemu refuses duplicates).
    assert (rp_a["chassis"], rp_a["slot"]) != (rp_b["chassis"], rp_b["slot"])


def test_standin_table_matches_the_guest_view() -> None:
    """The addresses and ids a Debian 12 guest reported (see the lab README)."""
    table = {s.role: (s.address, s.vendor_device, s.pci_class, s.group)
             for s in qemu.IOMMU_STANDINS}
    assert table == {
        "gpu-a": ("0000:01:00.0", "1234:1111", "0300", "gpu-a"),
        "gpu-a-audio": ("0000:01:00.1", "8086:293e", "0403", "gpu-a"),
        "gpu-b": ("0000:03:01.0", "1002:5046", "0300", "gpu-b"),
        "gpu-b-peer": ("0000:03:02.0", "1b36:000d", "0c03", "gpu-b"),
    }
    addr = re.compile(r"^0000:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
    assert all(addr.match(s.address) for s in qemu.IOMMU_STANDINS)
    assert all(addr.match(a) for a in qemu.IOMMU_BRIDGES.values())
    assert len({s.address for s in qemu.IOMMU_STANDINS}) == len(qemu.IOMMU_STANDINS)


def test_old_vm_json_without_the_key_loads_as_no_iommu(tmp_path: Path) -> None:
    path = tmp_path / "vm.json"
    path.write_text(json.dumps({
        "name": "old", "cpus": 2, "memory_mib": 2048, "numa": 2, "disk_gib": 8,
        "ssh_port": 2222, "forwards": {"8000": 18000}, "instance_id": "old-1",
        "origin": {"kind": "base"}}))
    cfg = core.VMConfig.load(path)
    assert cfg.iommu is False and cfg.forwards == {8000: 18000}
    cfg.iommu = True
    cfg.save(path)
    assert json.loads(path.read_text())["iommu"] is True
    assert core.VMConfig.load(path).iommu is True




def _argv_of(the_lab: Lab, name: str) -> str:
    return (the_lab.vm_dir(name) / "qemu.log").read_text().splitlines()[0]


def test_iommu_is_kept_across_restart_snapshot_and_fork(lab: Lab) -> None:  # noqa: F811
    vm = lab.up("pve", numa=1, wait=False, iommu=True)
    assert vm.iommu and vm.info()["iommu"] is True
    assert "intel-iommu,intremap=on" in _argv_of(lab, "pve")
    assert json.loads((lab.vm_dir("pve") / "vm.json").read_text())["iommu"] is True
    lab.down("pve")
    vm = lab.up("pve", numa=1, wait=False)  # no iommu argument: the VM keeps its devices
    assert vm.iommu and "intel-iommu" in _argv_of(lab, "pve")
    lab.down("pve")
    # Snapshot (of a stopped VM: nothing to power off) and fork keep it too.
    lab.snapshot("pve", "pvesnap")
    meta = json.loads(lab.snapshot_path("pvesnap").with_suffix(".json").read_text())
    assert meta["iommu"] is True
    fork = lab.fork("pvesnap", "pve2", wait=False)
    assert fork.iommu and "intel-iommu" in _argv_of(lab, "pve2")
    assert lab.vm("pve2").iommu
    lab.down("pve2")
    off = lab.fork("pvesnap", "pve3", wait=False, iommu=False)
    assert not off.iommu and "intel-iommu" not in _argv_of(lab, "pve3")


def test_iommu_can_be_switched_explicitly(lab: Lab) -> None:  # noqa: F811
    assert not lab.up("plain", wait=False).iommu
    assert "intel-iommu" not in _argv_of(lab, "plain")
    lab.down("plain")
    assert lab.up("plain", wait=False, iommu=True).iommu
    lab.down("plain")
    assert not lab.up("plain", wait=False, iommu=False).iommu
    assert "intel-iommu" not in _argv_of(lab, "plain")


def test_fork_of_old_snapshot_without_the_key(lab: Lab) -> None:  # noqa: F811
    assert not fork_of_snapshot_without(lab, "iommu").iommu


@pytest.mark.parametrize("flag,expected", [("--iommu", True), ("--no-iommu", False)])
def test_cli_up_passes_the_flag(flag: str, expected: bool, monkeypatch: pytest.MonkeyPatch,
                                tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gpunode.lab import cli

    seen: dict[str, object] = {}

    def fake_up(self: Lab, name: str, **kw: object) -> object:
        seen.update(kw)
        raise core.LabInputError("stop here")

    monkeypatch.setattr(Lab, "up", fake_up)
    res = CliRunner().invoke(cli.app, ["up", "x", flag, "--state-dir", str(tmp_path / "s")])
    assert res.exit_code == 2 and seen["iommu"] is expected
    CliRunner().invoke(cli.app, ["up", "x", "--state-dir", str(tmp_path / "s")])
    assert seen["iommu"] is None
