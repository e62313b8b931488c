"""pvesim backed by a lab VM, driven only through proxmoxer: a VM created by an API token
from the imported cloud image, with cloud-init user and keys, boots, answers SSH with those
keys, and its guest agent reports interfaces only once the agent runs in the guest.

One VM boot for the whole module (~1-2 min under TCG)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from proxmoxer.core import ResourceException
from proxmoxer.tools import Tasks

VMID = 200
CIUSER = "clouduser"
BOOT_TIMEOUT_S = 300


def _wait(api: Any, upid: str, timeout: float = 120) -> dict[str, Any]:
    st = Tasks.blocking_status(api, upid, timeout=timeout, polling_interval=0.5)
    assert st is not None, f"task {upid} still running after {timeout} s"
    return st


def _ssh(port: int, key: Path, cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-p", str(port), "-i", str(key), "-o", "IdentitiesOnly=yes",
         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
         "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5",
         f"{CIUSER}@127.0.0.1", cmd], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def booted(pvesim_vms: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pve = pvesim_vms
    key = tmp_path_factory.mktemp("pvesim-key") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pvesim-test", "-f",
                    str(key)], check=True)
    root = pve.api()
    root.cluster.mapping.pci.post(id="pvesim-it-gpu0",
                                  map="node=pve1,path=0000:01:00,id=10de:2230,iommugroup=14")
    tok = pve.create_token("ci@pve", "auto", acl=[
        ("/vms", "PVEVMAdmin"), ("/mapping/pci", "PVEMappingUser"),
        ("/storage", "PVEDatastoreUser")])
    api = pve.api(tok)
    n = api.nodes(pve.node)
    st = _wait(api, n.qemu.post(
        vmid=VMID, name="pvetest", ostype="l26", machine="q35", bios="ovmf", cores=2,
        memory=2048, balloon=0, scsihw="virtio-scsi-single",
        scsi0="local-lvm:0,import-from=local:import/debian-12-lab.qcow2,iothread=1",
        ide2="local-lvm:cloudinit", net0="virtio,bridge=vmbr0", serial0="socket",
        agent="enabled=1", ciuser=CIUSER, ciupgrade=0, ipconfig0="ip=dhcp",
        sshkeys=quote(key.with_suffix(".pub").read_text(), safe=""),
        hostpci0="mapping=pvesim-it-gpu0,pcie=1"))
    assert st["exitstatus"] == "OK", st
    started = time.monotonic()
    st = _wait(api, n.qemu(VMID).status.start.post())
    assert st["exitstatus"] == "OK", (st, n.tasks(st["upid"]).log.get())
    # Right after the start task the guest is still in firmware/boot: no agent yet.
    try:
        n.qemu(VMID).agent("network-get-interfaces").get()
        early_agent: str | None = "answered"
    except ResourceException as exc:
        early_agent = f"{exc.status_code} {exc.content}"
    return {"pve": pve, "api": api, "node": n, "key": key, "started": started,
            "early_agent": early_agent}


def test_agent_reports_interfaces_only_once_the_guest_agent_is_up(booted: dict[str, Any]
                                                                   ) -> None:
    n = booted["node"]
    assert booted["early_agent"] == "500 QEMU guest agent is not running"
    assert n.qemu(VMID).status.current.get()["status"] == "running"
    deadline = booted["started"] + BOOT_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        try:
            result = n.qemu(VMID).agent("network-get-interfaces").get()["result"]
            break
        except ResourceException as exc:
            assert exc.content == "QEMU guest agent is not running", exc
            last = exc
            time.sleep(3)
    else:
        pytest.fail(f"the guest agent never answered within {BOOT_TIMEOUT_S} s: {last}")
    addrs = {a["ip-address"] for i in result for a in i.get("ip-addresses", [])}
    assert "127.0.0.1" in addrs and "10.0.2.15" in addrs, result
    assert n.qemu(VMID).agent.ping.post() == {"result": {}}


def test_cloud_image_vm_answers_ssh_with_the_cloud_init_keys(booted: dict[str, Any]) -> None:
    host, port = booted["pve"].ssh_endpoint(VMID)
    assert host == "127.0.0.1"
    published = json.loads((booted["pve"].lab_dir / "pvesim" / "endpoints.json").read_text())
    assert published[str(VMID)] == {"guest_address": "10.0.2.15", "host": "127.0.0.1",
                                    "ssh_port": port, "lab_vm": f"pve-{VMID}"}
    deadline = booted["started"] + BOOT_TIMEOUT_S
    res = None
    while time.monotonic() < deadline:
        res = _ssh(port, booted["key"], "id -un; hostname")
        if res.returncode == 0:
            break
        time.sleep(3)
    assert res is not None and res.returncode == 0, res and res.stderr
    assert res.stdout.split() == [CIUSER, "pvetest"]
    # a key that cloud-init did not get is refused
    other = booted["key"].with_name("other")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True)
    assert _ssh(port, other, "true").returncode == 255


def test_guest_sees_the_gpu_its_hostpci_mapping_names(booted: dict[str, Any]) -> None:
    host, port = booted["pve"].ssh_endpoint(VMID)
    deadline = time.monotonic() + 60
    while True:
        res = _ssh(port, booted["key"], "cat /etc/gpunode-sim/gpus.json")
        if res.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert res.returncode == 0, res.stderr
    gpus = json.loads(res.stdout)["gpus"]
    assert [g["model"]["name"] for g in gpus] == ["NVIDIA RTX A6000"]
    # hostpci0 with pcie=1 sits behind the first PCIe root port: guest bus 01
    assert gpus[0]["pci_bus_id"] == "00000000:01:00.0"


def test_shutdown_stops_the_lab_vm(booted: dict[str, Any]) -> None:
    api, n = booted["api"], booted["node"]
    st = _wait(api, n.qemu(VMID).status.shutdown.post(timeout=90), timeout=150)
    assert st["exitstatus"] == "OK", st
    assert n.qemu(VMID).status.current.get()["status"] == "stopped"
    assert booted["pve"].ssh_endpoint(VMID) is None
    published = json.loads((booted["pve"].lab_dir / "pvesim" / "endpoints.json").read_text())
    assert str(VMID) not in published
    assert _wait(api, n.qemu(VMID).delete(purge=1))["exitstatus"] == "OK"
