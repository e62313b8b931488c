"""Lab VMs: real Debian 12 guests under qemu, reachable only through 127.0.0.1.

State lives in one directory (default `$GPUNODE_LAB_DIR`, else `~/.cache/gpunode/lab/state`):

    ssh/id_ed25519[.pub]          key pair generated per lab directory (never committed)
    vms/<name>/vm.json            settings, ports, origin
    vms/<name>/disk.qcow2         overlay on the base image or on a snapshot
    vms/<name>/seed.iso           cloud-init NoCloud seed
    vms/<name>/OVMF_VARS.fd       the VM's own UEFI variable store
    vms/<name>/serial.log         serial console
    vms/<name>/qemu.log           qemu's own output
    vms/<name>/qemu.pid           pid file (verified against /proc/<pid>/cmdline before use)
    vms/<name>/known_hosts        the VM's host keys (new keys for each fresh boot of a disk)
    snapshots/<snap>.qcow2|.json  frozen disks of converged VMs, base for `fork`

Unix sockets (QMP, qemu-guest-agent, ssh ControlMaster) live in a short per-lab directory
under /tmp because socket paths are limited to about 100 bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpunode.lab import image, paths, qemu, seed
from gpunode.lab.errors import LabError, LabInputError

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
SSH_PORT_BASE = 2222
SSH_PORT_LAST = 2399
FORWARD_PORT_BASE = 18000
BOOT_TIMEOUT_S = 300.0  # generous: TCG on a shared 2-core host
SERIAL_TAIL_LINES = 25


@dataclass
class VMConfig:
    name: str
    cpus: int
    memory_mib: int
    numa: int
    disk_gib: int
    ssh_port: int
    forwards: dict[int, int]
    instance_id: str
    origin: dict[str, str]  # {"kind": "base"} or {"kind": "snapshot", "name": ...}
    iommu: bool = False  # emulated VT-d + GPU stand-ins (qemu.IOMMU_STANDINS)
    os: str = "debian-12"  # the guest OS (image.LAB_OS), fixed when the VM is created
    kernel: str = "generic"  # its kernel (image.KERNELS), fixed when the VM is created

    @classmethod
    def load(cls, path: Path) -> VMConfig:
        data = json.loads(path.read_text())
        data["forwards"] = {int(g): int(h) for g, h in data.get("forwards", {}).items()}
        return cls(**data)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)


@dataclass
class VM:
    """One lab VM as the lab sees it. `run` needs it to be running."""

    name: str
    state: str  # "running" | "stopped"
    pid: int | None
    address: str
    ssh_port: int
    user: str
    key_path: Path
    forwards: dict[int, int]  # guest port -> host port on 127.0.0.1
    cpus: int
    memory_mib: int
    numa: int
    disk_gib: int
    serial_log: Path
    qga_socket: Path
    qmp_socket: Path
    known_hosts: Path
    control_path: Path
    iommu: bool = False
    os: str = "debian-12"
    kernel: str = "generic"
    _ssh_base: list[str] = field(repr=False, default_factory=list)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def ssh_argv(self, command: str | None = None, tty: bool = False) -> list[str]:
        argv = list(self._ssh_base)
        if tty:
            argv.append("-t")
        argv.append(f"{self.user}@{self.address}")
        if command is not None:
            argv.append(command)
        return argv

    def run(self, cmd: str | list[str], timeout: float | None = 300,
            input: str | None = None) -> tuple[int, str, str]:
        """Run a shell command on the VM over SSH; returns (exit code, stdout, stderr).

        A list is quoted for the remote shell; a string is passed to it as is. Exit code 255
        means SSH itself failed.
        """
        command = shlex.join(cmd) if isinstance(cmd, list) else cmd
        try:
            res = subprocess.run(self.ssh_argv(command), input=input, capture_output=True,
                                 text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise LabError(
                f"{self.name}: `{command}` did not finish within {timeout} s over SSH"
            ) from exc
        return res.returncode, res.stdout, res.stderr

    def check(self, cmd: str | list[str], timeout: float | None = 300) -> str:
        """Like `run`, but raise LabError unless the command exits 0; returns stdout."""
        rc, out, err = self.run(cmd, timeout=timeout)
        if rc != 0:
            raise LabError(f"{self.name}: `{cmd}` exited {rc}: {err.strip() or out.strip()}")
        return out

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name, "state": self.state, "pid": self.pid,
            "ssh": f"{self.user}@{self.address}:{self.ssh_port}", "key": str(self.key_path),
            "forwards": {str(g): h for g, h in self.forwards.items()},
            "cpus": self.cpus, "memory_mib": self.memory_mib, "numa": self.numa,
            "disk_gib": self.disk_gib, "serial_log": str(self.serial_log),
            "qga_socket": str(self.qga_socket), "iommu": self.iommu, "os": self.os,
            "kernel": self.kernel,
        }


class Lab:
    """A directory of lab VMs. Every method is safe to call from a fresh process."""

    def __init__(self, state_dir: str | Path | None = None, *, qemu_binary: str = qemu.QEMU,
                 tie_to_parent: bool = False) -> None:
        """`tie_to_parent=True` makes every qemu this object starts die with the thread that
        started it (the kernel's parent-death signal follows the thread, so start VMs from a
        thread that outlives them, e.g. `up(..., wait=False)` from the main thread and
        `wait_ssh` in workers) -- and so with this process
        (what test sessions want); the CLI leaves VMs running after it exits."""
        self.dir = Path(state_dir) if state_dir else paths.default_state_dir()
        self.dir = self.dir.absolute()
        self.qemu_binary = qemu_binary
        self.tie_to_parent = tie_to_parent
        self.sock_dir = paths.socket_dir(self.dir)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._accel: str | None = None

    # ---- paths -----------------------------------------------------------------------
    @property
    def key_path(self) -> Path:
        return self.dir / "ssh" / "id_ed25519"

    def vm_dir(self, name: str) -> Path:
        return self.dir / "vms" / name

    def snapshot_path(self, snap: str) -> Path:
        return self.dir / "snapshots" / f"{snap}.qcow2"

    def _pidfile(self, name: str) -> Path:
        return self.vm_dir(name) / "qemu.pid"

    # ---- queries ---------------------------------------------------------------------
    def names(self) -> list[str]:
        vms = self.dir / "vms"
        if not vms.is_dir():
            return []
        return sorted(p.name for p in vms.iterdir() if (p / "vm.json").is_file())

    def _config(self, name: str) -> VMConfig:
        _check_name(name)
        path = self.vm_dir(name) / "vm.json"
        if not path.is_file():
            known = ", ".join(self.names()) or "none"
            raise LabInputError(
                f"no lab VM named {name!r} in {self.dir} (known: {known}); "
                f"create it with `gpunode lab up {name}`"
            )
        return VMConfig.load(path)

    def _live_pid(self, name: str) -> int | None:
        """The pid of the VM's qemu if it is running; stale pid files are removed."""
        pidfile = self._pidfile(name)
        pid = qemu.read_pid(pidfile)
        if pid is None:
            if pidfile.exists():
                pidfile.unlink()
            return None
        if qemu.is_lab_qemu(pid, pidfile):
            return pid
        # Left behind by a killed run (or the pid now belongs to something else).
        pidfile.unlink(missing_ok=True)
        self._cleanup_runtime(name)
        return None

    def vm(self, name: str) -> VM:
        cfg = self._config(name)
        pid = self._live_pid(name)
        return self._vm_from(cfg, pid)

    def _vm_from(self, cfg: VMConfig, pid: int | None) -> VM:
        d = self.vm_dir(cfg.name)
        vm = VM(
            name=cfg.name, state="running" if pid else "stopped", pid=pid,
            address="127.0.0.1", ssh_port=cfg.ssh_port, user=seed.USER, key_path=self.key_path,
            forwards=dict(cfg.forwards), cpus=cfg.cpus, memory_mib=cfg.memory_mib,
            numa=cfg.numa, disk_gib=cfg.disk_gib, serial_log=d / "serial.log",
            qga_socket=self.sock_dir / f"{cfg.name}.qga", qmp_socket=self.sock_dir /
            f"{cfg.name}.qmp", known_hosts=d / "known_hosts",
            control_path=self.sock_dir / f"{cfg.name}.ssh", iommu=cfg.iommu, os=cfg.os,
            kernel=cfg.kernel,
        )
        vm._ssh_base = [
            "ssh", "-F", "/dev/null", "-p", str(cfg.ssh_port), "-i", str(self.key_path),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={vm.known_hosts}",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
            "-o", "ControlMaster=auto", "-o", f"ControlPath={vm.control_path}",
            "-o", "ControlPersist=60",
        ]
        return vm

    def status(self) -> list[VM]:
        """All VMs of this lab, running or stopped (stale pid files are cleaned)."""
        return [self.vm(n) for n in self.names()]

    # ---- lifecycle -------------------------------------------------------------------
    def up(self, name: str, cpus: int = 2, memory_mib: int = 2048, numa: int = 2,
           disk_gib: int = 8, forward: Mapping[int, int] | Iterable[int] | None = None,
           *, ssh_port: int | None = None, wait: bool = True,
           timeout: float = BOOT_TIMEOUT_S, iommu: bool | None = None,
           os_name: str = "debian-12", kernel: str = "generic") -> VM:
        """Start VM `name` (creating it from the base image of `os_name` with `kernel`,
        image.KERNELS, when new) and wait for SSH.

        `forward` maps guest TCP ports to host ports on 127.0.0.1 (host port 0 = pick a free
        one); an iterable of guest ports picks host ports for all of them. An existing VM
        keeps its disk; settings given here apply from this boot on.

        `iommu=True` gives the VM an emulated Intel VT-d IOMMU with interrupt remapping and
        the PCI devices of `qemu.IOMMU_STANDINS` standing in for passthrough GPUs (a lab
        Proxmox host). It is kept in the VM's settings: `None` keeps what the VM has (off
        for a new VM), so reboots, restarts, snapshots and forks keep the devices.
        The OS and kernel are fixed when the VM is created (an existing VM keeps its own;
        snapshots and forks keep them too).
        """
        _check_name(name)
        _check_sizes(cpus, memory_mib, numa, disk_gib)
        # Creating disks, keys and seeds and picking ports is serialized per lab (VMs started
        # at once from threads or processes would pick the same port or race on the key);
        # waiting for SSH is not.
        with self._lock():
            if (self.vm_dir(name) / "vm.json").is_file():
                cfg = self._config(name)
                pid = self._live_pid(name)
                if pid:
                    vm = self._vm_from(cfg, pid)
                    return self.wait_ssh(name, timeout) if wait else vm
                cfg.cpus, cfg.memory_mib, cfg.numa = cpus, memory_mib, numa
                if iommu is not None:
                    cfg.iommu = iommu
                if disk_gib > cfg.disk_gib:
                    subprocess.run(["qemu-img", "resize", str(self.vm_dir(name) / "disk.qcow2"),
                                    f"{disk_gib}G"], check=True, capture_output=True)
                    cfg.disk_gib = disk_gib
            else:
                # a lab OS and kernel, or a clear error before anything is made
                image.recipe(os_name, kernel)
                cfg = self._create(name, cpus, memory_mib, numa, disk_gib, {"kind": "base"},
                                   iommu=bool(iommu), os_name=os_name, kernel=kernel)
            vm = self._start(cfg, forward, ssh_port, False, timeout)
        if wait:
            return self.wait_ssh(name, timeout)
        return vm

    @contextlib.contextmanager
    def _lock(self):
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _create(self, name: str, cpus: int, memory_mib: int, numa: int, disk_gib: int,
                origin: dict[str, str], iommu: bool = False,
                os_name: str = "debian-12", kernel: str = "generic") -> VMConfig:
        d = self.vm_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        cfg = VMConfig(name=name, cpus=cpus, memory_mib=memory_mib, numa=numa,
                       disk_gib=disk_gib, ssh_port=0, forwards={},
                       instance_id=f"{name}-{uuid.uuid4().hex[:12]}", origin=origin,
                       iommu=iommu, os=os_name, kernel=kernel)
        try:
            self._fresh_disk(cfg)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        cfg.save(d / "vm.json")
        return cfg

    def _backing(self, origin: dict[str, str], os_name: str, kernel: str = "generic") -> Path:
        if origin.get("kind") == "snapshot":
            snap = self.snapshot_path(origin["name"])
            if not snap.is_file():
                raise LabError(f"snapshot {origin['name']!r} ({snap}) no longer exists")
            return snap
        return image.ensure_image(os_name=os_name, kernel=kernel)

    def _fresh_disk(self, cfg: VMConfig) -> None:
        """A pristine overlay on the VM's origin, a fresh UEFI store, a new seed."""
        d = self.vm_dir(cfg.name)
        backing = self._backing(cfg.origin, cfg.os, cfg.kernel)
        disk = d / "disk.qcow2"
        disk.unlink(missing_ok=True)
        res = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing),
             str(disk), f"{cfg.disk_gib}G"], capture_output=True, text=True)
        if res.returncode != 0:
            raise LabError(f"creating the overlay {disk} failed: {res.stderr.strip()}")
        vars_src = backing.with_suffix(".vars.fd")
        shutil.copyfile(vars_src if vars_src.is_file() else qemu.OVMF_VARS,
                        d / "OVMF_VARS.fd")
        seed.write_seed(d / "seed.iso", cfg.name, cfg.instance_id, self._pubkey())
        (d / "known_hosts").unlink(missing_ok=True)

    def _pubkey(self) -> str:
        key = self.key_path
        if not key.is_file():
            key.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(key.parent, 0o700)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                            "gpunode-lab", "-f", str(key)], check=True)
        return key.with_suffix(".pub").read_text()

    def _used_ports(self, exclude: str) -> dict[int, str]:
        used: dict[int, str] = {}
        for n in self.names():
            if n == exclude:
                continue
            with contextlib.suppress(LabError, OSError, ValueError):
                c = self._config(n)
                used[c.ssh_port] = n
                for h in c.forwards.values():
                    used[h] = n
        return used

    def _pick_port(self, wanted: int | None, start: int, used: dict[int, str],
                   taken: set[int], what: str) -> int:
        if wanted:
            if wanted in used or wanted in taken:
                owner = used.get(wanted, "this VM")
                raise LabError(
                    f"port 127.0.0.1:{wanted} for {what} is already assigned to lab VM "
                    f"{owner!r}; choose another port or stop that VM"
                )
            if not port_free(wanted):
                raise LabError(
                    f"port 127.0.0.1:{wanted} for {what} is in use by another process; "
                    "choose another port or stop that process"
                )
            return wanted
        for port in range(start, start + 2000):
            if port not in used and port not in taken and port_free(port):
                return port
        raise LabError(f"no free port on 127.0.0.1 from {start} for {what}")

    def _start(self, cfg: VMConfig, forward: Mapping[int, int] | Iterable[int] | None,
               ssh_port: int | None, wait: bool, timeout: float) -> VM:
        d = self.vm_dir(cfg.name)
        used = self._used_ports(cfg.name)
        taken: set[int] = set()
        # Keep the previous port when it is still free (stable addresses across restarts).
        if ssh_port is None and cfg.ssh_port and cfg.ssh_port not in used \
                and port_free(cfg.ssh_port):
            ssh_port = cfg.ssh_port
        cfg.ssh_port = self._pick_port(ssh_port, SSH_PORT_BASE, used, taken,
                                       f"SSH of VM {cfg.name!r}")
        taken.add(cfg.ssh_port)
        wanted: dict[int, int] = {}
        if forward is not None:
            items = forward.items() if isinstance(forward, Mapping) else ((g, 0) for g in forward)
            for g, h in items:
                if not 0 < int(g) < 65536 or not 0 <= int(h) < 65536:
                    raise LabInputError(f"forward {g}->{h}: ports must be 1..65535 (host 0 = any)")
                wanted[int(g)] = int(h)
        else:
            wanted = {g: h for g, h in cfg.forwards.items()}
        forwards: dict[int, int] = {}
        for g, h in sorted(wanted.items()):
            keep = h if h and h not in used and h not in taken and port_free(h) else 0
            if forward is not None:
                keep = h  # explicitly asked for: clash is an error, not a silent change
            port = self._pick_port(keep or None, FORWARD_PORT_BASE, used, taken,
                                   f"guest port {g} of VM {cfg.name!r}")
            taken.add(port)
            forwards[g] = port
        cfg.forwards = forwards
        cfg.save(d / "vm.json")

        vm = self._vm_from(cfg, None)
        self._cleanup_runtime(cfg.name)
        self.sock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        spec = qemu.MachineSpec(
            name=cfg.name, cpus=cfg.cpus, memory_mib=cfg.memory_mib, numa=cfg.numa,
            disk=d / "disk.qcow2", seed=d / "seed.iso", vars=d / "OVMF_VARS.fd",
            serial_log=vm.serial_log, pidfile=self._pidfile(cfg.name),
            qmp_socket=vm.qmp_socket, qga_socket=vm.qga_socket, ssh_port=cfg.ssh_port,
            forwards=cfg.forwards, iommu=cfg.iommu,
        )
        if not shutil.which(self.qemu_binary):
            raise LabError(f"{self.qemu_binary} is not installed; run `gpunode lab deps "
                           "--install` (as root) or `apt-get install -y qemu-system-x86`")
        if self._accel is None:
            self._accel = qemu.probe_accel(self.qemu_binary)
        argv = qemu.build_argv(spec, self._accel, self.qemu_binary)
        vm.serial_log.write_text("")
        log = d / "qemu.log"
        log.write_text(" ".join(shlex.quote(a) for a in argv) + "\n")
        proc = qemu.launch(argv, log, self.tie_to_parent)
        self._procs[cfg.name] = proc
        try:
            qemu.wait_running(proc, vm.qmp_socket, log)
        except LabError as exc:
            self._kill_proc(cfg.name, proc.pid)
            raise LabError(f"VM {cfg.name!r}: {exc}") from None
        except BaseException:
            self._kill_proc(cfg.name, proc.pid)
            raise
        vm = self._vm_from(cfg, proc.pid)
        if wait:
            self.wait_ssh(cfg.name, timeout)
        return vm

    def wait_ssh(self, name: str, timeout: float = BOOT_TIMEOUT_S) -> VM:
        """Wait until SSH with the lab key works. On timeout the VM's qemu is killed and the
        error carries the last lines of its serial console."""
        deadline = time.monotonic() + timeout
        vm = self.vm(name)
        while True:
            pid = self._live_pid(name)
            if pid is None:
                self._cleanup_runtime(name)
                raise LabError(
                    f"VM {name!r} stopped while waiting for SSH.\n{self._tails(name)}"
                )
            rc, _ = _probe_ssh(vm)
            if rc == 0:
                return self._vm_from(self._config(name), pid)
            if time.monotonic() > deadline:
                self._kill_proc(name, pid)
                raise LabError(
                    f"VM {name!r} did not answer SSH on 127.0.0.1:{vm.ssh_port} within "
                    f"{timeout:.0f} s; its qemu was stopped.\n{self._tails(name)}"
                )
            time.sleep(1)

    def _tails(self, name: str) -> str:
        d = self.vm_dir(name)
        out = []
        for f, n in ((d / "serial.log", SERIAL_TAIL_LINES), (d / "qemu.log", 5)):
            try:
                lines = f.read_text(errors="replace").replace("\r", "").splitlines()
            except OSError:
                lines = []
            lines = [ln for ln in lines if ln.strip()][-n:]
            out.append(f"Last lines of {f}:\n" + ("\n".join(lines) or "(empty)"))
        return "\n".join(out)

    def _kill_proc(self, name: str, pid: int) -> None:
        qemu.kill(pid, self._pidfile(name))
        proc = self._procs.pop(name, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._pidfile(name).unlink(missing_ok=True)
        self._cleanup_runtime(name)

    def _cleanup_runtime(self, name: str) -> None:
        """Stop the SSH master and remove the VM's sockets."""
        cp = self.sock_dir / f"{name}.ssh"
        if cp.exists():
            subprocess.run(["ssh", "-o", f"ControlPath={cp}", "-O", "exit", "lab"],
                           capture_output=True, timeout=10)
            cp.unlink(missing_ok=True)
        for suffix in ("qmp", "qga"):
            (self.sock_dir / f"{name}.{suffix}").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.sock_dir.rmdir()  # only when no other VM of this lab has sockets there

    def down(self, name: str) -> None:
        """Stop the VM's qemu (its disk stays). Stopping a stopped VM is fine."""
        self._config(name)
        pid = self._live_pid(name)
        if pid:
            self._kill_proc(name, pid)
        else:
            self._cleanup_runtime(name)

    def down_all(self) -> list[str]:
        """Stop every VM of this lab; returns the names that were running."""
        stopped = []
        for name in self.names():
            with contextlib.suppress(LabError):
                if self._live_pid(name):
                    stopped.append(name)
                self.down(name)
        return stopped

    def destroy(self, name: str) -> None:
        """Stop the VM and delete its directory (disk, seed, logs)."""
        self.down(name)
        shutil.rmtree(self.vm_dir(name))

    def shutdown(self, name: str, timeout: float = 90.0) -> None:
        """Power the guest off cleanly (systemd poweroff) and wait for qemu to exit."""
        vm = self.vm(name)
        if not vm.pid:
            return
        pidfile = self._pidfile(name)
        with contextlib.suppress(LabError):
            vm.run("sudo systemctl poweroff --no-block", timeout=20)
        if not qemu.wait_exit(vm.pid, pidfile, timeout / 2):
            with contextlib.suppress(OSError, LabError):
                qemu.qmp_command(vm.qmp_socket, "system_powerdown")
            if not qemu.wait_exit(vm.pid, pidfile, timeout / 2):
                self._kill_proc(name, vm.pid)
                raise LabError(f"VM {name!r} did not power off within {timeout:.0f} s; "
                               "its qemu was killed")
        self._procs.pop(name, None)
        pidfile.unlink(missing_ok=True)
        self._cleanup_runtime(name)

    def reboot(self, name: str, timeout: float = BOOT_TIMEOUT_S) -> VM:
        """Reboot the VM and wait until SSH answers from the new boot.

        Done as a power cycle: a clean `systemctl poweroff` in the guest, then a cold start
        of qemu. (Warm resets issued by the guest were seen to hang after GRUB for NUMA VMs
        under TCG on the development hosts; a power cycle has the same effect for kernel
        command line, modules and sysctl changes.)
        """
        vm = self.vm(name)
        if not vm.running:
            raise LabError(f"VM {name!r} is not running; start it with `gpunode lab up {name}`")
        boot_id = vm.check("cat /proc/sys/kernel/random/boot_id").strip()
        self.shutdown(name)
        vm = self._start(self._config(name), None, None, True, timeout)
        rc, out = _probe_ssh(vm, "cat /proc/sys/kernel/random/boot_id")
        if rc != 0 or out.strip() == boot_id:
            raise LabError(f"VM {name!r}: no new boot after the power cycle.\n"
                           f"{self._tails(name)}")
        return vm

    def reset(self, name: str, wait: bool = True, timeout: float = BOOT_TIMEOUT_S) -> VM:
        """Throw the VM's disk away: a pristine overlay on its origin (base image or the
        snapshot it was forked from), new host keys, first boot again. Restarts it if it
        was running."""
        cfg = self._config(name)
        was_running = self._live_pid(name) is not None
        self.down(name)
        self._fresh_disk(cfg)
        cfg.save(self.vm_dir(name) / "vm.json")
        vm = self.vm(name)
        if was_running:
            vm = self._start(cfg, None, None, wait, timeout)
        return vm

    def snapshot(self, name: str, snap: str, restart: bool = True,
                 timeout: float = BOOT_TIMEOUT_S) -> Path:
        """Freeze the VM's current disk as snapshot `snap` (after a clean power-off).

        The VM continues on a new overlay above the snapshot (restarted when it was
        running). Fork new VMs from it with `fork`.
        """
        _check_name(snap, what="snapshot")
        cfg = self._config(name)
        target = self.snapshot_path(snap)
        if target.exists():
            raise LabInputError(f"snapshot {snap!r} already exists ({target}); pick another name")
        was_running = self._live_pid(name) is not None
        self.shutdown(name)
        d = self.vm_dir(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(d / "disk.qcow2", target)
        os.chmod(target, 0o444)
        shutil.copyfile(d / "OVMF_VARS.fd", target.with_suffix(".vars.fd"))
        target.with_suffix(".json").write_text(json.dumps({
            "source": name, "cpus": cfg.cpus, "memory_mib": cfg.memory_mib,
            "numa": cfg.numa, "disk_gib": cfg.disk_gib, "iommu": cfg.iommu,
            "os": cfg.os, "kernel": cfg.kernel, "created": time.time(),
        }, indent=2) + "\n")
        res = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(target),
             str(d / "disk.qcow2")], capture_output=True, text=True)
        if res.returncode != 0:
            raise LabError(f"creating the overlay above snapshot {snap!r} failed: "
                           f"{res.stderr.strip()}")
        if was_running and restart:
            self._start(cfg, None, None, True, timeout)
        return target

    def snapshots(self) -> list[str]:
        sd = self.dir / "snapshots"
        return sorted(p.stem for p in sd.glob("*.qcow2")) if sd.is_dir() else []

    def fork(self, snap: str, new_name: str, *, cpus: int | None = None,
             memory_mib: int | None = None, numa: int | None = None,
             forward: Mapping[int, int] | Iterable[int] | None = None,
             wait: bool = True, timeout: float = BOOT_TIMEOUT_S,
             iommu: bool | None = None) -> VM:
        """A new VM on a cheap overlay above snapshot `snap` (new hostname, instance-id and
        host keys via cloud-init); settings (`iommu` too) default to the snapshot source's."""
        _check_name(snap, what="snapshot")
        _check_name(new_name)
        path = self.snapshot_path(snap)
        if not path.is_file():
            known = ", ".join(self.snapshots()) or "none"
            raise LabInputError(f"no snapshot named {snap!r} in {self.dir} (known: {known}); "
                           f"make one with `gpunode lab snapshot VM {snap}`")
        if (self.vm_dir(new_name) / "vm.json").exists():
            raise LabInputError(f"lab VM {new_name!r} already exists; pick another name or "
                           f"`gpunode lab destroy {new_name}` first")
        meta = json.loads(path.with_suffix(".json").read_text())
        c = cpus or meta["cpus"]
        m = memory_mib or meta["memory_mib"]
        n = numa or meta["numa"]
        _check_sizes(c, m, n, meta["disk_gib"])
        cfg = self._create(new_name, c, m, n, meta["disk_gib"],
                           {"kind": "snapshot", "name": snap},
                           iommu=bool(meta.get("iommu", False)) if iommu is None else iommu,
                           os_name=meta.get("os", "debian-12"),
                           kernel=meta.get("kernel", "generic"))
        return self._start(cfg, forward, None, wait, timeout)

    # ---- site file -------------------------------------------------------------------
    def site(self, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """`base` (a loaded site YAML) with a connection and the OS of every running lab VM."""
        doc: dict[str, Any] = dict(base or {})
        nodes = dict(doc.get("nodes") or {})
        has_lab_group = "lab" in (doc.get("groups") or {})
        for vm in self.status():
            if not vm.running:
                continue
            node = dict(nodes.get(vm.name) or {})
            if vm.name not in nodes and has_lab_group:
                node["groups"] = ["lab"]
            node["connection"] = {"address": vm.address, "port": vm.ssh_port,
                                  "user": vm.user, "key": str(vm.key_path), "become": True}
            node["os"] = vm.os
            nodes[vm.name] = node
        doc["nodes"] = nodes
        return doc

    def write_site(self, path: str | Path, base: dict[str, Any] | None = None) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# Written by gpunode lab: connections to the running lab VMs.\n"
                       + yaml.safe_dump(self.site(base), sort_keys=False))
        return out


def _probe_ssh(vm: VM, command: str = "true") -> tuple[int, str]:
    """One SSH attempt outside the connection-sharing master (a master opened while a guest
    goes down would hang on a dead connection)."""
    argv = vm.ssh_argv(command)
    i = argv.index(f"ControlPath={vm.control_path}")
    argv[i - 3:i + 3] = ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return 255, ""
    return res.returncode, res.stdout


def qemu_pids(under: str | Path) -> list[int]:
    """Live qemu processes whose command line names a path under `under` (a lab or VM dir)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        argv = qemu.qemu_cmdline(int(p.name))
        if argv and "qemu-system" in " ".join(argv[:2]) and any(
                str(under) in a for a in argv):
            found.append(int(p.name))
    return found


def port_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:`port` (and we may bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _check_name(name: str, what: str = "VM") -> None:
    if not NAME_RE.match(name or ""):
        raise LabInputError(
            f"invalid lab {what} name {name!r}: use 1-31 characters a-z, 0-9 and '-', "
            "starting with a letter (it becomes the hostname)"
        )


def _check_sizes(cpus: int, memory_mib: int, numa: int, disk_gib: int) -> None:
    if not 1 <= cpus <= 64:
        raise LabInputError(f"cpus={cpus}: a lab VM takes 1..64 vCPUs")
    if memory_mib < 512:
        raise LabInputError(f"memory={memory_mib} MiB: a lab VM needs at least 512 MiB")
    if not 1 <= numa <= 8:
        raise LabInputError(f"numa={numa}: a lab VM takes 1..8 emulated NUMA nodes")
    if disk_gib < image.DISK_MIB // 1024:
        raise LabInputError(f"disk={disk_gib} GiB: the lab image needs at least "
                       f"{image.DISK_MIB // 1024} GiB")
    qemu.numa_layout(cpus, memory_mib, numa)
