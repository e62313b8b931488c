"""Provision and destroy the VMs of a site: the one entry point the CLI, the Ansible module
and the benchmark share. Input problems are found for every selected node before any API
call; then each PVE endpoint is handled in turn, each VM on its own (one failing VM does
not stop the others)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gpunode.model import Connection
from gpunode.proxmox.apply import Provisioner, VmResult
from gpunode.proxmox.client import Credentials, Pve, resolve_credentials
from gpunode.proxmox.errors import PveError, PveInputError
from gpunode.proxmox.plan import Change, VmPlan
from gpunode.proxmox.spec import VmTarget, desired_vm, find_pve_host
from gpunode.proxmox.state import vm_ids


class InputProblems(PveInputError):
    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass
class Endpoint:
    """One PVE API endpoint and the VMs the run handles through it."""

    label: str                                   # the pve-host node, or "environment"
    creds: Credentials
    targets: list[VmTarget] = field(default_factory=list)
    mappings: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)


@dataclass
class NodeReport:
    node: str
    vmid: int
    plan: VmPlan | None
    result: VmResult

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {"node": self.node, "vmid": self.vmid, "ok": r.ok, "changed": r.changed,
                "address": r.address, "error": r.error, "warnings": r.warnings,
                "seconds": round(r.seconds, 3),
                "plan": [c.row() for c in (self.plan.changes if self.plan else [])],
                "done": [c.row() for c in r.done]}


@dataclass
class Report:
    nodes: list[NodeReport] = field(default_factory=list)
    mappings: list[Change] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(n.result.ok for n in self.nodes)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "seconds": round(self.seconds, 3),
                "mappings": [c.row() for c in self.mappings],
                "nodes": [n.to_json() for n in self.nodes]}


def endpoints_for(site: Any, names: list[str] | None,
                  env: Mapping[str, str] | None = None) -> list[Endpoint]:
    """Group the selected pve-guest nodes by PVE endpoint. Raises InputProblems listing
    every problem (nothing contacted)."""
    env = os.environ if env is None else env
    problems: list[str] = []
    profiles = site.select(names) if names else [p for p in site.nodes.values()
                                                  if p.kind == "pve-guest"]
    if not profiles:
        raise InputProblems([f"{site.path}: no pve-guest nodes to provision"])
    endpoints: dict[str, Endpoint] = {}
    vmids: dict[tuple[str, int], str] = {}
    for p in profiles:
        where = f"{site.path}: nodes.{p.name}"
        if p.kind != "pve-guest" or p.vm is None:
            problems.append(f"{where}: kind is {p.kind}; provision and destroy work on "
                            "pve-guest nodes (with a vm section)")
            continue
        other = vmids.setdefault((p.vm.pve_node, p.vm.vmid), p.name)
        if other != p.name:
            problems.append(f"{where}.vm.vmid: {p.vm.vmid} is also node {other}'s VM id")
            continue
        host = find_pve_host(site.nodes, p.vm.pve_node)
        label = host.name if host is not None else "environment"
        try:
            t = desired_vm(p, host)
            if label not in endpoints:
                api = host.pve.api if host is not None else None
                at = (f"{site.path}: nodes.{host.name}.pve.api" if host is not None else
                      f"{where}: no pve-host node for pve_node {p.vm.pve_node!r}, so from "
                      "the environment")
                endpoints[label] = Endpoint(label, resolve_credentials(api, env, at))
        except PveInputError as exc:
            problems.append(str(exc))
            continue
        ep = endpoints[label]
        for i, dev in enumerate(p.vm.hostpci):
            if dev.address and not ep.creds.is_root_password:
                problems.append(
                    f"{where}.vm.hostpci[{i}].address: PVE lets only root@pam with a "
                    f"password set a raw PCI address, and this run logs in as "
                    f"{ep.creds.who}; use a mapping (pve.pci_mappings) instead")
        site_maps = {m.name: m for m in (host.pve.pci_mappings if host is not None else [])}
        wanted = ep.mappings.setdefault(t.pve_node, [])
        for name in t.mappings:
            if name in site_maps and all(w[0] != name for w in wanted):
                wanted.append((name, list(site_maps[name].addresses)))
        ep.targets.append(t)
    if problems:
        raise InputProblems(problems)
    return list(endpoints.values())


def _failed(t: VmTarget, message: str) -> NodeReport:
    return NodeReport(t.node, t.vmid, None, VmResult(t.node, t.vmid, ok=False, error=message))


def provision(endpoints: list[Endpoint], dry_run: bool = False,
              progress: Callable[[str, str], None] | None = None,
              connect: Callable[[Credentials], Any] = Pve, wait_agent: bool = True) -> Report:
    """Plan (dry run) or converge every VM of the endpoints. ``wait_agent=False``: do not
    wait for the guest agent's address after a start (images without the agent)."""
    started = time.monotonic()
    report = Report()
    say = progress or (lambda _node, _msg: None)
    for ep in endpoints:
        try:
            pve = connect(ep.creds)
        except PveError as exc:
            report.nodes += [_failed(t, str(exc)) for t in ep.targets]
            continue
        bad_maps: dict[str, str] = {}
        for pve_node, wanted in ep.mappings.items():
            prov = Provisioner(pve, lambda msg, n=pve_node: say(n, msg))
            try:
                changes, problems = prov.converge_mappings(pve_node, wanted, dry_run)
            except PveError as exc:
                changes, problems = [], [f"PCI mappings on {pve_node}: {exc}"]
            report.mappings += changes
            for line in problems:
                for name, _ in wanted:
                    if line.startswith(f"mapping {name}:"):
                        bad_maps[name] = line
                if not line.startswith("mapping "):
                    bad_maps.update({name: line for name, _ in wanted})
        listed: dict[str, Any] = {}    # each node's VM list, read once per run
        for t in ep.targets:
            broken = [bad_maps[m] for m in t.mappings if m in bad_maps]
            if broken:
                report.nodes.append(_failed(t, "; ".join(broken)))
                continue
            if t.pve_node not in listed:
                try:
                    listed[t.pve_node] = vm_ids(pve, t.pve_node)
                except PveError as exc:
                    listed[t.pve_node] = exc
            rows = listed[t.pve_node]
            if isinstance(rows, PveError):
                report.nodes.append(_failed(t, str(rows)))
                continue
            prov = Provisioner(pve, lambda msg, n=t.node: say(n, msg), wait_agent=wait_agent)
            plan, result = prov.provision(t, dry_run=dry_run, rows=rows)
            report.nodes.append(NodeReport(t.node, t.vmid, plan, result))
    report.seconds = time.monotonic() - started
    return report


def destroy(endpoints: list[Endpoint], progress: Callable[[str, str], None] | None = None,
            connect: Callable[[Credentials], Any] = Pve) -> Report:
    started = time.monotonic()
    report = Report()
    say = progress or (lambda _node, _msg: None)
    for ep in endpoints:
        try:
            pve = connect(ep.creds)
        except PveError as exc:
            report.nodes += [_failed(t, str(exc)) for t in ep.targets]
            continue
        for t in ep.targets:
            result = Provisioner(pve, lambda msg, n=t.node: say(n, msg)).destroy(t)
            report.nodes.append(NodeReport(t.node, t.vmid, None, result))
    report.seconds = time.monotonic() - started
    return report


# --- handing the guest's address to deploy and checks ----------------------------------

def addresses_path(site_path: Path) -> Path:
    """Where provision records the addresses the guest agents reported."""
    return site_path.resolve().parent / ".gpunode" / "addresses.json"


def record_addresses(site_path: Path, report: Report) -> Path | None:
    found = {n.node: {"address": n.result.address, "vmid": n.vmid}
             for n in report.nodes if n.result.ok and n.result.address}
    gone = {n.node for n in report.nodes if n.result.ok and n.plan is None}   # destroyed
    path = addresses_path(site_path)
    try:
        known = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        known = {}
    known = {k: v for k, v in known.items() if k not in gone} | found
    if not known and not path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, indent=2, sort_keys=True) + "\n")
    return path


def recorded_address(site_path: Path, node: str) -> str | None:
    path = addresses_path(site_path)
    try:
        return json.loads(path.read_text()).get(node, {}).get("address")
    except (OSError, ValueError, AttributeError):
        return None


#: ``connection.address`` of a pve-guest node whose address comes from provision.
AUTO_ADDRESS = "auto"


def use_recorded_addresses(site: Any) -> list[str]:
    """Give pve-guest nodes whose ``connection.address`` is ``auto`` the address their guest
    agent reported at the last ``gpunode provision`` (``.gpunode/addresses.json`` next to
    the site file). Returns one line per node that has none recorded yet."""
    missing = []
    for name, p in site.nodes.items():
        if p.kind != "pve-guest" or p.connection.address != AUTO_ADDRESS:
            continue
        address = recorded_address(site.path, name)
        if address is None:
            missing.append(f"{site.path}: nodes.{name}.connection.address is {AUTO_ADDRESS} "
                           f"but no address is recorded for it in "
                           f"{addresses_path(site.path)}: run gpunode provision {name}")
            continue
        try:  # the address came from a guest: validated like a site value
            connection = Connection.model_validate({**p.connection.model_dump(),
                                                    "address": address})
        except ValidationError:
            missing.append(f"{addresses_path(site.path)}: the address recorded for {name} "
                           f"is not an IP address or host name ({address!r}); run gpunode "
                           f"provision {name} again")
            continue
        site.nodes[name] = p.model_copy(update={"connection": connection})
    return missing
