"""End to end on pvesim backed by lab VMs: provision a GPU VM from the lab image ->
it boots with cloud-init -> gpunode deploy -> gpunode check passes and the guest sees the
mapped GPUs -> a second provision plans no change -> a memory change plans exactly that
-> gpunode rebuild gives a node whose checks pass -> destroy removes it; then the same
provisioning through ansible-playbook playbooks/provision.yml.

The site is the lab example without vLLM services: a rebuilt VM comes from the cloud
image alone, and the lab's stand-in model directory is put in place by hand (labsite
prepare_guest), which a rebuild cannot do. vLLM on a deployed node is covered by
test_deploy.py."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from convergence import lock, manifest

from gpunode.cli.deploy import ansible_env
from gpunode.core.manifest import reproducible
from gpunode.lab import labsite

REPO = Path(__file__).resolve().parents[2]
VMID = 201
NODE = "pvegpu1"


def gpunode(*args: str, timeout: float = 2400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXMOX_")}
    proc = subprocess.run([sys.executable, "-m", "gpunode.cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env=env | {"COLUMNS": "160"})
    print(f"$ gpunode {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n"
          f"{proc.stderr[-3000:]}")
    return proc


def plan_of(site: Path) -> list[tuple[str, str]]:
    proc = gpunode("provision", NODE, "--dry-run", "--site", str(site), "--json", "-")
    assert proc.returncode == 0, proc.stderr
    node = json.loads(proc.stdout)["nodes"][0]
    return [(c["action"], c["key"]) for c in node["plan"]]


@contextlib.contextmanager
def hold_ports_below(port: int, first: int = 2222) -> Iterator[None]:
    held = []
    try:
        for p in range(first, port):
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", p))
                sock.listen(1)
                held.append(sock)
            except OSError:
                sock.close()
        yield
    finally:
        for sock in held:
            sock.close()


def vm_exists(pve: Any) -> bool:
    return VMID in [int(r["vmid"]) for r in pve.api().nodes(pve.node).qemu.get()]


@pytest.fixture
def e2e_site(pvesim_vms: Any, lab: Any, tmp_path: Path) -> Any:
    pve = pvesim_vms
    facts = labsite.prepare_lab(lab.dir)
    doc = labsite.lab_site(lab, facts)
    doc["groups"]["lab"]["vllm"]["services"] = []
    tok = pve.create_token("e2e@pve", f"p{tmp_path.name[-12:].replace('_', '')}", privsep=True,
                           acl=labsite.PROVISION_TOKEN_ACL)
    secret = tmp_path / "pve.token"
    secret.write_text(tok.secret + "\n")
    secret.chmod(0o600)
    doc["nodes"] = labsite.pvesim_nodes(lab, pve, tok.full_id, secret, node=NODE, vmid=VMID)
    site = tmp_path / "site.yaml"

    def write(port: int | None = None, **vm_changes: Any) -> Path:
        if port:
            doc["nodes"][NODE]["connection"]["port"] = port
        doc["nodes"][NODE]["vm"] |= vm_changes
        site.write_text(yaml.safe_dump(doc, sort_keys=False))
        return site

    def refresh() -> None:
        groups = labsite.lab_site(lab, labsite.prepare_lab(lab.dir))["groups"]
        groups["lab"]["vllm"]["services"] = []
        doc["groups"] = groups
        write()

    write()
    yield pve, write, refresh, tok
    if vm_exists(pve):
        gpunode("destroy", NODE, "--site", str(site))


def test_provision_deploy_check_then_plans_then_destroy(e2e_site, lab):
    pve, write, refresh, tok = e2e_site
    site = write()
    proc = gpunode("provision", NODE, "--site", str(site))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "10.0.2.15" in proc.stdout              # the guest agent's address
    host, port = pve.ssh_endpoint(VMID)
    site = write(port=port)
    guest = lab.wait_ssh(f"pve-{VMID}", timeout=600)
    # booted with cloud-init: the user and key came from the VM's cloud-init settings
    guest.run("cloud-init status --wait >/dev/null 2>&1", timeout=900)
    guest = lab.wait_ssh(f"pve-{VMID}", timeout=300)
    assert guest.check("id -un").strip() == "gpunode"

    proc = gpunode("deploy", NODE, "--site", str(site))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = gpunode("check", NODE, "--site", str(site))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = guest.check("nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader").split()
    assert [s.lower().replace("00000000:", "0000:") for s in seen] == \
        ["0000:01:00.0", "0000:02:00.0"]                  # hostpci0, hostpci1 (pcie=1)

    assert plan_of(site) == []
    assert plan_of(write(memory_mib=3072)) == [("set", "memory"), ("restart", "memory")]
    site = write(memory_mib=2048)

    proc = gpunode("destroy", NODE, "--site", str(site))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not vm_exists(pve) and pve.ssh_endpoint(VMID) is None


@pytest.mark.matrix
def test_rebuild_gives_a_node_whose_checks_pass(e2e_site, lab):
    """`gpunode rebuild` of a deployed VM: destroy, provision, wait for SSH and cloud-init,
    deploy from the site's lock, check -- one command; the rebuilt node's manifest is its
    predecessor's (GPU UUIDs aside)."""
    pve, write, refresh, tok = e2e_site
    site = write()
    assert gpunode("provision", NODE, "--no-wait", "--site", str(site)).returncode == 0
    host, port = pve.ssh_endpoint(VMID)
    site = write(port=port)
    refresh()          # the mirrors' facts as they are now (another session may rebuild them)
    lock(site)         # versions from the lab's SIMULATED mirrors, for both builds

    def rebuild() -> dict:
        # A real site gives a CI node a static address (ipconfig0) or a DNS name; the lab's
        # stand-in is the forwarded SSH port, which the lab picks anew (the lowest free one)
        # when pvesim boots the re-created VM. Holding the free ports below the VM's port
        # for the rebuild makes the lab pick the same one again.
        with hold_ports_below(port):
            proc = gpunode("rebuild", NODE, "--site", str(site))
        assert pve.ssh_endpoint(VMID) == (host, port), \
            "the lab gave the rebuilt VM another SSH port than the site names"
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return manifest(site, NODE)

    before = rebuild()     # the predecessor: a deployed node
    after = rebuild()
    assert after["packages"] and after["files"] and after["driver_module"]
    assert reproducible(after) == reproducible(before)
    proc = gpunode("destroy", NODE, "--site", str(site))
    assert proc.returncode == 0 and not vm_exists(pve)


@pytest.mark.matrix
def test_provision_through_ansible_playbook(e2e_site):
    """The playbook drives the same library on a VM that boots (agent, SSH). In
    `make test-matrix`: `make test` runs the playbook against pvesim without a booting VM
    (test_provision.py::test_ansible_playbook_drives_the_same_library)."""
    pve, write, refresh, tok = e2e_site
    site = write()
    env = {k: v for k, v in ansible_env(site).items() if not k.startswith("PROXMOX_")}
    env["ANSIBLE_NOCOLOR"] = "1"

    def play(*extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(["ansible-playbook", "playbooks/provision.yml", "--limit", NODE,
                               *extra], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=1800)
        print(proc.stdout[-4000:], proc.stderr[-2000:])
        return proc

    proc = play("--check")
    assert proc.returncode == 0 and "changed=1" in proc.stdout and not vm_exists(pve)
    # the play waits for the agent's address, then for SSH on the site's address: give the
    # lab's forwarded port first (the VM is created on the first run of the play)
    proc = play("-e", "gpunode_wait=false")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    write(port=pve.ssh_endpoint(VMID)[1])
    proc = play()                          # converged: no change; waits for SSH to answer
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "changed=0" in proc.stdout
    proc = play()                          # the booted guest's agent reports its address
    assert proc.returncode == 0 and "vm 201 at 10.0.2.15" in proc.stdout, proc.stdout
    proc = play("-e", "gpunode_vm_state=absent")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not vm_exists(pve)
