"""gpunode provision / destroy against pvesim (the simulated PVE API, no lab VMs here).

A token with PVE's built-in roles drives the CLI as a user would; root@pam (pvesim's own
password) only prepares what an administrator would (a template, another VM holding a
GPU). Every output of every command is kept, and the last test greps it all -- and
pvesim's log -- for the token secret and the root password."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from gpunode.cli.deploy import ansible_env
from gpunode.inventory import load_site
from gpunode.proxmox import apply as papply
from gpunode.proxmox import run

REPO = Path(__file__).resolve().parents[2]
KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPzn6XJDk8h3qmVdW0dXyf2RkCqv1kU0W6wI2z1cOx0c "
       "ci@example")
OUTPUTS: list[str] = []   # every command's stdout+stderr in this module


@pytest.fixture(scope="module")
def pve(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from gpunode.lab.pvesim.server import PveSim

    lab = tmp_path_factory.mktemp("pvesim-lab")
    with PveSim(lab, vms=False) as sim:
        img = lab / "cloud.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1G"], check=True)
        sim.import_image(img, "debian-12.qcow2")
        yield sim


@pytest.fixture(scope="module")
def token(pve: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tok = pve.create_token("ci@pve", "provision", privsep=True,
                           acl=[("/vms", "PVEVMAdmin"), ("/mapping/pci", "PVEMappingAdmin"),
                                ("/storage", "PVEDatastoreUser"), ("/", "PVEAuditor")])
    d = tmp_path_factory.mktemp("secrets")
    path = d / "pve.token"
    path.write_text(tok.secret + "\n")
    path.chmod(0o600)
    return SimpleNamespace(full_id=tok.full_id, secret=tok.secret, file=path)


def write_site(d: Path, pve: Any, token: Any, *, url: str | None = None,
               secret_file: Path | None = None, **vm: Any) -> Path:
    spec = {"pve_node": pve.node, "vmid": 201, "cloud_image": "local:import/debian-12.qcow2",
            "cores": 2, "memory_mib": 2048, "disk_gib": 8, "agent_timeout_s": 30,
            "hostpci": [{"mapping": "a6000-0"}], "cloud_init": {"ssh_keys": [KEY]}} | vm
    if "template_vmid" in vm:
        spec.pop("cloud_image")
    site = {"site": {"name": "pvesim"}, "nodes": {
        "pve1": {"kind": "pve-host", "os": "debian-12",
                 "connection": {"address": "127.0.0.1", "user": "root"},
                 "pve": {"api": {"url": url or f"https://{pve.host}:{pve.port}",
                                 "token_id": token.full_id,
                                 "token_secret_file": str(secret_file or token.file),
                                 "verify_tls": str(pve.ca_path)},
                         "pci_mappings": [{"name": "a6000-0", "addresses": ["0000:01:00"]},
                                          {"name": "a6000-1", "addresses": ["0000:41:00"]}]}},
        "gpuvm1": {"kind": "pve-guest", "reboot": "auto",
                   "connection": {"address": "127.0.0.1", "user": "gpunode"}, "vm": spec}}}
    d.mkdir(parents=True, exist_ok=True)
    path = d / "site.yaml"
    path.write_text(yaml.safe_dump(site, sort_keys=False))
    return path


def gpunode(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PROXMOX_")}
    proc = subprocess.run([sys.executable, "-m", "gpunode.cli.main", *args], capture_output=True,
                          text=True, cwd=REPO, env=clean | (env or {}) | {"COLUMNS": "160"},
                          timeout=300)
    OUTPUTS.append(f"$ gpunode {' '.join(args)}\n{proc.stdout}\n{proc.stderr}")
    return proc


def plan_of(site: Path) -> list[tuple[str, str]]:
    proc = gpunode("provision", "--dry-run", "--site", str(site), "--json", "-")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    node = json.loads(text)["nodes"][0]
    return [(c["action"], c["key"]) for c in node["plan"]]


def vm_config(pve: Any, vmid: int) -> dict[str, Any] | None:
    root = pve.api()
    if vmid not in [int(r["vmid"]) for r in root.nodes(pve.node).qemu.get()]:
        return None
    cfg = root.nodes(pve.node).qemu(vmid).config.get()
    cfg["_status"] = root.nodes(pve.node).qemu(vmid).status.current.get()["status"]
    return cfg


def cleanup(pve: Any, *vmids: int) -> None:
    root = pve.api()
    for vmid in vmids:
        if vm_config(pve, vmid) is None:
            continue
        upid = root.nodes(pve.node).qemu(vmid).status.stop.post()
        papply.wait_task(_Raw(root), upid, "stop", 60)
        upid = root.nodes(pve.node).qemu(vmid).delete(purge=1)
        papply.wait_task(_Raw(root), upid, "destroy", 60)


class _Raw:
    """gpunode's wait_task on a bare proxmoxer API (root's)."""

    def __init__(self, api: Any):
        self.api = api

    def get(self, path: str, **params: Any) -> Any:
        return self.api(path).get(**params)


def test_lifecycle_with_a_token(pve, token, tmp_path):
    site = write_site(tmp_path, pve, token)
    # dry run: the whole plan, nothing created
    assert plan_of(site) == [("create", ""), ("resize", "scsi0"), ("start", ""),
                             ("wait-agent", "")]
    assert vm_config(pve, 201) is None

    proc = gpunode("provision", "--no-wait", "--site", str(site))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = vm_config(pve, 201)
    assert cfg is not None and cfg["_status"] == "running"
    assert cfg["hostpci0"] == "mapping=a6000-0,pcie=1"
    assert (cfg["machine"], cfg["bios"], cfg["cpu"], cfg["numa"], cfg["balloon"]) == \
        ("q35", "ovmf", "host", 1, 0)
    assert "pre-enrolled-keys=0" in cfg["efidisk0"] and "size=8G" in cfg["scsi0"]
    assert cfg["sshkeys"] == "ssh-ed25519%20AAAAC3NzaC1lZDI1NTE5AAAAIPzn6XJDk8h3qmVdW0dXyf2R" \
                             "kCqv1kU0W6wI2z1cOx0c%20ci%40example"
    mapping = pve.api().cluster.mapping.pci("a6000-0").get()
    hw = {d["id"]: d for d in pve.api().nodes(pve.node).hardware.pci.get(
        **{"pci-class-blacklist": ""})}["0000:01:00.0"]
    assert mapping["map"] == [f"node=pve1,path=0000:01:00,id=10de:2230,subsystem-id="
                              f"{hw['subsystem_vendor'][2:]}:{hw['subsystem_device'][2:]},"
                              f"iommugroup={hw['iommugroup']}"]

    # a second provision plans no change
    assert plan_of(site) == []
    proc = gpunode("provision", "--no-wait", "--site", str(site))
    assert proc.returncode == 0 and "no change" in proc.stdout

    # the site's memory changes: exactly that, plus the restart it needs
    site = write_site(tmp_path, pve, token, memory_mib=4096)
    assert plan_of(site) == [("set", "memory"), ("restart", "memory")]
    proc = gpunode("provision", "--no-wait", "--site", str(site))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = vm_config(pve, 201)
    assert cfg["memory"] == "4096" and cfg["_status"] == "running"
    assert plan_of(site) == []

    # destroy removes it; a second destroy has nothing to do
    proc = gpunode("destroy", "gpuvm1", "--site", str(site))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert vm_config(pve, 201) is None
    assert gpunode("destroy", "gpuvm1", "--site", str(site)).returncode == 0


def _lock_image(site: Path) -> dict[str, Any]:
    """<site>.lock as `gpunode lock` writes it for this site's VM: the image group read
    through PVE (the same code path), the other groups recording their site values only
    (their mirrors are not part of this module)."""
    from gpunode.cli.lock import pve_images
    from gpunode.core import lock as lk

    loaded = load_site(site)
    src = lk.Sources(image=pve_images(loaded))
    nodes = {name: {g: {"site": lk.group_inputs(p, g)} for g in lk.GROUPS
                    if lk.group_inputs(p, g) is not None and g != "image"}
             for name, p in loaded.nodes.items()}
    nodes["gpuvm1"]["image"] = lk.resolve_group(loaded.nodes["gpuvm1"], "image", src)
    site.with_suffix(".lock").write_text(lk.dump_lock(nodes, site.name))
    return nodes["gpuvm1"]["image"]["identity"]


def test_a_new_vm_comes_from_the_locked_image_only(pve, token, tmp_path):
    """With a lock, `provision` creates a VM only from the image the lock records: the
    same name holding another image (re-imported, say) is refused before anything is
    created, naming what moved and how to accept it."""
    site = write_site(tmp_path, pve, token)
    identity = _lock_image(site)
    assert identity["volid"] == "local:import/debian-12.qcow2"
    assert identity["format"] == "qcow2" and identity["size"] > 0 and identity["ctime"] > 0
    assert plan_of(site)[0] == ("create", "")
    other = tmp_path / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "2G"], check=True)
    original = tmp_path / "original.qcow2"
    try:
        pve.import_image(other, "debian-12.qcow2")
        proc = gpunode("provision", "--no-wait", "--site", str(site))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        out = " ".join((proc.stdout + proc.stderr).split())
        assert "is not the image the lock records" in out and "size" in out, out
        assert "gpunode lock --update image" in out
        assert vm_config(pve, 201) is None
        _lock_image(site)                  # accepted: the lock now records the new image
        assert plan_of(site)[0] == ("create", "")
    finally:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(original), "1G"],
                       check=True)
        pve.import_image(original, "debian-12.qcow2")
        site.with_suffix(".lock").unlink()


def test_restart_held_when_the_site_says_never(pve, token, tmp_path):
    site = write_site(tmp_path, pve, token)
    assert gpunode("provision", "--no-wait", "--site", str(site)).returncode == 0
    try:
        doc = yaml.safe_load(site.read_text())
        doc["nodes"]["gpuvm1"]["reboot"] = "never"
        doc["nodes"]["gpuvm1"]["vm"]["memory_mib"] = 3072
        site.write_text(yaml.safe_dump(doc))
        proc = gpunode("provision", "--no-wait", "--site", str(site))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "held" in proc.stdout
        root = pve.api()
        pending = {r["key"]: r for r in root.nodes(pve.node).qemu(201).pending.get()}
        assert pending["memory"].get("pending") in ("3072", 3072)   # waits for a restart
        assert vm_config(pve, 201)["_status"] == "running"
    finally:
        cleanup(pve, 201)


def test_clone_gets_cloud_init_and_gpu_after_the_clone(pve, token, tmp_path):
    root = pve.api()
    upid = root.nodes(pve.node).qemu.post(
        vmid=9000, name="debian12-tpl", machine="q35", bios="ovmf", ostype="l26",
        scsihw="virtio-scsi-single", serial0="socket", vga="serial0",
        efidisk0="local-lvm:1,efitype=4m,pre-enrolled-keys=0",
        scsi0="local-lvm:0,import-from=local:import/debian-12.qcow2",
        ide2="local-lvm:cloudinit", net0="virtio,bridge=vmbr0", agent="1")
    papply.wait_task(_Raw(root), upid, "create template", 60)
    papply.wait_task(_Raw(root), root.nodes(pve.node).qemu(9000).template.post(),
                     "template", 60)
    site = write_site(tmp_path, pve, token, template_vmid=9000)
    try:
        plan = plan_of(site)
        assert plan[0] == ("clone", "")
        assert {("set", "ciuser"), ("set", "sshkeys"), ("set", "hostpci0")} <= set(plan)
        proc = gpunode("provision", "--no-wait", "--site", str(site))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        cfg = vm_config(pve, 201)
        assert cfg["name"] == "gpuvm1" and cfg["ciuser"] == "gpunode"
        assert cfg["hostpci0"] == "mapping=a6000-0,pcie=1" and "sshkeys" in cfg
        assert plan_of(site) == []
    finally:
        cleanup(pve, 201)


def holder_vm(pve: Any) -> None:
    """root@pam starts VM 150 holding the first GPU by its raw address."""
    root = pve.api()
    upid = root.nodes(pve.node).qemu.post(vmid=150, name="holder", machine="q35",
                                           hostpci0="0000:01:00,pcie=1", memory="1024")
    papply.wait_task(_Raw(root), upid, "create", 60)
    papply.wait_task(_Raw(root), root.nodes(pve.node).qemu(150).status.start.post(),
                     "start", 60)


@pytest.mark.parametrize("policy", ["destroy", "stop"])
def test_start_fails_when_the_gpu_is_in_use(pve, token, tmp_path, policy):
    holder_vm(pve)
    try:
        site = write_site(tmp_path, pve, token, on_start_failure=policy)
        proc = gpunode("provision", "--no-wait", "--site", str(site))
        assert proc.returncode == 1
        text = " ".join((proc.stdout + proc.stderr).split())
        assert "PCI device '0000:01:00.0' already in use by VMID '150'" in text
        cfg = vm_config(pve, 201)
        if policy == "destroy":
            assert cfg is None and "destroyed" in text        # no leaked VM
        else:
            assert cfg is not None and cfg["_status"] == "stopped" and "left stopped" in text
    finally:
        cleanup(pve, 201, 150)


def test_wrong_token_secret_is_explained(pve, token, tmp_path):
    wrong = tmp_path / "wrong.token"
    wrong.write_text("00000000-1111-2222-3333-444444444444\n")
    wrong.chmod(0o600)
    site = write_site(tmp_path, pve, token, secret_file=wrong)
    proc = gpunode("provision", "--dry-run", "--site", str(site))
    assert proc.returncode == 1
    text = " ".join((proc.stdout + proc.stderr).split())
    assert "authentication failed (HTTP 401)" in text and token.full_id in text
    assert "00000000-1111-2222-3333-444444444444" not in text


def test_unreachable_pve_names_the_host(pve, token, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    site = write_site(tmp_path, pve, token, url=f"https://127.0.0.1:{port}")
    proc = gpunode("provision", "--site", str(site))
    assert proc.returncode == 1
    text = " ".join((proc.stdout + proc.stderr).split())
    assert f"cannot reach the Proxmox API at https://127.0.0.1:{port}" in text
    assert "connection refused" in text


def test_hung_start_times_out_naming_the_task(pve, token, tmp_path, monkeypatch):
    monkeypatch.setattr(papply, "START_MARGIN_S", 2)
    site = load_site(write_site(tmp_path, pve, token))
    eps = run.endpoints_for(site, ["gpuvm1"], env={})
    eps[0].targets[0] = dataclasses.replace(eps[0].targets[0], start_timeout_s=1)
    pve.fault("task-hang", path="/status/start")
    try:
        started = time.monotonic()
        report = run.provision(eps, wait_agent=False)
        assert time.monotonic() - started < 60
        error = report.nodes[0].result.error or ""
        OUTPUTS.append(error)
        assert not report.ok
        assert "start vm 201: task UPID:pve1:" in error and "still running after" in error
        assert vm_config(pve, 201) is None                      # cleaned up
    finally:
        pve.clear_faults()
        cleanup(pve, 201)


def test_ansible_playbook_drives_the_same_library(pve, token, tmp_path):
    site = write_site(tmp_path, pve, token)
    env = {k: v for k, v in ansible_env(site).items() if not k.startswith("PROXMOX_")}
    env["ANSIBLE_NOCOLOR"] = "1"

    def play(*extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(["ansible-playbook", "playbooks/provision.yml", "-e",
                               "gpunode_wait=false", *extra], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        OUTPUTS.append(proc.stdout + proc.stderr)
        return proc

    try:
        proc = play("--check")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "changed=1" in proc.stdout and vm_config(pve, 201) is None
        proc = play()
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "gpuvm1" in proc.stdout and "changed=1" in proc.stdout
        assert vm_config(pve, 201)["_status"] == "running"
        proc = play()
        assert proc.returncode == 0 and "changed=0" in proc.stdout
        proc = play("-e", "gpunode_vm_state=absent")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert vm_config(pve, 201) is None
    finally:
        cleanup(pve, 201)


def password_site(d: Path, pve: Any) -> Path:
    site = {"nodes": {
        "pve1": {"kind": "pve-host", "os": "debian-12",
                 "connection": {"address": "127.0.0.1", "user": "root"}, "pve": {}},
        "gpuvm1": {"kind": "pve-guest", "connection": {"address": "127.0.0.1"},
                   "vm": {"pve_node": pve.node, "vmid": 201,
                          "cloud_image": "local:import/debian-12.qcow2", "cores": 2,
                          "memory_mib": 2048, "disk_gib": 8,
                          "hostpci": [{"address": "0000:41:00"}]}}}}
    d.mkdir(parents=True, exist_ok=True)
    (d / "site.yaml").write_text(yaml.safe_dump(site))
    return d / "site.yaml"


def test_root_password_from_the_environment_may_set_a_raw_address(pve, tmp_path):
    site = password_site(tmp_path, pve)
    env = {"PROXMOX_HOST": f"{pve.host}:{pve.port}", "PROXMOX_USER": "root@pam",
           "PROXMOX_PASSWORD": pve.root_password, "PROXMOX_CA_PATH": str(pve.ca_path)}
    try:
        proc = gpunode("provision", "--no-wait", "--site", str(site), env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert vm_config(pve, 201)["hostpci0"] == "0000:41:00,pcie=1"
        wrong = env | {"PROXMOX_PASSWORD": "not-the-password"}
        proc = gpunode("provision", "--dry-run", "--site", str(site), env=wrong)
        assert proc.returncode == 1
        text = " ".join((proc.stdout + proc.stderr).split())
        assert "authentication failed for user root@pam" in text
        assert "not-the-password" not in text
        # without a CA the self-signed certificate is refused, and the message says so
        proc = gpunode("provision", "--dry-run", "--site", str(site),
                       env={k: v for k, v in env.items() if k != "PROXMOX_CA_PATH"})
        assert proc.returncode == 1
        assert "TLS certificate verification failed" in " ".join(proc.stderr.split() +
                                                                 proc.stdout.split())
    finally:
        cleanup(pve, 201)


def test_lifecycle_on_pve_8_4(tmp_path):
    """PVE 8.4 (the research's reference version): same plan, same result."""
    from gpunode.lab.pvesim.server import PveSim

    with PveSim(tmp_path / "lab", version="8.4", vms=False) as pve84:
        img = tmp_path / "cloud.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1G"], check=True)
        pve84.import_image(img, "debian-12.qcow2")
        assert pve84.api().version.get()["release"] == "8.4"
        tok = pve84.create_token("ci@pve", "provision", privsep=True,
                                 acl=[("/vms", "PVEVMAdmin"),
                                      ("/mapping/pci", "PVEMappingAdmin"),
                                      ("/storage", "PVEDatastoreUser"), ("/", "PVEAuditor")])
        secret = tmp_path / "tok"
        secret.write_text(tok.secret)
        secret.chmod(0o600)
        site = write_site(tmp_path / "s", pve84, SimpleNamespace(full_id=tok.full_id,
                                                                 file=secret))
        proc = gpunode("provision", "--no-wait", "--site", str(site))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert vm_config(pve84, 201)["_status"] == "running"
        assert plan_of(site) == []
        assert gpunode("destroy", "gpuvm1", "--site", str(site)).returncode == 0
        assert vm_config(pve84, 201) is None


def test_no_secret_in_any_output(pve, token):
    """Runs last in this module: every command output above, and pvesim's log."""
    assert len(OUTPUTS) >= 15, "the tests above did not run"
    log = pve.lab_dir / "pvesim" / "pvesim.log"
    texts = OUTPUTS + ([log.read_text(errors="replace")] if log.exists() else [])
    for secret in (token.secret, pve.root_password):
        assert secret and all(secret not in t for t in texts)
