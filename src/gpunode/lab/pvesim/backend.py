"""Lab VMs behind pvesim's VMs (SIMULATION): `start` boots a lab VM from the VM's disk
with a NoCloud seed built the way PVE builds its cloud-init drive; the guest agent
endpoints talk to the real qemu-guest-agent in the guest over its socket.

- Lab VM name: `pve-<vmid>` in the same lab directory (`gpunode lab status` lists it).
- Boot disk: the first disk of `boot: order=...` (else the first disk with data), used in
  place (the VM's volume file, an overlay of the imported image or template).
- Size: at most 2 vCPUs and 2048 MiB (`PVESIM_MAX_CPUS` / `PVESIM_MAX_MEMORY_MIB`), one
  NUMA node; the PVE config keeps what was asked for. Firmware is always OVMF (the lab's).
- Network: qemu user networking; the guest sees itself as 10.0.2.15 and its NIC keeps
  qemu's MAC (the lab image leaves networking to systemd-networkd, so the seed's
  network-config is written but not applied). What the agent reports as 10.0.2.15 is
  reached from the host at 127.0.0.1:<ssh port> (`PveSim.ssh_endpoint(vmid)`). The port
  is the lowest free one, or the one `PVESIM_SSH_PORTS` ("201=2390,202=2391") fixes for
  the VM: the lab's stand-in for an address a site gives a VM in advance (a static
  ipconfig0 or a DNS name), so a site file can name it before the VM exists.
- Simulated GPUs: once the agent answers after a start, pvesim writes
  /etc/gpunode-sim/gpus.json in the guest through the agent (guest-file-*) from the VM's
  hostpci devices (removes it when there are none): the "hardware" the guest sees.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gpunode.lab import qemu, seed
from gpunode.lab.core import Lab, VMConfig
from gpunode.lab.errors import LabError
from gpunode.lab.pvesim.messages import msg
from gpunode.lab.sim import gpus as simgpus

AGENT_TIMEOUT_S = 3.0  # qemu-server Agent.pm: guest-ping with a 3 s timeout
MAX_CPUS = int(os.environ.get("PVESIM_MAX_CPUS", "2"))
MAX_MEMORY_MIB = int(os.environ.get("PVESIM_MAX_MEMORY_MIB", "2048"))


def fixed_ssh_ports(value: str | None = None) -> dict[int, int]:
    """`PVESIM_SSH_PORTS` ("VMID=PORT,..."): the host port forwarding each listed VM's SSH."""
    raw = os.environ.get("PVESIM_SSH_PORTS", "") if value is None else value
    out: dict[int, int] = {}
    for item in raw.replace(" ", "").split(","):
        if not item:
            continue
        vmid, eq, port = item.partition("=")
        if not (eq and vmid.isdigit() and port.isdigit() and 0 < int(port) < 65536):
            raise LabError(msg("sim_ssh_ports", item=item))
        out[int(vmid)] = int(port)
    return out


def lab_name(vmid: int) -> str:
    return f"pve-{vmid}"


def _split(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in value.split(","):
        k, eq, v = part.partition("=")
        if eq:
            out[k] = v
        elif part:
            out[""] = part
    return out


# ---- what PVE writes on its NoCloud cloud-init drive (qemu-server Cloudinit.pm) ---------------
def user_data(conf: dict[str, str], vmid: int) -> str:
    hostname = conf.get("name") or f"VM{vmid}"
    fqdn = hostname
    if "." in hostname:
        hostname = hostname.split(".")[0]
    elif conf.get("searchdomain"):
        fqdn = f"{hostname}.{conf['searchdomain']}"
    out = f"#cloud-config\nhostname: {hostname}\nmanage_etc_hosts: true\nfqdn: {fqdn}\n"
    user = conf.get("ciuser")
    if user is not None:
        out += f"user: {user}\n"
        if user == "root":
            out += "disable_root: False\n"
    if "cipassword" in conf:
        out += f"password: {conf['cipassword']}\n"
    if "sshkeys" in conf:
        keys = [k.strip() for k in urllib.parse.unquote(conf["sshkeys"]).split("\n")]
        out += "ssh_authorized_keys:\n" + "".join(f"  - {k}\n" for k in keys if k)
    out += "chpasswd:\n  expire: False\n"
    if user != "root":
        out += "users:\n  - default\n"
    if conf.get("ciupgrade", "1") != "0":
        out += "package_upgrade: true\n"
    return out


def network_config(conf: dict[str, str]) -> str:
    out = "version: 1\nconfig:\n"
    for iface in sorted(k for k in conf if k.startswith("net") and k[3:].isdigit()):
        i = iface[3:]
        ipc = conf.get(f"ipconfig{i}")
        if not ipc:
            continue
        net = _split(conf[iface])
        mac = next((v for k, v in net.items() if ":" in v and k != "bridge"), "").lower()
        ip = _split(ipc)
        out += (f"    - type: physical\n      name: eth{i}\n      mac_address: '{mac}'\n"
                "      subnets:\n")
        if ip.get("ip") == "dhcp":
            out += "      - type: dhcp4\n"
        elif ip.get("ip"):
            addr, _, bits = ip["ip"].partition("/")
            mask = ".".join(str((0xFFFFFFFF << (32 - int(bits or 32)) >> s) & 255)
                            for s in (24, 16, 8, 0))
            out += f"      - type: static\n        address: '{addr}'\n        netmask: '{mask}'\n"
            if ip.get("gw"):
                out += f"        gateway: '{ip['gw']}'\n"
        if ip.get("ip6") == "dhcp":
            out += "      - type: dhcp6\n"
        elif ip.get("ip6") == "auto":
            out += "      - type: ipv6_slaac\n"
        elif ip.get("ip6"):
            out += f"      - type: static6\n        address: '{ip['ip6']}'\n"
    ns, sd = conf.get("nameserver"), conf.get("searchdomain")
    if ns or sd:
        out += "    - type: nameserver\n"
        if ns:
            out += "      address:\n" + "".join(f"      - '{a}'\n" for a in ns.split())
        if sd:
            out += "      search:\n" + "".join(f"      - '{a}'\n" for a in sd.split())
    return out


def write_nocloud(path: Path, conf: dict[str, str], vmid: int) -> None:
    ud, nc = user_data(conf, vmid), network_config(conf)
    files = {"user-data": ud, "network-config": nc, "vendor-data": "",
             "meta-data": f"instance-id: {hashlib.sha1((ud + nc).encode()).hexdigest()}\n"}
    with tempfile.TemporaryDirectory(prefix="pvesim-ci-") as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        res = subprocess.run([*seed.iso_tool(), "-quiet", "-output", str(path), "-volid",
                              "cidata", "-joliet", "-rock",
                              *(str(Path(tmp) / n) for n in files)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise LabError(msg("sim_ci_iso", detail=res.stderr.strip()))


def write_empty_seed(path: Path) -> None:
    """No cloud-init drive in the config: the lab still attaches a (non-cidata) ISO."""
    with tempfile.TemporaryDirectory(prefix="pvesim-noci-") as tmp:
        (Path(tmp) / "README").write_text("pvesim: this VM has no cloud-init drive\n")
        subprocess.run([*seed.iso_tool(), "-quiet", "-output", str(path), "-volid",
                        "PVESIMNONE", str(Path(tmp) / "README")], check=True,
                       capture_output=True)


# ---- the guest agent ------------------------------------------------------------------------
def qga(sock: Path, command: str, arguments: dict[str, Any] | None = None,
        timeout: float = AGENT_TIMEOUT_S) -> Any:
    """One qemu-guest-agent command (after guest-sync). TimeoutError when no agent answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            f = s.makefile("rwb")
            sync = secrets.randbelow(1 << 30)
            f.write(json.dumps({"execute": "guest-sync", "arguments": {"id": sync}}).encode()
                    + b"\n")
            f.flush()
            deadline = time.monotonic() + timeout
            while True:
                line = f.readline()
                if not line:
                    raise TimeoutError("agent closed the connection")
                with contextlib.suppress(ValueError):
                    if json.loads(line.strip(b"\xff").decode()).get("return") == sync:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError("no guest-sync answer")
            req: dict[str, Any] = {"execute": command}
            if arguments:
                req["arguments"] = arguments
            f.write(json.dumps(req).encode() + b"\n")
            f.flush()
            if command == "guest-shutdown":
                return {}
            reply = json.loads(f.readline())
    except (OSError, ValueError) as exc:  # socket.timeout is an OSError (TimeoutError)
        raise TimeoutError(str(exc)) from None
    if "error" in reply:
        raise RuntimeError(reply["error"].get("desc", str(reply["error"])))
    return reply.get("return")


class LabBackend:
    """Boots, stops and talks to the lab VMs behind pvesim's VMs."""

    def __init__(self, lab_dir: Path, tie_to_parent: bool = True) -> None:
        self.lab = Lab(lab_dir, tie_to_parent=tie_to_parent)
        # qemu dies with the thread that started it (PR_SET_PDEATHSIG): start every VM from
        # this one long-lived thread, not from the short-lived task threads.
        self._launcher = ThreadPoolExecutor(1, thread_name_prefix="pvesim-launcher")
        self._locks: dict[int, threading.Lock] = {}
        # set by the server: volume id -> file of that volume (None: no data)
        self.volume_path: Callable[[str], Path | None] = lambda volid: None

    def start(self, vm: Any, gpus: list[Any], task: Any) -> None:
        conf = vm.config
        name = lab_name(vm.vmid)
        boot = _split(conf.get("boot", "")).get("order", "")
        keys = [k for k in boot.split(";") if k] + sorted(conf)
        disk = None
        for k in keys:
            if k in conf and (k.startswith(("scsi", "virtio", "sata", "ide"))):
                fields = _split(conf[k])
                if fields.get("media") == "cdrom" or "cloudinit" in fields.get("", ""):
                    continue
                disk = self.volume_path(fields.get("", ""))
                if disk is not None:
                    break
        if disk is None:
            raise LabError(msg("sim_no_boot_disk"))
        d = self.lab.vm_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        link = d / "disk.qcow2"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(disk)
        if not (d / "OVMF_VARS.fd").exists():
            shutil.copyfile(qemu.OVMF_VARS, d / "OVMF_VARS.fd")
        has_ci = any("cloudinit" in v for k, v in conf.items()
                     if k.startswith(("ide", "scsi", "sata", "virtio")))
        if has_ci:
            write_nocloud(d / "seed.iso", conf, vm.vmid)
            task.say(msg("log_ci_iso"))
        else:
            write_empty_seed(d / "seed.iso")
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json",
                                          str(disk)], capture_output=True, text=True,
                                         check=True).stdout)
        disk_gib = max(1, math.ceil(int(info["virtual-size"]) / (1 << 30)))
        cpus = min(MAX_CPUS, int(conf.get("sockets", "1")) * int(conf.get("cores", "1")))
        mem = int(conf.get("memory", "512").split("=")[-1])
        mem = max(512, min(MAX_MEMORY_MIB, mem))
        cfg_path = d / "vm.json"
        old = VMConfig.load(cfg_path) if cfg_path.is_file() else None
        VMConfig(name=name, cpus=cpus, memory_mib=mem, numa=1, disk_gib=disk_gib,
                 ssh_port=old.ssh_port if old else 0, forwards={},
                 instance_id=f"pvesim-{vm.vmid}", origin={"kind": "pvesim"}).save(cfg_path)
        self._launcher.submit(self.lab.up, name, cpus=cpus, memory_mib=mem, numa=1,
                              disk_gib=disk_gib, ssh_port=fixed_ssh_ports().get(vm.vmid),
                              wait=False).result()
        task.say(msg("log_lab_vm", name=name, port=self.lab.vm(name).ssh_port))
        self.publish_endpoints()
        agent = _split(conf.get("agent", "")).get("enabled", _split(conf.get("agent", ""))
                                                   .get("", "0"))
        if agent in ("1", "on", "yes", "true"):
            threading.Thread(target=self._push_gpus, args=(vm.vmid, gpus), daemon=True).start()

    def _push_gpus(self, vmid: int, gpus: list[Any], timeout: float = 600) -> None:
        """Write the simulated GPUs of this VM's hostpci devices into the guest."""
        sock = self.lab.vm(lab_name(vmid)).qga_socket
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive_name(lab_name(vmid)):
                return
            try:
                qga(sock, "guest-ping")
                break
            except (TimeoutError, RuntimeError):
                time.sleep(2)
        else:
            return
        devs = [simgpus.PciDevice(addr, vendor_device, 0) for addr, vendor_device in gpus]
        specs = simgpus.from_pci_devices(devs, seed=f"pvesim-{vmid}")
        with contextlib.suppress(TimeoutError, RuntimeError):
            if specs:
                self._exec(sock, ["mkdir", "-p", "/etc/gpunode-sim"])
                h = qga(sock, "guest-file-open", {"path": "/etc/gpunode-sim/gpus.json",
                                                   "mode": "w"})
                data = base64.b64encode(simgpus.to_json(specs).encode()).decode()
                qga(sock, "guest-file-write", {"handle": h, "buf-b64": data})
                qga(sock, "guest-file-close", {"handle": h})
            else:
                self._exec(sock, ["rm", "-f", "/etc/gpunode-sim/gpus.json"])

    @staticmethod
    def _exec(sock: Path, argv: list[str]) -> None:
        pid = qga(sock, "guest-exec", {"path": argv[0], "arg": argv[1:]})["pid"]
        for _ in range(20):
            st = qga(sock, "guest-exec-status", {"pid": pid})
            if st.get("exited"):
                return
            time.sleep(0.2)

    def publish_endpoints(self) -> Path:
        """`<lab dir>/pvesim/endpoints.json`: {vmid: {"guest_address", "host", "ssh_port",
        "lab_vm"}} for every running lab VM behind pvesim: where the address the agent
        reports (10.0.2.15 in every lab guest) is reached from the host."""
        out: dict[str, Any] = {}
        for name in self.lab.names():
            if name.startswith("pve-") and name[4:].isdigit() and self.alive_name(name):
                lvm = self.lab.vm(name)
                out[name[4:]] = {"guest_address": "10.0.2.15", "host": lvm.address,
                                 "ssh_port": lvm.ssh_port, "lab_vm": name}
        path = self.lab.dir / "pvesim" / "endpoints.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        return path

    def alive_name(self, name: str) -> bool:
        try:
            return self.lab.vm(name).running
        except LabError:
            return False

    def alive(self, vm: Any) -> bool:
        return self.alive_name(lab_name(vm.vmid))

    def stop(self, vm: Any) -> None:
        with contextlib.suppress(LabError):
            self.lab.down(lab_name(vm.vmid))
        self.publish_endpoints()

    def shutdown(self, vm: Any, timeout: float) -> bool:
        """guest-shutdown through the agent when enabled and answering, else ACPI; True when
        qemu exited within `timeout`."""
        name = lab_name(vm.vmid)
        try:
            lvm = self.lab.vm(name)
        except LabError:
            return True
        if not lvm.running or lvm.pid is None:
            return True
        agent = _split(vm.config.get("agent", ""))
        used_agent = False
        if agent.get("enabled", agent.get("", "0")) in ("1", "on", "yes", "true"):
            with contextlib.suppress(TimeoutError, RuntimeError):
                qga(lvm.qga_socket, "guest-shutdown")
                used_agent = True
        if not used_agent:
            with contextlib.suppress(OSError, LabError):
                qemu.qmp_command(lvm.qmp_socket, "system_powerdown")
        if qemu.wait_exit(lvm.pid, self.lab.vm_dir(name) / "qemu.pid", timeout):
            with contextlib.suppress(LabError):
                self.lab.down(name)
            self.publish_endpoints()
            return True
        return False

    def agent(self, vm: Any, command: str) -> Any:
        sock = self.lab.vm(lab_name(vm.vmid)).qga_socket
        lock = self._locks.setdefault(vm.vmid, threading.Lock())
        with lock:
            return qga(sock, command)

    def endpoint(self, vm: Any) -> dict[str, Any] | None:
        try:
            lvm = self.lab.vm(lab_name(vm.vmid))
        except LabError:
            return None
        if not lvm.running:
            return None
        return {"host": lvm.address, "ssh_port": lvm.ssh_port, "lab_vm": lvm.name,
                "guest_address": "10.0.2.15"}

    def destroy(self, vm: Any) -> None:
        with contextlib.suppress(LabError, OSError):
            self.lab.destroy(lab_name(vm.vmid))

    def stop_all(self) -> None:
        for name in self.lab.names():
            if name.startswith("pve-"):
                with contextlib.suppress(LabError):
                    self.lab.down(name)
