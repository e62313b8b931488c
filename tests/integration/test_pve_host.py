"""A Proxmox host prepared for GPU passthrough, for real, on lab VMs with an emulated
IOMMU (qemu's intel-iommu with interrupt remapping) and emulated PCI functions standing in
for the GPUs (gpunode.lab.qemu.IOMMU_STANDINS: a VGA function and an HDA audio function in
one slot, and a second "GPU" behind a PCI bridge with a USB controller in its group).

Two fresh VMs, deployed at the same time: `pvehost` by pyinfra, `pvehost-ans` by Ansible.
Each deploy writes the VFIO configuration, rebuilds the initramfs and GRUB's
configuration and reboots; then the kernel's own IOMMU groups and driver bindings are read
by `gpunode check`. A second run of each engine changes nothing, both hosts end in the
same state, and a site that maps the stand-in in the shared group is refused with the
group's other member named, before anything changes.

The guests run Debian 12 without Proxmox VE installed: what this concern touches (kernel
command line, modprobe.d, initramfs, GRUB) is Debian's, as on a PVE 8 host."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from convergence import (
    ansible_playbook,
    changed_tasks,
    diff,
    gpunode_cli,
    pyinfra,
    recap,
    state_dump,
)

from gpunode.inventory import load_site
from gpunode.lab import qemu

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PY, ANS = "pvehost", "pvehost-ans"
STANDIN = {s.role: s for s in qemu.IOMMU_STANDINS}
SLOT_A = STANDIN["gpu-a"].address.rsplit(".", 1)[0]
SLOT_B = STANDIN["gpu-b"].address.rsplit(".", 1)[0]


def site_doc(lab: Any, slot: str) -> dict[str, Any]:
    """Both lab VMs as PVE hosts mapping `slot` (lab.site adds their connections)."""
    ids = sorted({s.vendor_device for s in qemu.IOMMU_STANDINS if s.role.startswith("gpu-")
                  and not s.role.endswith("peer")})
    node = {"kind": "pve-host", "os": "debian-12", "reboot_timeout_s": 600,
            # The emulated IOMMU is Intel's VT-d while TCG's CPU says AuthenticAMD, so
            # `auto` would pick AMD's (argument-free) default: name it.
            "pve": {"iommu": "intel", "vfio_ids": ids,
                    "host_drivers": ["bochs", "snd_hda_intel"],
                    "pci_mappings": [{"name": "standin", "addresses": [slot]}]}}
    return lab.site({"nodes": {PY: dict(node), ANS: dict(node)}})


def write(doc: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def pve_hosts(lab: Any) -> Any:
    # Started from this thread (the test lab ties each qemu to the thread that started it:
    # VMs started from short-lived worker threads died with them), then both boot at once.
    for name in (PY, ANS):
        lab.up(name, cpus=2, memory_mib=2048, numa=1, iommu=True, wait=False)
    vms: dict[str, Any] = {}
    for name in (PY, ANS):
        vm = lab.wait_ssh(name)
        # cloud-init restarts sshd once SSH first answers: wait for it to finish (255
        # is ssh's own failure while sshd restarts).
        for _ in range(30):
            if vm.run("cloud-init status --wait >/dev/null 2>&1", timeout=900)[0] != 255:
                break
            time.sleep(2)
        vms[name] = vm
    with tempfile.TemporaryDirectory(prefix="gpunode-pve-") as tmp:
        yield vms, Path(tmp)
    for name in (PY, ANS):
        lab.destroy(name)


def test_both_engines_prepare_the_host_and_the_checks_pass(lab, pve_hosts):
    vms, tmp = pve_hosts
    site = write(site_doc(lab, SLOT_A), tmp / "site.yaml")
    before = vms[PY].check("for d in /sys/bus/pci/devices/*; do echo ${d##*/} "
                           "$(basename $(readlink $d/driver) 2>/dev/null); done")
    print("drivers before:\n" + before)
    assert f"{STANDIN['gpu-a-audio'].address} snd_hda_intel" in before
    # One engine after the other: two emulated-IOMMU guests rebooting at once under TCG
    # on the 2-core machine once left one stuck in early boot past its 600 s.
    for engine, node in (("pyinfra", PY), ("ansible", ANS)):
        rc, out, seconds = gpunode_cli("deploy", node, "--site", str(site), "--engine",
                                       engine, timeout=2400)
        print(f"{engine} fresh deploy: rc {rc}, {seconds} s\n{out[-4000:]}")
        assert rc == 0, f"{engine}: {out[-4000:]}"

    report = tmp / "check.json"
    rc, out, _ = gpunode_cli("check", PY, ANS, "--site", str(site), "--json", str(report))
    doc = json.loads(report.read_text())
    for node in (PY, ANS):
        host = doc["hosts"][node]
        assert host["ok"], f"{node}: {host['drifted']}\n{out[-3000:]}"
        assert host["concerns"]["pve_host"]["passed"] >= 8, host["concerns"]
    for node in (PY, ANS):
        drivers = vms[node].check(
            f"basename $(readlink /sys/bus/pci/devices/{STANDIN['gpu-a'].address}/driver); "
            f"basename $(readlink /sys/bus/pci/devices/{STANDIN['gpu-a-audio'].address}/driver)")
        assert drivers.split() == ["vfio-pci", "vfio-pci"], (node, drivers)

    # Second runs change nothing.
    rc, res, seconds = pyinfra(site, [PY], entry="pve_host")
    print(f"pyinfra no-op: {seconds:.1f} s")
    assert rc == 0 and not res[PY].changed and not res[PY].errors, res[PY]
    rc, out, seconds = ansible_playbook(site, ANS, playbook="playbooks/pve_host.yml")
    print(f"ansible no-op: {seconds:.1f} s")
    assert rc == 0, out[-3000:]
    assert recap(out, ANS)["changed"] == 0, changed_tasks(out)

    # Both engines leave the same host.
    profiles = load_site(site).nodes
    a, b = state_dump(vms[PY], profiles[PY]), state_dump(vms[ANS], profiles[ANS])
    assert diff(a, b) == []


def test_a_device_in_a_shared_group_is_refused_before_anything_changes(lab, pve_hosts):
    vms, tmp = pve_hosts
    site = write(site_doc(lab, SLOT_B), tmp / "shared.yaml")
    p = load_site(site).nodes[PY]
    before = state_dump(vms[PY], p)
    peer = STANDIN["gpu-b-peer"].address
    rc, out, _ = gpunode_cli("deploy", PY, "--site", str(site))
    assert rc == 1, out
    assert f"{SLOT_B} shares IOMMU group" in out and peer in out, out
    assert state_dump(vms[PY], p) == before
    rc, out, _ = ansible_playbook(site, ANS, playbook="playbooks/pve_host.yml")
    assert rc != 0 and f"{SLOT_B} shares IOMMU group" in out and peer in out, out[-3000:]
