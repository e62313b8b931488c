"""The permission check each served endpoint declares (SIMULATION of the `permissions`
of PVE's API methods, run before the handler as pve-access-control RPCEnvironment.pm
exec_api2_perm_check does). Handlers add the checks PVE makes in their code (config keys,
hostpci mappings, storages). `tests/unit/test_pvesim_schema.py` compares this table with
the schemas' `permissions.check`.
"""

from __future__ import annotations

from typing import Any

from gpunode.lab.pvesim.messages import msg
from gpunode.lab.pvesim.state import PveError, Sim

_VM_CONFIG_ANY = ["VM.Config.Disk", "VM.Config.CDROM", "VM.Config.CPU", "VM.Config.Memory",
                  "VM.Config.Network", "VM.Config.HWType", "VM.Config.Options",
                  "VM.Config.Cloudinit"]
_AGENT_9 = ["perm", "/vms/{vmid}", ["VM.GuestAgent.Audit", "VM.GuestAgent.Unrestricted"],
            "any", 1]
_AGENT_84 = ["perm", "/vms/{vmid}", ["VM.Monitor"]]

# None: no declared check ("user": "all" / "world" in the schema); the handler decides.
PERMS: dict[tuple[str, str], Any] = {
    ("GET", "/version"): None,
    ("POST", "/access/ticket"): None,
    ("POST", "/access/users"): ["and", ["userid-param", "Realm.AllocateUser"],
                                ["userid-group", ["User.Modify"], "groups_param", "create"]],
    ("POST", "/access/users/{userid}/token/{tokenid}"): [
        "or", ["userid-param", "self"], ["userid-group", ["User.Modify"]]],
    ("PUT", "/access/acl"): ["perm-modify", "{path}"],
    ("GET", "/nodes"): None,
    ("GET", "/nodes/{node}/qemu"): None,
    ("GET", "/cluster/nextid"): None,
    ("GET", "/cluster/resources"): None,
    ("GET", "/nodes/{node}/hardware/pci"): ["perm", "/", ["Sys.Audit", "Sys.Modify"], "any", 1],
    ("GET", "/cluster/mapping/pci"): None,
    ("POST", "/cluster/mapping/pci"): ["perm", "/mapping/pci", ["Mapping.Modify"]],
    ("GET", "/cluster/mapping/pci/{id}"): [
        "or", ["perm", "/mapping/pci/{id}", ["Mapping.Use"]],
        ["perm", "/mapping/pci/{id}", ["Mapping.Modify"]],
        ["perm", "/mapping/pci/{id}", ["Mapping.Audit"]]],
    ("PUT", "/cluster/mapping/pci/{id}"): ["perm", "/mapping/pci/{id}", ["Mapping.Modify"]],
    ("DELETE", "/cluster/mapping/pci/{id}"): ["perm", "/mapping/pci", ["Mapping.Modify"]],
    ("POST", "/nodes/{node}/qemu"): None,
    ("GET", "/nodes/{node}/qemu/{vmid}/config"): ["perm", "/vms/{vmid}", ["VM.Audit"]],
    ("POST", "/nodes/{node}/qemu/{vmid}/config"): ["perm", "/vms/{vmid}", _VM_CONFIG_ANY,
                                                   "any", 1],
    ("PUT", "/nodes/{node}/qemu/{vmid}/config"): ["perm", "/vms/{vmid}", _VM_CONFIG_ANY,
                                                  "any", 1],
    ("GET", "/nodes/{node}/qemu/{vmid}/pending"): ["perm", "/vms/{vmid}", ["VM.Audit"]],
    ("POST", "/nodes/{node}/qemu/{vmid}/clone"): [
        "and", ["perm", "/vms/{vmid}", ["VM.Clone"]],
        ["or", ["perm", "/vms/{newid}", ["VM.Allocate"]],
         ["perm", "/pool/{pool}", ["VM.Allocate"], "require_param", "pool"]]],
    ("POST", "/nodes/{node}/qemu/{vmid}/template"): ["perm", "/vms/{vmid}", ["VM.Allocate"]],
    ("PUT", "/nodes/{node}/qemu/{vmid}/resize"): ["perm", "/vms/{vmid}", ["VM.Config.Disk"]],
    ("GET", "/nodes/{node}/qemu/{vmid}/status/current"): ["perm", "/vms/{vmid}",
                                                          ["VM.Audit"]],
    ("POST", "/nodes/{node}/qemu/{vmid}/status/start"): ["perm", "/vms/{vmid}",
                                                         ["VM.PowerMgmt"]],
    ("POST", "/nodes/{node}/qemu/{vmid}/status/stop"): ["perm", "/vms/{vmid}",
                                                        ["VM.PowerMgmt"]],
    ("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown"): ["perm", "/vms/{vmid}",
                                                            ["VM.PowerMgmt"]],
    ("POST", "/nodes/{node}/qemu/{vmid}/status/reboot"): ["perm", "/vms/{vmid}",
                                                          ["VM.PowerMgmt"]],
    ("DELETE", "/nodes/{node}/qemu/{vmid}"): ["perm", "/vms/{vmid}", ["VM.Allocate"]],
    ("GET", "/nodes/{node}/tasks/{upid}/status"): None,
    ("GET", "/nodes/{node}/tasks/{upid}/log"): None,
    ("DELETE", "/nodes/{node}/tasks/{upid}"): None,
    ("POST", "/nodes/{node}/qemu/{vmid}/agent/ping"): _AGENT_9,
    ("GET", "/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces"): _AGENT_9,
    ("GET", "/nodes/{node}/storage/{storage}/content"): [
        "perm", "/storage/{storage}", ["Datastore.Audit", "Datastore.AllocateSpace"], "any", 1],
    ("POST", "/nodes/{node}/storage/{storage}/download-url"): [
        "and", ["perm", "/storage/{storage}", ["Datastore.AllocateTemplate"]],
        ["or", ["perm", "/", ["Sys.Audit", "Sys.Modify"]],
         ["perm", "/nodes/{node}", ["Sys.AccessNetwork"]]]],
}
PERMS_84: dict[tuple[str, str], Any] = {
    ("POST", "/nodes/{node}/qemu/{vmid}/agent/ping"): _AGENT_84,
    ("GET", "/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces"): _AGENT_84,
}


def declared(method: str, path: str, version: str) -> Any:
    if version == "8.4" and (method, path) in PERMS_84:
        return PERMS_84[(method, path)]
    return PERMS[(method, path)]


def _fill(template: str, params: dict[str, Any]) -> str:
    out = template
    for k, v in params.items():
        out = out.replace("{" + k + "}", str(v))
    return out


def run_check(sim: Sim, check: Any, user: str, params: dict[str, Any],
              noerr: bool = False) -> bool:
    """exec_api2_perm_check: and / or / perm (any, require_param) / userid-param /
    userid-group / perm-modify. Raises PveError(403) unless `noerr`."""
    if check is None:
        return True
    test, rest = check[0], check[1:]
    if test == "and":
        for sub in rest:
            run_check(sim, sub, user, params)
        return True
    if test == "or":
        for sub in rest:
            if run_check(sim, sub, user, params, noerr=True):
                return True
        if noerr:
            return False
        raise PveError(403, msg("perm_plain"))
    if test == "perm":
        path, privs, opts = rest[0], rest[1], dict(zip(rest[2::2], rest[3::2], strict=False))
        req = opts.get("require_param")
        if req and req not in params:
            if noerr:
                return False
            raise PveError(403, msg("perm_plain"))
        path = _fill(path, params)
        if noerr:
            return sim.has_perm(user, path, privs, bool(opts.get("any")))
        sim.check_perm(user, path, privs, bool(opts.get("any")))
        return True
    if test == "perm-modify":
        path = _fill(rest[0], params)
        extra = ("Datastore.Allocate" if path.startswith("/storage/") else
                 "VM.Allocate" if path.startswith("/vms/") else
                 "Pool.Allocate" if path.startswith("/pool/") else None)
        privs = ["Permissions.Modify"] + ([extra] if extra else [])
        if noerr:
            return sim.has_perm(user, path, privs, True)
        sim.check_perm(user, path, privs, True)
        return True
    if test == "userid-param":
        userid = str(params.get("userid", ""))
        if rest[0] == "self":
            ok = user.split("!")[0] == userid
            if not ok and not noerr:
                raise PveError(403, msg("perm_plain"))
            return ok
        realm = userid.rsplit("@", 1)[-1]
        if noerr:
            return sim.has_perm(user, f"/access/realm/{realm}", [rest[0]])
        sim.check_perm(user, f"/access/realm/{realm}", [rest[0]])
        return True
    if test == "userid-group":
        privs = rest[0]
        if noerr:
            return sim.has_perm(user, "/access/groups", privs, False)
        sim.check_perm(user, "/access/groups", privs)
        return True
    raise ValueError(f"pvesim: unknown permission test {test!r}")
