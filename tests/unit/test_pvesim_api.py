"""pvesim's PVE API behaviour, driven only through proxmoxer over HTTPS (no VMs here).

VM-backed behaviour (booting, SSH, the guest agent) is in tests/integration/test_pvesim.py.
"""

from __future__ import annotations

import http.server
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import requests
from proxmoxer import ProxmoxAPI
from proxmoxer.core import AuthenticationError, ResourceException
from pvesim_fixtures import (  # noqa: F401 - fixtures
    AUTH_FAIL_DELAY,
    pve_root,
    pve_token,
    pvesim,
    pvesim84,
    wait_task,
)

from gpunode.lab.pvesim.server import PveSim, Token

UPID_RE = re.compile(r"^UPID:([a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?):([0-9A-Fa-f]{8}):"
                     r"([0-9A-Fa-f]{8,9}):([0-9A-Fa-f]{8}):([^:\s/]+):([^:\s/]*):([^:\s/]+):$")
A6000_MAP = "node=pve1,path=0000:01:00,id=10de:2230,iommugroup=14"
A6000_MAP_1 = "node=pve1,path=0000:41:00,id=10de:2230,iommugroup=48"
ED25519 = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl "
           "ci@example")


def _err(fn: Any, *args: Any, **kw: Any) -> ResourceException:
    with pytest.raises(ResourceException) as info:
        fn(*args, **kw)
    return info.value


@pytest.fixture(scope="module")
def node(pvesim: PveSim, pve_root: Any) -> Any:  # noqa: F811
    pve_root.cluster.mapping.pci.post(id="a6000-0", map=A6000_MAP, description="GPU 0")
    pve_root.cluster.mapping.pci.post(id="a6000-1", map=A6000_MAP_1)
    return pve_root.nodes(pvesim.node)


@pytest.fixture(scope="module")
def tnode(pvesim: PveSim, pve_token: Token, node: Any) -> Any:  # noqa: F811
    return pvesim.api(pve_token).nodes(pvesim.node)


@pytest.fixture(scope="module")
def tapi(pvesim: PveSim, pve_token: Token) -> Any:  # noqa: F811
    return pvesim.api(pve_token)


# ---- the Done-when points ------------------------------------------------------------------
def test_token_creates_vm_with_mapped_gpu(tapi: Any, tnode: Any) -> None:
    upid = tnode.qemu.post(vmid=100, name="gpu-01", machine="q35", memory=4096,
                           hostpci0="mapping=a6000-0,pcie=1", net0="virtio,bridge=vmbr0")
    assert UPID_RE.match(upid), upid
    assert upid.split(":")[5:8] == ["qmcreate", "100", "ci@pve!auto"]
    status = wait_task(tapi, upid)
    assert status["exitstatus"] == "OK"
    assert (status["user"], status["tokenid"]) == ("ci@pve", "auto")
    conf = tnode.qemu(100).config.get()
    assert conf["hostpci0"] == "mapping=a6000-0,pcie=1"
    assert re.fullmatch(r"virtio=BC:24:11(:[0-9A-F]{2}){3},bridge=vmbr0", conf["net0"])
    assert conf["memory"] == "4096" and "lock" not in conf and len(conf["digest"]) == 40


def test_token_gets_root_only_message_for_raw_hostpci(tnode: Any, node: Any) -> None:
    err = _err(tnode.qemu.post, vmid=101, machine="q35", hostpci0="0000:01:00,pcie=1")
    assert err.status_code == 500
    assert err.content == "only root can set 'hostpci0' config for non-mapped devices"
    assert str(err).startswith("500 Internal Server Error: only root can set 'hostpci0'")
    missing = _err(node.qemu(101).config.get)
    assert missing.content == "Configuration file 'nodes/pve1/qemu-server/101.conf' does not exist"
    # root@pam with a password ticket may
    assert node.qemu.post(vmid=101, hostpci0="0000:01:00,pcie=1")


def test_token_needs_mapping_use_on_the_mapping(pvesim: PveSim) -> None:  # noqa: F811
    tok = pvesim.create_token("nomap@pve", "tok", acl=[("/vms", "PVEVMAdmin")])
    n = pvesim.api(tok).nodes(pvesim.node)
    err = _err(n.qemu.post, vmid=102, hostpci0="mapping=a6000-0,pcie=1")
    assert (err.status_code, err.content) == (
        403, "Permission check failed (/mapping/pci/a6000-0, Mapping.Use)")
    auditor = pvesim.create_token("audit@pve", "tok", acl=[("/", "PVEAuditor")])
    err = _err(pvesim.api(auditor).nodes(pvesim.node).qemu.post, vmid=103)
    assert (err.status_code, err.content) == (403, "Permission check failed (/vms/103, "
                                                   "VM.Allocate)")


def test_numa_true_is_refused_with_pves_boolean_message(tapi: Any, tnode: Any) -> None:
    err = _err(tnode.qemu.post, vmid=104, numa=True)
    assert err.status_code == 400
    assert err.content == "Parameter verification failed."
    assert err.errors == {"numa": "type check ('boolean') failed - got 'True'"}
    # 1/0 at the top level, and inside property strings PVE's parse_boolean accepts "true"
    assert wait_task(tapi, tnode.qemu.post(vmid=104, numa=1, agent="enabled=true"))[
        "exitstatus"] == "OK"
    assert tnode.qemu(104).config.get()["numa"] == 1  # typed: a JSON number


def test_start_fails_inside_the_task_when_a_running_vm_holds_the_gpu(
        pve_root: Any, node: Any) -> None:  # noqa: F811
    for vmid in (110, 111):
        wait_task(pve_root, node.qemu.post(vmid=vmid, machine="q35",
                                           hostpci0="0000:41:00,pcie=1"))
    assert wait_task(pve_root, node.qemu(110).status.start.post())["exitstatus"] == "OK"
    upid = node.qemu(111).status.start.post()  # the HTTP call succeeds ...
    assert UPID_RE.match(upid)
    status = wait_task(pve_root, upid)  # ... the task fails
    assert status["exitstatus"] == "PCI device '0000:41:00.0' already in use by VMID '110'"
    assert node.qemu(111).status.current.get()["status"] == "stopped"
    log = node.tasks(upid).log.get()
    assert log[-1]["t"] == "TASK ERROR: PCI device '0000:41:00.0' already in use by VMID '110'"
    wait_task(pve_root, node.qemu(110).status.stop.post())
    assert wait_task(pve_root, node.qemu(111).status.start.post())["exitstatus"] == "OK"
    wait_task(pve_root, node.qemu(111).status.stop.post())


def test_mapped_gpu_in_use_fails_the_start_task_too(tapi: Any, tnode: Any) -> None:
    for vmid in (112, 113):
        wait_task(tapi, tnode.qemu.post(vmid=vmid, machine="q35",
                                        hostpci0="mapping=a6000-1,pcie=1"))
    assert wait_task(tapi, tnode.qemu(112).status.start.post())["exitstatus"] == "OK"
    st = wait_task(tapi, tnode.qemu(113).status.start.post())
    assert st["exitstatus"] == "PCI device '0000:41:00.0' already in use by VMID '112'"
    wait_task(tapi, tnode.qemu(112).status.stop.post())


@pytest.mark.parametrize(("params", "exitstatus"), [
    ({"hostpci0": "0000:01:00,pcie=1"},
     "q35 machine model is not enabled at /usr/share/perl5/PVE/QemuServer/PCI.pm line 510."),
    ({"machine": "q35", "hostpci0": "0000:09:00,pcie=1"}, "no PCI device found for '0000:09:00'"),
    ({"hugepages": "1024", "memory": 4096},
     "numa needs to be enabled to use hugepages at /usr/share/perl5/PVE/QemuServer/Memory.pm "
     "line 388."),
    ({"hugepages": "1024", "memory": 3000, "numa": 1},
     "Memory size 3000 is not a multiple of the requested hugepages size 1024"),
    ({"machine": "q35", "hostpci0": "mapping=nosuch,pcie=1"},
     "PCI device mapping not found for 'nosuch'"),
])
def test_start_time_failures_are_task_failures(pve_root: Any, node: Any,  # noqa: F811
                                               params: dict[str, Any], exitstatus: str) -> None:
    vmid = 120 + len(exitstatus) % 50
    wait_task(pve_root, node.qemu.post(vmid=vmid, **params))
    st = wait_task(pve_root, node.qemu(vmid).status.start.post())
    assert st["exitstatus"] == exitstatus
    wait_task(pve_root, node.qemu(vmid).delete())


def test_locked_vm_refuses_config_changes(pvesim: PveSim, tapi: Any, tnode: Any) -> None:  # noqa: F811
    pvesim.fault("task-hang", path="/qemu", seconds=2)
    upid = tnode.qemu.post(vmid=130, name="slow")
    assert tnode.qemu(130).config.get()["lock"] == "create"  # written before the UPID returns
    err = _err(tnode.qemu(130).config.put, memory=2048)
    assert (err.status_code, err.content) == (500, "VM is locked (create)")
    # the async POST and resize check the lock in their worker: the task fails
    st = wait_task(tapi, tnode.qemu(130).config.post(name="other"))
    assert st["exitstatus"] == "VM is locked (create)"
    err = _err(tnode.qemu(130).config.post, name="other", background_delay=5)
    assert err.content == "failed to update VM 130: VM is locked (create)"
    st = wait_task(tapi, tnode.qemu(130).resize.put(disk="scsi0", size="+1G"))
    assert st["exitstatus"] == "VM is locked (create)"
    assert wait_task(tapi, upid)["exitstatus"] == "OK"
    assert tnode.qemu(130).config.get()["name"] == "slow"
    assert tnode.qemu(130).config.put(memory=2048) is None  # unlocked now
    err = _err(tnode.qemu(130).config.put, memory=1024, skiplock=1)
    assert err.status_code == 400 and err.errors == {"skiplock": "Only root may use this option."}


def test_pve9_only_keys_are_refused_by_84(pvesim84: PveSim, pvesim: PveSim,  # noqa: F811
                                          pve_root: Any) -> None:  # noqa: F811
    root84 = pvesim84.api()
    assert root84.version.get()["release"] == "8.4"
    n84 = root84.nodes(pvesim84.node)
    err = _err(n84.qemu.post, vmid=100, machine="q35", hostpci0="0000:01:00,pcie=1,driver=vfio")
    assert err.status_code == 400
    assert err.errors == {"hostpci0": "invalid format - invalid key in comma-separated list "
                                      "property: driver\n"}
    err = _err(n84.qemu.post, vmid=100, **{"allow-ksm": 0})
    assert err.errors == {"allow-ksm": "property is not defined in schema and the schema does "
                                       "not allow additional properties"}
    # the same keys are fine on PVE 9
    n9 = pve_root.nodes(pvesim.node)
    wait_task(pve_root, n9.qemu.post(vmid=140, machine="q35", **{"allow-ksm": 0},
                                     hostpci0="0000:01:00,pcie=1,driver=vfio"))
    assert n9.qemu(140).config.get()["hostpci0"] == "0000:01:00,pcie=1,driver=vfio"


# ---- further fidelity ------------------------------------------------------------------------
def test_sshkeys_must_be_urlencoded_with_quote(tapi: Any, tnode: Any) -> None:
    err = _err(tnode.qemu.post, vmid=141, sshkeys=ED25519)
    # PVE's `die "...\n"` keeps its newline in the errors value
    assert err.errors == {"sshkeys": f"invalid format - invalid urlencoded string: {ED25519}\n"}
    err = _err(tnode.qemu.post, vmid=141, sshkeys=quote_plus(ED25519))
    assert "invalid urlencoded string" in err.errors["sshkeys"]
    err = _err(tnode.qemu.post, vmid=141, sshkeys=quote("ssh-ed25519 AAAAnotakey x", safe=""))
    assert (err.status_code, err.content) == (500, "SSH public key validation error")
    assert wait_task(tapi, tnode.qemu.post(vmid=141, sshkeys=quote(ED25519, safe="")))[
        "exitstatus"] == "OK"


def test_unknown_path_missing_param_and_unknown_param(pve_root: Any, node: Any) -> None:  # noqa: F811
    err = _err(node.foo.get)
    assert (err.status_code, err.content) == (501, "Method 'GET /nodes/pve1/foo' not implemented")
    err = _err(node.qemu.post, name="x")
    assert err.errors == {"vmid": "property is missing and it is not optional"}
    err = _err(node.qemu.post, vmid=142, cores=0, bogus=1, ostype="linux")
    assert err.errors == {
        "cores": "value must have a minimum value of 1",
        "bogus": "property is not defined in schema and the schema does not allow additional "
                 "properties",
        "ostype": "value 'linux' does not have a value in the enumeration 'other, wxp, w2k, "
                  "w2k3, w2k8, wvista, win7, win8, win10, win11, l24, l26, solaris'"}
    err = _err(node.qemu.post, vmid=142, agent="enabled=maybe")
    assert err.errors == {"agent": "invalid format - format error\nagent.enabled: type check "
                                   "('boolean') failed - got 'maybe'\n"}
    err = _err(node.qemu.post, vmid=142, ipconfig0="ip=10.0.0.5,gw=10.0.0.1")
    assert err.errors == {"ipconfig0": "invalid format - format error\nipconfig0.ip: invalid "
                          "format - value does not look like a valid ipv4 network "
                          "configuration\n\n"}
    err = _err(pve_root.nodes("pve9").qemu.get)
    assert err.content.startswith("hostname lookup 'pve9' failed")


def test_auth_failures(pvesim: PveSim, pve_token: Token) -> None:  # noqa: F811
    bad = Token(pve_token.full_id, "00000000-0000-0000-0000-000000000000")
    t0 = time.monotonic()
    err = _err(pvesim.api(bad).version.get)
    assert (err.status_code, err.content) == (401, "Authentication failed!")
    assert time.monotonic() - t0 >= AUTH_FAIL_DELAY  # unauthorized calls are delayed
    err = _err(pvesim.api().access.users("ci@pve").token("auto").post)
    assert (err.status_code, err.errors) == (400, {"tokenid": "Token already exists."})
    with pytest.raises(AuthenticationError):
        ProxmoxAPI(pvesim.host, port=pvesim.port, user="root@pam", password="wrong",
                   verify_ssl=str(pvesim.ca_path))
    root = pvesim.api()
    auth = root._store["session"].auth  # proxmoxer's ticket auth: send a wrong CSRF token
    good, auth.csrf_prevention_token = auth.csrf_prevention_token, "00000000:bad"
    err = _err(root.nodes(pvesim.node).qemu.post, vmid=199)
    assert (err.status_code, err.content) == (401, "Permission denied - invalid csrf token")
    assert root.version.get()  # GETs need no CSRF token
    auth.csrf_prevention_token = good
    pvesim.fault("expire-tickets", times=0)
    try:
        err = _err(root.version.get)
        assert (err.status_code, err.content) == (401, "Authentication failed!")
        assert pvesim.api(pve_token).version.get()  # tokens do not expire with tickets
    finally:
        pvesim.clear_faults()
    assert root.version.get()["release"] == "9.1"


def test_tls_is_verified_against_the_lab_ca(pvesim: PveSim) -> None:  # noqa: F811
    other = ProxmoxAPI(pvesim.host, port=pvesim.port, user="x@pve", token_name="t",
                       token_value="v", verify_ssl=True)  # system CAs: must not trust pvesim
    with pytest.raises(requests.exceptions.SSLError):
        other.version.get()


def test_nextid_is_a_string_and_checks_a_given_id(tnode: Any, tapi: Any) -> None:
    nid = tapi.cluster.nextid.get()
    assert isinstance(nid, str) and int(nid) >= 100
    err = _err(tapi.cluster.nextid.get, vmid=100)
    assert err.errors == {"vmid": "VM 100 already exists"}
    err = _err(tnode.qemu.post, vmid=100)
    assert err.content == "unable to create VM 100 - VM 100 already exists on node 'pve1'"


def test_cluster_resources_lag_behind(pvesim: PveSim, tapi: Any, tnode: Any) -> None:  # noqa: F811
    pvesim.fault("lag", seconds=1.5, times=0)
    try:
        wait_task(tapi, tnode.qemu.post(vmid=150, name="lagging"))
        entry = next(e for e in tapi.cluster.resources.get(type="vm") if e["vmid"] == 150)
        assert entry["status"] == "unknown" and "name" not in entry
        assert tnode.qemu(150).status.current.get()["status"] == "stopped"  # the truth
        time.sleep(1.6)
        entry = next(e for e in tapi.cluster.resources.get(type="vm") if e["vmid"] == 150)
        assert (entry["status"], entry["name"], entry["id"]) == ("stopped", "lagging",
                                                                 "qemu/150")
    finally:
        pvesim.clear_faults()


def test_pending_changes_on_a_running_vm_and_digest(tapi: Any, tnode: Any) -> None:
    wait_task(tapi, tnode.qemu.post(vmid=151, memory=2048, cores=2))
    wait_task(tapi, tnode.qemu(151).status.start.post())
    digest = tnode.qemu(151).config.get()["digest"]
    assert tnode.qemu(151).config.put(memory=4096, name="renamed", digest=digest) is None
    assert tnode.qemu(151).config.get(current=1)["memory"] == "2048"
    assert tnode.qemu(151).config.get()["memory"] == "4096"  # pending applied in the view
    pend = {e["key"]: e for e in tnode.qemu(151).pending.get()}
    assert pend["memory"] == {"key": "memory", "value": "2048", "pending": "4096"}
    assert pend["name"] == {"key": "name", "value": "renamed"}  # hot-pluggable: applied
    err = _err(tnode.qemu(151).config.put, cores=4, digest=digest)
    assert err.content == "checksum mismatch (file change by other user?)"
    wait_task(tapi, tnode.qemu(151).status.stop.post())
    wait_task(tapi, tnode.qemu(151).status.start.post())
    assert tnode.qemu(151).config.get(current=1)["memory"] == "4096"
    wait_task(tapi, tnode.qemu(151).status.stop.post())


def test_sync_put_async_post_config(tapi: Any, tnode: Any) -> None:
    wait_task(tapi, tnode.qemu.post(vmid=152))
    assert tnode.qemu(152).config.put(description="sync") is None
    upid = tnode.qemu(152).config.post(description="async")
    assert UPID_RE.match(upid) and upid.split(":")[5] == "qmconfig"
    assert wait_task(tapi, upid)["exitstatus"] == "OK"
    assert tnode.qemu(152).config.post(description="quick", background_delay=5) is None
    assert tnode.qemu(152).config.get()["description"] == "quick"
    assert tnode.qemu(152).config.put(delete="description") is None
    assert "description" not in tnode.qemu(152).config.get()
    err = _err(tnode.qemu(152).config.put, delete="colour")
    assert err.errors == {"delete": "unknown option 'colour'"}
    err = _err(tnode.qemu(152).config.put, cores=2, delete="cores")
    assert err.errors == {"delete": "you can't use '-cores' and -delete cores' at the same time"}


def test_faults_task_warn_fail_http_slow_and_node_gone(pvesim: PveSim, tapi: Any,  # noqa: F811
                                                       tnode: Any) -> None:
    wait_task(tapi, tnode.qemu.post(vmid=153))
    pvesim.fault("task-warn", path="/status/start", message="simulated warning")
    assert wait_task(tapi, tnode.qemu(153).status.start.post())["exitstatus"] == "WARNINGS: 1"
    wait_task(tapi, tnode.qemu(153).status.stop.post())
    # stopping or shutting down a stopped VM is a successful no-op; reboot refuses at once
    assert wait_task(tapi, tnode.qemu(153).status.shutdown.post())["exitstatus"] == "OK"
    assert wait_task(tapi, tnode.qemu(153).status.stop.post())["exitstatus"] == "OK"
    assert _err(tnode.qemu(153).status.reboot.post).content == "VM 153 not running"
    pvesim.fault("task-fail", path="/status/start", message="start failed: QEMU exited with "
                 "code 1")
    st = wait_task(tapi, tnode.qemu(153).status.start.post())
    assert st["exitstatus"] == "start failed: QEMU exited with code 1"
    pvesim.fault("http-error", path="/nextid", status=503, message="service unavailable")
    err = _err(tapi.cluster.nextid.get)
    assert (err.status_code, err.content) == (503, "service unavailable")
    pvesim.fault("slow", path="/version", seconds=1.5)
    impatient = pvesim.api(timeout=0.5)
    with pytest.raises(requests.exceptions.Timeout):
        impatient.version.get()
    pvesim.fault("task-hang", path="/status/start", seconds=1.0)
    upid = tnode.qemu(153).status.start.post()
    pvesim.fault("node-gone", times=0)
    try:
        err = _err(tnode.qemu(153).status.current.get)
        assert err.status_code == 595
        time.sleep(1.3)
    finally:
        pvesim.clear_faults()
    st = wait_task(tapi, upid)
    assert st["exitstatus"] == "pvesim: node 'pve1' went away (fault injection)"


def test_clone_template_resize_and_delete(pvesim: PveSim, pve_root: Any, tapi: Any,  # noqa: F811
                                          tnode: Any, tmp_path: Path) -> None:
    img = tmp_path / "cloud.qcow2"  # raw bytes are enough for the API (1 GiB, sparse)
    with img.open("wb") as fh:
        fh.truncate(1 << 30)
    volid = pvesim.import_image(img, "tiny-cloud.qcow2")
    assert volid == "local:import/tiny-cloud.qcow2"
    assert any(v["volid"] == volid for v in
               tnode.storage("local").content.get(content="import"))
    wait_task(tapi, tnode.qemu.post(
        vmid=9000, name="tpl", scsihw="virtio-scsi-single", ide2="local-lvm:cloudinit",
        scsi0=f"local-lvm:0,import-from={volid},iothread=1",
        efidisk0="local-lvm:1,efitype=4m,pre-enrolled-keys=0"))
    conf = tnode.qemu(9000).config.get()
    assert conf["scsi0"] == "local-lvm:vm-9000-disk-1,iothread=1,size=1G"
    assert conf["efidisk0"] == "local-lvm:vm-9000-disk-0,efitype=4m,pre-enrolled-keys=0,size=4M"
    assert conf["ide2"] == "local-lvm:vm-9000-cloudinit,media=cdrom"
    assert conf["boot"] == "order=scsi0"
    wait_task(tapi, tnode.qemu(9000).template.post())
    assert tnode.qemu(9000).config.get()["scsi0"].startswith("local-lvm:base-9000-disk-1,")
    upid = tnode.qemu(9000).clone.post(newid=160, name="c1")
    assert upid.split(":")[5:7] == ["qmclone", "9000"]
    assert wait_task(tapi, upid)["exitstatus"] == "OK"
    c = tnode.qemu(160).config.get()
    assert c["scsi0"].startswith("local-lvm:base-9000-disk-1/vm-160-disk-1,") and c["name"] == "c1"
    err = _err(tnode.qemu(9000).clone.post, newid=161, storage="local-lvm")
    assert err.content == "parameter 'storage' not allowed for linked clones"
    err = _err(tnode.qemu(9000).clone.post, newid=160)
    assert err.content == "unable to create VM 160: config file already exists"
    err = _err(tnode.qemu(160).clone.post, newid=162, full=0)  # 160 is no template
    assert err.content == ("Linked clone feature is not supported for "  # sorted: efidisk0
                           "'local-lvm:base-9000-disk-0/vm-160-disk-0' (efidisk0)")
    assert wait_task(tapi, tnode.qemu(160).clone.post(newid=162))["exitstatus"] == "OK"
    assert tnode.qemu(162).config.get()["scsi0"].startswith("local-lvm:vm-162-disk-1,")
    assert tnode.qemu(162).config.get()["name"] == "Copy-of-VM-c1"
    wait_task(tapi, tnode.qemu(162).delete())
    assert wait_task(tapi, tnode.qemu(160).resize.put(disk="scsi0", size="+1G"))[
        "exitstatus"] == "OK"
    assert "size=2G" in tnode.qemu(160).config.get()["scsi0"]
    assert wait_task(tapi, tnode.qemu(160).resize.put(disk="scsi0", size="1G"))[
        "exitstatus"] == "shrinking disks is not supported"
    wait_task(tapi, tnode.qemu(160).status.start.post())
    err = _err(tnode.qemu(160).delete)
    assert err.content == "VM 160 is running - destroy failed"
    wait_task(tapi, tnode.qemu(160).status.stop.post())
    assert wait_task(tapi, tnode.qemu(160).delete(purge=1))["exitstatus"] == "OK"
    assert _err(tnode.qemu(160).config.get).status_code == 500
    st = wait_task(tapi, tnode.qemu(9000).status.start.post())
    assert st["exitstatus"] == "you can't start a vm if it's a template"


def test_import_from_rules(tnode: Any, tmp_path: Path) -> None:
    err = _err(tnode.qemu.post, vmid=170, scsi0="local-lvm:8,import-from=local:import/x.qcow2")
    assert err.errors == {"scsi0": "'import-from' requires special syntax - use <storage ID>:0,"
                                   "import-from=<source>"}
    err = _err(tnode.qemu.post, vmid=170, scsi0=f"local-lvm:0,import-from={tmp_path}/x.qcow2")
    assert (err.status_code, err.content) == (403, "Only root can pass arbitrary filesystem "
                                                   "paths.")
    err = _err(tnode.qemu.post, vmid=170, efidisk0="local-lvm:0,import-from=local:import/x.raw")
    assert err.errors == {"efidisk0": "need to specify 'efitype' when using 'import-from'"}


def test_pci_mappings_crud_with_digest(pve_root: Any, node: Any) -> None:  # noqa: F811
    m = pve_root.cluster.mapping.pci
    m.post(id="tmp-gpu", map=[A6000_MAP], description="temporary")
    got = m("tmp-gpu").get()
    assert got["map"] == [A6000_MAP] and got["description"] == "temporary"
    err = _err(m.post, id="tmp-gpu", map=[A6000_MAP])
    assert err.content == "create hardware mapping failed: pci ID 'tmp-gpu' already defined"
    err = _err(m("tmp-gpu").put, description="x", digest="0" * 40)
    assert err.content == "detected modified configuration - file changed by other user? Try " \
                          "again."
    m("tmp-gpu").put(description="changed", digest=got["digest"])
    assert "tmp-gpu" in [e["id"] for e in m.get()]
    err = _err(m.post, id="bad", map=["node=pve1,path=0000:01:00,id=10de:2230,colour=red"])
    assert err.errors == {"map[0]": "invalid format - invalid key in comma-separated list "
                                    "property: colour\n"}
    m("tmp-gpu").delete()
    assert _err(m("tmp-gpu").get).content == "mapping 'tmp-gpu' not found"


def test_hardware_pci_lists_gpus_with_their_audio_functions(pve_root: Any, node: Any) -> None:  # noqa: F811
    devs = node.hardware.pci.get()
    assert [d["id"] for d in devs] == sorted(d["id"] for d in devs)
    gpus = [d for d in devs if (d["vendor"], d["device"]) == ("0x10de", "0x2230")]
    audio = [d for d in devs if d["device"] == "0x1aef"]
    assert [d["id"] for d in gpus] == ["0000:01:00.0", "0000:41:00.0"]
    assert [(d["id"], d["iommugroup"]) for d in audio] == [("0000:01:00.1", 14),
                                                            ("0000:41:00.1", 48)]
    assert all(d["class"] != "0x060000" for d in devs)  # bridges hidden by default
    everything = node.hardware.pci.get(**{"pci-class-blacklist": ""})
    assert any(d["class"] == "0x060000" for d in everything)


def test_agent_errors_without_a_guest(tapi: Any, tnode: Any) -> None:
    wait_task(tapi, tnode.qemu.post(vmid=180))
    err = _err(tnode.qemu(180).agent.ping.post)
    assert (err.status_code, err.content) == (500, "No QEMU guest agent configured")
    tnode.qemu(180).config.put(agent="enabled=1")
    err = _err(tnode.qemu(180).agent("network-get-interfaces").get)
    assert err.content == "VM 180 is not running"
    wait_task(tapi, tnode.qemu(180).status.start.post())
    err = _err(tnode.qemu(180).agent("network-get-interfaces").get)
    assert err.content == "QEMU guest agent is not running"  # no guest behind this pvesim
    wait_task(tapi, tnode.qemu(180).status.stop.post())


@pytest.fixture
def loopback_http(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", tmp_path
    srv.shutdown()


def test_download_url_into_import_content(pvesim: PveSim, pve_root: Any, node: Any,  # noqa: F811
                                          loopback_http: tuple[str, Path]) -> None:
    base, www = loopback_http
    (www / "img.qcow2").write_bytes(b"QFI\xfb" + bytes(4092))
    st = node.storage("local")
    upid = st("download-url").post(url=f"{base}/img.qcow2", content="import",
                                   filename="noble.qcow2")
    assert upid.split(":")[5:7] == ["download", ""]
    assert wait_task(pve_root, upid)["exitstatus"] == "OK"
    vols = {v["volid"]: v for v in st.content.get(content="import")}
    assert vols["local:import/noble.qcow2"]["format"] == "qcow2"
    err = _err(st("download-url").post, url=f"{base}/img.qcow2", content="import",
               filename="noble.img")
    assert err.errors == {"filename": "invalid filename or wrong extension"}
    err = _err(st("download-url").post, url="http://deb.debian.org/x.qcow2", content="import",
               filename="x.qcow2")
    assert err.content == "pvesim: download-url only fetches from 127.0.0.1 in the lab"


def test_a_failed_create_task_removes_the_vm(pvesim: PveSim, tapi: Any, tnode: Any) -> None:  # noqa: F811
    pvesim.fault("task-hang", path="/qemu", seconds=1)
    upid = tnode.qemu.post(vmid=190, name="doomed", cores=2)
    # only the lock is written before the worker runs (create_and_lock_config)
    conf = tnode.qemu(190).config.get()
    assert conf["lock"] == "create" and "name" not in conf
    wait_task(tapi, upid)
    pvesim.fault("task-fail", path="/qemu", message="unable to create VM 191 - disk full")
    st = wait_task(tapi, tnode.qemu.post(vmid=191, name="doomed"))
    assert st["exitstatus"] == "unable to create VM 191 - disk full"
    err = _err(tnode.qemu(191).config.get)
    assert err.content == "Configuration file 'nodes/pve1/qemu-server/191.conf' does not exist"


def test_four_gpu_node(tmp_path: Path) -> None:
    with PveSim(tmp_path, gpus=4, in_process=True, auth_fail_delay=AUTH_FAIL_DELAY) as pve:
        root = pve.api()
        devs = root.nodes(pve.node).hardware.pci.get()
        gpus = [d["id"] for d in devs if d["device"] == "0x2230"]
        assert gpus == ["0000:01:00.0", "0000:41:00.0", "0000:81:00.0", "0000:c1:00.0"]
        assert {d["iommugroup"] for d in devs if d["id"].startswith("0000:c1:00.")} == {112}


def test_stopping_a_hanging_task(pvesim: PveSim, tapi: Any, tnode: Any) -> None:  # noqa: F811
    pvesim.fault("task-hang", path="/qemu", seconds=30)
    upid = tnode.qemu.post(vmid=195, name="hung")
    assert tapi.nodes(pvesim.node).tasks(upid).delete() is None
    st = wait_task(tapi, upid, timeout=5)
    assert st["exitstatus"] == "received interrupt"
    assert tapi.nodes(pvesim.node).tasks(upid).log.get()[-1]["t"] == \
        "TASK ERROR: received interrupt"
    # the failed create cleans up, as qemu-server's worker does on its way out
    assert _err(tnode.qemu(195).config.get).status_code == 500
    err = _err(tapi.nodes(pvesim.node).tasks("UPID:pve1:00000001:00000001:00000001:x:1:a@pve:")
               .delete)
    assert err.errors == {"upid": "no such task"}


def test_agent_privilege_differs_between_9_and_84(pvesim: PveSim, pvesim84: PveSim) -> None:  # noqa: F811
    for pve, priv in ((pvesim, "VM.GuestAgent.Audit|VM.GuestAgent.Unrestricted"),
                      (pvesim84, "VM.Monitor")):
        root = pve.api()
        wait_task(root, root.nodes(pve.node).qemu.post(vmid=196, agent=1))
        tok = pve.create_token("auditor@pve", "ro", acl=[("/vms", "PVEAuditor")])
        err = _err(pve.api(tok).nodes(pve.node).qemu(196).agent.ping.post)
        assert (err.status_code, err.content) == (403, f"Permission check failed (/vms/196, "
                                                       f"{priv})")


def test_declared_permission_checks_run_before_the_handler(pvesim: PveSim,  # noqa: F811
                                                           pve_root: Any) -> None:  # noqa: F811
    tok = pvesim.create_token("nobody@pve", "tok", acl=[("/", "NoAccess")])
    api = pvesim.api(tok)
    n = api.nodes(pvesim.node)
    # a VM that does not exist: the permission check comes first (403, not 500)
    err = _err(n.qemu(4242).config.get)
    assert (err.status_code, err.content) == (403, "Permission check failed (/vms/4242, "
                                                   "VM.Audit)")
    err = _err(n.qemu(4242).config.put, memory=1024)
    assert err.content == ("Permission check failed (/vms/4242, VM.Config.Disk|"
                           "VM.Config.CDROM|VM.Config.CPU|VM.Config.Memory|VM.Config.Network|"
                           "VM.Config.HWType|VM.Config.Options|VM.Config.Cloudinit)")
    # an 'or' check says no more than that
    assert _err(api.cluster.mapping.pci("a6000-0").get).content == "Permission check failed"
    err = _err(api.cluster.mapping.pci("a6000-0").delete)
    assert err.content == "Permission check failed (/mapping/pci, Mapping.Modify)"
    err = _err(n.storage("local")("download-url").post, url="http://127.0.0.1:1/x.qcow2",
               content="import", filename="x.qcow2")
    assert err.content == "Permission check failed (/storage/local, Datastore.AllocateTemplate)"
    err = _err(api.access.acl.put, path="/vms/100", roles="PVEVMAdmin", users="nobody@pve")
    assert err.content == ("Permission check failed (/vms/100, Permissions.Modify|"
                           "VM.Allocate)")
