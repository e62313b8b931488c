"""Reading a PVE cluster: facts only, no changes. Each function is a few GET calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpunode.proxmox.errors import PveApiError


@dataclass
class VmState:
    """A VM as PVE reports it (``config`` is the pending view, as ``GET config`` gives)."""

    vmid: int
    pve_node: str
    status: str                            # running | stopped
    config: dict[str, Any]
    pending: dict[str, Any] = field(default_factory=dict)   # key -> pending value / None=delete
    lock: str | None = None

    @property
    def name(self) -> str | None:
        return self.config.get("name")

    @property
    def is_template(self) -> bool:
        return str(self.config.get("template", "0")) == "1"


def vm_ids(pve: Any, pve_node: str) -> dict[int, dict[str, Any]]:
    """The VMs on one node: vmid -> the row of ``GET /nodes/{node}/qemu``."""
    return {int(row["vmid"]): row for row in pve.get(f"nodes/{pve_node}/qemu")}


def cluster_vm(pve: Any, vmid: int) -> dict[str, Any] | None:
    """Where a VM id is in use anywhere in the cluster (qemu or lxc), or None."""
    for row in pve.get("cluster/resources", type="vm"):
        if int(row.get("vmid", -1)) == vmid:
            return row
    return None


def read_vm(pve: Any, pve_node: str, vmid: int,
            rows: dict[int, dict[str, Any]] | None = None) -> VmState | None:
    """The VM's config (the pending view, as ``GET config`` gives it), its pending changes
    and its power state; None if the node has no such VM.

    ``rows``: the node's VM list already read in this run (one ``GET /nodes/{node}/qemu``
    for many VMs); its ``status`` is the node's own, not the lagging cluster view. One more
    call per VM: ``GET pending`` for a running VM (it carries every key's current and
    pending value), ``GET config`` for a stopped one (a start applies pending changes)."""
    rows = vm_ids(pve, pve_node) if rows is None else rows
    row = rows.get(vmid)
    if row is None:
        return None
    base = f"nodes/{pve_node}/qemu/{vmid}"
    try:
        status = str(row.get("status") or pve.get(f"{base}/status/current").get("status"))
        pending: dict[str, Any] = {}
        if status == "running":
            config: dict[str, Any] = {}
            for prow in pve.get(f"{base}/pending") or []:
                key = prow["key"]
                if "pending" in prow:
                    pending[key] = config[key] = prow["pending"]
                elif prow.get("delete"):
                    pending[key] = None
                elif "value" in prow:
                    config[key] = prow["value"]
        else:
            config = dict(pve.get(f"{base}/config"))
    except PveApiError as exc:
        if "does not exist" in exc.pve_message:
            return None
        raise
    return VmState(vmid=vmid, pve_node=pve_node, status=status, config=config,
                   pending=pending, lock=config.get("lock"))


def read_pci(pve: Any, pve_node: str) -> list[dict[str, Any]]:
    """Every PCI function of the node (the default class blacklist hides bridges only)."""
    return list(pve.get(f"nodes/{pve_node}/hardware/pci", **{"pci-class-blacklist": ""}))


def read_mappings(pve: Any) -> dict[str, dict[str, Any]]:
    """Cluster PCI resource mappings by id."""
    return {row["id"]: row for row in pve.get("cluster/mapping/pci")}


def guest_addresses(agent_result: Any) -> list[tuple[str, str, str]]:
    """(interface, MAC, IPv4) from ``agent/network-get-interfaces``, loopback and
    link-local left out."""
    rows = agent_result.get("result", agent_result) if isinstance(agent_result, dict) \
        else agent_result
    out = []
    for iface in rows or []:
        mac = str(iface.get("hardware-address", "")).lower()
        for addr in iface.get("ip-addresses", []) or []:
            ip = addr.get("ip-address", "")
            if addr.get("ip-address-type") != "ipv4":
                continue
            if ip.startswith("127.") or ip.startswith("169.254."):
                continue
            out.append((str(iface.get("name", "")), mac, ip))
    return out


def image_identity(pve: Any, pve_node: str, cloud_image: str | None,
                   template: VmState | None) -> dict[str, Any] | None:
    """What a new VM would be made from, as a lock records it: a cloud image's volume
    (volid, format, size, ctime from ``GET /nodes/{node}/storage/{storage}/content``) or a
    template's config digest (PVE's sha1 of its config; any change to the template changes
    it). None: the image or template is not there."""
    if cloud_image:
        storage = cloud_image.split(":", 1)[0]
        for row in pve.get(f"nodes/{pve_node}/storage/{storage}/content") or []:
            if row.get("volid") == cloud_image:
                return {"volid": cloud_image, "format": str(row.get("format", "")),
                        "size": int(row.get("size", 0)), "ctime": int(row.get("ctime", 0))}
        return None
    if template is None:
        return None
    return {"template_vmid": template.vmid, "digest": str(template.config.get("digest", ""))}
