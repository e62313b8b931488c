"""The pure diff: desired VM (``spec.VmTarget``) vs what PVE reports -> ordered changes.

No I/O here. ``plan_vm`` and ``plan_mappings`` are called by the dry run, by ``apply``
(which re-plans after every structural step, so a plan is never trusted stale) and by the
Ansible module. Order of a VM's changes: create or clone -> config (one call: keys set,
keys deleted) -> resize -> start or restart -> wait for the guest agent's address."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpunode.proxmox.spec import (
    CLOUDINIT_KEYS,
    RESTART_KEYS,
    VmTarget,
    normalize,
    parse_props,
    size_mib,
)
from gpunode.proxmox.state import VmState

#: Keys gpunode removes when the site no longer asks for them (others are left alone).
OWNED_OPTIONAL = ("hugepages", "nameserver", "sshkeys", *(f"hostpci{i}" for i in range(16)))


@dataclass(frozen=True)
class Change:
    target: str                 # "vm 201 on pve1" / "mapping a6000-0"
    # old/new are full PVE values (new is what gets written); shorten only for display
    action: str                 # create clone set delete resize start restart wait-agent
                                # mapping-create mapping-update held
    key: str = ""
    old: str | None = None
    new: str | None = None
    note: str = ""
    restart: bool = False       # takes effect only after the VM restarts
    applied: bool = True        # False: reported, not done (policy or impossible)

    def row(self) -> dict[str, Any]:
        return {"target": self.target, "action": self.action, "key": self.key,
                "old": self.old, "new": self.new, "note": self.note,
                "restart": self.restart, "applied": self.applied}


@dataclass
class VmPlan:
    node: str
    target: VmTarget
    changes: list[Change] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(c.applied and c.action != "wait-agent" for c in self.changes)

    def config_params(self) -> dict[str, Any]:
        """The one config call: keys to set and the comma list of keys to delete."""
        params: dict[str, Any] = {c.key: c.new for c in self.changes
                                  if c.action == "set" and c.applied}
        deletes = [c.key for c in self.changes if c.action == "delete" and c.applied]
        if deletes:
            params["delete"] = ",".join(deletes)
        return params


def _where(t: VmTarget) -> str:
    return f"vm {t.vmid} on {t.pve_node}"


def diff_config(t: VmTarget, config: dict[str, Any], running: bool) -> list[Change]:
    """set/delete changes that make ``config`` match the target's managed keys."""
    where = _where(t)
    out: list[Change] = []
    for key, want in t.config.items():
        have = config.get(key)
        if have is not None and normalize(key, have) == normalize(key, want):
            continue
        new = want
        if key.startswith("net") and have is not None:
            # keep the VM's MAC: same model, same address, new bridge
            cur = parse_props(str(have), "model")
            model = want.split(",", 1)[0]
            mac = cur.get(model) or cur.get("macaddr")
            if mac:
                new = f"{model}={mac}," + want.split(",", 1)[1]
        restart = running and key in RESTART_KEYS
        note = ""
        if restart:
            note = "needs a restart"
        elif key in CLOUDINIT_KEYS:
            note = "cloud-init: seen at the next boot"
        out.append(Change(where, "set", key, None if have is None else str(have), new, note,
                          restart))
    for key in OWNED_OPTIONAL:
        if key in config and key not in t.config:
            restart = running and key in RESTART_KEYS
            out.append(Change(where, "delete", key, str(config[key]), None,
                              "needs a restart" if restart else "", restart))
    # disks the toolkit owns but that are not plain keys
    if t.config.get("bios") == "ovmf":
        efi = config.get("efidisk0")
        if efi is None:
            out.append(Change(where, "set", "efidisk0", None,
                              f"{t.storage}:1,efitype=4m,pre-enrolled-keys=0",
                              "OVMF needs an EFI vars disk", running))
        elif parse_props(str(efi), "file").get("pre-enrolled-keys", "0") in ("1", "on", "yes",
                                                                            "true"):
            out.append(Change(where, "held", "efidisk0", str(efi), "pre-enrolled-keys=0",
                              "Secure Boot keys are enrolled, so unsigned NVIDIA modules will "
                              "not load; PVE cannot change this in place: gpunode rebuild "
                              f"{t.node}", applied=False))
    if not any("cloudinit" in str(config.get(k, "")) for k in ("ide2", "ide0", "scsi1",
                                                                 "sata0")):
        out.append(Change(where, "set", "ide2", None, f"{t.storage}:cloudinit",
                          "cloud-init drive", False))
    return out


def disk_changes(t: VmTarget, config: dict[str, Any] | None) -> list[Change]:
    where = _where(t)
    want_mib = t.disk_gib * 1024
    if config is None:
        return [Change(where, "resize", "scsi0", None, f"{t.disk_gib}G",
                       "grown after the import if the image is smaller")]
    disk = config.get("scsi0")
    if disk is None:
        return [Change(where, "held", "scsi0", None, f"{t.disk_gib}G",
                       "the VM has no scsi0 disk; gpunode only grows an existing boot disk",
                       applied=False)]
    have = size_mib(parse_props(str(disk), "file").get("size"))
    if have is None or have == want_mib:
        return []
    if have < want_mib:
        return [Change(where, "resize", "scsi0", f"{have // 1024}G", f"{t.disk_gib}G")]
    return [Change(where, "held", "scsi0", f"{have // 1024}G", f"{t.disk_gib}G",
                   "PVE cannot shrink disks; lower disk_gib only with a rebuild",
                   applied=False)]


def image_problem(t: VmTarget, image: dict[str, Any] | None) -> str | None:
    """Why a VM created now would not come from the image the site's lock records (None:
    it would, or there is no lock)."""
    if not t.image or image == t.image:
        return None
    what = t.cloud_image or f"template {t.template_vmid}"
    if image is None:
        return f"{_where(t)}: the locked image {what} is not on {t.pve_node}"
    moved = ", ".join(f"{k} {t.image.get(k)} -> {image.get(k)}"
                      for k in sorted(set(t.image) | set(image)) if t.image.get(k) != image.get(k))
    return (f"{_where(t)}: {what} is not the image the lock records ({moved}); a rebuild from "
            "it would not reproduce the node. Check it, then `gpunode lock --update image`")


def plan_vm(t: VmTarget, current: VmState | None,
            template: VmState | None = None,
            image: dict[str, Any] | None = None) -> VmPlan:
    """Ordered changes that take the VM from ``current`` (None: absent) to ``t``.

    For a clone that does not exist yet, ``template`` (the template's state) stands in for
    the clone's config, so the dry run lists the keys set after the clone."""
    plan = VmPlan(t.node, t)
    where = _where(t)
    add = plan.changes.append
    if current is None:
        problem = image_problem(t, image)
        if problem:
            plan.problems.append(problem)
            return plan
        if t.source == "import":
            add(Change(where, "create", "", None, t.cloud_image,
                       f"import the cloud image; {len(t.config)} settings in the create call"))
            add(disk_changes(t, None)[0])
        else:
            if template is None:
                plan.problems.append(f"{where}: template {t.template_vmid} not found on "
                                     f"{t.pve_node}")
                return plan
            if not template.is_template:
                plan.problems.append(f"{where}: VM {t.template_vmid} "
                                     f"({template.name}) is not a template")
                return plan
            add(Change(where, "clone", "", str(t.template_vmid), str(t.vmid),
                       "full clone" if t.full_clone else "linked clone"))
            cfg = {k: v for k, v in template.config.items() if k != "template"}
            for c in diff_config(t, cfg, running=False):
                plan.changes.append(c if c.action == "held" else
                                    Change(c.target, c.action, c.key, c.old, c.new,
                                           c.note or "after the clone", False, c.applied))
            plan.changes.extend(disk_changes(t, cfg))
        add(Change(where, "start", "", None, None,
                   f"start timeout {t.start_timeout_s} s"))
        add(Change(where, "wait-agent", "", None, None,
                   f"guest agent address, up to {t.agent_timeout_s} s"))
        return plan

    if current.name != t.node:
        plan.problems.append(f"{where} is named {current.name!r}, not {t.node!r}: it is not "
                             "this node's VM; gpunode leaves it alone (fix vm.vmid in the site)")
        return plan
    if current.is_template:
        plan.problems.append(f"{where} is a template; gpunode does not converge templates")
        return plan
    if current.lock:
        plan.problems.append(f"{where} is locked ({current.lock}); try again when the "
                             "running operation has finished")
        return plan
    running = current.status == "running"
    plan.changes.extend(diff_config(t, current.config, running))
    plan.changes.extend(disk_changes(t, current.config))
    if running:
        pending = sorted(k for k in current.pending if k in RESTART_KEYS)
        needs = sorted({c.key for c in plan.changes if c.restart and c.applied} | set(pending))
        if needs:
            if t.may_restart:
                add(Change(where, "restart", ",".join(needs), None, None,
                           "shutdown and start so the VM picks up: " + ", ".join(needs)))
            else:
                add(Change(where, "held", ",".join(needs), None, None,
                           "needs a restart; the site's reboot policy is 'never': restart "
                           "the VM yourself or set reboot: auto", applied=False))
    else:
        add(Change(where, "start", "", current.status, "running",
                   f"start timeout {t.start_timeout_s} s"))
        add(Change(where, "wait-agent", "", None, None,
                   f"guest agent address, up to {t.agent_timeout_s} s"))
    return plan


# --- PCI resource mappings ---------------------------------------------------------------

@dataclass(frozen=True)
class MappingTarget:
    name: str
    pve_node: str
    entry: str                   # node=...,path=...,id=...[,subsystem-id=...][,iommugroup=N]


def _hex4(value: Any) -> str:
    return str(value or "").lower().removeprefix("0x").zfill(4)


def mapping_entry(pve_node: str, addresses: list[str],
                  pci: list[dict[str, Any]]) -> tuple[str | None, str | None]:
    """The ``map`` entry for one node from ``/hardware/pci``: (entry, problem)."""
    by_id = {row["id"]: row for row in pci}
    rows = []
    for addr in addresses:
        row = by_id.get(addr if "." in addr else addr + ".0")
        if row is None:
            return None, (f"PCI device {addr} not found on {pve_node} (GET /nodes/{pve_node}/"
                          "hardware/pci): wrong address, or the card moved")
        rows.append(row)
    ids = {(_hex4(r.get("vendor")), _hex4(r.get("device"))) for r in rows}
    if len(ids) > 1:
        return None, (f"devices {', '.join(addresses)} on {pve_node} have different ids "
                      f"{sorted(':'.join(i) for i in ids)}; one mapping holds one kind")
    vendor, device = ids.pop()
    parts = [f"node={pve_node}", "path=" + ";".join(addresses), f"id={vendor}:{device}"]
    first = rows[0]
    if first.get("subsystem_vendor") and first.get("subsystem_device"):
        parts.append(f"subsystem-id={_hex4(first['subsystem_vendor'])}:"
                     f"{_hex4(first['subsystem_device'])}")
    if len(rows) == 1 and int(first.get("iommugroup", -1)) >= 0:
        parts.append(f"iommugroup={int(first['iommugroup'])}")
    return ",".join(parts), None


def _entry_key(entry: str) -> dict[str, str]:
    p = parse_props(entry, "node")
    return {k: p.get(k, "") for k in ("node", "path", "id", "subsystem-id", "iommugroup")}


def plan_mappings(pve_node: str, wanted: list[tuple[str, list[str]]],
                  pci: list[dict[str, Any]], existing: dict[str, dict[str, Any]]
                  ) -> tuple[list[Change], list[str]]:
    """Mappings (name, addresses) the VMs use -> create/update changes for this node."""
    changes: list[Change] = []
    problems: list[str] = []
    for name, addresses in wanted:
        entry, problem = mapping_entry(pve_node, addresses, pci)
        if problem:
            problems.append(f"mapping {name}: {problem}")
            continue
        assert entry is not None
        where = f"mapping {name}"
        row = existing.get(name)
        if row is None:
            changes.append(Change(where, "mapping-create", "map", None, entry,
                                  "IOMMU group and ids recorded from /hardware/pci"))
            continue
        maps = row.get("map") or []
        maps = [maps] if isinstance(maps, str) else list(maps)
        mine = [m for m in maps if parse_props(m, "node").get("node") == pve_node]
        if mine and _entry_key(mine[0]) == _entry_key(entry):
            continue
        changes.append(Change(where, "mapping-update", "map", mine[0] if mine else None, entry,
                              "hardware or site changed" if mine else
                              f"add {pve_node} to the mapping"))
    return changes, problems


def updated_map(row: dict[str, Any] | None, pve_node: str, entry: str) -> list[str]:
    """The mapping's full ``map`` list with this node's entry replaced or added."""
    maps = (row or {}).get("map") or []
    maps = [maps] if isinstance(maps, str) else list(maps)
    return [m for m in maps if parse_props(m, "node").get("node") != pve_node] + [entry]
