"""Shared state of the simulated NVIDIA stack inside a lab guest (SIMULATION).

Installed at /usr/lib/gpunode-sim/gpunode_sim.py; python3 stdlib only (Debian 12: 3.11).
Every path is taken relative to $GPUNODE_SIM_ROOT (default "/") so unit tests can run the
guest tools on a development host against a temporary directory. See ../CONTRACT.md.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from typing import Any

ETC_GPUS = "/etc/gpunode-sim/gpus.json"
STATE = "/var/lib/gpunode-sim/state.json"
LIB = "/usr/lib/gpunode-sim"
INSTALLED = LIB + "/installed"
RUN = "/run/gpunode-sim"
LOADED_KMOD = RUN + "/loaded-kmod"
LOADED_UVM = RUN + "/loaded-uvm"
PROC_DEVICES = RUN + "/proc-devices"
PERSISTENCED = RUN + "/persistenced.json"
PROCS = RUN + "/procs"
PROC_DRIVER = "/proc/driver"

# CUDA version a driver branch reports (nvidia-smi header, --version).
CUDA_FOR_BRANCH = {
    "535": "12.2",
    "545": "12.3",
    "550": "12.4",
    "555": "12.5",
    "560": "12.6",
    "565": "12.7",
    "570": "12.8",
    "575": "12.9",
    "580": "13.0",
    "590": "13.1",
}

NOT_LOADED_TEXT = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)
EXIT_NOT_LOADED = 9  # NVML_ERROR_DRIVER_NOT_LOADED
EXIT_MISMATCH = 18  # NVML_ERROR_LIB_RM_VERSION_MISMATCH
EXIT_NOT_FOUND = 6
EXIT_INVALID = 2
EXIT_NO_PERMISSION = 4


def root() -> str:
    return os.environ.get("GPUNODE_SIM_ROOT", "/") or "/"


def on_real_root() -> bool:
    return os.path.realpath(root()) == "/"


def path(p: str) -> str:
    """Map an absolute guest path into $GPUNODE_SIM_ROOT."""
    return os.path.join(root(), p.lstrip("/"))


def read_text(p: str) -> str | None:
    try:
        with open(path(p), encoding="utf-8") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def write_text(p: str, text: str, mode: int = 0o644) -> None:
    full = path(p)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    tmp = f"{full}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, full)


def installed(component: str) -> str | None:
    """One-line file written by a simulated package, e.g. installed/driver -> '580.95.05'."""
    text = read_text(f"{INSTALLED}/{component}")
    return text.strip() if text and text.strip() else None


def branch(version: str) -> str:
    return version.split(".", 1)[0]


def cuda_version(driver_version: str) -> str:
    return CUDA_FOR_BRANCH.get(branch(driver_version), "13.0")


def nvml_version(driver_version: str) -> str:
    return ".".join(driver_version.split(".")[:2])


# ---------------------------------------------------------------- GPUs and settings


def load_gpus() -> list[dict[str, Any]]:
    text = read_text(ETC_GPUS)
    if not text:
        return []
    doc = json.loads(text)
    gpus = list(doc.get("gpus", []))
    gpus.sort(key=lambda g: g["index"])
    return gpus


def default_settings(gpu: dict[str, Any]) -> dict[str, Any]:
    m = gpu["model"]
    return {
        "persistence": False,
        "power_limit_w": m["power_default_w"],
        "ecc_current": m["ecc_default"],
        "ecc_pending": m["ecc_default"],
        "locked_clocks": None,
        "app_clocks": None,
        "compute_mode": "Default",
    }


def load_state() -> dict[str, Any]:
    text = read_text(STATE)
    if not text:
        return {"gpus": {}}
    doc = json.loads(text)
    doc.setdefault("gpus", {})
    return doc


def save_state(state: dict[str, Any]) -> None:
    write_text(STATE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def settings(state: dict[str, Any], gpu: dict[str, Any]) -> dict[str, Any]:
    """The settings of one GPU (defaults filled in); mutating it mutates ``state``."""
    cur = state["gpus"].setdefault(gpu["uuid"], {})
    for k, v in default_settings(gpu).items():
        cur.setdefault(k, v)
    return cur


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def persistenced_info() -> dict[str, Any] | None:
    """The running nvidia-persistenced's record, or None if it is not running."""
    text = read_text(PERSISTENCED)
    if not text:
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not pid_alive(int(info.get("pid", 0))):
        return None
    return info


def persistence_enabled(state: dict[str, Any], gpu: dict[str, Any]) -> bool:
    info = persistenced_info()
    if info is not None and info.get("persistence", {}).get(gpu["uuid"]):
        return True
    return bool(settings(state, gpu)["persistence"])


def memory_total(state: dict[str, Any], gpu: dict[str, Any]) -> int:
    m = gpu["model"]
    return m["memory_total_ecc_mib"] if settings(state, gpu)["ecc_current"] else m["memory_total_mib"]


def processes() -> list[dict[str, Any]]:
    """Simulated compute processes (written by the vLLM stand-in) whose pid is alive."""
    d = path(PROCS)
    out: list[dict[str, Any]] = []
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return out
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(d, name), encoding="utf-8") as f:
                rec = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if pid_alive(int(rec.get("pid", 0))):
            out.append(rec)
    return out


def memory_used(gpu: dict[str, Any]) -> int:
    used = int(gpu.get("readings", {}).get("memory_used_mib", 1))
    for p in processes():
        used += int(p.get("memory_mib", {}).get(gpu["uuid"], 0))
    return used


def node_cpulist(node: int) -> str:
    text = read_text(f"/sys/devices/system/node/node{node}/cpulist")
    if text and text.strip():
        return text.strip()
    n = os.cpu_count() or 1
    return "0" if n == 1 else f"0-{n - 1}"


# ---------------------------------------------------------------- driver state


def driver_status() -> tuple[str, str]:
    """("ok", version) | ("not_loaded", "") | ("mismatch", user-space version).

    The kernel side is /run/gpunode-sim/loaded-kmod (written at boot); the user side is
    installed/driver. A package upgrade without reboot makes them differ, as on real hosts.
    """
    lib = installed("driver")
    loaded = read_text(LOADED_KMOD)
    if not loaded or not loaded.strip() or lib is None:
        return "not_loaded", ""
    kver = loaded.split()[0]
    if kver != lib:
        return "mismatch", lib
    return "ok", lib


def fail_unusable(status: tuple[str, str]) -> int:
    """Print nvidia-smi's real failure text for a non-ok driver status; return its exit code."""
    kind, ver = status
    if kind == "mismatch":
        print("Failed to initialize NVML: Driver/library version mismatch")
        print(f"NVML library version: {nvml_version(ver)}")
        return EXIT_MISMATCH
    print(NOT_LOADED_TEXT)
    return EXIT_NOT_LOADED


# ---------------------------------------------------------------- boot


def proc_version_text(kmod: str) -> str:
    """/proc/driver/nvidia/version for installed/kmod '<version> open|proprietary'.

    Layout per captures.md §7.2 (two spaces between fields; the open module adds
    'Open Kernel Module for x86_64' and 'Release Build  (builder@host)'; GCC line with a
    trailing space). The build date and builder are simulated.
    """
    parts = kmod.split()
    ver = parts[0]
    flavour = parts[1] if len(parts) > 1 else "open"
    date = "Tue Sep 23 22:56:28 UTC 2025"
    gcc = "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14+deb12u1) \n"
    if flavour == "proprietary":
        return f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {ver}  {date}\n" + gcc
    return (
        f"NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {ver}  Release Build  "
        f"(dvs-builder@U22-I3-AF03-09-1)  {date}\n" + gcc
    )


def nouveau_blacklisted() -> bool:
    """True if modprobe config or the kernel command line keeps nouveau from loading."""
    cmdline = read_text("/proc/cmdline") or ""
    for word in cmdline.split():
        k, _, v = word.partition("=")
        if k in ("modprobe.blacklist", "module_blacklist", "rd.driver.blacklist") and (
            "nouveau" in v.split(",")
        ):
            return True
    for d in ("/etc/modprobe.d", "/usr/lib/modprobe.d", "/lib/modprobe.d", "/run/modprobe.d"):
        try:
            names = sorted(os.listdir(path(d)))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if not name.endswith(".conf"):
                continue
            for line in (read_text(f"{d}/{name}") or "").splitlines():
                w = line.split()
                if (
                    len(w) >= 2
                    and w[1] == "nouveau"
                    and (w[0] == "blacklist" or (w[0] == "install" and "false" in line))
                ):
                    return True
    return False


def nouveau_loaded() -> bool:
    """nouveau is loaded for real, or would be (GPUs present and it is not blacklisted).

    The lab VMs have no real NVIDIA device, so udev never loads nouveau; the simulation
    assumes it would, as on a real host, unless the deploy blacklisted it.
    """
    if os.path.isdir(path("/sys/module/nouveau")):
        return True
    return bool(load_gpus()) and not nouveau_blacklisted()


def _make_node(p: str, major: int, minor: int, mode: int) -> None:
    full = path(p)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    if os.path.lexists(full):
        os.remove(full)
    if on_real_root():
        os.mknod(full, stat.S_IFCHR | mode, os.makedev(major, minor))
    else:  # tests: a plain file with the same name and mode
        with open(full, "w"):
            pass
    os.chmod(full, mode)


# ---------------------------------------------------------------- nvidia-uvm

# Where systemd-modules-load reads module lists (modules-load.d(5)); Debian and Ubuntu
# link /etc/modules-load.d/modules.conf to /etc/modules.
MODULES_LOAD_DIRS = ("/etc/modules-load.d", "/run/modules-load.d", "/usr/local/lib/modules-load.d",
                     "/usr/lib/modules-load.d", "/lib/modules-load.d")
UDEV_RULES_DIRS = ("/etc/udev/rules.d", "/run/udev/rules.d", "/usr/lib/udev/rules.d",
                   "/lib/udev/rules.d")
UVM_NODES = ("/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
NVIDIA_MAJOR = 195


def _config_files(dirs: tuple[str, ...], suffix: str) -> list[str]:
    names: dict[str, str] = {}
    for d in dirs:  # the first directory holding a name wins, as systemd's lookup does
        try:
            for name in os.listdir(path(d)):
                if name.endswith(suffix):
                    names.setdefault(name, f"{d}/{name}")
        except (FileNotFoundError, NotADirectoryError):
            continue
    return [names[n] for n in sorted(names)]


def uvm_listed() -> bool:
    """nvidia-uvm (or nvidia_uvm) is in a modules-load.d list or /etc/modules."""
    for f in [*_config_files(MODULES_LOAD_DIRS, ".conf"), "/etc/modules"]:
        for line in (read_text(f) or "").splitlines():
            word = line.split("#", 1)[0].strip()
            if word and not word.startswith(";") and word.replace("-", "_") == "nvidia_uvm":
                return True
    return False


def udev_uvm() -> tuple[bool, bool]:
    """(loads nvidia-uvm, creates its nodes) by the installed udev rules when nvidia.ko binds
    the GPUs. Ubuntu's nvidia-kernel-common-<branch> 71-nvidia.rules does both (modprobe
    nvidia-uvm on the driver's add event, ub-device-create on nvidia_uvm's module event);
    NVIDIA's Debian packages ship no such rule."""
    loads = creates = False
    for f in _config_files(UDEV_RULES_DIRS, ".rules"):
        for line in (read_text(f) or "").splitlines():
            if line.lstrip().startswith("#") or 'ACTION=="add"' not in line:
                continue
            if "/sbin/modprobe nvidia-uvm" in line:
                loads = True
            if 'DEVPATH=="/module/nvidia_uvm"' in line and "RUN+=" in line:
                creates = True
    return loads, creates


def uvm_loaded() -> bool:
    return bool(read_text(LOADED_UVM))


def _proc_devices(uvm_major: int | None) -> str:
    """/proc/devices as the kernel shows it with the NVIDIA modules loaded: systemd resolves
    DeviceAllow=char-nvidia* from it. The real file lacks them in a lab VM, so the boot unit
    bind-mounts this text over it."""
    real = read_text(PROC_DEVICES + ".orig") or ""
    head, _, block = real.partition("\nBlock devices:")
    lines = [ln for ln in head.splitlines() if ln.strip()]
    # the open module registers major 195 as "nvidia", the proprietary one as
    # "nvidia-frontend" (research/domain.md)
    kmod = (read_text(LOADED_KMOD) or installed("kmod") or "").split()
    name = "nvidia-frontend" if kmod[-1:] == ["proprietary"] else "nvidia"
    extra = [f"{NVIDIA_MAJOR:3d} {name}"] + (
        [f"{uvm_major:3d} nvidia-uvm"] if uvm_major is not None else [])
    chars = sorted([*lines[1:], *extra], key=lambda ln: int(ln.split()[0]))
    text = "Character devices:\n" + "\n".join(chars) + "\n"
    return text + ("\nBlock devices:" + block if block else "")


def uvm_major() -> int:
    """The dynamic major nvidia-uvm gets: the highest free one in 234..254, as the kernel
    hands them out (find_dynamic_major counts down from 254)."""
    used = set()
    for line in (read_text(PROC_DEVICES + ".orig") or "").partition("Block devices:")[0].splitlines():
        w = line.split()
        if w and w[0].isdigit():
            used.add(int(w[0]))
    return next((m for m in range(254, 233, -1) if m not in used), 238)


def _show_devices() -> None:
    """Rewrite the bind-mounted /proc/devices in place (the mount follows the inode)."""
    if not os.path.exists(path(PROC_DEVICES)):
        return
    with open(path(PROC_DEVICES), "w", encoding="utf-8") as f:
        f.write(_proc_devices(uvm_major() if uvm_loaded() else None))


def load_uvm() -> bool:
    """modprobe nvidia-uvm: loads only beside a loaded nvidia module; creates no node."""
    if not read_text(LOADED_KMOD):
        return False
    write_text(LOADED_UVM, "nvidia_uvm\n")
    _show_devices()
    return True


def make_uvm_nodes(minor: int = 0) -> None:
    """What nvidia-modprobe -u -c=N (or Ubuntu's ub-device-create) does once nvidia-uvm is
    loaded: /dev/nvidia-uvm (minor N) and /dev/nvidia-uvm-tools (minor N+1), mode 0666.
    An existing node is kept (nvidia-modprobe only fixes a wrong one)."""
    for i, node in enumerate(UVM_NODES):
        if not os.path.lexists(path(node)):
            _make_node(node, uvm_major(), minor + i, 0o666)


def _mount_proc_devices(log=print) -> None:  # noqa: ANN001 - tiny logger callable
    if not on_real_root():
        return
    if os.path.exists(path(PROC_DEVICES)):  # mounted earlier this boot (/run is per boot)
        _show_devices()
        return
    write_text(PROC_DEVICES + ".orig", read_text("/proc/devices") or "")
    write_text(PROC_DEVICES, _proc_devices(None))
    if subprocess.call(["mount", "--bind", PROC_DEVICES, "/proc/devices"]) != 0:
        log("gpunode-sim: cannot bind-mount /proc/devices; DeviceAllow=char-nvidia* "
            "matches nothing in this VM")


def no_new_privs() -> bool:
    """This process runs under no_new_privs (always the real /proc, even in tests)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        return any(line.split() == ["NoNewPrivs:", "1"] for line in f)


def modprobe(argv: list[str]) -> int:
    """nvidia-modprobe [-u] [-c=N] (SIMULATION of the setuid root helper).

    Without -u: load nvidia.ko (here: succeed when the boot unit loaded it). -u loads
    nvidia-uvm; -c=N creates the device file(s) of minor N: with -u /dev/nvidia-uvm{,-tools},
    else /dev/nvidia<N> and /dev/nvidiactl. The helper does its work as root, which it is
    when run by root or through its setuid bit; under no_new_privs (NoNewPrivileges=) the
    kernel ignores the setuid bit, so a non-root caller cannot load or create anything.
    Exit 0 on success, 1 on failure, silent as the real one."""
    uvm, minor = False, None
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in ("-u", "--unified-memory"):
            uvm = True
        elif a.startswith(("-c=", "--create-nvidia-device-file=")):
            minor = a.split("=", 1)[1]
        elif a.startswith("-c") and len(a) > 2:
            minor = a[2:]
        elif a in ("-c", "--create-nvidia-device-file") and args:
            minor = args.pop(0)
    if minor is not None and not minor.isdigit():
        return 1
    if os.geteuid() != 0 and no_new_privs():
        return 1  # setuid ignored: modprobe and mknod as the caller fail
    if not read_text(LOADED_KMOD):
        return 1  # nvidia.ko did not load (nouveau, no kmod package)
    try:
        if uvm:
            if not (uvm_loaded() or load_uvm()):
                return 1
            if minor is not None:
                make_uvm_nodes(int(minor))
        elif minor is not None:
            if not os.path.lexists(path(f"/dev/nvidia{minor}")):
                _make_node(f"/dev/nvidia{minor}", NVIDIA_MAJOR, int(minor), 0o666)
            if not os.path.lexists(path("/dev/nvidiactl")):
                _make_node("/dev/nvidiactl", NVIDIA_MAJOR, 255, 0o666)
    except OSError:  # e.g. EPERM: a unit's DevicePolicy= without m for the node
        return 1
    return 0


def _mount_proc_driver() -> None:
    if not on_real_root():
        return
    if (
        shutil.which("mountpoint")
        and subprocess.call(["mountpoint", "-q", PROC_DRIVER], stdout=subprocess.DEVNULL) == 0
    ):
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=1m", "tmpfs", PROC_DRIVER], check=True)


def boot(log=print) -> int:  # noqa: ANN001 - tiny logger callable
    """What gpunode-sim-boot.service does once per boot (see gpunode-sim-boot)."""
    os.makedirs(path(RUN), exist_ok=True)
    for stale in (LOADED_KMOD, LOADED_UVM, PERSISTENCED, *UVM_NODES):
        if os.path.lexists(path(stale)):  # a real reboot starts with an empty /run and /dev
            os.remove(path(stale))
    shutil.rmtree(path(PROCS), ignore_errors=True)
    os.makedirs(path(PROCS), exist_ok=True)
    os.chmod(path(PROCS), 0o1777)  # any user's vLLM stand-in records its GPU memory here

    # GPU settings: ECC pending becomes current; volatile settings are lost at reboot.
    gpus = load_gpus()
    state = load_state()
    for gpu in gpus:
        s = settings(state, gpu)
        s["ecc_current"] = s["ecc_pending"]
        s["persistence"] = False
        s["power_limit_w"] = gpu["model"]["power_default_w"]
        s["locked_clocks"] = None
        s["app_clocks"] = None
        s["compute_mode"] = "Default"
    state["boots"] = int(state.get("boots", 0)) + 1
    state["last_boot"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    save_state(state)

    kmod = installed("kmod")
    if kmod is None:
        log("gpunode-sim: no NVIDIA kernel module package installed; driver not loaded")
        return 0
    if nouveau_loaded():
        log("gpunode-sim: nouveau is loaded; the NVIDIA kernel module cannot load beside it")
        return 0
    write_text(LOADED_KMOD, kmod + "\n")
    _mount_proc_driver()
    write_text(PROC_DRIVER + "/nvidia/version", proc_version_text(kmod), 0o444)
    for gpu in gpus:
        info = (
            f"Model: \t\t {gpu['model']['name']}\n"
            f"IRQ:   \t\t 0\n"
            f"GPU UUID: \t {gpu['uuid']}\n"
            f"Video BIOS: \t {gpu['model']['vbios_version'].lower()}\n"
            f"Bus Type: \t PCIe\n"
            f"DMA Size: \t 47 bits\n"
            f"DMA Mask: \t 0x7fffffffffff\n"
            f"Bus Location: \t {gpu['pci_bus_id'][4:].lower()}\n"
            f"Device Minor: \t {gpu['index']}\n"
            + (f"GPU Firmware: \t {kmod.split()[0]}\n" if kmod.split()[-1] == "open" else "")
            + "GPU Excluded:\t No\n"
        )
        write_text(f"{PROC_DRIVER}/nvidia/gpus/{gpu['pci_bus_id'][4:].lower()}/information", info, 0o444)
    # device nodes as the driver creates them (major 195; nvidia-uvm gets a dynamic major)
    for gpu in gpus:
        _make_node(f"/dev/nvidia{gpu['index']}", 195, gpu["index"], 0o666)
    _make_node("/dev/nvidiactl", 195, 255, 0o666)
    _mount_proc_devices(log)
    # nvidia.ko creates no /dev/nvidia-uvm: nvidia-uvm loads from modules-load.d (the real
    # systemd-modules-load ran before this unit, and nvidia-uvm pulls nvidia in) or from a
    # udev rule, and its nodes come from that rule or from nvidia-modprobe -u -c=0.
    udev_loads, udev_creates = udev_uvm()
    if (uvm_listed() or udev_loads) and load_uvm() and udev_creates:
        make_uvm_nodes()
    log(f"gpunode-sim: NVIDIA kernel module {kmod} loaded; {len(gpus)} GPU(s); nvidia-uvm "
        f"{'loaded' if uvm_loaded() else 'not loaded'}, /dev/nvidia-uvm "
        f"{'present' if os.path.exists(path(UVM_NODES[0])) else 'absent'}")
    return 0


def die(msg: str, code: int = 1) -> int:
    print(msg, file=sys.stderr)
    return code
