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
    for stale in (LOADED_KMOD, PERSISTENCED):
        if os.path.exists(path(stale)):
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
    _make_node("/dev/nvidia-uvm", 238, 0, 0o666)
    _make_node("/dev/nvidia-uvm-tools", 238, 1, 0o666)
    log(f"gpunode-sim: NVIDIA kernel module {kmod} loaded; {len(gpus)} GPU(s)")
    return 0


def die(msg: str, code: int = 1) -> int:
    print(msg, file=sys.stderr)
    return code
