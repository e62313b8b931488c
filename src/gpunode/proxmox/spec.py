"""The desired VM, computed once from a node's profile: PVE config keys as PVE writes them.

Pure: no API calls. ``desired_vm(site, profile)`` is what ``plan`` compares with the VM's
current config; ``props`` parses and prints PVE property strings."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, unquote

from gpunode.proxmox.errors import PveInputError

#: Keys that a running VM only picks up at its next start (PVE's default hotplug is
#: network,disk,usb: memory, CPUs, PCI devices, firmware and machine are cold).
RESTART_KEYS = frozenset({
    "machine", "bios", "cpu", "sockets", "cores", "numa", "memory", "balloon", "hugepages",
    "scsihw", "serial0", "vga", "agent", "ostype", "boot", "efidisk0",
    *(f"hostpci{i}" for i in range(16)),
})
#: Cloud-init keys: written at once, seen by the guest when it next boots.
CLOUDINIT_KEYS = frozenset({"ciuser", "sshkeys", "ipconfig0", "nameserver", "ciupgrade"})


def parse_props(value: str, default_key: str) -> dict[str, str]:
    """``'mapping=a6000-0,pcie=1'`` -> dict; a leading item without '=' is ``default_key``."""
    out: dict[str, str] = {}
    for i, item in enumerate(str(value).split(",")):
        if not item:
            continue
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.strip()] = v.strip()
        elif i == 0:
            out[default_key] = item.strip()
        else:
            out[item.strip()] = ""
    return out


def bool_prop(value: str | int | None, default: bool) -> bool:
    """PVE's parse_boolean inside property strings: 1|on|yes|true / 0|off|no|false."""
    if value is None or value == "":
        return default
    return str(value).strip().lower() in ("1", "on", "yes", "true")


def encode_sshkeys(keys: list[str]) -> str:
    """PVE's ``urlencoded`` format: every reserved character escaped (not quote_plus)."""
    return quote("\n".join(k.strip() for k in keys if k.strip()), safe="")


def size_mib(text: str | None) -> int | None:
    """'200G' / '3584M' / '1T' / '512K' -> MiB."""
    if not text:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", text.strip())
    if not m:
        return None
    n = float(m.group(1))
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024, "": 1 / (1024 * 1024)}
    return int(n * scale[m.group(2)])


@dataclass(frozen=True)
class VmTarget:
    """One VM as the site wants it."""

    node: str                      # site node name (also the VM name)
    pve_host: str                  # site node name of the PVE host (holds the API access)
    pve_node: str                  # PVE node name in API paths
    vmid: int
    source: Literal["clone", "import"]
    template_vmid: int | None
    cloud_image: str | None
    full_clone: bool
    storage: str
    disk_gib: int
    config: dict[str, str]         # managed keys, PVE wire values
    may_restart: bool              # site allows gpunode to restart the VM
    on_start_failure: Literal["stop", "destroy"]
    start_timeout_s: int
    agent_timeout_s: int
    mappings: list[str] = field(default_factory=list)
    image: dict[str, Any] | None = None  # the locked image identity (state.image_identity)

    def create_params(self) -> dict[str, Any]:
        """``POST /nodes/{node}/qemu`` for an import: the whole config in one call."""
        s = self.storage
        params: dict[str, Any] = {"vmid": self.vmid, **self.config}
        params["efidisk0"] = f"{s}:1,efitype=4m,pre-enrolled-keys=0"
        params["scsi0"] = (f"{s}:0,import-from={self.cloud_image},iothread=1,discard=on,"
                           "ssd=1")
        params["ide2"] = f"{s}:cloudinit"
        return params


def find_pve_host(nodes: dict[str, Any], pve_node: str) -> Any | None:
    """The pve-host profile for a PVE node name: ``pve.node_name`` if a host sets it, else
    the host whose inventory name is the PVE node name."""
    hosts = [p for p in nodes.values() if p.kind == "pve-host" and p.pve is not None]
    for p in hosts:
        if getattr(p.pve, "node_name", None) == pve_node:
            return p
    for p in hosts:
        if p.name == pve_node and not getattr(p.pve, "node_name", None):
            return p
    return None


def desired_vm(profile: Any, host: Any | None) -> VmTarget:
    """The target of a ``pve-guest`` profile; ``host`` is the PVE host's profile (or None)."""
    vm = profile.vm
    if vm is None:
        raise PveInputError(f"nodes.{profile.name}: kind {profile.kind} has no vm section")
    name = profile.name
    if not re.fullmatch(r"[a-zA-Z0-9]([a-zA-Z0-9\-.]*[a-zA-Z0-9])?", name):
        raise PveInputError(f"nodes.{name}: a VM name must be a DNS name (letters, digits, "
                            "'-' and '.'); PVE rejects it otherwise")
    ci = vm.cloud_init
    cfg: dict[str, str] = {
        "name": name,
        "ostype": "l26",
        "machine": vm.machine,
        "bios": vm.bios,
        "cpu": vm.cpu,
        "sockets": str(vm.sockets),
        "cores": str(vm.cores),
        "numa": "1" if vm.numa else "0",
        "memory": str(vm.memory_mib),
        "balloon": "0",
        "scsihw": "virtio-scsi-single",
        "serial0": "socket",
        "vga": "serial0",
        "agent": "1",
        "boot": "order=scsi0",
        "net0": f"virtio,bridge={vm.bridge}",
        "ciuser": ci.user,
        "ipconfig0": ci.ipconfig0,
        "ciupgrade": "0",
    }
    if vm.hugepages != "none":
        cfg["hugepages"] = vm.hugepages
    if ci.ssh_keys:
        cfg["sshkeys"] = encode_sshkeys(ci.ssh_keys)
    if ci.nameserver:
        cfg["nameserver"] = ci.nameserver
    mappings = []
    for i, dev in enumerate(vm.hostpci):
        parts = [f"mapping={dev.mapping}" if dev.mapping else str(dev.address)]
        if dev.mapping:
            mappings.append(dev.mapping)
        if dev.pcie:
            parts.append("pcie=1")
        if not dev.rombar:
            parts.append("rombar=0")
        if dev.x_vga:
            parts.append("x-vga=1")
        cfg[f"hostpci{i}"] = ",".join(parts)
    return VmTarget(
        node=name, pve_host=host.name if host is not None else vm.pve_node,
        pve_node=vm.pve_node, vmid=vm.vmid,
        source="clone" if vm.template_vmid is not None else "import",
        template_vmid=vm.template_vmid, cloud_image=vm.cloud_image,
        full_clone=vm.full_clone, storage=vm.storage,
        disk_gib=vm.disk_gib, config=cfg, may_restart=profile.reboot == "auto",
        on_start_failure=vm.on_start_failure,
        start_timeout_s=start_timeout(cfg), agent_timeout_s=vm.agent_timeout_s,
        mappings=mappings, image=(profile.locked_image.model_dump(exclude_none=True)
                                  if profile.locked_image else None))


def start_timeout(cfg: dict[str, Any]) -> int:
    """PVE's config_aware_timeout (qemu-server Helpers.pm): 30 s, or the memory in GiB above
    30 GiB; x4 with any hostpci (VFIO maps all RAM); at least 150 s with huge pages."""
    mem = parse_props(str(cfg.get("memory", "512")), "current").get("current", "512")
    gib = int(mem) // 1024
    timeout = max(30, gib)
    if any(k.startswith("hostpci") for k in cfg):
        timeout *= 4
    if cfg.get("hugepages"):
        timeout = max(timeout, 150)
    return timeout


def normalize(key: str, value: Any) -> Any:
    """A comparable form of one config value (PVE may spell the same setting differently)."""
    if value is None:
        return None
    v = str(value)
    if key == "memory":
        return parse_props(v, "current").get("current")
    if key == "machine":
        t = parse_props(v, "type").get("type", "")
        return "q35" if t.startswith("pc-q35") or t == "q35" else ("pc" if t.startswith("pc")
                                                                    else t)
    if key == "cpu":
        return parse_props(v, "cputype").get("cputype")
    if key == "agent":
        return bool_prop(parse_props(v, "enabled").get("enabled"), False)
    if key in ("numa", "ciupgrade"):
        return bool_prop(v, key == "ciupgrade")
    if key == "vga":
        return parse_props(v, "type").get("type")
    if key == "boot":
        return parse_props(v, "legacy").get("order")
    if key == "sshkeys":
        return "\n".join(line.strip() for line in unquote(v).splitlines() if line.strip())
    if key.startswith("net"):
        p = parse_props(v, "model")
        model = next((k for k in p if k not in ("bridge", "firewall", "link_down", "macaddr",
                                                "mtu", "queues", "rate", "tag", "trunks",
                                                "model")), p.get("model"))
        return (model, p.get("bridge"))
    if key.startswith("hostpci"):
        p = parse_props(v, "host")
        return (p.get("mapping"), p.get("host"), bool_prop(p.get("pcie"), False),
                bool_prop(p.get("rombar"), True), bool_prop(p.get("x-vga"), False))
    if key == "ipconfig0":
        return tuple(sorted(parse_props(v, "ip").items()))
    return v


def guest_gpu_addresses(vm: Any) -> list[str]:
    """Where the guest sees the VM's passed-through GPUs, in hostpci order: qemu-server puts
    hostpciN with pcie=1 behind root port N+1 (bus N+1), otherwise on bus 0 from slot 0x10
    (PCI.pm print_hostpci_devices). Function .0 (the GPU itself)."""
    return [f"0000:{i + 1:02x}:00.0" if dev.pcie else f"0000:00:{0x10 + i:02x}.0"
            for i, dev in enumerate(vm.hostpci)]
