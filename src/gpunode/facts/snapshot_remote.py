# Runs ON THE HOST (python3, stdlib only) and prints one JSON document with everything
# the deploy and the reboot logic read: one remote command instead of dozens of facts.
# Input: argv[1] = JSON spec {"paths": [...], "units": [...], "sysctls": [...]}.
import glob
import grp
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys


def run(cmd, timeout=60):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)


def read(path, default=None):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def boot_loaders():
    """The boot loader tools found on the host, by name (kernel arguments go through
    the first: GRUB's update-grub or grub-mkconfig)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin"
    tool = lambda name: shutil.which(name, path=path) is not None  # noqa: E731
    found = []
    if tool("update-grub") or tool("grub-mkconfig"):
        found.append("grub")
    if any(os.path.exists(p + "/loader/loader.conf") for p in ("/boot/efi", "/efi", "/boot")):
        found.append("systemd-boot")
    if tool("proxmox-boot-tool"):
        found.append("proxmox-boot-tool")
    if tool("extlinux") or os.path.exists("/boot/extlinux/extlinux.conf"):
        found.append("extlinux")
    if os.path.exists("/etc/kernel/cmdline"):
        found.append("/etc/kernel/cmdline")
    return found


def thp_default(release):
    """The running kernel's built-in THP mode, from its config (None: no config file, or a
    kernel without THP), so gpunode asks on the command line only for what differs."""
    lines = set((read("/boot/config-" + release, "") or "").splitlines())
    for mode in ("always", "madvise", "never"):
        if f"CONFIG_TRANSPARENT_HUGEPAGE_{mode.upper()}=y" in lines:
            return mode
    return None


#: Where an installed kernel's nvidia module lives: DKMS builds (updates/dkms on Debian and
#: Ubuntu; .ko, .ko.xz or .ko.zst), other updates/ installs, and Ubuntu's prebuilt
#: linux-modules-nvidia-* (kernel/nvidia-<branch>[srv]/).
NVIDIA_KO = ("updates/nvidia.ko*", "updates/*/nvidia.ko*", "kernel/nvidia-*/nvidia.ko*")


def kernel_modules(kernels, root="/lib/modules"):
    """Per installed kernel: whether it has headers (the build link DKMS builds against) and
    the nvidia module's path (None: none), so a reboot into a kernel without it is refused.
    modinfo finds a module elsewhere through modules.dep; its path must exist (a stale
    modules.dep names files that are gone)."""
    out = {}
    for k in kernels:
        base = os.path.join(root, k)
        found = sorted(f for g in NVIDIA_KO for f in glob.glob(os.path.join(glob.escape(base), g)))
        path = found[0] if found else None
        if path is None:
            rc, text, _ = run(["modinfo", "-k", k, "-n", "nvidia"])
            path = text.strip() if rc == 0 and os.path.isfile(text.strip()) else None
        out[k] = {"headers": os.path.exists(os.path.join(base, "build")), "nvidia": path}
    return out


def file_info(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    info = {"mode": "%04o" % (st.st_mode & 0o7777), "mtime": int(st.st_mtime)}
    try:
        info["owner"] = pwd.getpwuid(st.st_uid).pw_name
        info["group"] = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        info["owner"], info["group"] = str(st.st_uid), str(st.st_gid)
    if os.path.isfile(path):
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                h.update(f.read())
            info["sha256"] = h.hexdigest()
        except OSError:
            info["sha256"] = None
    else:
        info["dir"] = os.path.isdir(path)
    return info


def link_name(path):
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def pci_facts():
    """PCI devices with their driver and IOMMU group, the IOMMU and interrupt remapping as
    the kernel reports them (a Proxmox host prepared for passthrough)."""
    devices = {}
    for d in sorted(glob.glob("/sys/bus/pci/devices/*")):
        devices[os.path.basename(d)] = {
            "vendor": (read(d + "/vendor", "") or "").strip().removeprefix("0x"),
            "device": (read(d + "/device", "") or "").strip().removeprefix("0x"),
            "class": (read(d + "/class", "") or "").strip().removeprefix("0x"),
            "driver": link_name(d + "/driver"),
            "iommu_group": link_name(d + "/iommu_group"),
        }
    interrupts = read("/proc/interrupts", "") or ""
    vendor = next((line.split(":", 1)[1].strip() for line in
                   (read("/proc/cpuinfo", "") or "").splitlines()
                   if line.startswith("vendor_id")), None)
    rc, status, _ = run(["proxmox-boot-tool", "status"]) if os.path.exists(
        "/usr/sbin/proxmox-boot-tool") else (None, "", "")
    return {
        "devices": devices,
        "iommu": sorted(os.listdir("/sys/class/iommu")) if os.path.isdir("/sys/class/iommu")
        else [],
        "groups": len(glob.glob("/sys/kernel/iommu_groups/*")),
        # Remapped interrupt chips carry an IR- prefix (IR-PCI-MSI, IR-IO-APIC).
        "interrupt_remapping": " IR-" in interrupts,
        "cpu_vendor": vendor,
        "boot_tool": {"rc": rc, "out": status[-4000:]},
    }


def main():
    spec = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    out = {}
    osr = {}
    for line in (read("/etc/os-release", "") or "").splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            osr[k] = v.strip('"')
    out["os"] = {"id": osr.get("ID"), "version_id": osr.get("VERSION_ID")}
    out["kernel"] = os.uname().release
    out["thp_default"] = thp_default(out["kernel"])
    out["kernels"] = sorted(os.path.basename(d) for d in glob.glob("/lib/modules/*")
                            if os.path.exists(os.path.join(d, "modules.dep"))
                            or os.path.isdir(os.path.join(d, "kernel")))
    out["kernel_modules"] = kernel_modules(out["kernels"])
    out["cmdline"] = (read("/proc/cmdline", "") or "").strip()
    out["boot_time"] = next((int(line.split()[1]) for line in
                             (read("/proc/stat", "") or "").splitlines()
                             if line.startswith("btime ")), 0)
    rc, virt, _ = run(["systemd-detect-virt"])
    out["virt"] = virt.strip() or "none"
    out["cpufreq"] = os.path.isdir("/sys/devices/system/cpu/cpu0/cpufreq")
    out["governors"] = sorted({(read(p, "") or "").strip() for p in
                               glob.glob("/sys/devices/system/cpu/cpu*/cpufreq/scaling_governor")})
    sb = None
    for p in glob.glob("/sys/firmware/efi/efivars/SecureBoot-*"):
        data = open(p, "rb").read()
        sb = bool(data[-1]) if data else None
    out["secure_boot"] = sb
    out["efi"] = os.path.isdir("/sys/firmware/efi")
    out["boot"] = boot_loaders()
    mods = [line.split()[0] for line in (read("/proc/modules", "") or "").splitlines() if line]
    out["modules"] = sorted(m for m in mods if m.startswith(("nouveau", "nvidia", "vfio")))
    out["reboot_required"] = os.path.exists("/run/reboot-required")
    out["reboot_required_pkgs"] = (read("/run/reboot-required.pkgs", "") or "").split()
    out["nvidia_proc_version"] = read("/proc/driver/nvidia/version")
    rc, dpkg, _ = run(["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${Status}\n"])
    pkgs, holds, unfinished = {}, [], []
    for line in dpkg.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        name, version, status = parts
        words = status.split()
        if len(words) == 3 and words[2] in ("installed", "half-configured", "unpacked"):
            pkgs[name] = version
        if words and words[0] == "hold":
            holds.append(name)
        if len(words) == 3 and words[2] in ("half-installed", "half-configured", "unpacked",
                                            "triggers-awaited", "triggers-pending"):
            unfinished.append(name)
    out["packages"] = pkgs
    # An interrupted dpkg run (killed apt, lost power) leaves its journal or packages
    # that are unpacked but not configured; apt refuses to work until it is finished.
    journal = glob.glob("/var/lib/dpkg/updates/*")
    out["dpkg_unfinished"] = sorted(unfinished) + (["(dpkg journal)"] if journal else [])
    out["holds"] = sorted(holds)
    lists = glob.glob("/var/lib/apt/lists/*_Packages") + glob.glob("/var/lib/apt/lists/*Release")
    out["apt_lists_mtime"] = max((os.path.getmtime(p) for p in lists), default=0)
    out["files"] = {p: file_info(p) for p in spec.get("paths", [])}
    units = spec.get("units", [])
    out["units"] = {}
    if units:
        rc, text, _ = run(["systemctl", "show", "--no-pager", "-p",
                           "Id,LoadState,ActiveState,SubState,UnitFileState,MainPID,"
                           "NeedDaemonReload", *units])
        blocks = [b for b in text.split("\n\n")]
        for unit, block in zip(units, blocks, strict=False):
            props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            out["units"][unit] = props
    out["sysctl"] = {}
    for key in spec.get("sysctls", []):
        value = read("/proc/sys/" + key.replace(".", "/"))
        out["sysctl"][key] = " ".join(value.split()) if value is not None else None
    thp = {}
    for k in ("enabled", "defrag"):
        text = read("/sys/kernel/mm/transparent_hugepage/" + k, "") or ""
        thp[k] = next((w.strip("[]") for w in text.split() if w.startswith("[")), None)
    out["thp"] = thp
    if spec.get("block"):
        # every whole disk's active I/O scheduler, those it offers, and its read-ahead
        out["block"] = {}
        for d in sorted(glob.glob("/sys/block/*")):
            words = (read(d + "/queue/scheduler", "") or "").split()
            ra = (read(d + "/queue/read_ahead_kb", "") or "").strip()
            out["block"][os.path.basename(d)] = {
                "scheduler": next((w.strip("[]") for w in words if w.startswith("[")), None),
                "schedulers": [w.strip("[]") for w in words],
                "read_ahead_kb": int(ra) if ra.isdigit() else None}
    out["hugepages"] = {os.path.basename(d): int((read(d + "/nr_hugepages", "0") or "0").strip())
                        for d in glob.glob("/sys/kernel/mm/hugepages/hugepages-*")}
    out["memory_kib"] = next((int(line.split()[1]) for line in
                              (read("/proc/meminfo", "") or "").splitlines()
                              if line.startswith("MemTotal:")), None)
    smi = {"present": False}
    if any(os.access(os.path.join(d, "nvidia-smi"), os.X_OK)
           for d in os.environ.get("PATH", "/usr/bin:/bin").split(":") + ["/usr/bin"]):
        smi["present"] = True
        q = spec.get("nvidia_smi_query")
        if q:
            rc, text, err = run(q.split(), timeout=60)
            smi.update({"rc": rc, "query": text, "error": (err or text).strip()[:2000]})
            if rc == 0:
                rc2, topo, _ = run(["nvidia-smi", "topo", "-m"], timeout=60)
                smi["topo"] = topo if rc2 == 0 else None
    out["nvidia_smi"] = smi
    venvs = {}
    for prefix in spec.get("venvs", []):
        found = glob.glob(prefix + "/lib/python3*/site-packages/*.dist-info")
        venvs[prefix] = {os.path.basename(d)[:-len(".dist-info")].rsplit("-", 1)[0].lower():
                         os.path.basename(d)[:-len(".dist-info")].rsplit("-", 1)[1]
                         for d in found}
    out["venvs"] = venvs
    out["users"] = sorted(line.split(":", 1)[0] for line in
                          (read("/etc/passwd", "") or "").splitlines() if ":" in line)
    out["globs"] = {g: sorted(glob.glob(g)) for g in spec.get("globs", [])}
    out["cmds"] = {}
    for key, cmd in spec.get("commands", {}).items():
        rc, text, err = run(["sh", "-c", cmd], timeout=120)
        out["cmds"][key] = {"rc": rc, "out": text[-4000:], "err": err[-2000:]}
    out["reads"] = {path: read(path) for path in spec.get("reads", [])}
    if spec.get("pci"):
        out["pci"] = pci_facts()
    json.dump(out, sys.stdout, sort_keys=True)


main()
