"""Carry out a plan against PVE: tasks polled to the end, failures carry PVE's words.

A task succeeds when its exit status is ``OK`` or ``WARNINGS: n`` (PVE's
``status_is_error``); anything else is the error message PVE wrote after ``TASK ERROR:``.
Every structural step (create, clone) is followed by a fresh read and a new plan, so the
config call writes exactly the keys that differ at that moment."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpunode.proxmox.errors import (
    AgentTimeout,
    PveApiError,
    PveAuthError,
    PveError,
    TaskFailed,
    TaskTimeout,
)
from gpunode.proxmox.plan import Change, VmPlan, plan_mappings, plan_vm, updated_map
from gpunode.proxmox.spec import VmTarget, parse_props
from gpunode.proxmox.state import (
    cluster_vm,
    guest_addresses,
    image_identity,
    read_mappings,
    read_pci,
    read_vm,
    vm_ids,
)

UPID_RE = re.compile(r"^UPID:([a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?):([0-9A-Fa-f]{8}):"
                     r"([0-9A-Fa-f]{8,9}):([0-9A-Fa-f]{8}):([^:\s/]+):([^:\s/]*):([^:\s/]+):$")
#: Create (with a disk import) and clone copy whole disks: minutes on real storage.
CREATE_TIMEOUT_S = 1800
CONFIG_TIMEOUT_S = 300
DESTROY_TIMEOUT_S = 600
SHUTDOWN_TIMEOUT_S = 120
#: Polling starts fast (a simulated or small task ends in well under a second) and backs off.
POLL_FIRST_S = 0.2
POLL_MAX_S = 3.0
#: Waited for a start beyond PVE's own start timeout (QEMU set-up, our polling).
START_MARGIN_S = 60

Progress = Callable[[str], None]


def task_ok(exitstatus: str | None) -> bool:
    """PVE's rule: OK or ``WARNINGS: n`` is success; anything else is an error message."""
    if exitstatus is None:
        return False
    return exitstatus == "OK" or re.fullmatch(r"WARNINGS: \d+", exitstatus) is not None


def upid_node(upid: str) -> str:
    m = UPID_RE.match(upid)
    if not m:
        raise PveError(f"PVE returned {upid!r} where a task id (UPID) was expected")
    return m.group(1)


def wait_task(pve: Any, upid: str | None, what: str, timeout_s: float,
              clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Poll a task until it stops; return its status, or raise TaskFailed / TaskTimeout.

    ``upid`` None means the call finished synchronously (PVE returns null then)."""
    if upid is None:
        return {"status": "stopped", "exitstatus": "OK"}
    node = upid_node(upid)
    started = clock()
    delay = POLL_FIRST_S
    while True:
        st = pve.get(f"nodes/{node}/tasks/{upid}/status")
        if st.get("status") == "stopped":
            exitstatus = st.get("exitstatus")
            if task_ok(exitstatus):
                return st
            raise TaskFailed(what, upid, str(exitstatus or "no exit status"),
                             task_log_tail(pve, node, upid))
        waited = clock() - started
        if waited >= timeout_s:
            raise TaskTimeout(what, upid, waited)
        sleep(min(delay, max(0.0, timeout_s - waited)))
        delay = min(delay * 2, POLL_MAX_S)


def task_log_tail(pve: Any, node: str, upid: str, lines: int = 8) -> list[str]:
    try:
        rows = pve.get(f"nodes/{node}/tasks/{upid}/log", start=0, limit=1000)
    except PveError:
        return []
    return [str(r.get("t", "")) for r in rows[-lines:]]


@dataclass
class VmResult:
    node: str
    vmid: int
    ok: bool = True
    done: list[Change] = field(default_factory=list)
    held: list[Change] = field(default_factory=list)
    address: str | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    created: bool = False
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.done)


def read_plan(pve: Any, t: VmTarget,
              rows: dict[int, dict[str, Any]] | None = None) -> VmPlan:
    """Read the VM (and the template, for a clone not made yet) and plan. ``rows``: the
    node's VM list, when the caller read it once for many VMs."""
    rows = vm_ids(pve, t.pve_node) if rows is None else rows
    current = read_vm(pve, t.pve_node, t.vmid, rows)
    template = None
    if current is None and t.source == "clone" and t.template_vmid is not None:
        template = read_vm(pve, t.pve_node, t.template_vmid, rows)
    image = None
    if current is None and t.image:  # a new VM from a lock: from the locked image only
        image = image_identity(pve, t.pve_node, t.cloud_image, template)
    return plan_vm(t, current, template, image)


def _note(result: VmResult, st: dict[str, Any], what: str) -> None:
    ex = st.get("exitstatus", "OK")
    if ex != "OK":
        result.warnings.append(f"{what}: {ex}")


class Provisioner:
    """Apply VM plans on one PVE endpoint."""

    def __init__(self, pve: Any, progress: Progress | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, wait_agent: bool = True):
        self.pve = pve
        self.wait_agent = wait_agent
        self.progress = progress or (lambda _msg: None)
        self.clock = clock
        self.sleep = sleep

    def _wait(self, upid: Any, what: str, timeout_s: float) -> dict[str, Any]:
        return wait_task(self.pve, upid, what, timeout_s, self.clock, self.sleep)

    # --- mappings --------------------------------------------------------------------
    def converge_mappings(self, pve_node: str, wanted: list[tuple[str, list[str]]],
                          dry_run: bool = False) -> tuple[list[Change], list[str]]:
        if not wanted:
            return [], []
        existing = read_mappings(self.pve)
        try:
            pci = read_pci(self.pve, pve_node)
        except PveAuthError as exc:
            # A token for VMs often may use mappings but not read the host's hardware
            # (Sys.Audit on /): existing mappings are then used as they are.
            missing = [name for name, _ in wanted if name not in existing]
            if missing:
                return [], [f"mapping {name}: does not exist and cannot be created: {exc}; "
                            "create it as an administrator, or grant the token Sys.Audit on "
                            "/ and Mapping.Modify on /mapping/pci" for name in missing]
            self.progress(f"mappings {', '.join(n for n, _ in wanted)} exist; not compared "
                          f"with the hardware (this login may not read /nodes/{pve_node}/"
                          "hardware/pci)")
            return [], []
        changes, problems = plan_mappings(pve_node, wanted, pci, existing)
        if dry_run or problems:
            return changes, problems
        for c in changes:
            name = c.target.removeprefix("mapping ")
            self.progress(f"{c.action} {name}: {c.new}")
            if c.action == "mapping-create":
                self.pve.post("cluster/mapping/pci", id=name, map=[c.new],
                              description="gpunode: GPU passthrough")
            else:
                row = existing.get(name) or {}
                self.pve.put(f"cluster/mapping/pci/{name}",
                             map=updated_map(row, pve_node, str(c.new)), digest=row.get("digest"))
        return changes, problems

    # --- one VM ----------------------------------------------------------------------
    def provision(self, t: VmTarget, dry_run: bool = False,
                  rows: dict[int, dict[str, Any]] | None = None) -> tuple[VmPlan, VmResult]:
        """Plan (and unless dry_run apply) one VM. Never raises PveError: the result says.
        ``rows``: the node's VM list read once for the whole run (first read only)."""
        started = self.clock()
        result = VmResult(t.node, t.vmid)
        plan = VmPlan(t.node, t)
        try:
            plan = read_plan(self.pve, t, rows)
            if plan.problems:
                result.ok, result.error = False, "; ".join(plan.problems)
                return plan, result
            result.held = [c for c in plan.changes if not c.applied]
            if dry_run:
                return plan, result
            self._apply(t, plan, result)
        except PveError as exc:
            result.ok, result.error = False, str(exc)
        finally:
            result.seconds = self.clock() - started
        return plan, result

    def _apply(self, t: VmTarget, plan: VmPlan, result: VmResult) -> None:
        base = f"nodes/{t.pve_node}/qemu/{t.vmid}"
        first = plan.changes[0] if plan.changes else None
        if first is not None and first.action in ("create", "clone"):
            used = cluster_vm(self.pve, t.vmid)
            if used is not None:
                raise PveError(f"vm {t.vmid}: the id is already used by "
                               f"{used.get('name') or used.get('id')} on node "
                               f"{used.get('node')}; pick another vm.vmid")
            if first.action == "create":
                self.progress(f"create vm {t.vmid} from {t.cloud_image}")
                upid = self.pve.post(f"nodes/{t.pve_node}/qemu", **t.create_params())
                result.created = True
                _note(result, self._wait(upid, f"create vm {t.vmid}", CREATE_TIMEOUT_S),
                      "create")
            else:
                self.progress(f"clone template {t.template_vmid} to vm {t.vmid}")
                params: dict[str, Any] = {"newid": t.vmid, "name": t.node,
                                          "full": 1 if t.full_clone else 0}
                if t.full_clone:
                    params["storage"] = t.storage
                upid = self.pve.post(f"nodes/{t.pve_node}/qemu/{t.template_vmid}/clone",
                                     **params)
                result.created = True
                _note(result, self._wait(upid, f"clone {t.template_vmid} to vm {t.vmid}",
                                         CREATE_TIMEOUT_S), "clone")
            result.done.append(first)
            plan = read_plan(self.pve, t)   # the real config now, not the template's
            if plan.problems:
                raise PveError("; ".join(plan.problems))
        try:
            self._converge(t, plan, result, base)
        except (TaskFailed, TaskTimeout) as exc:
            if result.created and exc.what.startswith("start "):
                raise PveError(self._start_failed(t, exc)) from None
            raise

    def _converge(self, t: VmTarget, plan: VmPlan, result: VmResult, base: str) -> None:
        params = plan.config_params()
        if params:
            keys = ", ".join(sorted(k for k in params if k != "delete"))
            self.progress(f"config vm {t.vmid}: {keys}" + (f"; delete {params['delete']}"
                                                            if "delete" in params else ""))
            upid = self.pve.post(f"{base}/config", **params)
            _note(result, self._wait(upid, f"config vm {t.vmid}", CONFIG_TIMEOUT_S), "config")
            result.done.extend(c for c in plan.changes
                               if c.action in ("set", "delete") and c.applied)
        for c in plan.changes:
            if not c.applied:
                continue
            if c.action == "resize":
                self.progress(f"resize vm {t.vmid} {c.key} to {c.new}")
                upid = self.pve.put(f"{base}/resize", disk=c.key, size=c.new)
                self._wait(upid, f"resize vm {t.vmid} {c.key}", CONFIG_TIMEOUT_S)
                result.done.append(c)
            elif c.action == "restart":
                self.progress(f"restart vm {t.vmid} ({c.key})")
                upid = self.pve.post(f"{base}/status/shutdown", timeout=SHUTDOWN_TIMEOUT_S,
                                     forceStop=1)
                _note(result, self._wait(upid, f"shutdown vm {t.vmid}",
                                         SHUTDOWN_TIMEOUT_S + 60), "shutdown")
                self._start(t, base, result)
                result.done.append(c)
            elif c.action == "start":
                self._start(t, base, result)
                result.done.append(c)
        if not self.wait_agent:
            result.address = self.read_address(t)
        elif result.created or any(c.action in ("start", "restart") for c in result.done):
            result.address = self.wait_address(t)
        else:
            result.address = self.read_address(t)

    def _start(self, t: VmTarget, base: str, result: VmResult) -> None:
        self.progress(f"start vm {t.vmid} (timeout {t.start_timeout_s} s)")
        upid = self.pve.post(f"{base}/status/start", timeout=t.start_timeout_s)
        # PVE's own start timeout plus room for QEMU setup and our polling
        _note(result, self._wait(upid, f"start vm {t.vmid}", t.start_timeout_s + START_MARGIN_S),
              "start")

    def _start_failed(self, t: VmTarget, exc: TaskFailed | TaskTimeout) -> str:
        """Clean up after the first start of a VM this run created failed or hung."""
        base = f"nodes/{t.pve_node}/qemu/{t.vmid}"
        if isinstance(exc, TaskFailed):
            msg = f"start vm {t.vmid} failed: {exc.exitstatus}"
        else:
            msg = str(exc)
            try:   # stop the hung start task, as the GUI's "Stop" button does
                self.pve.delete(f"nodes/{upid_node(exc.upid)}/tasks/{exc.upid}")
                self._wait(exc.upid, f"stopping task {exc.upid}", 30)
            except PveError:
                pass   # a stopped task ends as an error: expected here
        try:
            if t.on_start_failure == "destroy":
                self._destroy(t.pve_node, t.vmid)
                return msg + (f"; the new VM {t.vmid} was destroyed (vm.on_start_failure: "
                              "destroy)")
            st = self.pve.get(f"{base}/status/current")
            if st.get("status") == "running":
                self._wait(self.pve.post(f"{base}/status/stop"), f"stop vm {t.vmid}",
                           SHUTDOWN_TIMEOUT_S)
            return msg + (f"; the new VM {t.vmid} is left stopped for inspection "
                          "(vm.on_start_failure: stop)")
        except PveError as cleanup:
            return msg + f"; cleaning up the new VM failed too: {cleanup}"

    # --- the guest's address -----------------------------------------------------------
    def _mac(self, t: VmTarget) -> str | None:
        cfg = self.pve.get(f"nodes/{t.pve_node}/qemu/{t.vmid}/config")
        net = parse_props(str(cfg.get("net0", "")), "model")
        model = t.config.get("net0", "virtio").split(",", 1)[0]
        mac = net.get(model) or net.get("macaddr")
        return mac.lower() if mac else None

    def read_address(self, t: VmTarget, mac: str | None = None) -> str | None:
        """The guest's IPv4 address from the agent now, or None while it is not up."""
        try:
            data = self.pve.get(f"nodes/{t.pve_node}/qemu/{t.vmid}/agent/"
                                "network-get-interfaces")
        except PveApiError:
            return None   # agent not running (yet), VM not running: all sync 500s
        found = guest_addresses(data)
        if mac:
            for _iface, hw, ip in found:
                if hw == mac:
                    return ip
        return found[0][2] if found else None

    def wait_address(self, t: VmTarget) -> str:
        self.progress(f"wait for vm {t.vmid}'s guest agent (up to {t.agent_timeout_s} s)")
        mac = self._mac(t)
        started = self.clock()
        while True:
            ip = self.read_address(t, mac)
            if ip:
                return ip
            waited = self.clock() - started
            if waited >= t.agent_timeout_s:
                raise AgentTimeout(
                    f"vm {t.vmid} is running but its guest agent gave no IPv4 address within "
                    f"{t.agent_timeout_s} s: the image needs qemu-guest-agent (a cloud image "
                    "gets it through cloud-init) and an address on net0; see the VM's "
                    "console (serial0)")
            self.sleep(min(2.0, max(0.0, t.agent_timeout_s - waited)))

    # --- destroy -----------------------------------------------------------------------
    def _destroy(self, pve_node: str, vmid: int) -> None:
        base = f"nodes/{pve_node}/qemu/{vmid}"
        st = self.pve.get(f"{base}/status/current")
        if st.get("status") == "running":
            self.progress(f"stop vm {vmid}")
            self._wait(self.pve.post(f"{base}/status/stop"), f"stop vm {vmid}",
                       SHUTDOWN_TIMEOUT_S)
        self.progress(f"destroy vm {vmid} (purge)")
        upid = self.pve.delete(base, purge=1, **{"destroy-unreferenced-disks": 1})
        self._wait(upid, f"destroy vm {vmid}", DESTROY_TIMEOUT_S)

    def destroy(self, t: VmTarget) -> VmResult:
        """Stop and remove the node's VM (purge: backup jobs, replication, HA too).

        Refuses a VM whose name is not the node's: the id may belong to someone else."""
        started = self.clock()
        result = VmResult(t.node, t.vmid)
        try:
            current = read_vm(self.pve, t.pve_node, t.vmid)
            if current is None:
                self.progress(f"vm {t.vmid} does not exist on {t.pve_node}: nothing to do")
            elif current.name != t.node:
                raise PveError(f"vm {t.vmid} on {t.pve_node} is named {current.name!r}, not "
                               f"{t.node!r}; gpunode does not destroy another VM")
            elif current.is_template:
                raise PveError(f"vm {t.vmid} on {t.pve_node} is a template; not destroyed")
            else:
                self._destroy(t.pve_node, t.vmid)
                result.done.append(Change(f"vm {t.vmid} on {t.pve_node}", "destroy"))
        except PveError as exc:
            result.ok, result.error = False, str(exc)
        result.seconds = self.clock() - started
        return result
