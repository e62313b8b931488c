"""Task polling and the apply sequence, against a scripted PVE (no HTTP)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gpunode.inventory import load_site
from gpunode.proxmox.apply import Provisioner, task_ok, upid_node, wait_task
from gpunode.proxmox.errors import PveApiError, TaskFailed, TaskTimeout
from gpunode.proxmox.spec import desired_vm, find_pve_host

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "proxmox"
UPID = "UPID:pve1:0000A1B2:0012C3D4:6932F0A0:qmstart:201:gpunode@pve!provision:"


def load(name: str):
    return json.loads((FIX / name).read_text())


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


class ScriptedPve:
    """Answers by (method, path regex); records calls. Tasks finish per ``tasks``."""

    def __init__(self):
        self.calls: list[tuple[str, str, dict]] = []
        self.routes: list[tuple[str, re.Pattern, object]] = []
        self.task_status: dict[str, list[dict]] = {}

    def on(self, method: str, pattern: str, answer) -> None:
        self.routes.insert(0, (method, re.compile(pattern + "$"), answer))

    def task(self, upid: str, *statuses: dict) -> str:
        self.task_status[upid] = list(statuses)
        return upid

    def call(self, method, path, **params):
        self.calls.append((method, path, params))
        m = re.fullmatch(r"nodes/[^/]+/tasks/(.+)/status", path)
        if m and m.group(1) in self.task_status:
            seq = self.task_status[m.group(1)]
            return seq.pop(0) if len(seq) > 1 else seq[0]
        if re.fullmatch(r"nodes/[^/]+/tasks/.+/log", path):
            return [{"n": 1, "t": "starting"}, {"n": 2, "t": "TASK ERROR: boom"}]
        for meth, rx, answer in self.routes:
            if meth == method and rx.fullmatch(path):
                return answer(**params) if callable(answer) else answer
        raise AssertionError(f"unexpected {method} {path}")

    def get(self, path, **p):
        return self.call("get", path, **p)

    def post(self, path, **p):
        return self.call("post", path, **p)

    def put(self, path, **p):
        return self.call("put", path, **p)

    def delete(self, path, **p):
        return self.call("delete", path, **p)

    def paths(self, method: str) -> list[str]:
        return [p for m, p, _ in self.calls if m == method]


RUNNING = {"status": "running"}
OK = {"status": "stopped", "exitstatus": "OK"}


def test_task_ok_rule():
    assert task_ok("OK") and task_ok("WARNINGS: 1") and task_ok("WARNINGS: 12")
    for bad in ("", None, "unexpected status", "WARNINGS: ", "warnings: 1",
                "start failed: QEMU exited with code 1"):
        assert not task_ok(bad)


def test_upid_node_follows_pves_regex():
    assert upid_node(UPID) == "pve1"
    with pytest.raises(Exception, match="UPID"):
        upid_node("UPID:pve1:nonsense")


def test_wait_task_polls_until_stopped_and_accepts_warnings():
    pve, clock = ScriptedPve(), Clock()
    pve.task(UPID, RUNNING, RUNNING, {"status": "stopped", "exitstatus": "WARNINGS: 2"})
    st = wait_task(pve, UPID, "start vm 201", 60, clock, clock.sleep)
    assert st["exitstatus"] == "WARNINGS: 2"
    assert len(pve.paths("get")) == 3 and all(p.startswith("nodes/pve1/tasks/") for p in
                                              pve.paths("get"))


def test_wait_task_failure_carries_pves_message_and_log():
    pve, clock = ScriptedPve(), Clock()
    msg = "PCI device '0000:01:00.0' already in use by VMID '101'"
    pve.task(UPID, RUNNING, {"status": "stopped", "exitstatus": msg})
    with pytest.raises(TaskFailed) as exc:
        wait_task(pve, UPID, "start vm 201", 60, clock, clock.sleep)
    assert exc.value.exitstatus == msg and msg in str(exc.value)
    assert exc.value.log_tail[-1] == "TASK ERROR: boom"


def test_wait_task_timeout_names_the_task():
    pve, clock = ScriptedPve(), Clock()
    pve.task(UPID, RUNNING)
    with pytest.raises(TaskTimeout) as exc:
        wait_task(pve, UPID, "start vm 201", 30, clock, clock.sleep)
    assert "start vm 201" in str(exc.value) and UPID in str(exc.value)
    assert 30 <= clock.now <= 31


def test_sync_null_result_is_success():
    assert wait_task(ScriptedPve(), None, "config", 1)["exitstatus"] == "OK"


# --- the provision sequence ------------------------------------------------------------

def site_target(node: str):
    site = load_site(FIX / "site.yaml")
    p = site.nodes[node]
    return desired_vm(p, find_pve_host(site.nodes, p.vm.pve_node))


def upid(kind: str, n: int) -> str:
    return f"UPID:pve1:0000{n:04X}:0012C3D4:6932F0A0:{kind}:201:gpunode@pve!provision:"


def fresh_pve(start_exit: str = "OK") -> tuple[ScriptedPve, dict]:
    """A PVE where vm 201 does not exist until the create task ran."""
    pve = ScriptedPve()
    vm: dict = {}
    pve.on("get", "nodes/pve1/qemu", lambda **_: [{"vmid": 201}] if vm else [])
    pve.on("get", "cluster/resources", [])
    pve.on("get", r"nodes/pve1/qemu/201/config", lambda **_: dict(vm))
    pve.on("get", r"nodes/pve1/qemu/201/status/current",
           lambda **_: {"status": vm.get("_status", "stopped")})
    pve.on("get", r"nodes/pve1/qemu/201/pending",
           lambda **_: [{"key": k, "value": v} for k, v in vm.items() if not k.startswith("_")])

    def create(**params):
        vm.update({k: v for k, v in params.items() if k != "vmid"})
        vm["scsi0"] = "local-lvm:vm-201-disk-1,discard=on,iothread=1,size=3G,ssd=1"
        vm["ide2"] = "local-lvm:vm-201-cloudinit,media=cdrom"
        vm["efidisk0"] = "local-lvm:vm-201-disk-0,efitype=4m,pre-enrolled-keys=0,size=4M"
        vm["net0"] = "virtio=BC:24:11:5E:7A:01,bridge=vmbr0"
        return pve.task(upid("qmcreate", 1), RUNNING, OK)

    def resize(disk, size):
        vm["scsi0"] = vm["scsi0"].replace("size=3G", f"size={size}")
        return pve.task(upid("resize", 2), OK)

    def start(timeout):
        assert timeout == 150            # hostpci x4 of 30 s, at least 150 s with hugepages
        if start_exit == "OK":
            vm["_status"] = "running"
        return pve.task(upid("qmstart", 3), RUNNING, {"status": "stopped",
                                                        "exitstatus": start_exit})

    def destroy(**params):
        assert params == {"purge": 1, "destroy-unreferenced-disks": 1}
        vm.clear()
        return pve.task(upid("qmdestroy", 4), OK)

    pve.on("post", "nodes/pve1/qemu", create)
    pve.on("put", r"nodes/pve1/qemu/201/resize", resize)
    pve.on("post", r"nodes/pve1/qemu/201/status/start", start)
    pve.on("delete", r"nodes/pve1/qemu/201", destroy)
    agent_calls = iter([PveApiError("GET x", 500, "QEMU guest agent is not running")] * 2
                       + [{"result": [
                           {"name": "lo", "hardware-address": "00:00:00:00:00:00",
                            "ip-addresses": [{"ip-address": "127.0.0.1",
                                              "ip-address-type": "ipv4"}]},
                           {"name": "eth0", "hardware-address": "bc:24:11:5e:7a:01",
                            "ip-addresses": [{"ip-address": "fe80::1",
                                              "ip-address-type": "ipv6"},
                                             {"ip-address": "192.0.2.41",
                                              "ip-address-type": "ipv4"}]}]}] * 10)

    def agent(**_):
        answer = next(agent_calls)
        if isinstance(answer, Exception):
            raise answer
        return answer

    pve.on("get", r"nodes/pve1/qemu/201/agent/network-get-interfaces", agent)
    return pve, vm


def test_provision_new_vm_creates_resizes_starts_and_reports_the_address():
    pve, vm = fresh_pve()
    clock = Clock()
    plan, result = Provisioner(pve, clock=clock, sleep=clock.sleep).provision(
        site_target("gpuvm1"))
    assert result.ok, result.error
    assert result.address == "192.0.2.41"
    order = [(m, p.rsplit("/", 1)[-1]) for m, p, _ in pve.calls if m != "get"]
    assert order == [("post", "qemu"), ("put", "resize"), ("post", "start")]
    create = next(params for m, p, params in pve.calls if m == "post" and p.endswith("qemu"))
    assert create["hostpci0"] == "mapping=a6000-0,pcie=1" and create["vmid"] == 201
    assert vm["scsi0"].endswith("size=64G,ssd=1")
    assert [c.action for c in result.done] == ["create", "resize", "start"]


def test_start_failure_of_a_new_vm_destroys_it_and_says_why():
    msg = "PCI device '0000:01:00.0' already in use by VMID '101'"
    pve, vm = fresh_pve(start_exit=msg)
    clock = Clock()
    _, result = Provisioner(pve, clock=clock, sleep=clock.sleep).provision(
        site_target("gpuvm1"))
    assert not result.ok
    assert msg in result.error and "destroyed" in result.error
    assert vm == {}                       # no leaked VM
    assert ("delete", "nodes/pve1/qemu/201") in [(m, p) for m, p, _ in pve.calls]


def test_start_failure_with_policy_stop_keeps_the_vm():
    msg = "q35 machine model is not enabled"
    pve, vm = fresh_pve(start_exit=msg)
    t = site_target("gpuvm1")
    t = type(t)(**{**t.__dict__, "on_start_failure": "stop"})
    clock = Clock()
    _, result = Provisioner(pve, clock=clock, sleep=clock.sleep).provision(t)
    assert not result.ok and "left stopped" in result.error and vm


def test_dry_run_only_reads():
    pve, _ = fresh_pve()
    plan, result = Provisioner(pve).provision(site_target("gpuvm1"), dry_run=True)
    assert result.ok and plan.changed
    assert {m for m, _, _ in pve.calls} == {"get"}


def test_converged_vm_makes_no_write_and_reads_the_address():
    pve, vm = fresh_pve()
    vm.update(load("vm_config_converged.json"))
    vm["_status"] = "running"
    clock = Clock()
    plan, result = Provisioner(pve, clock=clock, sleep=clock.sleep).provision(
        site_target("gpuvm1"))
    assert result.ok and not plan.changed and not result.changed
    assert {m for m, _, _ in pve.calls} == {"get"}


def test_read_vm_running_uses_pending_rows_stopped_uses_config():
    from gpunode.proxmox.state import read_vm

    pve = ScriptedPve()
    pve.on("get", r"nodes/pve1/qemu/201/pending", [
        {"key": "memory", "value": "32768", "pending": "65536"},
        {"key": "hugepages", "value": "1024", "delete": 1},
        {"key": "name", "value": "gpuvm1"}])
    pve.on("get", r"nodes/pve1/qemu/201/config", {"name": "gpuvm1", "memory": "2048"})
    vm = read_vm(pve, "pve1", 201, rows={201: {"vmid": 201, "status": "running"}})
    assert vm.config == {"memory": "65536", "name": "gpuvm1"}
    assert vm.pending == {"memory": "65536", "hugepages": None}
    assert pve.paths("get") == ["nodes/pve1/qemu/201/pending"]
    vm = read_vm(pve, "pve1", 201, rows={201: {"vmid": 201, "status": "stopped"}})
    assert vm.config == {"name": "gpuvm1", "memory": "2048"} and vm.pending == {}
    assert read_vm(pve, "pve1", 202, rows={201: {"vmid": 201}}) is None
