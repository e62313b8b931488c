"""qemu command lines, the accelerator probe, QMP and process handling for lab VMs."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gpunode.lab import paths
from gpunode.lab.errors import LabError, LabInputError

QEMU = "qemu-system-x86_64"
OVMF_DIR = Path("/usr/share/OVMF")
OVMF_CODE = OVMF_DIR / "OVMF_CODE_4M.fd"
OVMF_VARS = OVMF_DIR / "OVMF_VARS_4M.fd"


@dataclass(frozen=True)
class MachineSpec:
    """Everything qemu needs to start one lab VM."""

    name: str
    cpus: int
    memory_mib: int
    numa: int
    disk: Path
    seed: Path
    vars: Path
    serial_log: Path
    pidfile: Path
    qmp_socket: Path
    qga_socket: Path
    ssh_port: int
    forwards: dict[int, int]  # guest port -> host port on 127.0.0.1
    iommu: bool = False  # emulated VT-d + the PCI stand-ins of IOMMU_STANDINS


@dataclass(frozen=True)
class PciStandin:
    """An emulated PCI function of an `iommu` lab VM standing in for (part of) a GPU.

    `address` is where the guest sees it (fixed: the lab's other devices sit on the root
    bus, so the firmware numbers the two root ports' buses 01 and 02, the PCI bridge's 03).
    `group` names the stand-ins the guest puts into one IOMMU group: "gpu-a" (GPU and its
    audio function, nothing else) and "gpu-b" (a GPU sharing its group with an unrelated
    device behind a PCIe-to-PCI bridge: the case a deploy must refuse).
    """

    role: str            # gpu-a | gpu-a-audio | gpu-b | gpu-b-peer
    address: str         # guest PCI address, e.g. "0000:01:00.0"
    vendor_device: str   # "1234:1111" as lspci -n shows it
    pci_class: str       # "0300" (class and subclass, as lspci -n shows it)
    qemu_device: str     # qemu -device model
    group: str           # stand-ins with the same group share an IOMMU group
    guest_driver: str | None  # what the Debian 12 guest binds without vfio-pci


IOMMU_STANDINS: tuple[PciStandin, ...] = (
    PciStandin("gpu-a", "0000:01:00.0", "1234:1111", "0300", "VGA", "gpu-a", "bochs-drm"),
    PciStandin("gpu-a-audio", "0000:01:00.1", "8086:293e", "0403", "ich9-intel-hda",
               "gpu-a", "snd_hda_intel"),
    PciStandin("gpu-b", "0000:03:01.0", "1002:5046", "0300", "ati-vga", "gpu-b", None),
    PciStandin("gpu-b-peer", "0000:03:02.0", "1b36:000d", "0c03", "qemu-xhci", "gpu-b",
               "xhci_hcd"),
)
# The bridges in front of them (guest addresses): GPU A's root port, GPU B's root port and
# GPU B's PCIe-to-PCI bridge (which shares GPU B's group).
IOMMU_BRIDGES: dict[str, str] = {
    "gpu-a-root-port": "0000:00:1c.0",
    "gpu-b-root-port": "0000:00:1d.0",
    "gpu-b-pci-bridge": "0000:02:00.0",
}


def iommu_argv() -> list[str]:
    """Emulated Intel VT-d with interrupt remapping and the GPU stand-ins.

    intel-iommu comes before every PCI device: qemu gives a device its DMA address space
    when the device is realized, so devices created earlier would bypass the IOMMU.
    Interrupt remapping under KVM needs the split irqchip (added by build_argv); TCG's
    irqchip is in qemu anyway.
    """
    s = {x.role: x for x in IOMMU_STANDINS}
    return [
        "-device", "intel-iommu,intremap=on",
        "-device", "pcie-root-port,id=gpua_rp,bus=pcie.0,addr=0x1c.0,chassis=1,slot=1",
        "-device", f"{s['gpu-a'].qemu_device},id=gpua,bus=gpua_rp,addr=0x0.0,multifunction=on",
        "-device", f"{s['gpu-a-audio'].qemu_device},id=gpua_audio,bus=gpua_rp,addr=0x0.1",
        "-device", "pcie-root-port,id=gpub_rp,bus=pcie.0,addr=0x1d.0,chassis=2,slot=2",
        "-device", "pcie-pci-bridge,id=gpub_br,bus=gpub_rp,addr=0x0",
        "-device", f"{s['gpu-b'].qemu_device},id=gpub,bus=gpub_br,addr=0x1",
        "-device", f"{s['gpu-b-peer'].qemu_device},id=gpub_peer,bus=gpub_br,addr=0x2",
    ]


def numa_layout(cpus: int, memory_mib: int, nodes: int) -> list[tuple[list[int], int]]:
    """Split vCPUs (contiguous ranges) and memory (MiB) over `nodes` emulated NUMA nodes."""
    if nodes < 1:
        raise LabInputError(f"numa={nodes}: a VM needs at least 1 NUMA node")
    if memory_mib // nodes < 128:
        raise LabInputError(
            f"numa={nodes} with memory={memory_mib} MiB leaves less than 128 MiB per node; "
            "give the VM more memory or fewer NUMA nodes"
        )
    layout = []
    for i in range(nodes):
        lo, hi = i * cpus // nodes, (i + 1) * cpus // nodes
        mem = memory_mib // nodes + (memory_mib % nodes if i == nodes - 1 else 0)
        layout.append((list(range(lo, hi)), mem))
    return layout


def build_argv(spec: MachineSpec, accel: str, qemu: str = QEMU) -> list[str]:
    """The qemu command line. Host-side listeners are unix sockets or 127.0.0.1 only."""
    if accel == "kvm":
        accel_args = ["-accel", "kvm", "-cpu", "max"]
    else:
        accel_args = ["-accel", "tcg,thread=multi", "-cpu", "max"]
    machine = "q35,kernel-irqchip=split" if spec.iommu and accel == "kvm" else "q35"
    argv = [
        qemu, "-name", f"gpunode-lab-{spec.name}", "-machine", machine, *accel_args,
        "-smp", str(spec.cpus), "-m", str(spec.memory_mib),
        "-nodefaults", "-display", "none", "-vga", "none",
        *(iommu_argv() if spec.iommu else []),
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={spec.vars}",
        "-drive", f"file={spec.disk},format=qcow2,if=virtio,cache=unsafe,discard=unmap,"
        "detect-zeroes=unmap",
        "-drive", f"file={spec.seed},format=raw,if=virtio,readonly=on",
        "-device", "virtio-rng-pci",
    ]
    for i, (cpu_ids, mem) in enumerate(numa_layout(spec.cpus, spec.memory_mib, spec.numa)):
        argv += ["-object", f"memory-backend-ram,id=mem{i},size={mem}M"]
        node = f"node,nodeid={i},memdev=mem{i}"
        if cpu_ids:
            node += f",cpus={cpu_ids[0]}-{cpu_ids[-1]}"
        argv += ["-numa", node]
    fwd = [f"hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22"]
    fwd += [f"hostfwd=tcp:127.0.0.1:{h}-:{g}" for g, h in sorted(spec.forwards.items())]
    argv += [
        "-netdev", "user,id=net0," + ",".join(fwd),
        "-device", "virtio-net-pci,netdev=net0",
        "-chardev", f"socket,id=qga0,path={spec.qga_socket},server=on,wait=off",
        "-device", "virtio-serial-pci",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-qmp", f"unix:{spec.qmp_socket},server=on,wait=off",
        "-serial", f"file:{spec.serial_log}",
        "-pidfile", str(spec.pidfile),
    ]
    return argv


def _set_pdeathsig() -> None:
    """In the child: die with the parent (used by test sessions, never by the CLI)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def launch(argv: list[str], log: Path, tie_to_parent: bool) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_set_pdeathsig if tie_to_parent else None,
        )


def qemu_cmdline(pid: int) -> list[str] | None:
    """The argv of a live, non-zombie process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return None
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a] or None


def is_lab_qemu(pid: int, pidfile: Path) -> bool:
    """True when `pid` is a live qemu started by the lab with this very pid file."""
    argv = qemu_cmdline(pid)
    if not argv:
        return False
    return any("qemu-system" in a for a in argv[:2]) and str(pidfile) in argv


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def kill(pid: int, pidfile: Path, grace_s: float = 10.0) -> None:
    """Stop a lab qemu (verified by its command line first): SIGTERM, then SIGKILL; reap it."""
    if not is_lab_qemu(pid, pidfile):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and is_lab_qemu(pid, pidfile):
        _reap(pid)
        time.sleep(0.1)
    if is_lab_qemu(pid, pidfile):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            _reap(pid)
            if not is_lab_qemu(pid, pidfile):
                break
            time.sleep(0.1)
    _reap(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def wait_exit(pid: int, pidfile: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not is_lab_qemu(pid, pidfile):
            return True
        time.sleep(0.2)
    return False


class QMP:
    """A minimal QMP client over the VM's unix socket."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, object]:
        while True:
            line = self.file.readline()
            if not line:
                raise LabError("QMP connection closed by qemu")
            msg = json.loads(line)
            if "event" not in msg:
                return msg  # type: ignore[no-any-return]

    def execute(self, cmd: str, **args: object) -> object:
        req: dict[str, object] = {"execute": cmd}
        if args:
            req["arguments"] = args
        self.file.write(json.dumps(req).encode() + b"\n")
        self.file.flush()
        resp = self._read()
        if "error" in resp:
            raise LabError(f"QMP {cmd} failed: {resp['error']}")
        return resp.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def qmp_command(path: Path, cmd: str, **args: object) -> object:
    q = QMP(path)
    try:
        return q.execute(cmd, **args)
    finally:
        q.close()


def wait_running(proc: subprocess.Popen[bytes], qmp_socket: Path, log: Path,
                 timeout: float = 30.0) -> None:
    """Wait until qemu answers QMP; if it exits first, raise with its own error output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = log.read_text(errors="replace").strip().splitlines()[-8:]
            detail = "\n".join(out)
            raise LabError(f"qemu exited at start (exit code {proc.returncode}):\n{detail}")
        if qmp_socket.exists():
            try:
                status = qmp_command(qmp_socket, "query-status")
                if isinstance(status, dict) and status.get("status") in ("running", "prelaunch"):
                    return
            except (OSError, LabError, ValueError):
                pass
        time.sleep(0.1)
    raise LabError(f"qemu did not answer on its QMP socket {qmp_socket} within {timeout:.0f} s")


def probe_accel(qemu: str = QEMU) -> str:
    """'kvm' only when a KVM guest really runs firmware code here, else 'tcg'.

    Opening /dev/kvm is not enough: nested KVM on some hosts opens it and then fails with
    "emulation failure". The probe boots OVMF under KVM for a few seconds and looks for its
    boot manager on the serial console. `GPUNODE_LAB_ACCEL=kvm|tcg` overrides the probe;
    the result is cached per host boot.
    """
    forced = os.environ.get("GPUNODE_LAB_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or not shutil.which(qemu):
        return "tcg"
    cache = paths.cache_root() / "accel.json"
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    try:
        cached = json.loads(cache.read_text())
        if cached.get("boot_id") == boot_id and cached.get("accel") in ("kvm", "tcg"):
            return str(cached["accel"])
    except (OSError, ValueError):
        pass
    result = "tcg"
    with tempfile.TemporaryDirectory(prefix="gpunode-kvm-probe-") as tmp:
        vars_copy = Path(tmp) / "vars.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        serial = Path(tmp) / "serial.log"
        argv = [qemu, "-accel", "kvm", "-cpu", "max", "-machine", "q35", "-m", "256",
                "-nodefaults", "-display", "none",
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
                "-serial", f"file:{serial}"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 8
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                text = serial.read_text(errors="replace") if serial.exists() else ""
                if "BdsDxe" in text or "Shell>" in text or "UEFI" in text:
                    result = "kvm"
                    break
                time.sleep(0.2)
        finally:
            proc.kill()
            _, err = proc.communicate()
        if b"emulation failure" in err or b"KVM internal error" in err:
            result = "tcg"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"boot_id": boot_id, "accel": result}))
    return result
