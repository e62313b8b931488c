"""A Proxmox VE host prepared for GPU passthrough, written once for both engines.

What it takes (research/proxmox.md §9): the IOMMU on the kernel command line (intel_iommu=on
on Intel, nothing on AMD where it is the default; iommu=pt), through GRUB or systemd-boot as
the host boots; the VFIO modules at boot; vfio-pci claiming the passthrough devices by
vendor:device id before nouveau, nvidia or snd_hda_intel can (softdeps, in the initramfs
too); nouveau and nvidia kept off the host; 1 GiB huge pages reserved at boot when asked;
then a reboot. Each mapped device's IOMMU group must hold only that device's functions
(bridges aside), or no VM can take it: the host is refused, naming the group's members.

`plan(p, snap)` turns that into steps (gpunode.core.plan) from the host's snapshot; `problems`
is what the checks report on a host that should be prepared."""

from __future__ import annotations

from dataclasses import dataclass

from gpunode.core import paths
from gpunode.core.hostcmd import OS_IDS, stamped_command
from gpunode.core.paths import stamp_path
from gpunode.core.plan import Step, file_step, reboot_message, sha256, stop_step
from gpunode.core.render import render
from gpunode.facts import Snapshot
from gpunode.model import NodeProfile
from gpunode.model.parts import PveHost

CONCERN = "pve_host"
VFIO_CONF = paths.PVE_VFIO_CONF
BLACKLIST_CONF = paths.PVE_BLACKLIST_CONF
MODULES_CONF = paths.PVE_MODULES_CONF
GRUB_CFG = paths.PVE_GRUB_CFG
KERNEL_CMDLINE = paths.KERNEL_CMDLINE
VFIO_MODULES = ("vfio", "vfio_iommu_type1", "vfio_pci")
BLACKLIST = ("nouveau", "nvidia", "nvidiafb", "nvidia_drm")
#: Kernel arguments this concern owns on /etc/kernel/cmdline (others stay as they are).
OWNED_ARGS = ("intel_iommu", "amd_iommu", "iommu", "default_hugepagesz", "hugepagesz",
              "hugepages")
BRIDGE_CLASS = "0604"  # PCI-to-PCI bridge: may share a group with the device below it
BOOT_STAMP, INITRAMFS_STAMP = "pve-boot", "pve-initramfs"
VFIO = "vfio-pci"


@dataclass(frozen=True)
class Device:
    address: str  # 0000:01:00.0
    vendor: str
    device: str
    cls: str      # class code without 0x, e.g. 030000
    driver: str | None
    group: str | None

    @property
    def ids(self) -> str:
        return f"{self.vendor}:{self.device}"

    def describe(self) -> str:
        return f"{self.address} [{self.ids}, class {self.cls[:4]}, driver {self.driver or 'none'}]"


def settings(p: NodeProfile) -> PveHost:
    """The node's pve section (its defaults when the site gives none)."""
    return p.pve or PveHost()


def devices(snap: Snapshot) -> dict[str, Device]:
    raw = (snap.data.get("pci") or {}).get("devices", {})
    return {a: Device(a, d["vendor"], d["device"], d["class"], d["driver"], d["iommu_group"])
            for a, d in raw.items()}


def functions(address: str, devs: dict[str, Device]) -> list[Device]:
    """The functions an address names: one (dddd:bb:ss.f) or the whole slot (dddd:bb:ss)."""
    if "." in address:
        return [devs[address]] if address in devs else []
    return [d for a, d in sorted(devs.items()) if a.rsplit(".", 1)[0] == address]


def passthrough(p: NodeProfile) -> list[tuple[str, str]]:
    """(field path, address) of every mapped device on this host."""
    return [(f"pve.pci_mappings[{i}].addresses[{j}]", a)
            for i, m in enumerate(settings(p).pci_mappings)
            for j, a in enumerate(m.addresses)]


def iommu_on(snap: Snapshot) -> bool:
    pci = snap.data.get("pci") or {}
    return bool(pci.get("iommu")) and bool(pci.get("groups"))


def iommu_vendor(p: NodeProfile, snap: Snapshot) -> str:
    if settings(p).iommu != "auto":
        return settings(p).iommu
    vendor = (snap.data.get("pci") or {}).get("cpu_vendor") or ""
    return "amd" if vendor == "AuthenticAMD" else "intel"


def kernel_args(p: NodeProfile, snap: Snapshot) -> list[str]:
    """The kernel arguments this host needs for passthrough."""
    args = ["intel_iommu=on"] if iommu_vendor(p, snap) == "intel" else []
    if settings(p).iommu_pt:
        args.append("iommu=pt")
    if settings(p).hugepages_1g:
        args += ["default_hugepagesz=1G", "hugepagesz=1G", f"hugepages={settings(p).hugepages_1g}"]
    return args


def bootloader(p: NodeProfile, snap: Snapshot) -> str:
    """grub or systemd-boot. proxmox-boot-tool reports each ESP it manages as
    `<uuid> is configured with: uefi (versions: ...)` (systemd-boot) or `...: grub ...`."""
    if settings(p).bootloader != "auto":
        return settings(p).bootloader
    tool = (snap.data.get("pci") or {}).get("boot_tool") or {}
    if tool.get("rc") == 0 and "configured with: uefi" in (tool.get("out") or ""):
        return "systemd-boot"
    return "grub"


def systemd_boot_cmdline(current: str, args: list[str]) -> str:
    """/etc/kernel/cmdline with the owned arguments replaced by `args` (one line)."""
    kept = [t for t in current.split() if t.split("=", 1)[0] not in OWNED_ARGS]
    return " ".join(kept + args) + "\n"


def files(p: NodeProfile, snap: Snapshot) -> list[tuple[str, str]]:
    """(path, content) of every file this concern writes on this host."""
    out = [
        (VFIO_CONF, render("pve_host/gpunode-vfio.conf.j2", p,
                           softdeps=settings(p).host_drivers,
                           vfio_ids=settings(p).vfio_ids)),
        (BLACKLIST_CONF, render("pve_host/gpunode-gpu-blacklist.conf.j2", p,
                                blacklist=BLACKLIST)),
        (MODULES_CONF, render("pve_host/gpunode-vfio-modules.conf.j2", p,
                              modules=VFIO_MODULES)),
    ]
    args = kernel_args(p, snap)
    if bootloader(p, snap) == "systemd-boot":
        current = (snap.data.get("reads") or {}).get(KERNEL_CMDLINE)
        if current is not None:
            out.append((KERNEL_CMDLINE, systemd_boot_cmdline(current, args)))
    else:
        out.append((GRUB_CFG, render("pve_host/60-gpunode-pve-grub.cfg.j2", p,
                                     kernel_args=args)))
    return out


def refusals(p: NodeProfile, snap: Snapshot) -> list[str]:
    """Why this host cannot be prepared as the site says, before anything changes."""
    os_ = snap.data["os"]
    found = (os_.get("id"), os_.get("version_id"))
    if found != OS_IDS[p.os]:
        return [f"the profile says {p.os} but the host runs {found[0]} {found[1]}"]
    if bootloader(p, snap) == "systemd-boot" and \
            (snap.data.get("reads") or {}).get(KERNEL_CMDLINE) is None:
        return [f"the host boots with systemd-boot but has no {KERNEL_CMDLINE} to add the "
                "kernel arguments to (proxmox-boot-tool keeps the root= arguments there)"]
    return group_problems(p, snap)


def group_problems(p: NodeProfile, snap: Snapshot) -> list[str]:
    """Mapped devices missing from the host, not covered by vfio_ids, or sharing their IOMMU
    group with other devices (known only once the IOMMU is on)."""
    devs = devices(snap)
    out = []
    ids = set(settings(p).vfio_ids)
    for where, address in passthrough(p):
        funcs = functions(address, devs)
        if not funcs:
            out.append(f"{where}: {address} is not a PCI device on this host (see "
                       "`lspci -D`; after a hardware change the card may have moved)")
            continue
        for d in funcs:
            if d.ids not in ids:
                out.append(f"{where}: {d.describe()} is not in pve.vfio_ids "
                           f"({', '.join(sorted(ids)) or 'empty'}), so vfio-pci would not "
                           f"claim it at boot; add {d.ids}")
        if not iommu_on(snap):
            continue
        own = {d.address for d in funcs}
        for group in sorted({d.group for d in funcs if d.group}):
            others = [d for d in devs.values() if d.group == group and d.address not in own
                      and not d.cls.startswith(BRIDGE_CLASS)]
            if others:
                out.append(f"{where}: {address} shares IOMMU group {group} with "
                           f"{'; '.join(o.describe() for o in others)}: a VM can only take "
                           "the whole group. Move the card to a slot of its own (one wired "
                           "to the CPU, or behind a port with ACS), or pass the other devices "
                           "through to the same VM")
        for d in funcs:
            if d.group is None:
                out.append(f"{where}: {d.address} has no IOMMU group although the IOMMU is "
                           "on")
    return out


def state(p: NodeProfile, snap: Snapshot) -> tuple[list[str], list[str]]:
    """(reboot reasons, failures): what the next boot will fix, and what a boot did not.
    A reboot is asked for only when the running kernel differs from what the next boot
    gives, so a host prepared by hand is not rebooted."""
    args = kernel_args(p, snap)
    current = snap.data["cmdline"].split()
    missing = [a for a in args if a not in current]
    stale = [a for a in current if a.split("=", 1)[0] in OWNED_ARGS and a not in args]
    boot_pending = boot_needed(p, snap) or _ran_since_boot(snap, BOOT_STAMP)
    vfio_pending = (initramfs_needed(p, snap) or _ran_since_boot(snap, INITRAMFS_STAMP)
                    or boot_pending)
    reasons, failures = [], []
    if missing:
        reasons.append(f"kernel command line lacks {' '.join(missing)}")
    elif stale and boot_pending:
        reasons.append(f"kernel command line still has {' '.join(stale)}")
    elif not iommu_on(snap):
        failures.append("the IOMMU is off although the kernel command line has "
                        f"{' '.join(args) or 'its defaults'}: enable VT-d (Intel) or "
                        "AMD-Vi/IOMMU in the firmware setup, then reboot")
    devs = devices(snap)
    unbound = [d for _, a in passthrough(p) for d in functions(a, devs) if d.driver != VFIO]
    if unbound or "vfio_pci" not in snap.data.get("modules", []):
        what = ("; ".join(f"{d.address} is bound to {d.driver or 'no driver'}"
                          for d in unbound) or "vfio_pci is not loaded")
        if vfio_pending or missing:
            reasons.append(f"{what} (vfio-pci takes the devices at the next boot)")
        else:
            failures.append(f"{what}, although the vfio configuration was in place at boot: "
                            "check `lspci -nnk`, that the driver is a module (not built in) "
                            "and pve.vfio_ids")
    return reasons, failures


def _ran_since_boot(snap: Snapshot, name: str) -> bool:
    """The stamp's command ran after this boot (its effect applies at the next one)."""
    info = snap.file(stamp_path(name))
    return bool(info and info.get("mtime", 0) > snap.data.get("boot_time", 0))


def _stamp_key(paths_contents: list[tuple[str, str]]) -> str:
    return sha256("".join(f"{path}\n{content}" for path, content in paths_contents))


def initramfs_key(p: NodeProfile, snap: Snapshot) -> str:
    return _stamp_key([f for f in files(p, snap) if f[0] in (VFIO_CONF, BLACKLIST_CONF)])


def initramfs_needed(p: NodeProfile, snap: Snapshot) -> bool:
    return _stamp_differs(snap, INITRAMFS_STAMP, initramfs_key(p, snap))


def boot_key(p: NodeProfile, snap: Snapshot) -> str:
    return _stamp_key([f for f in files(p, snap) if f[0] in (GRUB_CFG, KERNEL_CMDLINE)])


def boot_needed(p: NodeProfile, snap: Snapshot) -> bool:
    return _stamp_differs(snap, BOOT_STAMP, boot_key(p, snap))


def _stamp_differs(snap: Snapshot, name: str, key: str) -> bool:
    info = snap.file(stamp_path(name))
    return not (info and info.get("sha256") == sha256(key + "\n"))


def boot_command(loader: str) -> str:
    """Regenerate the boot configuration. On hosts whose ESPs proxmox-boot-tool manages,
    update-grub's own hook runs `proxmox-boot-tool refresh`."""
    if loader == "systemd-boot":
        return "proxmox-boot-tool refresh"
    return "update-grub"


def plan(p: NodeProfile, snap: Snapshot) -> list[Step]:
    """Every step of this concern on this host, in order."""
    refused = refusals(p, snap)
    if refused:
        return [stop_step(CONCERN, "refuse",
                          f"{p.name}: " + "; ".join(refused) + "; nothing was changed")]
    written = files(p, snap)
    steps = [file_step(CONCERN, snap, path, content) for path, content in written]
    loader = bootloader(p, snap)
    rebuild, boot = initramfs_needed(p, snap), boot_needed(p, snap)
    steps += [
        Step(key=f"stamp:{INITRAMFS_STAMP}", concern=CONCERN, kind="command",
             title="Rebuild the initramfs (vfio-pci first, GPU drivers blacklisted)",
             needed=rebuild, why="modprobe configuration changed" if rebuild else "current",
             command=stamped_command("update-initramfs -u -k all", INITRAMFS_STAMP,
                                     initramfs_key(p, snap))),
        Step(key=f"stamp:{BOOT_STAMP}", concern=CONCERN, kind="command",
             title=f"Update the boot configuration ({loader})", needed=boot,
             why="kernel arguments changed" if boot else "current",
             command=stamped_command(boot_command(loader), BOOT_STAMP, boot_key(p, snap))),
    ]
    reasons, failures = state(p, snap)
    if reasons and p.reboot == "never":
        steps.append(stop_step(CONCERN, "reboot-refused", reboot_message(p, reasons)))
    elif reasons:
        steps.append(Step(key="reboot", concern=CONCERN, kind="reboot",
                          title="Reboot for the passthrough settings", needed=True,
                          why="; ".join(reasons), reasons=reasons,
                          timeout_s=p.reboot_timeout_s))
    elif failures:
        steps.append(stop_step(CONCERN, "verify", f"{p.name}: " + "; ".join(failures)))
    return steps


def problems(p: NodeProfile, snap: Snapshot) -> list[str]:
    """What the checks report: refusals, reboot reasons and failures, files not as planned."""
    out = refusals(p, snap)
    if out:
        return out
    reasons, failures = state(p, snap)
    out += reasons + failures
    out += [f"{s.path}: {s.why}" for s in plan(p, snap) if s.kind == "file" and s.needed]
    return out
