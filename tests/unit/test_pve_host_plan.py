"""gpunode.core.pve_host.plan from host trees: fresh, converged, mid-way, refused, systemd-boot.

The trees are snapshots (gpunode.facts) as the snapshot script reports them; the PCI part
follows what a Proxmox host shows (/sys/bus/pci/devices: vendor, device, class, driver and
iommu_group links; proxmox-boot-tool status lines)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from gpunode.core import pve_host
from gpunode.core.paths import stamp_path
from gpunode.core.plan import sha256
from gpunode.facts import Snapshot
from gpunode.model import NodeProfile

BOOT = 1_700_000_000
GPU, AUDIO = "0000:41:00.0", "0000:41:00.1"
NIC = "0000:42:00.0"


def profile(**pve: Any) -> NodeProfile:
    return NodeProfile.model_validate({
        "name": "pve1", "kind": "pve-host", "os": "debian-12",
        "connection": {"address": "pve1.example"},
        "pve": {"pci_mappings": [{"name": "a6000", "addresses": ["0000:41:00"]}], **pve}})


def dev(vendor: str, device: str, cls: str, driver: str | None, group: str | None) -> dict:
    return {"vendor": vendor, "device": device, "class": cls, "driver": driver,
            "iommu_group": group}


def fresh_tree() -> dict[str, Any]:
    """An Intel PVE 8 host with GRUB, IOMMU still off, one A6000 held by nouveau and
    snd_hda_intel."""
    return {
        "os": {"id": "debian", "version_id": "12"}, "boot_time": BOOT,
        "cmdline": "BOOT_IMAGE=/boot/vmlinuz-6.8.12-4-pve root=/dev/mapper/pve-root ro quiet",
        "modules": ["nouveau"], "files": {}, "reads": {pve_host.KERNEL_CMDLINE: None},
        "hugepages": {"hugepages-2048kB": 0, "hugepages-1048576kB": 0},
        "pci": {
            "devices": {
                "0000:00:01.0": dev("8086", "1901", "060400", "pcieport", None),
                GPU: dev("10de", "2230", "030000", "nouveau", None),
                AUDIO: dev("10de", "1aef", "040300", "snd_hda_intel", None),
                NIC: dev("8086", "1533", "020000", "igb", None),
            },
            "iommu": [], "groups": 0, "interrupt_remapping": False,
            "cpu_vendor": "GenuineIntel", "boot_tool": {"rc": None, "out": ""},
        },
    }


def converged(p: NodeProfile, tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` after the deploy and its reboot: files and stamps in place (written before
    this boot), arguments on the command line, IOMMU on, vfio-pci holding the GPU."""
    t = copy.deepcopy(tree)
    snap = Snapshot(t)
    for path, content in pve_host.files(p, snap):
        t["files"][path] = {"mode": "0644", "owner": "root", "group": "root",
                            "sha256": sha256(content), "mtime": BOOT - 60}
    for name, key in ((pve_host.INITRAMFS_STAMP, pve_host.initramfs_key(p, snap)),
                      (pve_host.BOOT_STAMP, pve_host.boot_key(p, snap))):
        t["files"][stamp_path(name)] = {"mode": "0644", "owner": "root", "group": "root",
                                        "sha256": sha256(key + "\n"), "mtime": BOOT - 30}
    t["cmdline"] += " " + " ".join(pve_host.kernel_args(p, snap))
    t["modules"] = ["vfio", "vfio_iommu_type1", "vfio_pci", "vfio_pci_core"]
    pci = t["pci"]
    pci.update(iommu=["dmar0"], groups=3, interrupt_remapping=True)
    for addr, group in (("0000:00:01.0", "1"), (GPU, "14"), (AUDIO, "14"), (NIC, "15")):
        pci["devices"][addr]["iommu_group"] = group
    pci["devices"][GPU]["driver"] = pci["devices"][AUDIO]["driver"] = "vfio-pci"
    return t


def plan(p: NodeProfile, tree: dict[str, Any]):
    return pve_host.plan(p, Snapshot(tree))


def needed(steps) -> list[str]:
    return [s.key for s in steps if s.needed]


def test_fresh_host_gets_files_rebuilds_and_a_reboot():
    p = profile()
    steps = plan(p, fresh_tree())
    assert needed(steps) == [f"file:{pve_host.VFIO_CONF}", f"file:{pve_host.BLACKLIST_CONF}",
                             f"file:{pve_host.MODULES_CONF}", f"file:{pve_host.GRUB_CFG}",
                             "stamp:pve-initramfs", "stamp:pve-boot", "reboot"]
    files = {s.path: s.content for s in steps if s.kind == "file"}
    vfio = files[pve_host.VFIO_CONF]
    assert "options vfio-pci ids=10de:2230,10de:1aef\n" in vfio
    for module in ("nouveau", "nvidia", "snd_hda_intel"):
        assert f"softdep {module} pre: vfio-pci\n" in vfio
    assert "blacklist nouveau\n" in files[pve_host.BLACKLIST_CONF]
    assert files[pve_host.MODULES_CONF].splitlines()[-3:] == ["vfio", "vfio_iommu_type1",
                                                               "vfio_pci"]
    assert ('GRUB_CMDLINE_LINUX_DEFAULT="${GRUB_CMDLINE_LINUX_DEFAULT} intel_iommu=on '
            'iommu=pt"') in files[pve_host.GRUB_CFG]
    commands = {s.key: s.command for s in steps if s.kind == "command"}
    assert commands["stamp:pve-boot"].startswith("update-grub && ")
    assert commands["stamp:pve-initramfs"].startswith("update-initramfs -u -k all && ")
    reboot = steps[-1]
    assert reboot.kind == "reboot" and reboot.timeout_s == p.reboot_timeout_s
    assert "kernel command line lacks intel_iommu=on iommu=pt" in reboot.why
    assert f"{GPU} is bound to nouveau" in reboot.why


def test_converged_host_needs_nothing():
    p = profile()
    steps = plan(p, converged(p, fresh_tree()))
    assert needed(steps) == []
    assert pve_host.problems(p, Snapshot(converged(p, fresh_tree()))) == []


def test_steps_come_in_the_order_the_role_runs_them():
    """roles/gpunode_pve_host runs the kinds in this order (file, command, then reboot or
    a stop); a refusal is always the only step."""
    order = {"file": 0, "command": 1, "reboot": 2, "stop": 2}
    p = profile()
    for tree in (fresh_tree(), converged(p, fresh_tree())):
        ranks = [order[s.kind] for s in plan(p, tree)]
        assert ranks == sorted(ranks)
    tree = converged(p, fresh_tree())
    tree["pci"]["devices"][NIC]["iommu_group"] = "14"
    steps = plan(p, tree)
    assert [s.key for s in steps] == ["refuse"]


def test_a_shared_iommu_group_is_refused_naming_its_members():
    p = profile()
    tree = converged(p, fresh_tree())
    tree["pci"]["devices"][NIC]["iommu_group"] = "14"
    tree["pci"]["devices"]["0000:00:01.0"]["iommu_group"] = "14"  # a bridge is fine
    (step,) = plan(p, tree)
    assert step.kind == "stop" and step.key == "refuse"
    assert "pve.pci_mappings[0].addresses[0]: 0000:41:00 shares IOMMU group 14 with " \
           "0000:42:00.0 [8086:1533, class 0200, driver igb]" in step.message
    assert "0000:00:01.0" not in step.message
    assert step.message.endswith("nothing was changed")


def test_a_missing_device_is_refused_before_anything_changes():
    p = profile(pci_mappings=[{"name": "a6000", "addresses": ["0000:41:00", "0000:81:00.0"]}])
    (step,) = plan(p, fresh_tree())
    assert step.key == "refuse"
    assert "pve.pci_mappings[0].addresses[1]: 0000:81:00.0 is not a PCI device on this " \
           "host" in step.message


def test_a_function_outside_vfio_ids_is_refused():
    p = profile(vfio_ids=["10de:2230"])
    (step,) = plan(p, fresh_tree())
    assert "0000:41:00.1 [10de:1aef, class 0403, driver snd_hda_intel] is not in " \
           "pve.vfio_ids (10de:2230)" in step.message and "add 10de:1aef" in step.message


def test_another_os_is_refused():
    tree = fresh_tree()
    tree["os"] = {"id": "debian", "version_id": "13"}
    (step,) = plan(profile(), tree)
    assert "the profile says debian-12 but the host runs debian 13" in step.message


def test_amd_needs_no_iommu_argument_and_huge_pages_go_on_the_command_line():
    p = profile(hugepages_1g=64)
    tree = fresh_tree()
    tree["pci"]["cpu_vendor"] = "AuthenticAMD"
    assert pve_host.kernel_args(p, Snapshot(tree)) == [
        "iommu=pt", "default_hugepagesz=1G", "hugepagesz=1G", "hugepages=64"]
    assert pve_host.kernel_args(profile(iommu="intel", iommu_pt=False), Snapshot(tree)) == [
        "intel_iommu=on"]


SYSTEMD_BOOT_STATUS = ("Re-executing '/usr/sbin/proxmox-boot-tool' in new private mount "
                       "namespace..\nSystem currently booted with uefi\n"
                       "7A1B-22C3 is configured with: uefi (versions: 6.8.12-4-pve)\n"
                       "7A1C-1F40 is configured with: uefi (versions: 6.8.12-4-pve)\n")


def systemd_boot_tree() -> dict[str, Any]:
    tree = fresh_tree()
    tree["pci"]["boot_tool"] = {"rc": 0, "out": SYSTEMD_BOOT_STATUS}
    tree["reads"][pve_host.KERNEL_CMDLINE] = "root=ZFS=rpool/ROOT/pve-1 boot=zfs iommu=soft\n"
    tree["cmdline"] = "initrd=\\EFI\\proxmox\\6.8.12-4-pve\\initrd.img-6.8.12-4-pve " \
                      "root=ZFS=rpool/ROOT/pve-1 boot=zfs iommu=soft"
    return tree


def test_systemd_boot_keeps_root_arguments_and_replaces_owned_ones():
    p = profile()
    steps = plan(p, systemd_boot_tree())
    files = {s.path: s.content for s in steps if s.kind == "file"}
    assert pve_host.GRUB_CFG not in files
    assert files[pve_host.KERNEL_CMDLINE] == \
        "root=ZFS=rpool/ROOT/pve-1 boot=zfs intel_iommu=on iommu=pt\n"
    boot = next(s for s in steps if s.key == "stamp:pve-boot")
    assert boot.command.startswith("proxmox-boot-tool refresh && ")
    # idempotent: the file as written plans the same content again
    t = converged(p, systemd_boot_tree())
    t["reads"][pve_host.KERNEL_CMDLINE] = files[pve_host.KERNEL_CMDLINE]
    t["cmdline"] = t["cmdline"].replace(" iommu=soft", "")
    assert needed(plan(p, t)) == []


def test_grub_under_proxmox_boot_tool_stays_grub():
    tree = fresh_tree()
    tree["pci"]["boot_tool"] = {"rc": 0, "out": "System currently booted with legacy bios\n"
                                "D91B-B982 is configured with: grub (versions: 6.8.12-18-pve)\n"}
    assert pve_host.bootloader(profile(), Snapshot(tree)) == "grub"


def test_systemd_boot_without_kernel_cmdline_is_refused():
    tree = systemd_boot_tree()
    tree["reads"][pve_host.KERNEL_CMDLINE] = None
    (step,) = plan(profile(), tree)
    assert "has no /etc/kernel/cmdline" in step.message


def test_reboot_policy_never_stops_after_the_safe_steps():
    p = profile().model_copy(update={"reboot": "never"})
    steps = plan(p, fresh_tree())
    assert steps[-1].key == "reboot-refused" and "reboot policy is 'never'" in steps[-1].message
    assert [s.kind for s in steps if s.needed][:-1] == ["file"] * 4 + ["command"] * 2


def test_iommu_still_off_after_the_reboot_names_the_firmware():
    p = profile()
    tree = converged(p, fresh_tree())
    tree["pci"].update(iommu=[], groups=0)
    steps = plan(p, tree)
    assert needed(steps) == ["verify"]
    assert "enable VT-d (Intel) or AMD-Vi/IOMMU in the firmware" in steps[-1].message


def test_a_driver_that_kept_the_device_after_the_reboot_is_a_failure_not_a_loop():
    p = profile()
    tree = converged(p, fresh_tree())
    tree["pci"]["devices"][AUDIO]["driver"] = "snd_hda_intel"
    steps = plan(p, tree)
    assert needed(steps) == ["verify"]
    assert "0000:41:00.1 is bound to snd_hda_intel, although the vfio configuration was " \
           "in place at boot" in steps[-1].message


def test_a_host_prepared_by_hand_is_not_rebooted():
    """Everything is in place but gpunode never ran here (no stamps): the rebuild commands
    run once, no reboot."""
    p = profile()
    tree = converged(p, fresh_tree())
    for name in (pve_host.INITRAMFS_STAMP, pve_host.BOOT_STAMP):
        del tree["files"][stamp_path(name)]
    assert needed(plan(p, tree)) == ["stamp:pve-initramfs", "stamp:pve-boot"]


def test_a_config_change_after_boot_reboots_once():
    """The initramfs was rebuilt after this boot (an interrupted run): reboot, not a failure."""
    p = profile()
    tree = converged(p, fresh_tree())
    tree["pci"]["devices"][AUDIO]["driver"] = "snd_hda_intel"
    tree["files"][stamp_path(pve_host.INITRAMFS_STAMP)]["mtime"] = BOOT + 600
    assert needed(plan(p, tree)) == ["reboot"]


def test_hugepage_count_change_plans_files_and_a_reboot():
    p = profile()
    tree = converged(p, fresh_tree())
    q = profile(hugepages_1g=8)
    assert needed(plan(q, tree)) == [f"file:{pve_host.GRUB_CFG}", "stamp:pve-boot", "reboot"]


@pytest.mark.parametrize("kind", ["bare-metal", "pve-guest"])
def test_debian_13_is_for_proxmox_hosts_only(kind):
    from pydantic import ValidationError

    conn = {"address": "n1.example"}
    data = {"name": "n1", "kind": kind, "os": "debian-13", "connection": conn}
    if kind == "pve-guest":
        data["vm"] = {"pve_node": "pve1", "vmid": 200, "template_vmid": 9000}
    with pytest.raises(ValidationError, match="os: debian-13 is supported for pve-host "
                       r"nodes \(Proxmox VE 9\) only"):
        NodeProfile.model_validate(data)
    with pytest.raises(ValidationError, match="os: a pve-host runs Proxmox VE on Debian"):
        NodeProfile.model_validate({"name": "p", "kind": "pve-host", "os": "ubuntu-24.04",
                                    "connection": conn})
