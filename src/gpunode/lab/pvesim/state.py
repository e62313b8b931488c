"""pvesim's cluster state (SIMULATION): node, PCI devices, mappings, storages, VMs, tasks,
users/tokens/ACLs. Pure data plus a lock; no HTTP here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpunode.lab.pvesim.messages import msg

NODE = "pve1"
TICKET_LIFETIME_S = 7200

# PVE's built-in roles, limited to the privileges pvesim checks (pve-access-control
# AccessControl.pm $privgroups / role definitions).
_VM_PRIVS = {
    "VM.Allocate", "VM.Audit", "VM.Backup", "VM.Clone", "VM.Config.CDROM", "VM.Config.CPU",
    "VM.Config.Cloudinit", "VM.Config.Disk", "VM.Config.HWType", "VM.Config.Memory",
    "VM.Config.Network", "VM.Config.Options", "VM.Console", "VM.Migrate", "VM.PowerMgmt",
    "VM.Snapshot", "VM.Snapshot.Rollback",
}
_AGENT_PRIVS = {"9": {"VM.GuestAgent.Audit", "VM.GuestAgent.FileRead",
                      "VM.GuestAgent.FileWrite", "VM.GuestAgent.FileSystemMgmt",
                      "VM.GuestAgent.Unrestricted"},
                "8.4": {"VM.Monitor"}}
_DS = {"Datastore.Allocate", "Datastore.AllocateSpace", "Datastore.AllocateTemplate",
       "Datastore.Audit"}
_SYS = {"Sys.Audit", "Sys.Modify", "Sys.PowerMgmt", "Sys.Console", "Sys.Syslog",
        "Sys.AccessNetwork", "Sys.Incoming"}
_MAP = {"Mapping.Audit", "Mapping.Use", "Mapping.Modify"}
_ACCESS = {"User.Modify", "Permissions.Modify", "Realm.Allocate", "Realm.AllocateUser",
           "Group.Allocate"}


def roles(version: str) -> dict[str, set[str]]:
    vm = _VM_PRIVS | _AGENT_PRIVS[version]
    return {
        "Administrator": vm | _DS | _SYS | _MAP | _ACCESS | {"SDN.Use", "SDN.Audit",
                                                             "Pool.Allocate", "Pool.Audit"},
        "PVEVMAdmin": vm,
        "PVEVMUser": {"VM.Audit", "VM.Backup", "VM.Config.CDROM", "VM.Config.Cloudinit",
                      "VM.Console", "VM.PowerMgmt"} | ({"VM.GuestAgent.Audit"}
                                                       if version == "9" else {"VM.Monitor"}),
        "PVEAuditor": {"VM.Audit", "Datastore.Audit", "Sys.Audit", "Mapping.Audit",
                       "SDN.Audit", "Pool.Audit"},
        "PVEDatastoreUser": {"Datastore.AllocateSpace", "Datastore.Audit"},
        "PVEDatastoreAdmin": set(_DS),
        "PVEMappingUser": {"Mapping.Audit", "Mapping.Use"},
        "PVEMappingAdmin": set(_MAP),
        "NoAccess": set(),
    }


class PveError(Exception):
    """An error as PVE's HTTP server answers it: status, message, optional `errors`."""

    def __init__(self, status: int, message: str, errors: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors


def param_error(errors: dict[str, str]) -> PveError:
    return PveError(400, msg("param_failed"), errors)


@dataclass
class Task:
    upid: str
    node: str
    pid: int
    pstart: int
    starttime: int
    type: str
    id: str
    user: str
    status: str = "running"
    exitstatus: str | None = None
    log: list[str] = field(default_factory=list)
    warnings: int = 0
    endtime: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def say(self, line: str) -> None:
        self.log.append(line)

    def warn(self, line: str) -> None:
        self.warnings += 1
        self.log.append(f"WARN: {line}")


class TaskError(Exception):
    """Raised inside a task body: the task ends with this text as its exitstatus."""


@dataclass
class Vm:
    vmid: int
    node: str
    config: dict[str, str]
    pending: dict[str, str] = field(default_factory=dict)
    pending_delete: list[str] = field(default_factory=list)
    status: str = "stopped"
    started_at: float | None = None
    pid: int | None = None
    reserved: list[str] = field(default_factory=list)  # PCI ids held while running
    created: float = field(default_factory=time.time)
    guest: Any = None  # backend handle

    @property
    def lock(self) -> str | None:
        return self.config.get("lock")

    @property
    def template(self) -> bool:
        return self.config.get("template") == "1"


@dataclass
class PciDevice:
    id: str  # 0000:01:00.0
    cls: str  # 0x030000
    vendor: str
    device: str
    subsystem_vendor: str
    subsystem_device: str
    iommugroup: int
    vendor_name: str
    device_name: str


def a6000_devices(count: int) -> list[PciDevice]:
    """The simulated node's PCI devices: RTX A6000s with their HDMI audio functions (one
    IOMMU group per card), plus host bridges and a NIC that the default blacklist hides."""
    buses = ["01", "41", "81", "c1"][:count]
    groups = [14, 48, 80, 112]
    devs = [
        PciDevice("0000:00:00.0", "0x060000", "0x8086", "0x09a2", "0x8086", "0x0000", 0,
                  "Intel Corporation", "Ice Lake Memory Map/VT-d"),
        PciDevice("0000:02:00.0", "0x020000", "0x8086", "0x1533", "0x15d9", "0x1533", 20,
                  "Intel Corporation", "I210 Gigabit Network Connection"),
    ]
    for bus, group in zip(buses, groups, strict=False):
        devs.append(PciDevice(f"0000:{bus}:00.0", "0x030000", "0x10de", "0x2230", "0x10de",
                              "0x1459", group, "NVIDIA Corporation",
                              "GA102GL [RTX A6000]"))
        devs.append(PciDevice(f"0000:{bus}:00.1", "0x040300", "0x10de", "0x1aef", "0x10de",
                              "0x1459", group, "NVIDIA Corporation",
                              "GA102 High Definition Audio Controller"))
    return sorted(devs, key=lambda d: d.id)


@dataclass
class Storage:
    id: str
    type: str
    content: set[str]
    path: Path
    shared: bool = False


@dataclass
class Volume:
    volid: str
    content: str  # images | import | iso | vztmpl | rootdir
    size: int
    format: str
    path: Path | None
    vmid: int | None = None
    ctime: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Fault:
    """One injected fault: what it matches and what it does (pvesim only)."""

    kind: str  # http-error | slow | task-fail | task-hang | task-warn | lag | expire-tickets | node-gone
    method: str | None = None
    path: str | None = None  # substring of the request path (after /api2/json)
    status: int = 500
    message: str = "simulated failure"
    seconds: float = 0.0
    times: int = 1  # how often it fires; 0 = until cleared


class Sim:
    """The whole simulated cluster (one node)."""

    def __init__(self, data_dir: Path, version: str = "9", gpus: int = 2,
                 root_password: str | None = None) -> None:
        if version not in ("9", "8.4"):
            raise ValueError(f"pvesim version {version!r}: use '9' or '8.4'")
        self.version = version
        self.dir = data_dir
        self.lock = threading.RLock()
        self.node = NODE
        self.node_online = True
        self.pci = a6000_devices(gpus)
        self.mappings: dict[str, dict[str, Any]] = {}
        self.storages = {
            "local": Storage("local", "dir", {"iso", "vztmpl", "backup", "import", "snippets",
                                              "images"}, data_dir / "storage" / "local"),
            "local-lvm": Storage("local-lvm", "lvmthin", {"images", "rootdir"},
                                 data_dir / "storage" / "local-lvm"),
        }
        for s in self.storages.values():
            s.path.mkdir(parents=True, exist_ok=True)
        self.volumes: dict[str, Volume] = {}
        self.vms: dict[int, Vm] = {}
        self.tasks: dict[str, Task] = {}
        self.users: dict[str, dict[str, Any]] = {
            "root@pam": {"password": root_password or secrets.token_urlsafe(18),
                         "enable": 1},
        }
        self.tokens: dict[str, dict[str, Any]] = {}
        self.acl: list[tuple[str, str, str, bool]] = []  # (path, ugid, role, propagate)
        self.faults: list[Fault] = []
        self.resources_lag_s = 2.0
        self._history: list[tuple[float, dict[int, dict[str, Any]]]] = []
        self._secret = secrets.token_bytes(32)
        self._pid = 1000 + (os.getpid() % 50000)
        self.pstart = int(time.monotonic() * 100) & 0xFFFFFFFF
        self.roles = roles(version)
        self.backend: Any = None

    # ---- auth ---------------------------------------------------------------------------
    def _sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()[:40]

    def make_ticket(self, user: str, now: float | None = None) -> tuple[str, str]:
        t = f"{int(now or time.time()):08X}"
        plain = f"PVE:{user}:{t}"
        ticket = f"{plain}::{self._sign(plain)}"
        csrf = f"{t}:{self._sign('csrf:' + user + ':' + t)}"
        return ticket, csrf

    def check_ticket(self, ticket: str) -> str | None:
        """The user of a valid, unexpired ticket."""
        try:
            plain, sig = ticket.rsplit("::", 1)
            _, user, t = plain.split(":", 2)
            age = time.time() - int(t, 16)
        except ValueError:
            return None
        if not hmac.compare_digest(sig, self._sign(plain)) or not -300 < age < TICKET_LIFETIME_S:
            return None
        if any(f.kind == "expire-tickets" for f in self.faults):
            return None
        return user

    def check_csrf(self, user: str, token: str) -> bool:
        t, _, sig = token.partition(":")
        return hmac.compare_digest(sig, self._sign("csrf:" + user + ":" + t))

    def check_token(self, header_value: str) -> str | None:
        """`user@realm!id=secret` -> `user@realm!id` when valid."""
        full, sep, secret = header_value.partition("=")
        tok = self.tokens.get(full)
        if not sep or tok is None or not hmac.compare_digest(tok["secret"], secret):
            return None
        if tok.get("expire") and tok["expire"] < time.time():
            return None
        return full

    def privs(self, authuser: str, path: str) -> set[str]:
        """Effective privileges of a user or token on `path` (PVE's ACL tree: the most
        specific path with entries wins; entries on ancestors need `propagate`)."""
        if authuser == "root@pam":
            return set().union(*self.roles.values())
        user, _, tokid = authuser.partition("!")
        own = self._acl_privs(user, path)
        if tokid:
            tok = self.tokens.get(authuser) or {}
            if tok.get("privsep", 1):
                return own & self._acl_privs(authuser, path)
        return own

    def _acl_privs(self, ugid: str, path: str) -> set[str]:
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            p = "/" + "/".join(parts[:depth])
            entries = [e for e in self.acl if e[0] == p and e[1] == ugid
                       and (depth == len(parts) or e[3])]
            if entries:
                out: set[str] = set()
                for e in entries:
                    out |= self.roles.get(e[2], set())
                return out
        if ugid == "root@pam":
            return set().union(*self.roles.values())
        return set()

    def check_perm(self, authuser: str, path: str, privs: list[str], any_: bool = False) -> None:
        have = self.privs(authuser, path)
        for p in privs:
            if p in have:
                if any_:
                    return
            elif not any_:
                raise PveError(403, msg("perm", path=path, priv=p))
        if any_ and privs:
            raise PveError(403, msg("perm", path=path, priv="|".join(privs)))

    def has_perm(self, authuser: str, path: str, privs: list[str], any_: bool = True) -> bool:
        try:
            self.check_perm(authuser, path, privs, any_)
        except PveError:
            return False
        return True

    # ---- tasks --------------------------------------------------------------------------
    def upid(self, typ: str, ident: str, user: str) -> tuple[str, int, int]:
        with self.lock:
            self._pid += 1
            pid = self._pid
        start = int(time.time())
        return (f"UPID:{self.node}:{pid:08X}:{self.pstart:08X}:{start:08X}:{typ}:{ident}:"
                f"{user}:"), pid, start

    def start_task(self, typ: str, ident: str, user: str, body: Callable[[Task], None],
                   *, hang_path: str = "", on_end: Callable[[Task], None] | None = None) -> str:
        """Fork a worker (a thread): `body` raising TaskError/PveError ends the task with that
        text as `exitstatus`; warnings give `WARNINGS: n`; otherwise `OK`."""
        upid, pid, start = self.upid(typ, ident, user)
        task = Task(upid, self.node, pid, self.pstart, start, typ, ident, user)
        task.on_end = on_end  # type: ignore[attr-defined]
        fault = self.take_fault(("task-fail", "task-hang", "task-warn"), None, hang_path)
        with self.lock:
            self.tasks[upid] = task

        def run() -> None:
            status = "OK"
            try:
                if fault and fault.kind == "task-hang":
                    task.done.wait(fault.seconds or 3600)  # an abort ends the wait
                    if task.status == "stopped":
                        return
                if fault and fault.kind == "task-fail":
                    raise TaskError(msg("sim_fault", detail=fault.message))
                body(task)
                if fault and fault.kind == "task-warn":
                    task.warn(msg("sim_fault", detail=fault.message))
                if self.node_gone():
                    raise TaskError(msg("sim_node_gone", node=self.node))
                status = f"WARNINGS: {task.warnings}" if task.warnings else "OK"
            except (TaskError, PveError) as exc:
                status = str(exc).split("\n")[0]
            except Exception as exc:  # a pvesim bug: say so in the task, like PVE would
                traceback.print_exc()
                status = msg("sim_internal", detail=exc)
            with self.lock:
                if task.status == "stopped":  # aborted meanwhile: abort_task recorded it
                    return
                task.exitstatus = status
            if on_end:
                try:
                    on_end(task)
                except Exception:  # noqa: BLE001 - never leave a task running
                    traceback.print_exc()
            if status == "OK":
                task.say(msg("task_ok"))
            elif status.startswith("WARNINGS"):
                task.say(msg("task_warnings", n=task.warnings))
            else:
                task.say(msg("task_error", detail=status))
            task.endtime = time.time()
            task.status = "stopped"
            task.done.set()
            self.record()

        threading.Thread(target=run, name=f"pvesim-{typ}-{ident}", daemon=True).start()
        return upid

    def abort_task(self, task: Task) -> None:
        """DELETE .../tasks/{upid}: the worker gets SIGTERM and dies "received interrupt"."""
        with self.lock:
            if task.status != "running" or task.exitstatus is not None:
                return  # ended, or ending right now
            task.exitstatus = msg("task_interrupt")
            task.status = "stopped"
        on_end = getattr(task, "on_end", None)
        if on_end:
            try:
                on_end(task)
            except Exception:  # noqa: BLE001 - the task ends regardless
                traceback.print_exc()
        task.say(msg("task_error", detail=task.exitstatus))
        task.endtime = time.time()
        task.done.set()
        self.record()

    # ---- faults -------------------------------------------------------------------------
    def take_fault(self, kinds: tuple[str, ...], method: str | None, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.kind not in kinds:
                    continue
                if f.method and method and f.method.upper() != method.upper():
                    continue
                if f.path and f.path not in path:
                    continue
                if f.times > 0:
                    f.times -= 1
                    if f.times == 0:
                        self.faults.remove(f)
                return f
        return None

    def node_gone(self) -> bool:
        return any(f.kind == "node-gone" for f in self.faults)

    # ---- /cluster/resources lag ---------------------------------------------------------
    def record(self) -> None:
        """Remember what pvestatd would report now; /cluster/resources serves an older view."""
        with self.lock:
            snap = {vmid: {"status": vm.status, "name": vm.config.get("name"),
                           "template": 1 if vm.template else 0,
                           "maxmem": _mem_bytes(vm.config), "maxcpu": _cpus(vm.config)}
                    for vmid, vm in self.vms.items()}
            now = time.time()
            self._history.append((now, snap))
            self._history = [h for h in self._history if h[0] > now - 300] or [(now, snap)]

    def lagged_view(self) -> dict[int, dict[str, Any]]:
        lag = self.resources_lag_s
        f = next((f for f in self.faults if f.kind == "lag"), None)
        if f:
            lag = f.seconds
        cutoff = time.time() - lag
        view: dict[int, dict[str, Any]] = {}
        for t, snap in self._history:
            if t <= cutoff:
                view = snap
        return view


def _mem_bytes(config: dict[str, str]) -> int:
    mem = config.get("memory", "512")
    mem = mem.split("current=")[-1].split(",")[0]
    try:
        return int(mem) * 1024 * 1024
    except ValueError:
        return 512 * 1024 * 1024


def _cpus(config: dict[str, str]) -> int:
    try:
        return int(config.get("sockets", "1")) * int(config.get("cores", "1"))
    except ValueError:
        return 1
