"""The lab's real VMs: SSH, cloud-init, emulated NUMA, nouveau, guest agent, port forwards,
kernel arguments through GRUB across a reboot, snapshot/fork, reset.

One shared VM (`lab_vm`) carries the module; tests run in file order and the last one
(`reset`) hands the VM back pristine. Boots: first boot, one reboot, one fork, one reset.
The whole module runs in `make test-matrix` (its VM's boot, reboot, fork and reset cost
about 50 s each under TCG): in `make test` every other lab test uses SSH, cloud-init and the
port forwards, the converged pair's pinning tests read the emulated NUMA nodes, its fresh
deploy finds nouveau loaded, pvesim's tests ask the guest agent, and the Proxmox host
preparation proves kernel arguments through GRUB across a reboot.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
import uuid

import pytest

from gpunode.lab import qemu
from gpunode.lab.core import VM, Lab, qemu_pids

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.matrix]

MARKER = "/var/lib/gpunode-lab-test-marker"
TOKEN = f"gpunode_lab_probe={uuid.uuid4().hex[:10]}"


def test_ssh_and_cloud_init_applied_hostname_and_key(lab: Lab, lab_vm: VM) -> None:
    rc, out, err = lab_vm.run("hostname; id -un; sudo -n id -u; "
                              "sudo cloud-init query instance_id", timeout=120)
    assert rc == 0, out + err
    hostname, user, root_uid, instance_id = out.split("\n")[:4]
    assert hostname == lab_vm.name
    assert user == "gpunode" and root_uid == "0"
    cfg = json.loads((lab.vm_dir(lab_vm.name) / "vm.json").read_text())
    assert instance_id == cfg["instance_id"]  # the VM's own NoCloud seed was used
    keys = lab_vm.check("cat ~/.ssh/authorized_keys")
    assert lab.key_path.with_suffix(".pub").read_text().split()[1] in keys
    # cloud-init finishes its later stages; any module error is shown with its detail.
    _, status, _ = lab_vm.run("cloud-init status --wait --long", timeout=600)
    assert "status: running" not in status and "status: not run" not in status, status
    assert "status: error" not in status, status
    assert "BOOT_IMAGE=/boot/vmlinuz" in lab_vm.check("cat /proc/cmdline")  # via GRUB
    assert lab_vm.check("test -d /sys/firmware/efi && echo uefi").strip() == "uefi"


def test_numactl_shows_requested_nodes(lab_vm: VM) -> None:
    out = lab_vm.check("numactl --hardware")
    assert f"available: {lab_vm.numa} nodes (0-{lab_vm.numa - 1})" in out
    for i, (cpus, _mem) in enumerate(qemu.numa_layout(lab_vm.cpus, lab_vm.memory_mib,
                                                       lab_vm.numa)):
        assert f"node {i} cpus: {' '.join(map(str, cpus))}".rstrip() in out


def test_nouveau_is_loaded_on_a_fresh_host(lab_vm: VM) -> None:
    assert "nouveau" in lab_vm.check("lsmod").split()
    rc, out, _ = lab_vm.run("grep -rs 'blacklist nouveau' /etc/modprobe.d /usr/lib/modprobe.d")
    assert rc != 0, out


def test_guest_agent_answers_on_host_socket(lab_vm: VM) -> None:
    deadline = time.monotonic() + 60
    last: object = None
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(lab_vm.qga_socket))
                s.sendall(b'{"execute": "guest-get-host-name"}\n')
                reply = json.loads(s.makefile("rb").readline())
            assert reply["return"]["host-name"] == lab_vm.name
            return
        except (OSError, ValueError, KeyError) as exc:
            last = exc
            time.sleep(2)
    pytest.fail(f"qemu-guest-agent did not answer on {lab_vm.qga_socket}: {last}")


def test_forwarded_port_reaches_guest_service(lab_vm: VM) -> None:
    port = lab_vm.forwards[8000]
    lab_vm.check(f"mkdir -p /tmp/www && echo {TOKEN} > /tmp/www/t.txt && cd /tmp/www && "
                 "(nohup python3 -m http.server 8000 >/dev/null 2>&1 &)")
    deadline = time.monotonic() + 60
    body = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/t.txt", timeout=5) as r:
                body = r.read().decode()
            break
        except OSError:
            time.sleep(1)
    lab_vm.run("pkill -f 'http.server 8000'")
    assert body.strip() == TOKEN


def test_kernel_argument_in_grub_config_is_active_after_reboot(lab: Lab, lab_vm: VM) -> None:
    assert TOKEN not in lab_vm.check("cat /proc/cmdline")
    lab_vm.check(
        f"sudo sed -i 's/^GRUB_CMDLINE_LINUX_DEFAULT=\"/&{TOKEN} /' /etc/default/grub && "
        "sudo update-grub 2>&1", timeout=600)
    vm = lab.reboot(lab_vm.name)
    assert TOKEN in vm.check("cat /proc/cmdline").split()


def test_snapshot_then_fork_keeps_disk_and_gets_own_identity(lab: Lab, lab_vm: VM) -> None:
    lab_vm.check(f"echo {TOKEN} | sudo tee {MARKER}")
    lab.snapshot(lab_vm.name, "t-snap", restart=False)
    assert lab.vm(lab_vm.name).state == "stopped"
    assert not qemu_pids(lab.vm_dir(lab_vm.name))
    fork = lab.fork("t-snap", "labfork")
    try:
        assert fork.ssh_port != lab_vm.ssh_port
        assert fork.check(f"cat {MARKER}").strip() == TOKEN
        assert fork.check("hostname").strip() == "labfork"
    finally:
        lab.destroy("labfork")
    assert not qemu_pids(lab.vm_dir("labfork"))
    assert "labfork" not in lab.names()


def test_reset_gives_back_a_pristine_vm(lab: Lab, lab_vm: VM) -> None:
    lab.reset(lab_vm.name)
    vm = lab.up(lab_vm.name, forward=[8000])
    rc, out, _ = vm.run(f"test -e {MARKER}")
    assert rc == 1, f"marker survived reset: {out}"
    assert TOKEN not in vm.check("cat /proc/cmdline")
    assert TOKEN not in vm.check("cat /etc/default/grub")
    assert vm.check("hostname").strip() == lab_vm.name
