"""Proxmox VE host prepared for GPU passthrough: IOMMU and interrupt remapping on, each
mapped device alone in its IOMMU group and bound to vfio-pci, VFIO loaded, huge pages
reserved, gpunode's files as planned. Reads the deploy's own snapshot (gpunode.core.pve_host)."""

from __future__ import annotations

import pytest

from gpunode.core import pve_host

pytestmark = pytest.mark.pve_host


def test_kernel_arguments(node, facts):
    args = pve_host.kernel_args(node, facts.snap)
    missing = [a for a in args if a not in facts.snap.data["cmdline"].split()]
    assert not missing, (f"kernel command line lacks {' '.join(missing)} "
                         f"(/proc/cmdline: {facts.snap.data['cmdline']})")


def test_iommu_enabled(node, facts):
    pci = facts.snap.data["pci"]
    assert pve_host.iommu_on(facts.snap), (
        f"the IOMMU is off (/sys/class/iommu: {pci['iommu'] or 'empty'}, "
        f"{pci['groups']} IOMMU groups): enable VT-d/AMD-Vi in the firmware and check the "
        "kernel arguments")


def test_interrupt_remapping(node, facts):
    assert facts.snap.data["pci"]["interrupt_remapping"], (
        "no remapped interrupts in /proc/interrupts (no IR- chips): without interrupt "
        "remapping, VFIO refuses device assignment (enable it in the firmware)")


def test_passthrough_devices_isolated(node, facts):
    if not pve_host.passthrough(node):
        pytest.skip("the site maps no PCI devices on this host (pve.pci_mappings)")
    problems = pve_host.group_problems(node, facts.snap)
    assert not problems, "\n".join(problems)


def test_passthrough_devices_on_vfio(node, facts):
    devs = pve_host.devices(facts.snap)
    found = [d for _, a in pve_host.passthrough(node) for d in pve_host.functions(a, devs)]
    if not found:
        pytest.skip("no mapped PCI device found on this host")
    wrong = [d.describe() for d in found if d.driver != pve_host.VFIO]
    assert not wrong, f"not bound to vfio-pci: {'; '.join(wrong)}"


def test_vfio_modules_loaded(node, facts):
    loaded = set(facts.snap.data["modules"])
    assert "vfio_pci" in loaded, f"vfio_pci is not loaded (loaded: {sorted(loaded) or 'none'})"
    host_drivers = sorted(m for m in loaded if m.startswith(("nouveau", "nvidia")))
    assert not host_drivers, f"GPU drivers loaded on the Proxmox host: {host_drivers}"


def test_hugepages_1g(node, facts):
    want = pve_host.settings(node).hugepages_1g
    if not want:
        pytest.skip("the site reserves no 1 GiB pages (pve.hugepages_1g)")
    have = facts.snap.data["hugepages"].get("hugepages-1048576kB", 0)
    assert have == want, f"1 GiB huge pages: {have} reserved, expected {want}"


def test_files_as_planned(node, facts):
    drift = [f"{s.path}: {s.why}" for s in pve_host.plan(node, facts.snap)
             if s.kind == "file" and s.needed]
    assert not drift, "\n".join(drift)


def test_no_reboot_pending(node, facts):
    reasons, failures = pve_host.state(node, facts.snap)
    assert not reasons and not failures, "; ".join(reasons + failures)
