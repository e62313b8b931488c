"""The pure VM plan: desired spec vs fixtures of PVE's answers -> ordered changes."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote

import pytest

from gpunode.inventory import load_site
from gpunode.proxmox.errors import PveInputError
from gpunode.proxmox.plan import mapping_entry, plan_mappings, plan_vm, updated_map
from gpunode.proxmox.spec import (
    desired_vm,
    encode_sshkeys,
    find_pve_host,
    normalize,
    start_timeout,
)
from gpunode.proxmox.state import VmState

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "proxmox"


def load(name: str):
    return json.loads((FIX / name).read_text())


@pytest.fixture(scope="module")
def site():
    return load_site(FIX / "site.yaml")


def target(site, node: str, **vm_changes):
    p = site.nodes[node]
    if vm_changes:
        p = p.model_copy(update={"vm": p.vm.model_copy(update=vm_changes)})
    return desired_vm(p, find_pve_host(site.nodes, p.vm.pve_node))


def state(config: dict, status: str = "running", pending: dict | None = None,
          vmid: int = 201) -> VmState:
    return VmState(vmid, "pve1", status, dict(config), pending or {}, config.get("lock"))


def actions(plan) -> list[tuple[str, str]]:
    return [(c.action, c.key) for c in plan.changes]


def test_desired_config_is_a_gpu_passthrough_vm(site):
    t = target(site, "gpuvm1")
    c = t.config
    assert (c["machine"], c["bios"], c["cpu"], c["numa"], c["balloon"]) == \
        ("q35", "ovmf", "host", "1", "0")
    assert c["hostpci0"] == "mapping=a6000-0,pcie=1"
    assert c["scsihw"] == "virtio-scsi-single" and c["serial0"] == "socket"
    assert c["agent"] == "1" and c["hugepages"] == "1024" and c["memory"] == "32768"
    params = t.create_params()
    assert params["efidisk0"] == "local-lvm:1,efitype=4m,pre-enrolled-keys=0"
    assert params["scsi0"].startswith(
        "local-lvm:0,import-from=local:import/debian-12-genericcloud-amd64.qcow2,")
    assert params["ide2"] == "local-lvm:cloudinit"
    assert all(not isinstance(v, bool) for v in params.values())


def test_sshkeys_are_percent_encoded_for_pve():
    keys = ["ssh-ed25519 AAAA+b/c= me@host:x", "ssh-rsa BBBB c"]
    enc = encode_sshkeys(keys)
    # PVE's urlencoded format: ^[-%a-zA-Z0-9_.!~*'()]*$ -- no '+', '/', '=', space, ':'
    assert set(enc) <= set("-%abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                           "0123456789_.!~*'()")
    assert "%2B" in enc and "%2F" in enc and "%3D" in enc and "%0A" in enc and "+" not in enc
    assert unquote(enc) == "\n".join(keys)


def test_converged_vm_plans_no_change(site):
    plan = plan_vm(target(site, "gpuvm1"), state(load("vm_config_converged.json")))
    assert plan.problems == []
    assert plan.changes == [] and not plan.changed


def test_memory_change_plans_exactly_that_and_a_restart(site):
    t = target(site, "gpuvm1", memory_mib=65536)
    plan = plan_vm(t, state(load("vm_config_converged.json")))
    assert actions(plan) == [("set", "memory"), ("restart", "memory")]
    mem = plan.changes[0]
    assert (mem.old, mem.new, mem.restart) == ("32768", "65536", True)
    assert plan.config_params() == {"memory": "65536"}


def test_restart_is_held_when_the_site_forbids_it(site):
    t = target(site, "gpuvm1", memory_mib=65536)
    t = type(t)(**{**t.__dict__, "may_restart": False})
    plan = plan_vm(t, state(load("vm_config_converged.json")))
    assert actions(plan) == [("set", "memory"), ("held", "memory")]
    assert not plan.changes[-1].applied and "reboot" in plan.changes[-1].note
    # the key is still written (it waits in PVE's pending section for the next start)
    assert plan.config_params() == {"memory": "65536"}


def test_pending_change_on_a_running_vm_still_asks_for_a_restart(site):
    # an earlier run wrote the memory; GET config shows pending values, /pending has it
    cfg = load("vm_config_converged.json")
    plan = plan_vm(target(site, "gpuvm1"), state(cfg, pending={"memory": "32768"}))
    assert actions(plan) == [("restart", "memory")]


def test_stopped_vm_changes_need_no_restart_and_it_is_started(site):
    t = target(site, "gpuvm1", memory_mib=65536, cores=16)
    plan = plan_vm(t, state(load("vm_config_converged.json"), status="stopped"))
    assert actions(plan) == [("set", "cores"), ("set", "memory"), ("start", ""),
                             ("wait-agent", "")]
    assert not any(c.restart for c in plan.changes)


def test_equivalent_spellings_are_not_changes(site):
    cfg = load("vm_config_converged.json")
    cfg.update({"agent": "enabled=1,fstrim_cloned_disks=1", "machine": "pc-q35-9.2+pve1",
                "memory": "current=32768", "hostpci0": "mapping=a6000-0,pcie=on,rombar=1",
                "numa": "1", "boot": "order=scsi0"})
    assert plan_vm(target(site, "gpuvm1"), state(cfg)).changes == []


def test_bridge_change_keeps_the_mac(site):
    t = target(site, "gpuvm1", bridge="vmbr1")
    plan = plan_vm(t, state(load("vm_config_converged.json")))
    assert actions(plan) == [("set", "net0")]
    assert plan.changes[0].new == "virtio=BC:24:11:5E:7A:01,bridge=vmbr1"


def test_removed_gpu_and_hugepages_are_deleted(site):
    t = target(site, "gpuvm1", hostpci=[], hugepages="none")
    plan = plan_vm(t, state(load("vm_config_converged.json"), status="stopped"))
    assert plan.config_params()["delete"] == "hugepages,hostpci0"


def test_disk_grows_never_shrinks(site):
    cfg = load("vm_config_converged.json")
    grow = plan_vm(target(site, "gpuvm1", disk_gib=100), state(cfg))
    assert actions(grow) == [("resize", "scsi0")] and grow.changes[0].new == "100G"
    shrink = plan_vm(target(site, "gpuvm1", disk_gib=32), state(cfg))
    assert actions(shrink) == [("held", "scsi0")] and not shrink.changed


def test_secure_boot_efidisk_is_reported_not_converged(site):
    cfg = load("vm_config_converged.json")
    cfg["efidisk0"] = "local-lvm:vm-201-disk-0,efitype=4m,pre-enrolled-keys=1,size=4M"
    plan = plan_vm(target(site, "gpuvm1"), state(cfg))
    assert actions(plan) == [("held", "efidisk0")] and "rebuild" in plan.changes[0].note


def test_new_vm_from_image_plan(site):
    plan = plan_vm(target(site, "gpuvm1"), None)
    assert actions(plan) == [("create", ""), ("resize", "scsi0"), ("start", ""),
                             ("wait-agent", "")]


def test_clone_sets_cloud_init_and_gpu_after_the_clone(site):
    tpl = VmState(9000, "pve1", "stopped", load("template_config.json"))
    plan = plan_vm(target(site, "gpuvm2"), None, template=tpl)
    acts = actions(plan)
    assert acts[0] == ("clone", "")
    sets = {k for a, k in acts if a == "set"}
    assert {"name", "ciuser", "ipconfig0", "hostpci0", "memory", "cores", "cpu", "numa",
            "balloon", "ciupgrade"} <= sets
    assert "efidisk0" not in sets and "ide2" not in sets   # the template has both
    assert acts[-3:] == [("resize", "scsi0"), ("start", ""), ("wait-agent", "")]
    assert ("set", "agent") not in acts        # 'enabled=1' equals '1'
    # what is written is the whole value, however long (the table shortens, not the plan)
    ci = site.nodes["gpuvm2"].vm.cloud_init.model_copy(
        update={"ssh_keys": ["ssh-ed25519 " + "A" * 300 + " x"]})
    t = target(site, "gpuvm2", cloud_init=ci)
    params = plan_vm(t, None, template=tpl).config_params()
    assert params["sshkeys"] == t.config["sshkeys"] and len(params["sshkeys"]) > 300


def test_clone_of_a_missing_or_non_template_is_a_problem(site):
    assert plan_vm(target(site, "gpuvm2"), None, template=None).problems
    not_tpl = VmState(9000, "pve1", "stopped",
                      {k: v for k, v in load("template_config.json").items() if k != "template"})
    assert "not a template" in plan_vm(target(site, "gpuvm2"), None, not_tpl).problems[0]


def test_someone_elses_vm_is_left_alone(site):
    cfg = load("vm_config_converged.json") | {"name": "database"}
    plan = plan_vm(target(site, "gpuvm1"), state(cfg))
    assert plan.changes == [] and "not this node's VM" in plan.problems[0]


def test_locked_vm_is_a_problem(site):
    cfg = load("vm_config_converged.json") | {"lock": "backup"}
    assert "locked (backup)" in plan_vm(target(site, "gpuvm1"), state(cfg)).problems[0]


def test_start_timeout_scales_like_pve():
    assert start_timeout({"memory": "2048"}) == 30
    assert start_timeout({"memory": "2048", "hostpci0": "mapping=x"}) == 120
    assert start_timeout({"memory": str(256 * 1024), "hostpci0": "mapping=x"}) == 1024
    assert start_timeout({"memory": "4096", "hugepages": "1024"}) == 150


def test_invalid_vm_name_is_input_error(site):
    p = site.nodes["gpuvm1"].model_copy(update={"name": "gpu_vm"})
    with pytest.raises(PveInputError, match="DNS name"):
        desired_vm(p, None)


def test_normalize_hostpci_defaults():
    assert normalize("hostpci0", "mapping=a,pcie=1") == normalize(
        "hostpci0", "mapping=a,pcie=on,rombar=1,x-vga=0")
    assert normalize("hostpci0", "mapping=a,pcie=1") != normalize("hostpci0", "mapping=a")


# --- PCI resource mappings -------------------------------------------------------------

def test_mapping_entry_records_ids_and_iommu_group():
    entry, problem = mapping_entry("pve1", ["0000:41:00"], load("hardware_pci.json"))
    assert problem is None
    assert entry == ("node=pve1,path=0000:41:00,id=10de:2230,subsystem-id=10de:1459,"
                     "iommugroup=32")


def test_mapping_of_a_missing_device_is_a_problem():
    entry, problem = mapping_entry("pve1", ["0000:81:00"], load("hardware_pci.json"))
    assert entry is None and "0000:81:00 not found on pve1" in problem


def test_plan_mappings_creates_missing_keeps_matching(site):
    wanted = [(m.name, m.addresses) for m in site.nodes["pve1"].pve.pci_mappings]
    existing = {r["id"]: r for r in load("mapping_pci.json")}
    changes, problems = plan_mappings("pve1", wanted, load("hardware_pci.json"), existing)
    assert problems == []
    assert [(c.action, c.target) for c in changes] == [("mapping-create", "mapping a6000-1")]


def test_plan_mappings_updates_when_the_iommu_group_changed(site):
    rows = load("mapping_pci.json")
    rows[0]["map"] = ["node=pve1,path=0000:01:00,id=10de:2230,subsystem-id=10de:1459,"
                      "iommugroup=15", "node=pve2,path=0000:02:00,id=10de:2230"]
    changes, _ = plan_mappings("pve1", [("a6000-0", ["0000:01:00"])],
                               load("hardware_pci.json"), {r["id"]: r for r in rows})
    assert [c.action for c in changes] == ["mapping-update"]
    new_map = updated_map(rows[0], "pve1", changes[0].new)
    assert new_map[0].startswith("node=pve2") and new_map[1].endswith("iommugroup=14")


def test_a_clone_comes_only_from_the_template_the_lock_records(site):
    """With a lock, the template's identity (PVE's config digest) must be the locked one:
    another digest (the template edited or re-created under its id) or no template is a
    problem before any change."""
    import dataclasses

    from gpunode.proxmox.state import image_identity

    t = target(site, "gpuvm2")
    assert t.source == "clone"
    tpl = VmState(t.template_vmid, t.pve_node, "stopped",
                  {"template": 1, "name": "debian-12-tpl", "digest": "ab" * 20})
    identity = image_identity(None, t.pve_node, None, tpl)
    assert identity == {"template_vmid": t.template_vmid, "digest": "ab" * 20}
    locked = dataclasses.replace(t, image=identity)
    assert not plan_vm(locked, None, tpl, identity).problems
    assert plan_vm(t, None, tpl, None).changes[0].action == "clone"     # no lock: as before
    moved = {**identity, "digest": "cd" * 20}
    plan = plan_vm(locked, None, tpl, moved)
    assert plan.changes == [] and "digest " + "ab" * 20 + " -> " + "cd" * 20 in plan.problems[0]
    assert "gpunode lock --update image" in plan.problems[0]
    assert "is not on" in plan_vm(locked, None, None, None).problems[0]
