"""pvesim's parameter tables against the PVE API schemas (9 and 8.4), so drift shows.

The schema subsets in tests/fixtures/pve/ are generated from ../shared/pve by
tests/fixtures/pve/make_subset.py (see there for the source). Every endpoint pvesim serves
must be in them, with the same parameters, types, limits, patterns and property-string keys.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

from gpunode.lab.pvesim import params as tables
from gpunode.lab.pvesim import schema
from gpunode.lab.pvesim.api import Api
from gpunode.lab.pvesim.messages import MESSAGES
from gpunode.lab.pvesim.params import P
from gpunode.lab.pvesim.state import Sim

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pve"
VERSIONS = ("9", "8.4")
FIELDS = ("type", "enum", "minimum", "maximum", "pattern", "maxLength", "minLength",
          "requires", "alias")


def _subset(version: str) -> dict[str, Any]:
    path = FIXTURES / f"apischema-{version}-subset.json"
    assert path.is_file(), f"{path} is missing: run tests/fixtures/pve/make_subset.py"
    return json.loads(path.read_text())["endpoints"]


def _served() -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        return Api(Sim(Path(tmp))).endpoints()


def _num(x: Any) -> Any:
    if isinstance(x, str) and re.fullmatch(r"-?\d+(\.\d+)?", x):
        return float(x)
    return float(x) if isinstance(x, int | float) else x


def _compare(name: str, ours: P, theirs: dict[str, Any], formats: dict[str, dict[str, P]],
             problems: list[str]) -> None:
    for f in FIELDS:
        a, b = getattr(ours, f), theirs.get(f)
        if f in ("minimum", "maximum"):
            a, b = _num(a), _num(b)
        if a != b:
            problems.append(f"{name}: {f} is {a!r} in pvesim, {b!r} in the schema")
    if ours.optional != bool(theirs.get("optional", 0)) and not ours.alias:
        problems.append(f"{name}: optional is {ours.optional} in pvesim, "
                        f"{bool(theirs.get('optional', 0))} in the schema")
    if ours.default_key != bool(theirs.get("default_key", 0)):
        problems.append(f"{name}: default_key differs")
    fmt = theirs.get("format")
    if isinstance(fmt, dict):
        if not (ours.format or "").startswith("@"):
            problems.append(f"{name}: the schema has a property string, pvesim {ours.format!r}")
        else:
            _compare_format(name, formats[ours.format[1:]], fmt, formats, problems)
    elif fmt in tables.NAMED_FORMATS:
        keys = set(re.findall(r"\[?,?\[?([a-z][a-z0-9_-]*)=", theirs.get("typetext", "")))
        if keys != set(formats[fmt]):
            problems.append(f"{name}: keys of {fmt} are {sorted(formats[fmt])} in pvesim, "
                            f"{sorted(keys)} in the schema's typetext")
    elif ours.format != fmt:
        problems.append(f"{name}: format is {ours.format!r} in pvesim, {fmt!r} in the schema")
    items = theirs.get("items")
    if isinstance(items, dict) and isinstance(items.get("format"), dict):
        if not (ours.items or "").startswith("@"):
            problems.append(f"{name}: array items are a property string in the schema")
        else:
            _compare_format(f"{name}[]", formats[ours.items[1:]], items["format"], formats,
                            problems)


def _compare_format(name: str, ours: dict[str, P], theirs: dict[str, Any],
                    formats: dict[str, dict[str, P]], problems: list[str]) -> None:
    if set(ours) != set(theirs):
        problems.append(f"{name}: keys only in pvesim {sorted(set(ours) - set(theirs))}, "
                        f"only in the schema {sorted(set(theirs) - set(ours))}")
    for k in sorted(set(ours) & set(theirs)):
        _compare(f"{name}.{k}", ours[k], theirs[k], formats, problems)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_served_endpoint_matches_the_schema(version: str) -> None:
    subset = _subset(version)
    _, formats = schema.config_tables(version)
    problems: list[str] = []
    served = _served()
    assert len(served) >= 30
    for method, path in served:
        theirs = subset.get(f"{method} {path}")
        if theirs is None:
            problems.append(f"{method} {path}: not in the PVE {version} schema")
            continue
        props = theirs["parameters"].get("properties", {})
        ours = schema.endpoint_table(method, path, version)
        for k in sorted(set(ours) - set(props)):
            problems.append(f"{method} {path}: pvesim accepts {k!r}, PVE {version} does not")
        for k in sorted(set(props) - set(ours)):
            problems.append(f"{method} {path}: PVE {version} accepts {k!r}, pvesim does not")
        for k in sorted(set(ours) & set(props)):
            _compare(f"{method} {path} {k}", ours[k], props[k], formats, problems)
    assert not problems, f"pvesim vs PVE {version} schema:\n" + "\n".join(problems)


def test_the_cross_check_catches_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison must fail when a table is wrong (a test that cannot fail is a defect)."""
    monkeypatch.setitem(tables.CONFIG, "numa", P("string"))
    monkeypatch.setitem(tables.NAMED_FORMATS_84, "pve-qm-hostpci", {})  # 8.4 with driver=
    for version in VERSIONS:
        with pytest.raises(AssertionError) as info:
            test_every_served_endpoint_matches_the_schema(version)
        assert "numa: type is 'string' in pvesim, 'boolean' in the schema" in str(info.value)
    assert "driver" in str(info.value)


def test_version_specific_keys_are_where_the_schemas_put_them() -> None:
    """The 9-only keys pvesim knows about really are 9-only in the shared schemas."""
    nine, eight = _subset("9"), _subset("8.4")
    create = "POST /nodes/{node}/qemu"
    assert "allow-ksm" in nine[create]["parameters"]["properties"]
    assert "allow-ksm" not in eight[create]["parameters"]["properties"]
    assert "driver=" in nine[create]["parameters"]["properties"]["hostpci[n]"]["typetext"]
    assert "driver=" not in eight[create]["parameters"]["properties"]["hostpci[n]"]["typetext"]


def test_every_message_names_its_source() -> None:
    for key, (text, source) in MESSAGES.items():
        assert text and source, key
        assert re.match(r"(qemu-server|pve-[a-z-]+|pvesim)\b", source), (key, source)


_EMITTERS = re.compile(r"(PveError\(\d+,|TaskError\(|FormatError\(|LabError\(|_send\(\d+,|"
                       r"task\.say\(|task\.warn\(|param_error\(\{[^:{}]+:|errors\[[^\]]+\] =)"
                       r"\s*f?[\"']")


def test_no_message_is_written_inline() -> None:
    """Whatever pvesim answers or logs in a task comes from the table (msg(...))."""
    src = Path(schema.__file__).parent
    inline = []
    for p in sorted(src.glob("*.py")):
        text = p.read_text()
        inline += [f"{p.name}: {m.group(0)}" for m in _EMITTERS.finditer(text)
                   if not text.startswith('OK"', m.end())]  # HTTP's own "200 OK"
    assert not inline, inline
    assert _EMITTERS.search('raise TaskError("disk full")')  # the check itself can fail


def test_every_message_in_the_code_comes_from_the_table() -> None:
    """msg("key") calls name existing keys; and every key is used somewhere."""
    src = Path(schema.__file__).parent
    code = "\n".join(p.read_text() for p in src.glob("*.py") if p.name != "messages.py")
    used = set(re.findall(r'msg\(\s*"([a-z0-9_]+)"', code))
    assert used <= set(MESSAGES), sorted(used - set(MESSAGES))
    unused = set(MESSAGES) - used
    assert not unused, f"messages nobody emits: {sorted(unused)}"


@pytest.mark.parametrize("version", VERSIONS)
def test_token_refusal_matches_allowtoken(version: str) -> None:
    from gpunode.lab.pvesim.api import NO_TOKEN

    subset = _subset(version)
    no_token = {path for method, path in _served()
                if not subset[f"{method} {path}"]["allowtoken"]}
    assert no_token == NO_TOKEN


@pytest.mark.parametrize("version", VERSIONS)
def test_declared_permissions_match_the_schema(version: str) -> None:
    """The check pvesim runs before each handler is the one PVE's schema declares."""
    from gpunode.lab.pvesim import perms

    subset = _subset(version)
    problems = []
    for method, path in _served():
        theirs = (subset[f"{method} {path}"]["permissions"] or {}).get("check")
        ours = perms.declared(method, path, version)
        if ours != theirs:
            problems.append(f"{method} {path}: pvesim {ours}, PVE {version} {theirs}")
    assert not problems, "\n".join(problems)


def test_the_permission_cross_check_catches_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpunode.lab.pvesim import perms

    monkeypatch.setitem(perms.PERMS, ("DELETE", "/cluster/mapping/pci/{id}"),
                        ["perm", "/mapping/pci/{id}", ["Mapping.Modify"]])
    with pytest.raises(AssertionError, match="DELETE /cluster/mapping/pci/"):
        test_declared_permissions_match_the_schema("9")
