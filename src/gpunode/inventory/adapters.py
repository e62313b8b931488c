"""The same resolved profiles, shaped for each engine. Neither adapter computes anything:
both carry ``node`` = ``NodeProfile.model_dump(mode="json")`` and the connection."""

from __future__ import annotations

from typing import Any

from gpunode.inventory.loader import KIND_GROUPS, Site
from gpunode.model import NodeProfile


def node_data(profile: NodeProfile) -> dict[str, Any]:
    return profile.model_dump(mode="json")


def ansible_unsafe(value: Any) -> Any:
    """Mark every string of a site's data unsafe for Ansible (its JSON inventory form,
    ``{"__ansible_unsafe": ...}``): Ansible then never evaluates ``{{ }}`` or ``{% %}``
    inside a site value on the controller, and writes it literally, as pyinfra does."""
    if isinstance(value, str):
        return {"__ansible_unsafe": value}
    if isinstance(value, dict):
        return {k: ansible_unsafe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [ansible_unsafe(v) for v in value]
    return value


def ansible_plain(value: Any) -> Any:
    """The inverse of ansible_unsafe, for data read back from Ansible (`ansible-inventory`
    prints unsafe strings in the same marked form)."""
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("__ansible_unsafe"), str):
            return value["__ansible_unsafe"]
        return {k: ansible_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [ansible_plain(v) for v in value]
    return value


# seconds a host has to open an SSH channel for a command (pyinfra; paramiko's default is 3600)
CHANNEL_TIMEOUT_S = 120


def _ansible_connection(p: NodeProfile) -> dict[str, Any]:
    c = p.connection
    out: dict[str, Any] = {"ansible_host": c.address, "ansible_port": c.port,
                           "ansible_user": c.user, "ansible_become": c.become,
                           "ansible_python_interpreter": "/usr/bin/python3"}
    if c.key:
        out["ansible_ssh_private_key_file"] = c.key
    return out


def to_ansible(site: Site) -> dict[str, Any]:
    """`ansible-inventory --list` JSON: groups from the site, node in hostvars."""
    inv: dict[str, Any] = {
        # Connection values stay plain (testinfra's ansible backend reads them from
        # ansible-inventory as they are); the model allows no template syntax in them.
        "_meta": {"hostvars": {name: {**_ansible_connection(p),
                                      "node": ansible_unsafe(node_data(p)),
                                      "gpunode_site": str(site.path.resolve())}
                               for name, p in site.nodes.items()}},
        "all": {"children": ["ungrouped", *site.groups]},
        "ungrouped": {"hosts": [n for n, p in site.nodes.items() if not p.groups]},
    }
    for group, hosts in site.groups.items():
        inv[group] = {"hosts": list(hosts)}
    for kind, group in KIND_GROUPS.items():
        inv[group] = {"hosts": [n for n, p in site.nodes.items() if p.kind == kind]}
        inv["all"]["children"].append(group)
    return inv


def pyinfra_host(p: NodeProfile, site: Site) -> tuple[str, dict[str, Any]]:
    c = p.connection
    data: dict[str, Any] = {"ssh_hostname": c.address, "ssh_port": c.port, "ssh_user": c.user,
                            "_sudo": c.become and c.user != "root", "node": node_data(p),
                            "gpunode_site": str(site.path.resolve()),
                            "ssh_known_hosts_file": "/dev/null",
                            "ssh_strict_host_key_checking": "no",
                            # a command whose channel the host never opens (a host gone
                            # mid-command, e.g. rebooting) fails after this instead of
                            # paramiko's default hour
                            "ssh_paramiko_connect_kwargs": {"channel_timeout": CHANNEL_TIMEOUT_S}}
    if c.key:
        data["ssh_key"] = c.key
    return p.name, data


def to_pyinfra(site: Site) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Groups name -> [(host, data)]; pyinfra adds the implicit `all`."""
    hosts = dict(pyinfra_host(p, site) for p in site.nodes.values())
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {
        group: [(h, hosts[h]) for h in members] for group, members in site.groups.items()}
    for kind, group in KIND_GROUPS.items():
        out[group] = [(n, hosts[n]) for n, p in site.nodes.items() if p.kind == kind]
    out["ungrouped"] = [(n, hosts[n]) for n, p in site.nodes.items() if not p.groups]
    return out
