"""pvesim's API handlers and router (SIMULATION of the Proxmox VE REST API, PVE 9 / 8.4).

`Api(sim).handle(method, path, params, auth)` returns the `data` value or raises PveError;
the HTTP layer (server.py) turns that into PVE's envelope, status and reason phrase.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import shutil
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpunode.lab.pvesim import perms, schema
from gpunode.lab.pvesim.messages import msg
from gpunode.lab.pvesim.state import (
    PveError,
    Sim,
    Task,
    TaskError,
    Vm,
    Volume,
    param_error,
)

DRIVE_RE = re.compile(r"^(ide[0-3]|sata[0-5]|scsi([0-9]|[12][0-9]|30)|virtio([0-9]|1[0-5])|"
                      r"efidisk0|tpmstate0)$")
NEW_DISK_RE = re.compile(r"^(([^/:\s]+):)?(\d+(\.\d+)?)$")
SSH_KEY_RE = re.compile(r"^(?:(?:sk-)?(?:ssh-(?:rsa|dss|ed25519)|ecdsa-sha2-nistp(?:256|384|521))"
                        r"(?:@openssh\.com)?)\s+([A-Za-z0-9+/=]+)(?:\s.*)?$")
VERSIONS = {"9": {"version": "9.1.4", "release": "9.1", "repoid": "5ac30304265fbd8e"},
            "8.4": {"version": "8.4.1", "release": "8.4", "repoid": "2a5fa54a8503f96d"}}
QEMU_VERSION = {"9": "10.1.2", "8.4": "9.2.0"}
CPU_KEYS = {"cores", "cpu", "cpulimit", "cpuunits", "numa", "smp", "sockets", "vcpus"}
MEM_KEYS = {"memory", "balloon", "shares", "allow-ksm"}
HW_KEYS = {"acpi", "hotplug", "kvm", "machine", "scsihw", "smbios1", "tablet", "vga",
           "watchdog", "audio0", "rng0"}
GENERAL_KEYS = {"agent", "autostart", "bios", "description", "keyboard", "localtime",
                "migrate_downtime", "migrate_speed", "name", "onboot", "ostype", "protection",
                "reboot", "startdate", "startup", "tdf", "template"}
DISKOPT_KEYS = {"boot", "bootdisk", "vmstatestorage"}
CLOUDINIT_KEYS = {"cicustom", "cipassword", "citype", "ciuser", "ciupgrade", "nameserver",
                  "searchdomain", "sshkeys"}
# What a running VM takes at once (QemuServer.pm $fast_plug_option plus the cloud-init keys,
# and netN/disks under PVE's default hotplug set "network,disk,usb"); everything else stays
# in `pending` until the next start.
HOTPLUG_OK = {"description", "hookscript", "lock", "migrate_downtime", "migrate_speed",
              "name", "onboot", "protection", "shares", "startup", "tags", "vmstatestorage",
              "cicustom", "cipassword", "citype", "ciupgrade", "ciuser", "nameserver",
              "searchdomain", "sshkeys"}


def _hotpluggable(key: str) -> bool:
    return key in HOTPLUG_OK or bool(re.fullmatch(r"(ipconfig|net)\d+", key)) \
        or bool(DRIVE_RE.match(key))
HUGEPAGE_MIB = {"2": 2, "1024": 1024}
NO_TOKEN = {"/access/ticket"}  # allowtoken => 0 in the schema


@dataclass
class Auth:
    user: str  # authuser as PVE forms it: root@pam, ci@pve!auto
    ticket: bool  # a password ticket (not an API token)


Handler = Callable[[Auth, dict[str, Any]], Any]


class Api:
    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.routes: list[tuple[str, str, re.Pattern[str], Handler]] = []
        for method, path, fn in self._table():
            rx = "^" + re.sub(r"\\\{([a-z-]+)\\\}", r"(?P<\1>[^/]+)",
                              re.escape(path)).replace("(?P<pci-id-or-mapping>", "(?P<pci>") + "$"
            rx = rx.replace("(?P<upid>[^/]+)", "(?P<upid>UPID:[^/]+|[^/]+)")
            self.routes.append((method, path, re.compile(rx), fn))

    # ---- routing -----------------------------------------------------------------------
    def _table(self) -> list[tuple[str, str, Handler]]:
        q = "/nodes/{node}/qemu/{vmid}"
        return [
            ("GET", "/version", self.version),
            ("POST", "/access/ticket", self.ticket),
            ("POST", "/access/users", self.create_user),
            ("POST", "/access/users/{userid}/token/{tokenid}", self.create_token),
            ("PUT", "/access/acl", self.update_acl),
            ("GET", "/nodes", self.nodes),
            ("GET", "/nodes/{node}/qemu", self.qemu_list),
            ("GET", "/cluster/nextid", self.nextid),
            ("GET", "/cluster/resources", self.resources),
            ("GET", "/nodes/{node}/hardware/pci", self.hardware_pci),
            ("GET", "/cluster/mapping/pci", self.mapping_list),
            ("POST", "/cluster/mapping/pci", self.mapping_create),
            ("GET", "/cluster/mapping/pci/{id}", self.mapping_get),
            ("PUT", "/cluster/mapping/pci/{id}", self.mapping_update),
            ("DELETE", "/cluster/mapping/pci/{id}", self.mapping_delete),
            ("POST", "/nodes/{node}/qemu", self.create_vm),
            ("GET", f"{q}/config", self.get_config),
            ("POST", f"{q}/config", self.update_config_async),
            ("PUT", f"{q}/config", self.update_config_sync),
            ("GET", f"{q}/pending", self.pending),
            ("POST", f"{q}/clone", self.clone),
            ("POST", f"{q}/template", self.template),
            ("PUT", f"{q}/resize", self.resize),
            ("GET", f"{q}/status/current", self.status_current),
            ("POST", f"{q}/status/start", self.start),
            ("POST", f"{q}/status/stop", self.stop),
            ("POST", f"{q}/status/shutdown", self.shutdown),
            ("POST", f"{q}/status/reboot", self.reboot),
            ("DELETE", q, self.destroy),
            ("GET", "/nodes/{node}/tasks/{upid}/status", self.task_status),
            ("GET", "/nodes/{node}/tasks/{upid}/log", self.task_log),
            ("DELETE", "/nodes/{node}/tasks/{upid}", self.task_stop),
            ("POST", f"{q}/agent/ping", self.agent_ping),
            ("GET", f"{q}/agent/network-get-interfaces", self.agent_ifaces),
            ("GET", "/nodes/{node}/storage/{storage}/content", self.storage_content),
            ("POST", "/nodes/{node}/storage/{storage}/download-url", self.download_url),
        ]

    def endpoints(self) -> list[tuple[str, str]]:
        """Every (method, path template) pvesim serves."""
        return [(m, p) for m, p, _, _ in self.routes]

    def route(self, method: str, path: str) -> tuple[str, Handler, dict[str, str]]:
        for m, template, rx, fn in self.routes:
            mt = rx.match(path)
            if mt and m == method:
                return template, fn, {k: urllib.parse.unquote(v)
                                      for k, v in mt.groupdict().items()}
        raise PveError(501, msg("not_implemented", method=method, path=path))

    def handle(self, method: str, path: str, params: dict[str, Any], auth: Auth | None
               ) -> Any:
        template, fn, uri = self.route(method, path)
        if template in NO_TOKEN and auth is not None and not auth.ticket:
            raise PveError(403, msg("perm_token", uri=path))
        if auth is None and template not in NO_TOKEN:
            raise PveError(401, msg("no_ticket"))
        for k, v in uri.items():
            if k in params and params[k] != v:
                raise param_error({k: msg("uri_conflict")})
            params[k] = v
        # proxyto => 'node': the request is forwarded to the node before its parameters are
        # validated there (pve-manager HTTPServer.pm rest_handler)
        if "node" in uri and uri["node"] != self.sim.node:
            raise PveError(500, msg("hostname_lookup", node=uri["node"]))
        if "node" in uri and self.sim.node_gone():
            raise PveError(595, msg("node_unreachable"))
        table = schema.endpoint_table(method, template, self.sim.version)
        _, formats = schema.config_tables(self.sim.version)
        errors = schema.validate(params, table, formats)
        if errors:
            raise param_error(errors)
        auth = auth or Auth("", False)
        # the method's declared permissions, checked before its code runs
        perms.run_check(self.sim, perms.declared(method, template, self.sim.version),
                        auth.user, params)
        return fn(auth, params)

    # ---- helpers ------------------------------------------------------------------------
    def _vm(self, params: dict[str, Any]) -> Vm:
        vmid = int(params["vmid"])
        vm = self.sim.vms.get(vmid)
        if vm is None:
            raise PveError(500, msg("no_config", node=params.get("node", self.sim.node),
                                    vmid=vmid))
        return vm

    def _perm(self, auth: Auth, path: str, privs: list[str], any_: bool = False) -> None:
        self.sim.check_perm(auth.user, path, privs, any_)

    def _root_only(self, auth: Auth, params: dict[str, Any], *names: str) -> None:
        for n in names:
            if n in params and auth.user != "root@pam":
                raise param_error({n: msg("root_only_opt")})

    @staticmethod
    def _check_lock(vm: Vm, params: dict[str, Any]) -> None:
        if vm.lock and not params.get("skiplock") == "1":
            raise PveError(500, msg("locked", lock=vm.lock))

    def _config_perms(self, auth: Auth, vmid: int, keys: list[str], values: dict[str, Any],
                      deleting: bool = False) -> None:
        """qemu-server API2/Qemu.pm check_vm_modify_config_perm plus the hostpci and disk
        checks (root@pam passes everything)."""
        if auth.user == "root@pam":
            return
        path = f"/vms/{vmid}"
        for opt in keys:
            base = re.sub(r"\d+$", "", opt)
            if DRIVE_RE.match(opt):
                self._perm(auth, path, ["VM.Config.Disk"])
                if not deleting:
                    value = str(values.get(opt, ""))
                    m = NEW_DISK_RE.match(value.split(",")[0])
                    if m and m[2]:
                        self._perm(auth, f"/storage/{m[2]}", ["Datastore.AllocateSpace"])
            elif base == "hostpci":
                if deleting:
                    self._perm(auth, path, ["VM.Config.HWType"])
                    continue
                dev = schema.parse_property_string(
                    schema.config_tables(self.sim.version)[1]["pve-qm-hostpci"],
                    str(values[opt]), opt)
                if dev.get("host"):
                    raise PveError(500, msg("hostpci_root", opt=opt))
                if dev.get("mapping"):
                    self._perm(auth, f"/mapping/pci/{dev['mapping']}", ["Mapping.Use"])
                    self._perm(auth, path, ["VM.Config.HWType"])
                if self.sim.version == "9" and "romfile" in dev:
                    raise param_error({opt: msg("romfile_root")})
            elif base in ("unused", "usb", "serial", "virtiofs") or opt in ("cdrom", "tags"):
                if base == "serial" and values.get(opt) != "socket" and not deleting:
                    raise PveError(500, msg("real_device_root", opt=opt))
                self._perm(auth, path, ["VM.Config.HWType"] if base != "unused"
                           else ["VM.Config.Disk"])
            elif opt in CPU_KEYS or base == "numa":
                self._perm(auth, path, ["VM.Config.CPU"])
            elif opt in MEM_KEYS:
                self._perm(auth, path, ["VM.Config.Memory"])
            elif opt in HW_KEYS:
                self._perm(auth, path, ["VM.Config.HWType"])
            elif opt in GENERAL_KEYS:
                self._perm(auth, path, ["VM.Config.Options"])
                if opt == "startup":
                    self._perm(auth, "/", ["Sys.Modify"])
            elif opt == "freeze":
                self._perm(auth, path, ["VM.PowerMgmt"])
            elif opt in DISKOPT_KEYS:
                self._perm(auth, path, ["VM.Config.Disk"])
            elif base == "net":
                self._perm(auth, path, ["VM.Config.Network"])
            elif opt in CLOUDINIT_KEYS or base == "ipconfig":
                self._perm(auth, path, ["VM.Config.Cloudinit", "VM.Config.Network"], True)
            else:
                raise PveError(500, msg("root_only_key", opt=opt))

    def _check_sshkeys(self, params: dict[str, Any]) -> None:
        if "sshkeys" not in params:
            return
        keys = urllib.parse.unquote(str(params["sshkeys"]))
        for line in keys.split("\n"):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = SSH_KEY_RE.match(line)
            ok = False
            if m:
                try:
                    blob = base64.b64decode(m[1], validate=True)
                    ok = blob[4:4 + int.from_bytes(blob[:4], "big")].decode() == line.split()[0]
                except (binascii.Error, UnicodeDecodeError, ValueError):
                    ok = False
            if not ok:
                raise PveError(500, msg("ssh_key_invalid"))

    def _check_drive_params(self, auth: Auth, params: dict[str, Any]) -> None:
        """qemu-server check_drive_param / check_storage_access (synchronous)."""
        for opt in sorted(params):
            if not DRIVE_RE.match(opt):
                continue
            fields = _split_ps(str(params[opt]))
            file = fields.get("file", "")
            if "import-from" in fields:
                m = NEW_DISK_RE.match(file)
                if not m or float(m[3]) != 0:
                    raise param_error({opt: msg("import_syntax")})
                if opt == "efidisk0":
                    for req in ("efitype", "pre-enrolled-keys"):
                        if req not in fields:
                            raise param_error({opt: msg("import_needs", req=req)})
                src = fields["import-from"]
                if src.startswith("/"):
                    if auth.user != "root@pam":
                        raise PveError(403, msg("import_abs"))
                    if not Path(src).is_file():
                        raise PveError(500, msg("no_file_size", path=src))
                else:
                    vol = self.sim.volumes.get(src)
                    if vol is None:
                        raise PveError(500, msg("no_volume", volid=src))
                    if vol.content not in ("images", "import"):
                        raise PveError(500, msg("import_type", volid=src, vtype=vol.content))
                    store = src.split(":")[0]
                    self._perm(auth, f"/storage/{store}",
                               ["Datastore.Audit", "Datastore.AllocateSpace"], True)
            m = NEW_DISK_RE.match(file)
            store = (m[2] if m else None) or (file.split(":")[0] if ":" in file else None)
            if file.endswith(":cloudinit"):
                store = file.split(":")[0]
            if store is not None:
                if store not in self.sim.storages:
                    raise param_error({opt: msg("no_storage", storage=store)})
                if m and "images" not in self.sim.storages[store].content:
                    raise param_error({"storage": msg("storage_no_images", storage=store)})
            elif file and file not in ("none", "cdrom") and file not in self.sim.volumes:
                raise PveError(500, msg("no_volume", volid=file))

    def _check_hostpci_format(self, params: dict[str, Any]) -> None:
        """qemu-server verify_hostpci: the format validator of pve-qm-hostpci."""
        fmt = schema.config_tables(self.sim.version)[1]["pve-qm-hostpci"]
        errors = {}
        for opt in params:
            if re.fullmatch(r"hostpci\d+", opt):
                dev = schema.parse_property_string(fmt, str(params[opt]), opt)
                if dev.get("host") and dev.get("mapping"):
                    errors[opt] = msg("invalid_format", detail=msg("hostpci_both") + "\n")
                elif not dev.get("host") and not dev.get("mapping"):
                    errors[opt] = msg("invalid_format", detail=msg("hostpci_none") + "\n")
        if errors:
            raise param_error(errors)

    # ---- version, auth, users -----------------------------------------------------------
    def version(self, auth: Auth, p: dict[str, Any]) -> Any:
        return dict(VERSIONS[self.sim.version])

    def ticket(self, auth: Auth, p: dict[str, Any]) -> Any:
        user = p["username"]
        if "@" not in user and p.get("realm"):
            user = f"{user}@{p['realm']}"
        rec = self.sim.users.get(user)
        ok = rec is not None and rec.get("enable", 1) and (
            secrets.compare_digest(str(rec.get("password", "")), p["password"])
            or self.sim.check_ticket(p["password"]) == user)
        if not ok:
            raise PveError(401, msg("ticket_failed"))
        ticket, csrf = self.sim.make_ticket(user)
        return {"username": user, "ticket": ticket, "CSRFPreventionToken": csrf,
                "cap": {"vms": {}, "storage": {}, "access": {}, "nodes": {}, "dc": {},
                        "sdn": {}, "mapping": {}}}

    def create_user(self, auth: Auth, p: dict[str, Any]) -> Any:
        userid = p["userid"]
        with self.sim.lock:
            if userid in self.sim.users:
                raise PveError(500, msg("user_exists", user=userid))
            self.sim.users[userid] = {"enable": int(p.get("enable", 1)),
                                      "password": p.get("password")}
        return None

    def create_token(self, auth: Auth, p: dict[str, Any]) -> Any:
        userid, tokenid = p["userid"], p["tokenid"]
        if userid not in self.sim.users:
            raise PveError(500, msg("no_user", user=userid))
        full = f"{userid}!{tokenid}"
        with self.sim.lock:
            if full in self.sim.tokens:
                raise param_error({"tokenid": msg("token_exists")})
            value = str(uuid.uuid4())
            info = {"privsep": int(p.get("privsep", 1)), "expire": int(p.get("expire", 0))}
            if "comment" in p:
                info["comment"] = p["comment"]
            self.sim.tokens[full] = {"secret": value, **info}
        return {"full-tokenid": full, "info": info, "value": value}

    def update_acl(self, auth: Auth, p: dict[str, Any]) -> Any:
        path = p["path"]
        roles = [r for r in str(p["roles"]).split(",") if r]
        for r in roles:
            if r not in self.sim.roles:
                raise PveError(500, msg("role_missing", role=r))
        ugids = [u for key in ("users", "tokens") for u in str(p.get(key, "")).split(",") if u]
        propagate = p.get("propagate", "1") == "1"
        with self.sim.lock:
            for ugid in ugids:
                for r in roles:
                    self.sim.acl = [e for e in self.sim.acl
                                    if not (e[0] == path and e[1] == ugid and e[2] == r)]
                    if p.get("delete") != "1":
                        self.sim.acl.append((path, ugid, r, propagate))
        return None

    # ---- cluster / nodes ----------------------------------------------------------------
    def nodes(self, auth: Auth, p: dict[str, Any]) -> Any:
        return [{"node": self.sim.node, "status": "offline" if self.sim.node_gone()
                 else "online", "id": f"node/{self.sim.node}", "type": "node", "level": "",
                 "cpu": 0.02, "maxcpu": 64, "mem": 8 << 30, "maxmem": 512 << 30,
                 "uptime": 86400, "ssl_fingerprint": _fingerprint(self.sim)}]

    def qemu_list(self, auth: Auth, p: dict[str, Any]) -> Any:
        out = []
        for vm in sorted(self.sim.vms.values(), key=lambda v: v.vmid):
            if not self.sim.has_perm(auth.user, f"/vms/{vm.vmid}", ["VM.Audit"]):
                continue
            out.append(self._status_dict(vm, full=p.get("full") == "1"))
        return out

    def nextid(self, auth: Auth, p: dict[str, Any]) -> Any:
        with self.sim.lock:
            if "vmid" in p:
                if int(p["vmid"]) in self.sim.vms:
                    raise param_error({"vmid": msg("vm_exists_nextid", vmid=p["vmid"])})
                return str(p["vmid"])
            i = 100
            while i in self.sim.vms:
                i += 1
            return str(i)

    def resources(self, auth: Auth, p: dict[str, Any]) -> Any:
        typ = p.get("type")
        out: list[dict[str, Any]] = []
        if typ in (None, "vm"):
            view = self.sim.lagged_view()
            for vmid in sorted(self.sim.vms):
                if not self.sim.has_perm(auth.user, f"/vms/{vmid}", ["VM.Audit"]):
                    continue
                seen = view.get(vmid)
                e: dict[str, Any] = {"id": f"qemu/{vmid}", "type": "qemu", "vmid": vmid,
                                     "node": self.sim.node}
                if seen is None:
                    e["status"] = "unknown"
                else:
                    e.update({"status": seen["status"], "template": seen["template"],
                              "maxmem": seen["maxmem"], "maxcpu": seen["maxcpu"],
                              "maxdisk": 0, "cpu": 0, "mem": 0, "disk": 0, "uptime": 0,
                              "netin": 0, "netout": 0, "diskread": 0, "diskwrite": 0})
                    if seen["name"]:
                        e["name"] = seen["name"]
                out.append(e)
        if typ in (None, "node") and self.sim.has_perm(auth.user, f"/nodes/{self.sim.node}",
                                                       ["Sys.Audit"]):
            n = self.nodes(auth, p)[0]
            out.append({"id": n["id"], "type": "node", "node": n["node"], "status": n["status"],
                        "maxcpu": n["maxcpu"], "maxmem": n["maxmem"], "cpu": n["cpu"],
                        "mem": n["mem"], "uptime": n["uptime"], "level": ""})
        if typ in (None, "storage"):
            for s in self.sim.storages.values():
                if self.sim.has_perm(auth.user, f"/storage/{s.id}",
                                     ["Datastore.Audit", "Datastore.AllocateSpace"]):
                    out.append({"id": f"storage/{self.sim.node}/{s.id}", "type": "storage",
                                "storage": s.id, "node": self.sim.node, "status": "available",
                                "plugintype": s.type, "content": ",".join(sorted(s.content)),
                                "shared": int(s.shared), "maxdisk": 1 << 40, "disk": 0})
        return out

    def hardware_pci(self, auth: Auth, p: dict[str, Any]) -> Any:
        blacklist = [c for c in str(p.get("pci-class-blacklist", "05;06;0b")).split(";") if c]
        verbose = p.get("verbose", "1") == "1"
        out = []
        for d in self.sim.pci:
            if any(d.cls[2:].startswith(c) for c in blacklist):
                continue
            e: dict[str, Any] = {"id": d.id, "class": d.cls, "vendor": d.vendor,
                                 "device": d.device, "subsystem_vendor": d.subsystem_vendor,
                                 "subsystem_device": d.subsystem_device,
                                 "iommugroup": d.iommugroup}
            if verbose:
                e.update({"vendor_name": d.vendor_name, "device_name": d.device_name,
                          "subsystem_vendor_name": d.vendor_name,
                          "subsystem_device_name": d.device_name})
            out.append(e)
        return out

    # ---- PCI mappings -------------------------------------------------------------------
    def _mapping_digest(self) -> str:
        return hashlib.sha1(json.dumps(self.sim.mappings, sort_keys=True).encode()).hexdigest()

    def _mapping_out(self, mid: str) -> dict[str, Any]:
        m = self.sim.mappings[mid]
        out = {"id": mid, "map": list(m["map"]), "digest": self._mapping_digest()}
        for k in ("description", "mdev", "live-migration-capable"):
            if k in m:
                out[k] = m[k]
        return out

    def mapping_list(self, auth: Auth, p: dict[str, Any]) -> Any:
        out = []
        for mid in sorted(self.sim.mappings):
            if self.sim.has_perm(auth.user, f"/mapping/pci/{mid}",
                                 ["Mapping.Audit", "Mapping.Use", "Mapping.Modify"]):
                e = self._mapping_out(mid)
                if "check-node" in p:
                    e["checks"] = self._mapping_checks(mid, p["check-node"])
                out.append(e)
        return out

    def _mapping_checks(self, mid: str, node: str) -> list[dict[str, str]]:
        checks = []
        for entry in self.sim.mappings[mid]["map"]:
            f = _split_ps(entry)
            if f.get("node") != node:
                continue
            err = self._mapping_entry_error(mid, f)
            if err:
                checks.append({"severity": "error", "message": err})
        return checks

    def mapping_create(self, auth: Auth, p: dict[str, Any]) -> Any:
        mid = p["id"]
        with self.sim.lock:
            if mid in self.sim.mappings:
                raise PveError(500, msg("mapping_exists", id=mid))
            rec: dict[str, Any] = {"map": _as_list(p["map"])}
            for k in ("description", "mdev", "live-migration-capable"):
                if k in p:
                    rec[k] = int(p[k]) if k != "description" else p[k]
            self.sim.mappings[mid] = rec
        return None

    def mapping_get(self, auth: Auth, p: dict[str, Any]) -> Any:
        mid = p["id"]
        if mid not in self.sim.mappings:
            raise PveError(500, msg("mapping_missing", id=mid))
        out = self._mapping_out(mid)
        out.pop("id")
        return out

    def mapping_update(self, auth: Auth, p: dict[str, Any]) -> Any:
        mid = p["id"]
        with self.sim.lock:
            if mid not in self.sim.mappings:
                raise PveError(500, msg("mapping_missing", id=mid))
            if "digest" in p and p["digest"] != self._mapping_digest():
                raise PveError(500, msg("mapping_digest"))
            rec = self.sim.mappings[mid]
            for k in [d for d in str(p.get("delete", "")).split(",") if d]:
                rec.pop(k, None)
            if "map" in p:
                rec["map"] = _as_list(p["map"])
            for k in ("description", "mdev", "live-migration-capable"):
                if k in p:
                    rec[k] = int(p[k]) if k != "description" else p[k]
        return None

    def mapping_delete(self, auth: Auth, p: dict[str, Any]) -> Any:
        mid = p["id"]
        with self.sim.lock:
            self.sim.mappings.pop(mid, None)
        return None

    # ---- VM create / config -------------------------------------------------------------
    def create_vm(self, auth: Auth, p: dict[str, Any]) -> Any:
        sim = self.sim
        vmid = int(p["vmid"])
        self._root_only(auth, p, "archive", "force", "unique", "live-restore")
        self._perm(auth, f"/vms/{vmid}", ["VM.Allocate"])
        if "pool" in p:
            self._perm(auth, f"/pool/{p['pool']}", ["VM.Allocate"])
        if "storage" in p:
            self._perm(auth, f"/storage/{p['storage']}", ["Datastore.AllocateSpace"])
            st = sim.storages.get(p["storage"])
            if st is None:
                raise param_error({"storage": msg("no_storage", storage=p["storage"])})
            if "images" not in st.content:
                raise param_error({"storage": msg("storage_no_images", storage=p["storage"])})
        config_keys = [k for k in p if k not in ("node", "vmid", "storage", "pool", "start",
                                                 "import-working-storage", "bwlimit")]
        self._check_hostpci_format(p)
        self._config_perms(auth, vmid, config_keys, p)
        self._check_sshkeys(p)
        self._check_drive_params(auth, p)
        with sim.lock:
            if vmid in sim.vms:
                raise PveError(500, msg("vm_exists_create", vmid=vmid, node=sim.node))
            # create_and_lock_config: an empty config holding only the lock; the worker
            # writes the rest when the disks exist.
            vm = Vm(vmid, sim.node, {"lock": "create"})
            sim.vms[vmid] = vm
        conf = {k: str(p[k]) for k in config_keys}
        _add_macs(conf)  # add_random_macs runs before the fork
        start_after = p.get("start") == "1"

        def body(task: Task) -> None:
            staged = Vm(vmid, sim.node, dict(conf))
            try:
                self._create_disks(staged, task, p.get("storage"))
            except (TaskError, PveError) as exc:
                raise TaskError(msg("create_failed", vmid=vmid, detail=exc)) from None
            _fill_defaults(staged.config, sim.version)
            with sim.lock:
                vm.config = {**staged.config, "lock": "create"}
            task.say(msg("log_created", vmid=vmid))

        def on_end(task: Task) -> None:
            with sim.lock:
                if task.exitstatus and not task.exitstatus.startswith(("OK", "WARNINGS")):
                    self._drop_volumes(vm)
                    sim.vms.pop(vmid, None)
                else:
                    vm.config.pop("lock", None)
            sim.record()
            if start_after and vmid in sim.vms:
                self._start_worker(vm, auth, {})

        return sim.start_task("qmcreate", str(vmid), auth.user, body,
                              hang_path="/qemu", on_end=on_end)

    def _create_disks(self, vm: Vm, task: Task, default_storage: str | None) -> None:
        """Allocate new disks, import cloud images, make the cloud-init volume."""
        counter = _next_disk_index(self.sim, vm.vmid)
        for opt in sorted(vm.config):
            if not DRIVE_RE.match(opt):
                continue
            fields = _split_ps(vm.config[opt])
            file = fields.get("file", "")
            rest = {k: v for k, v in fields.items() if k != "file"}
            if file.endswith(":cloudinit"):
                store = file.split(":")[0]
                volid = f"{store}:vm-{vm.vmid}-cloudinit"
                self.sim.volumes[volid] = Volume(volid, "images", 4 << 20, "raw",
                                                 self._vol_path(store, f"vm-{vm.vmid}-cloudinit"
                                                                ".raw"), vm.vmid)
                vm.config[opt] = _join_ps(volid, {"media": "cdrom", **rest})
                continue
            m = NEW_DISK_RE.match(file)
            if not m:
                continue
            store = m[2] or default_storage or "local-lvm"
            name = f"vm-{vm.vmid}-disk-{next(counter)}"
            path = self._vol_path(store, name + ".qcow2")
            volid = f"{store}:{name}"
            if "import-from" in rest:
                src = rest.pop("import-from")
                src_path = Path(src) if src.startswith("/") else self.sim.volumes[src].path
                task.say(msg("log_import", src=src, volid=volid))
                size = _qemu_img_overlay(src_path, path)
            elif opt == "efidisk0":
                size = 4 << 20 if rest.get("efitype", "2m") == "4m" else 528 << 10
                _qemu_img_create(path, size)
            elif opt == "tpmstate0":
                size = 4 << 20
                _qemu_img_create(path, size)
            else:
                size = int(float(m[3]) * (1 << 30))
                _qemu_img_create(path, size)
            self.sim.volumes[volid] = Volume(volid, "images", size, "qcow2", path, vm.vmid)
            vm.config[opt] = _join_ps(volid, {**rest, "size": _fmt_size(size)})

    def _vol_path(self, store: str, name: str) -> Path:
        return self.sim.storages[store].path / name

    def _drop_volumes(self, vm: Vm) -> None:
        for volid, vol in list(self.sim.volumes.items()):
            if vol.vmid == vm.vmid and vol.content == "images":
                if vol.path:
                    vol.path.unlink(missing_ok=True)
                del self.sim.volumes[volid]

    def get_config(self, auth: Auth, p: dict[str, Any]) -> Any:
        vm = self._vm(p)
        conf = dict(vm.config)
        if p.get("current") != "1":
            conf.update(vm.pending)
            for k in vm.pending_delete:
                conf.pop(k, None)
        out = _typed(conf, self.sim.version)
        out["digest"] = _digest(vm.config)
        return out

    def pending(self, auth: Auth, p: dict[str, Any]) -> Any:
        vm = self._vm(p)
        cur = _typed(vm.config, self.sim.version)
        pend = _typed(vm.pending, self.sim.version)
        out = []
        for k in sorted(set(cur) | set(pend) | set(vm.pending_delete)):
            e: dict[str, Any] = {"key": k}
            if k in cur:
                e["value"] = cur[k]
            if k in pend:
                e["pending"] = pend[k]
            if k in vm.pending_delete:
                e["delete"] = 1
            out.append(e)
        return out

    def _update_config(self, auth: Auth, p: dict[str, Any]) -> Callable[[Task | None], None]:
        """The synchronous part of update_vm_api; returns the part that may run in a worker."""
        sim = self.sim
        vm = self._vm(p)
        self._root_only(auth, p, "skiplock")
        control = {"node", "vmid", "delete", "revert", "digest", "skiplock", "background_delay"}
        keys = [k for k in p if k not in control]
        delete = [d for d in re.split(r"[,;\s]+", str(p.get("delete", ""))) if d]
        revert = [d for d in re.split(r"[,;\s]+", str(p.get("revert", ""))) if d]
        if not keys and not delete and not revert:
            raise PveError(500, msg("no_options"))
        table = schema.endpoint_table("PUT", "/nodes/{node}/qemu/{vmid}/config", sim.version)
        for opt in revert:
            if schema.lookup(table, opt) is None:
                raise param_error({"revert": msg("delete_unknown", opt=opt)})
        for opt in delete:
            if opt in keys:
                raise param_error({"delete": msg("delete_conflict", opt=opt)})
            if schema.lookup(table, opt) is None:
                raise param_error({"delete": msg("delete_unknown", opt=opt)})
        self._check_hostpci_format(p)
        self._config_perms(auth, vm.vmid, keys, p)
        self._config_perms(auth, vm.vmid, delete, p, deleting=True)
        self._check_sshkeys(p)
        self._check_drive_params(auth, p)
        with sim.lock:  # early checks before forking (update_vm_api $load_and_check_config)
            if "digest" in p and p["digest"] != _digest(vm.config):
                raise PveError(500, msg("digest"))

        def apply(task: Task | None) -> None:
            """$updatefn under lock_config: in the worker for POST, in the request for PUT."""
            with sim.lock:
                self._check_lock(vm, p)
                running = vm.status == "running"
                for opt in revert:
                    vm.pending.pop(opt, None)
                    if opt in vm.pending_delete:
                        vm.pending_delete.remove(opt)
                newconf = {k: str(p[k]) for k in keys}
                for opt in delete:
                    if running and not _hotpluggable(opt):
                        if opt not in vm.pending_delete:
                            vm.pending_delete.append(opt)
                        vm.pending.pop(opt, None)
                    else:
                        vm.config.pop(opt, None)
                        vm.pending.pop(opt, None)
            tmp = Vm(vm.vmid, vm.node, dict(newconf))
            self._create_disks(tmp, task or Task("", "", 0, 0, 0, "", "", ""), None)
            with sim.lock:
                for k, v in tmp.config.items():
                    if running and not _hotpluggable(k):
                        vm.pending[k] = v
                        if k in vm.pending_delete:
                            vm.pending_delete.remove(k)
                    else:
                        vm.config[k] = v
                        vm.pending.pop(k, None)
            sim.record()

        return apply

    def update_config_sync(self, auth: Auth, p: dict[str, Any]) -> Any:
        apply = self._update_config(auth, p)
        with self.sim.lock:
            apply(None)
        return None

    def update_config_async(self, auth: Auth, p: dict[str, Any]) -> Any:
        apply = self._update_config(auth, p)
        vm = self._vm(p)
        upid = self.sim.start_task("qmconfig", str(vm.vmid), auth.user, apply,
                                   hang_path="/config")
        delay = float(p.get("background_delay", 0) or 0)
        if delay:
            task = self.sim.tasks[upid]
            if task.done.wait(delay):
                status = task.exitstatus or ""
                if status == "OK" or status.startswith("WARNINGS"):
                    return None
                raise PveError(500, msg("update_failed", vmid=vm.vmid, status=status))
        return upid

    # ---- clone / template / resize ------------------------------------------------------
    def clone(self, auth: Auth, p: dict[str, Any]) -> Any:
        sim = self.sim
        src = self._vm(p)
        newid = int(p["newid"])
        full = p.get("full", "0" if src.template else "1") == "1"
        if not src.template and not full:  # only base volumes have the 'clone' feature
            for opt in sorted(src.config):
                f = _split_ps(src.config[opt])
                if DRIVE_RE.match(opt) and f.get("media") != "cdrom" \
                        and "cloudinit" not in f.get("file", "") and opt != "tpmstate0":
                    raise PveError(500, msg("linked_needs_template", volid=f.get("file"),
                                            opt=opt))
        if "storage" in p:
            if not full:
                raise PveError(500, msg("not_template_linked"))
            st = sim.storages.get(p["storage"])
            if st is None or "images" not in st.content:
                raise param_error({"storage": msg("storage_no_images", storage=p["storage"])})
        if "target" in p and p["target"] != sim.node:
            raise PveError(500, msg("clone_target_local", node=p["target"]))
        # non-root clones of configs with raw hostpci (check_mapping_access)
        hp = {k: v for k, v in src.config.items() if re.fullmatch(r"hostpci\d+", k)}
        self._config_perms(auth, newid, list(hp), hp)
        with sim.lock:
            self._check_lock(src, {})
            if newid in sim.vms:
                raise PveError(500, msg("clone_exists", vmid=newid))
            conf = {k: v for k, v in src.config.items()
                    if k not in ("template", "lock", "vmgenid", "smbios1", "meta")}
            if "name" in p:
                conf["name"] = p["name"]
            else:
                conf["name"] = f"Copy-of-VM-{src.config.get('name', src.vmid)}"
            if "description" in p:
                conf["description"] = p["description"]
            conf["lock"] = "clone"
            new = Vm(newid, sim.node, conf)
            sim.vms[newid] = new
            if not src.template:
                src.config["lock"] = "clone"

        def body(task: Task) -> None:
            counter = _next_disk_index(sim, newid)
            for opt in sorted(conf):
                if not DRIVE_RE.match(opt):
                    continue
                fields = _split_ps(conf[opt])
                volid = fields.get("file", "")
                vol = sim.volumes.get(volid)
                if vol is None:
                    continue
                rest = {k: v for k, v in fields.items() if k != "file"}
                if volid.endswith("-cloudinit"):
                    store = volid.split(":")[0]
                    nv = f"{store}:vm-{newid}-cloudinit"
                    sim.volumes[nv] = Volume(nv, "images", vol.size, "raw", None, newid)
                    new.config[opt] = _join_ps(nv, rest)
                    continue
                store = p.get("storage") or volid.split(":")[0]
                name = f"vm-{newid}-disk-{next(counter)}"
                path = self._vol_path(store, name + ".qcow2")
                if full:
                    task.say(msg("log_full_clone", volid=volid))
                    _qemu_img_convert(vol.path, path, vol.size)
                    nv = f"{store}:{name}"
                else:
                    _qemu_img_overlay(vol.path, path)
                    nv = f"{store}:{volid.split(':', 1)[1]}/{name}"
                sim.volumes[nv] = Volume(nv, "images", vol.size, "qcow2", path, newid)
                new.config[opt] = _join_ps(nv, rest)
            for k in list(new.config):
                if re.fullmatch(r"net\d+", k):
                    new.config[k] = _new_mac(new.config[k])
            _fill_defaults(new.config, sim.version)

        def on_end(task: Task) -> None:
            with sim.lock:
                if src.config.get("lock") == "clone":
                    src.config.pop("lock")
                if task.exitstatus and not task.exitstatus.startswith(("OK", "WARNINGS")):
                    self._drop_volumes(new)
                    sim.vms.pop(newid, None)
                else:
                    new.config.pop("lock", None)

        return sim.start_task("qmclone", str(src.vmid), auth.user, body,
                              hang_path="/clone", on_end=on_end)

    def template(self, auth: Auth, p: dict[str, Any]) -> Any:
        sim = self.sim
        vm = self._vm(p)
        with sim.lock:
            self._check_lock(vm, p)
            if vm.template:
                raise PveError(500, msg("template_twice"))
            if vm.status == "running":
                raise PveError(500, msg("template_running"))

        def body(task: Task) -> None:
            with sim.lock:
                for opt in sorted(vm.config):
                    if not DRIVE_RE.match(opt):
                        continue
                    fields = _split_ps(vm.config[opt])
                    volid = fields.get("file", "")
                    vol = sim.volumes.get(volid)
                    if vol is None or volid.endswith("-cloudinit"):
                        continue
                    nv = volid.replace(f"vm-{vm.vmid}-disk", f"base-{vm.vmid}-disk")
                    sim.volumes[nv] = sim.volumes.pop(volid)
                    sim.volumes[nv].volid = nv
                    if vol.path:
                        os_chmod_ro(vol.path)
                    vm.config[opt] = _join_ps(nv, {k: v for k, v in fields.items()
                                                   if k != "file"})
                vm.config["template"] = "1"

        return sim.start_task("qmtemplate", str(vm.vmid), auth.user, body,
                              hang_path="/template")

    def resize(self, auth: Auth, p: dict[str, Any]) -> Any:
        sim = self.sim
        vm = self._vm(p)
        self._root_only(auth, p, "skiplock")
        disk = p["disk"]

        def body(task: Task) -> None:  # resize_vm: every check is in the worker's $updatefn
            with sim.lock:
                if "digest" in p and p["digest"] != _digest(vm.config):
                    raise TaskError(msg("digest"))
                if vm.lock and p.get("skiplock") != "1":
                    raise TaskError(msg("locked", lock=vm.lock))
                if disk not in vm.config:
                    raise TaskError(msg("resize_nodisk", disk=disk))
                fields = _split_ps(vm.config[disk])
                if fields.get("media") == "cdrom":
                    raise TaskError(msg("resize_cdrom"))
                vol = sim.volumes.get(fields.get("file", ""))
                if vol is None:
                    raise TaskError(msg("resize_nodisk", disk=disk))
                m = re.fullmatch(r"(\+)?(\d+(?:\.\d+)?)([KMGT])?", p["size"])
                assert m
                n = float(m[2]) * {None: 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
                                   "T": 1 << 40}[m[3]]
                new = int(vol.size + n) if m[1] else int(n)
                if new < vol.size:
                    raise TaskError(msg("resize_shrink"))
                vol.size = new
                fields["size"] = _fmt_size(new)
                vm.config[disk] = _join_ps(fields.pop("file"), fields)
            if vm.status != "running" and vol.path and vol.path.exists() and _HAVE_QEMU_IMG:
                subprocess.run(["qemu-img", "resize", "-q", str(vol.path), str(new)],
                               check=False, capture_output=True)
            task.say(msg("log_resized", size=new))

        return sim.start_task("resize", str(vm.vmid), auth.user, body, hang_path="/resize")

    # ---- power --------------------------------------------------------------------------
    def _status_dict(self, vm: Vm, full: bool = False) -> dict[str, Any]:
        self._sync_status(vm)
        d: dict[str, Any] = {"vmid": vm.vmid, "status": vm.status,
                             "cpus": _cpus(vm.config), "maxmem": _mem(vm.config),
                             "maxdisk": _maxdisk(self.sim, vm), "mem": 0, "cpu": 0,
                             "uptime": int(time.time() - vm.started_at) if vm.started_at
                             and vm.status == "running" else 0,
                             "netin": 0, "netout": 0, "diskread": 0, "diskwrite": 0}
        if "name" in vm.config:
            d["name"] = vm.config["name"]
        if vm.lock:
            d["lock"] = vm.lock
        if vm.template:
            d["template"] = 1
        if vm.status == "running":
            d["pid"] = vm.pid
        if "tags" in vm.config:
            d["tags"] = vm.config["tags"]
        if full:
            d["qmpstatus"] = vm.status
        return d

    def _sync_status(self, vm: Vm) -> None:
        """A guest that powered itself off is stopped (the lab qemu exited)."""
        b = self.sim.backend
        if vm.status == "running" and b is not None and not b.alive(vm):
            with self.sim.lock:
                self._stopped(vm)

    def _stopped(self, vm: Vm) -> None:
        vm.status = "stopped"
        vm.pid = None
        vm.reserved = []
        # pending changes are applied when a VM stops (vmconfig_apply_pending at start)
        self.sim.record()

    def status_current(self, auth: Auth, p: dict[str, Any]) -> Any:
        vm = self._vm(p)
        d = self._status_dict(vm)
        d["qmpstatus"] = vm.status
        d["ha"] = {"managed": 0}
        agent = _split_ps_default(vm.config.get("agent", ""), "enabled")
        if agent.get("enabled") in ("1", "on", "yes", "true"):
            d["agent"] = 1
        if vm.status == "running":
            d["running-qemu"] = QEMU_VERSION[self.sim.version]
            d["running-machine"] = "pc-q35-" + ".".join(QEMU_VERSION[self.sim.version]
                                                        .split(".")[:2]) + "+pve0"
        return d

    def start(self, auth: Auth, p: dict[str, Any]) -> Any:
        vm = self._vm(p)
        self._root_only(auth, p, "skiplock", "stateuri", "migratedfrom", "targetstorage",
                        "force-cpu", "migration_network", "migration_type", "nets-host-mtu",
                        "with-conntrack-state")
        return self._start_worker(vm, auth, p)

    def _start_worker(self, vm: Vm, auth: Auth, p: dict[str, Any]) -> str:
        sim = self.sim

        def body(task: Task) -> None:
            with sim.lock:
                self._sync_status(vm)
                if vm.lock and p.get("skiplock") != "1":
                    raise TaskError(msg("locked", lock=vm.lock))
                if vm.template:
                    raise TaskError(msg("start_template"))
                if vm.status == "running":
                    raise TaskError(msg("already_running", vmid=vm.vmid))
                # vmconfig_apply_pending
                vm.config.update(vm.pending)
                for k in vm.pending_delete:
                    vm.config.pop(k, None)
                vm.pending.clear()
                vm.pending_delete.clear()
                devices, assigned = self._start_checks(vm)
                vm.reserved = list(devices)
                vm.status = "running"
                vm.started_at = time.time()
                vm.pid = 100000 + vm.vmid
            try:
                if sim.backend is not None:
                    sim.backend.start(vm, self._guest_gpus(assigned), task)
            except Exception as exc:
                with sim.lock:
                    self._stopped(vm)
                raise TaskError(msg("start_failed", detail=str(exc).split("\n")[0])) from exc
            sim.record()

        return sim.start_task("qmstart", str(vm.vmid), auth.user, body,
                              hang_path="/status/start")

    def _guest_gpus(self, assigned: list[tuple[int, list[str], bool]]) -> list[tuple[str, str]]:
        """(guest PCI address, vendor:device) of each passed-through display function. As
        qemu-server places them: hostpciN with pcie=1 behind root port N+1 (bus N+1),
        otherwise on bus 0 from slot 0x10 (PCI.pm print_hostpci_devices / get_pci_addr)."""
        out = []
        for index, funcs, pcie in assigned:
            for f in funcs:
                d = next(d for d in self.sim.pci if d.id == f)
                if not d.cls.startswith("0x03"):
                    continue
                fn = f.rsplit(".", 1)[1]
                addr = f"0000:{index + 1:02x}:00.{fn}" if pcie else f"0000:00:{0x10 + index:02x}.0"
                out.append((addr, f"{d.vendor[2:]}:{d.device[2:]}"))
        return out

    def _mapping_entry_error(self, mid: str, f: dict[str, str]) -> str | None:
        paths = f.get("path", "").split(";")
        for path in paths:
            devs = [d for d in self.sim.pci if d.id == path or d.id.startswith(path + ".")]
            if not devs:
                return msg("mapping_invalid", detail=f"no PCI device found for '{path}'")
            d = devs[0]
            if f.get("id") and f["id"] != f"{d.vendor[2:]}:{d.device[2:]}":
                return msg("mapping_invalid", detail=f"'id' does not match for '{mid}' "
                           f"({f['id']} != {d.vendor[2:]}:{d.device[2:]})")
            if f.get("iommugroup") and int(f["iommugroup"]) != d.iommugroup:
                return msg("mapping_invalid", detail=f"'iommugroup' does not match for "
                           f"'{mid}' ({f['iommugroup']} != {d.iommugroup})")
        return None

    def _start_checks(self, vm: Vm) -> tuple[list[str], list[tuple[int, list[str], bool]]]:
        """What qemu-server checks when it builds the command line (inside the task)."""
        sim = self.sim
        conf = vm.config
        machine = _split_ps_default(conf.get("machine", "pc"), "type").get("type", "pc")
        q35 = "q35" in machine
        used: list[str] = []
        assigned: list[tuple[int, list[str], bool]] = []
        for opt in sorted((k for k in conf if re.fullmatch(r"hostpci\d+", k)),
                          key=lambda k: int(k[7:])):
            dev = _split_ps_default(conf[opt], "host")
            if dev.get("pcie") in ("1", "on", "yes", "true") and not q35:
                raise TaskError(msg("q35", at=_perl_at("PCI.pm", sim.version)))
            if dev.get("mapping"):
                mid = dev["mapping"]
                m = sim.mappings.get(mid)
                entries = [_split_ps(e) for e in (m or {}).get("map", [])
                           if _split_ps(e).get("node") == sim.node]
                if not entries:
                    raise TaskError(msg("mapping_not_found", id=mid))
                for entry in entries:
                    err = self._mapping_entry_error(mid, entry)
                    if err:
                        raise TaskError(err)
                alternatives = [[f for path in e["path"].split(";")
                                 for f in self._functions(path)] for e in entries]
            else:
                alternatives = [[]]
                for host in dev["host"].split(";"):
                    full = host if re.match(r"^[a-f0-9]{4,}:", host) else f"0000:{host}"
                    f = self._functions(full)
                    if not f:
                        raise TaskError(msg("no_pci_device", id=full))
                    alternatives[0] += f
            if len(alternatives) == 1:
                funcs = alternatives[0]
                for f in funcs:  # reserve_pci_usage
                    holder = self._holder(f, vm)
                    if holder:
                        raise TaskError(msg("pci_in_use", id=f, vmid=holder))
            else:
                free = [a for a in alternatives if not any(self._holder(f, vm) for f in a)]
                if not free:
                    raise TaskError(msg("no_free_device", opt=opt))
                funcs = free[0]
            for f in funcs:
                if f in used:
                    raise TaskError(msg("assigned_twice", id=f))
            used += funcs
            assigned.append((int(opt[7:]), funcs, dev.get("pcie") in ("1", "on", "yes", "true")))
        hp = conf.get("hugepages")
        if hp:
            if conf.get("numa") != "1":
                raise TaskError(msg("hugepages_numa", at=_perl_at("Memory.pm", sim.version)))
            mem = int(_mem(conf) >> 20)
            size = HUGEPAGE_MIB.get(hp, 2)
            if mem % size:
                raise TaskError(msg("hugepages_multiple", mem=mem, size=size))
        return used, assigned

    def _functions(self, path: str) -> list[str]:
        return [d.id for d in self.sim.pci if d.id == path or d.id.startswith(path + ".")]

    def _holder(self, func: str, me: Vm) -> int | None:
        for other in list(self.sim.vms.values()):
            if other is not me and other.status == "running":
                self._sync_status(other)  # a lab VM that powered off holds nothing
            if other is not me and other.status == "running" and func in other.reserved:
                return other.vmid
        return None

    def stop(self, auth: Auth, p: dict[str, Any]) -> Any:
        vm = self._vm(p)
        self._root_only(auth, p, "skiplock", "keepActive", "migratedfrom")
        sim = self.sim

        def body(task: Task) -> None:  # vm_stop_nolock: a stopped VM is fine, then the lock
            with sim.lock:
                self._sync_status(vm)
                if vm.status != "running":
                    return
                if vm.lock and p.get("skiplock") != "1":
                    raise TaskError(msg("locked", lock=vm.lock))
            if sim.backend is not None:
                sim.backend.stop(vm)
            with sim.lock:
                self._stopped(vm)

        return sim.start_task("qmstop", str(vm.vmid), auth.user, body,
                              hang_path="/status/stop")

    def shutdown(self, auth: Auth, p: dict[str, Any]) -> Any:
        vm = self._vm(p)
        self._root_only(auth, p, "skiplock", "keepActive")
        sim = self.sim
        timeout = float(p.get("timeout", 60))
        force = p.get("forceStop") == "1"

        def body(task: Task) -> None:  # vm_stop_nolock with $shutdown
            with sim.lock:
                self._sync_status(vm)
                if vm.status != "running":
                    return
                if vm.lock and p.get("skiplock") != "1":
                    raise TaskError(msg("locked", lock=vm.lock))
            ok = sim.backend.shutdown(vm, timeout) if sim.backend is not None else True
            if not ok:
                if not force:
                    raise TaskError(msg("shutdown_timeout"))
                task.warn(msg("sigterm"))
                sim.backend.stop(vm)
            with sim.lock:
                self._stopped(vm)

        return sim.start_task("qmshutdown", str(vm.vmid), auth.user, body,
                              hang_path="/status/shutdown")

    def reboot(self, auth: Auth, p: dict[str, Any]) -> Any:
        vm = self._vm(p)
        sim = self.sim
        self._sync_status(vm)
        if vm.status != "running":  # vm_reboot checks this before forking
            raise PveError(500, msg("not_running", vmid=vm.vmid))

        def body(task: Task) -> None:
            with sim.lock:
                if vm.lock:
                    raise TaskError(msg("locked", lock=vm.lock))
            if sim.backend is not None:
                if not sim.backend.shutdown(vm, float(p.get("timeout", 60))):
                    raise TaskError(msg("shutdown_timeout"))
            with sim.lock:
                self._stopped(vm)
                vm.config.update(vm.pending)
                for k in vm.pending_delete:
                    vm.config.pop(k, None)
                vm.pending.clear()
                vm.pending_delete.clear()
                devices, assigned = self._start_checks(vm)
                vm.reserved = devices
                vm.status = "running"
                vm.started_at = time.time()
                vm.pid = 100000 + vm.vmid
            if sim.backend is not None:
                sim.backend.start(vm, self._guest_gpus(assigned), task)

        return sim.start_task("qmreboot", str(vm.vmid), auth.user, body,
                              hang_path="/status/reboot")

    def destroy(self, auth: Auth, p: dict[str, Any]) -> Any:
        sim = self.sim
        vm = self._vm(p)
        self._root_only(auth, p, "skiplock")
        with sim.lock:
            self._sync_status(vm)
            if vm.config.get("protection") == "1":
                raise PveError(500, msg("protection", vmid=vm.vmid))
            if vm.status == "running":
                raise PveError(500, msg("running_destroy", vmid=vm.vmid))

        def body(task: Task) -> None:
            with sim.lock:  # destroy_vm checks the lock in the worker
                if vm.lock and p.get("skiplock") != "1":
                    raise TaskError(msg("locked", lock=vm.lock))
                vm.config["lock"] = "destroyed"
                self._drop_volumes(vm)
                sim.vms.pop(vm.vmid, None)
            if sim.backend is not None:
                sim.backend.destroy(vm)
            task.say(msg("log_destroyed", vmid=vm.vmid))

        return sim.start_task("qmdestroy", str(vm.vmid), auth.user, body, hang_path="/qemu")

    # ---- tasks --------------------------------------------------------------------------
    def _task(self, auth: Auth, p: dict[str, Any]) -> Task:
        task = self.sim.tasks.get(p["upid"])
        if task is None:
            raise param_error({"upid": msg("no_such_task")})
        if task.user != auth.user:
            self._perm(auth, f"/nodes/{p['node']}", ["Sys.Audit"])
        return task

    def task_status(self, auth: Auth, p: dict[str, Any]) -> Any:
        t = self._task(auth, p)
        user, _, tokenid = t.user.partition("!")
        d: dict[str, Any] = {"upid": t.upid, "node": t.node, "pid": t.pid, "pstart": t.pstart,
                             "starttime": t.starttime, "type": t.type, "id": t.id,
                             "user": user, "status": t.status}
        if tokenid:
            d["tokenid"] = tokenid
        if t.status == "stopped":
            d["exitstatus"] = t.exitstatus
        return d

    def task_stop(self, auth: Auth, p: dict[str, Any]) -> Any:
        task = self.sim.tasks.get(p["upid"])
        if task is None:
            raise param_error({"upid": msg("no_such_task")})
        if task.user != auth.user:
            self._perm(auth, f"/nodes/{p['node']}", ["Sys.Modify"])
        self.sim.abort_task(task)
        return None

    def task_log(self, auth: Auth, p: dict[str, Any]) -> Any:
        t = self._task(auth, p)
        start = int(p.get("start", 0))
        limit = int(p.get("limit", 50))
        lines = t.log[start:start + limit] if limit else t.log[start:]
        return _WithTotal([{"n": start + i + 1, "t": line} for i, line in enumerate(lines)],
                          len(t.log))

    # ---- agent --------------------------------------------------------------------------
    def _agent(self, auth: Auth, p: dict[str, Any], command: str) -> Any:
        vm = self._vm(p)
        # Agent.pm agent_available: `agent` absent -> not configured; present but disabled ->
        # qemu has no agent channel, so "not running"
        if "agent" not in vm.config:
            raise PveError(500, msg("agent_not_configured"))
        self._sync_status(vm)
        if vm.status != "running":
            raise PveError(500, msg("agent_vm_not_running", vmid=vm.vmid))
        agent = _split_ps_default(vm.config["agent"], "enabled")
        b = self.sim.backend
        if b is None or agent.get("enabled") not in ("1", "on", "yes", "true"):
            raise PveError(500, msg("agent_not_running"))
        try:
            result = b.agent(vm, command)
        except TimeoutError:
            raise PveError(500, msg("agent_not_running")) from None
        return {"result": result}

    def agent_ping(self, auth: Auth, p: dict[str, Any]) -> Any:
        return self._agent(auth, p, "guest-ping")

    def agent_ifaces(self, auth: Auth, p: dict[str, Any]) -> Any:
        return self._agent(auth, p, "guest-network-get-interfaces")

    # ---- storage ------------------------------------------------------------------------
    def storage_content(self, auth: Auth, p: dict[str, Any]) -> Any:
        store = p["storage"]
        if store not in self.sim.storages:
            raise PveError(500, msg("no_storage", storage=store))
        out = []
        for vol in sorted(self.sim.volumes.values(), key=lambda v: v.volid):
            if not vol.volid.startswith(store + ":"):
                continue
            if "content" in p and vol.content != p["content"]:
                continue
            if "vmid" in p and vol.vmid != int(p["vmid"]):
                continue
            e: dict[str, Any] = {"volid": vol.volid, "content": vol.content,
                                 "format": vol.format, "size": vol.size, "ctime": vol.ctime}
            if vol.vmid is not None:
                e["vmid"] = vol.vmid
            out.append(e)
        return out

    def download_url(self, auth: Auth, p: dict[str, Any]) -> Any:
        sim = self.sim
        store = p["storage"]
        st = sim.storages.get(store)
        if st is None:
            raise PveError(500, msg("no_storage", storage=store))
        content, filename = p["content"], p["filename"]
        if content not in st.content:
            raise PveError(500, msg("content_not_allowed", storage=store, content=content))
        exts = {"iso": (".iso", ".img"), "vztmpl": (".tar.gz", ".tar.xz", ".tar.zst"),
                "import": (".ova",) + ((".qcow2", ".raw", ".vmdk"))}[content]
        if not filename.endswith(exts) or "/" in filename:
            raise param_error({"filename": msg("download_ext")})
        url = urllib.parse.urlsplit(p["url"])
        if url.scheme not in ("http", "https") or url.hostname not in ("127.0.0.1",
                                                                        "localhost"):
            raise PveError(500, msg("sim_download_loopback"))
        volid = f"{store}:{content}/{filename}"
        dest = st.path / content / filename

        def body(task: Task) -> None:
            import urllib.request

            dest.parent.mkdir(parents=True, exist_ok=True)
            task.say(msg("log_downloading", url=p["url"], dest=dest))
            tmp = dest.with_suffix(dest.suffix + ".tmp")
            try:
                with urllib.request.urlopen(p["url"], timeout=60) as r, tmp.open("wb") as out:
                    shutil.copyfileobj(r, out)
            except OSError as exc:
                raise TaskError(msg("download_failed", detail=exc)) from None
            if "checksum" in p:
                algo = p.get("checksum-algorithm", "sha256")
                h = hashlib.new(algo, tmp.read_bytes()).hexdigest()
                if h != p["checksum"]:
                    tmp.unlink()
                    raise TaskError(msg("download_checksum", got=h, want=p["checksum"]))
            tmp.replace(dest)
            size = dest.stat().st_size
            task.say(msg("log_downloaded", url=p["url"], dest=dest))
            fmt = filename.rsplit(".", 1)[-1] if content == "import" else content
            with sim.lock:
                sim.volumes[volid] = Volume(volid, content, size, fmt, dest)

        return sim.start_task("download", "", auth.user, body, hang_path="/download-url")


class _WithTotal(list):  # type: ignore[type-arg]
    """A list answered as {"data": [...], "total": n} (task log)."""

    def __init__(self, items: list[Any], total: int) -> None:
        super().__init__(items)
        self.total = total


# ---- helpers ------------------------------------------------------------------------------
# `die` without a trailing newline: Perl appends " at FILE line N." (qemu-server 9.2.6 / 8.3.13).
_DIE_LINES = {("PCI.pm", "9"): 510, ("PCI.pm", "8.4"): 495,
              ("Memory.pm", "9"): 388, ("Memory.pm", "8.4"): 368}


def _perl_at(file: str, version: str) -> str:
    return f" at /usr/share/perl5/PVE/QemuServer/{file} line {_DIE_LINES[(file, version)]}."


def _as_list(v: Any) -> list[str]:
    return [str(x) for x in v] if isinstance(v, list) else [str(v)]


def _split_ps(value: str) -> dict[str, str]:
    """Split a drive/mapping property string; the key-less first part is `file`."""
    out: dict[str, str] = {}
    for part in value.split(","):
        if "=" in part:
            k, _, v = part.partition("=")
            out[k] = v
        elif part:
            out["file"] = part
    return out


def _split_ps_default(value: str, default_key: str) -> dict[str, str]:
    out = _split_ps(value)
    if "file" in out:
        out[default_key] = out.pop("file")
    return out


def _join_ps(first: str, rest: dict[str, str]) -> str:
    return ",".join([first, *(f"{k}={v}" for k, v in rest.items())])


def _fmt_size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _next_disk_index(sim: Sim, vmid: int):  # type: ignore[no-untyped-def]
    used = {int(m[1]) for v in sim.volumes
            if (m := re.search(rf"(?:vm|base)-{vmid}-disk-(\d+)", v))}
    i = 0
    while True:
        if i not in used:
            used.add(i)
            yield i
        i += 1


def _new_mac(net: str) -> str:
    mac = "BC:24:11:" + ":".join(f"{b:02X}" for b in secrets.token_bytes(3))
    parts = net.split(",")
    models = ("virtio", "e1000", "e1000e", "rtl8139", "vmxnet3")
    first = parts[0]
    if "=" in first and first.split("=")[0] in models:
        parts[0] = f"{first.split('=')[0]}={mac}"
    elif first in models:
        parts[0] = f"{first}={mac}"
    elif first.startswith("model="):
        parts[0] = f"{first.split('=')[1]}={mac}"
    return ",".join(parts)


def _add_macs(conf: dict[str, str]) -> None:
    """Network::add_random_macs: a BC:24:11 MAC for every netN without one."""
    for k in list(conf):
        if re.fullmatch(r"net\d+", k):
            first = conf[k].split(",")[0]
            if "=" not in first or first.startswith("model="):
                conf[k] = _new_mac(conf[k])


def _fill_defaults(conf: dict[str, str], version: str) -> None:
    """What qemu-server adds on create: MACs, smbios1 uuid, vmgenid, meta, boot order."""
    _add_macs(conf)
    conf.setdefault("smbios1", f"uuid={uuid.uuid4()}")
    conf.setdefault("vmgenid", str(uuid.uuid4()))
    conf.setdefault("meta", f"creation-qemu={QEMU_VERSION[version]},ctime={int(time.time())}")
    if "boot" not in conf:
        order = [k for k in sorted(conf, key=_drive_sort) if DRIVE_RE.match(k)
                 and k not in ("efidisk0", "tpmstate0") and "cloudinit" not in conf[k]]
        order += sorted((k for k in conf if re.fullmatch(r"net\d+", k)), key=_drive_sort)[:1]
        if order:
            conf["boot"] = "order=" + ";".join(order)


def _drive_sort(k: str) -> tuple[int, int]:
    rank = {"scsi": 0, "virtio": 1, "sata": 2, "ide": 3, "net": 4}
    m = re.fullmatch(r"([a-z]+)(\d+)", k)
    return (rank.get(m[1], 9), int(m[2])) if m else (9, 0)


def _typed(conf: dict[str, str], version: str) -> dict[str, Any]:
    """Config values typed by schema: integer/boolean/number keys become JSON numbers."""
    config, _ = schema.config_tables(version)
    out: dict[str, Any] = {}
    for k, v in conf.items():
        spec = schema.lookup(config, k)
        t = spec.type if spec else None
        if t in ("integer", "boolean") and re.fullmatch(r"[+-]?\d+", v):
            out[k] = int(v)
        elif t == "number" and re.fullmatch(r"[+-]?\d+(\.\d+)?", v):
            out[k] = float(v) if "." in v else int(v)
        else:
            out[k] = v
    return out


def _digest(conf: dict[str, str]) -> str:
    text = "".join(f"{k}: {conf[k]}\n" for k in sorted(conf))
    return hashlib.sha1(text.encode()).hexdigest()


def _mem(conf: dict[str, str]) -> int:
    m = re.search(r"(?:current=)?(\d+)", conf.get("memory", "512"))
    return int(m[1] if m else 512) << 20


def _cpus(conf: dict[str, str]) -> int:
    try:
        return int(conf.get("sockets", "1")) * int(conf.get("cores", "1"))
    except ValueError:
        return 1


def _maxdisk(sim: Sim, vm: Vm) -> int:
    for k in sorted(vm.config, key=_drive_sort):
        if DRIVE_RE.match(k) and k not in ("efidisk0", "tpmstate0"):
            vol = sim.volumes.get(_split_ps(vm.config[k]).get("file", ""))
            if vol and vol.content == "images" and not vol.volid.endswith("cloudinit"):
                return vol.size
    return 0


def _fingerprint(sim: Sim) -> str:
    return getattr(sim, "ssl_fingerprint", "")


def os_chmod_ro(path: Path) -> None:
    import contextlib
    import os

    with contextlib.suppress(OSError):
        os.chmod(path, 0o444)


# Without qemu-img (a machine without the lab's packages, unit tests only) volumes are sparse
# placeholder files of the right size: enough for the API, not for booting.
_HAVE_QEMU_IMG = shutil.which("qemu-img") is not None


def _placeholder(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.truncate(size)


def _qemu_img_create(path: Path, size: int) -> None:
    if not _HAVE_QEMU_IMG:
        _placeholder(path, size)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise TaskError(msg("sim_qemu_img", what="create", detail=res.stderr.strip()))


def _qemu_img_info(path: Path) -> dict[str, Any]:
    res = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise TaskError(msg("sim_qemu_img", what="info", detail=res.stderr.strip()))
    return json.loads(res.stdout)


def _qemu_img_overlay(src: Path | None, dest: Path) -> int:
    """A qcow2 overlay on `src` (pvesim's "import" and linked clone); returns its size."""
    if src is None:
        raise TaskError(msg("sim_no_source"))
    if not _HAVE_QEMU_IMG:
        size = src.stat().st_size
        _placeholder(dest, size)
        return size
    info = _qemu_img_info(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", info["format"],
                          "-b", str(src.resolve()), str(dest)], capture_output=True, text=True)
    if res.returncode != 0:
        raise TaskError(msg("sim_qemu_img", what="import", detail=res.stderr.strip()))
    return int(info["virtual-size"])


def _qemu_img_convert(src: Path | None, dest: Path, size: int) -> None:
    if src is None or not _HAVE_QEMU_IMG:
        _qemu_img_create(dest, size)
        return
    res = subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", str(src), str(dest)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise TaskError(msg("sim_qemu_img", what="convert", detail=res.stderr.strip()))
