"""Property-based: whatever a site file holds, load_site returns a Site or raises SiteError
with one non-empty line per problem, each starting with the file path -- never anything else.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpunode.inventory import Site, SiteError, load_site

REPO = Path(__file__).resolve().parents[2]
BASES = {p.stem: yaml.safe_load(p.read_text())
         for p in sorted((REPO / "inventory" / "examples").glob("*.yaml"))}
#: Maps whose keys are free-form (no unknown-key check inside them).
FREE_FORM = {"sysctl", "extra_args", "extra_env"}

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-(2**40), 2**40)
           | st.floats(allow_nan=False) | st.text(max_size=12))
keys = st.text(max_size=10) | st.integers(-5, 5) | st.booleans()
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(keys, inner, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def site_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "site.yaml"


def load_text(path: Path, text: str) -> Site | SiteError:
    """Load text as a site; assert the outcome is a Site or a well-formed SiteError."""
    path.write_text(text, encoding="utf-8")
    try:
        return load_site(path)
    except SiteError as exc:
        assert exc.lines
        for line in exc.lines:
            assert line.startswith(str(path)), line
            assert line[len(str(path)):].strip(": \n"), line
            assert "Traceback" not in line
        return exc


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


@FUZZ
@given(st.text(max_size=200))
def test_random_text(site_file: Path, text: str) -> None:
    load_text(site_file, text)


yamlish = st.text(alphabet=st.sampled_from(list("abcnodes:-[]{},?&*!|>'\"#\t\n 0123.")),
                  max_size=120)


@FUZZ
@given(yamlish)
def test_random_yamlish_text(site_file: Path, text: str) -> None:
    load_text(site_file, text)


@FUZZ
@given(values, st.sampled_from(["top", "nodes", "node", "defaults", "groups"]))
def test_random_structures(site_file: Path, value: Any, where: str) -> None:
    wrapped: Any = {"top": value, "nodes": {"nodes": value},
                    "node": {"nodes": {"n1": value}},
                    "defaults": {"defaults": value, "nodes": {"n1": {"connection": {
                        "address": "h"}}}},
                    "groups": {"groups": value, "nodes": {"n1": {"groups": ["g"]}}}}[where]
    load_text(site_file, dump(wrapped))


# --- unknown keys at random depths of real sites -------------------------------------------

Loc = tuple[str | int, ...]


def model_maps(data: Any, loc: Loc = ()) -> Iterator[Loc]:
    """Locations of mappings whose keys are model fields (where an unknown key is an error)."""
    if isinstance(data, dict):
        if loc[-1:] not in (("groups",), ("nodes",)) or len(loc) != 1:
            yield loc
        for key, value in data.items():
            if key in FREE_FORM or (len(loc) == 0 and key == "site"):
                continue
            yield from model_maps(value, (*loc, key))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            yield from model_maps(item, (*loc, i))


def field_path(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def at(data: Any, loc: Loc) -> Any:
    for part in loc:
        data = data[part]
    return data


@FUZZ
@given(st.sampled_from(sorted(BASES)), st.data(),
       st.from_regex(r"zz[a-z0-9_]{0,10}", fullmatch=True), values)
def test_unknown_key_at_random_depth(site_file: Path, base: str, data: st.DataObject,
                                     key: str, value: Any) -> None:
    site = copy.deepcopy(BASES[base])
    loc = data.draw(st.sampled_from(list(model_maps(site))), label="where")
    at(site, loc)[key] = value
    outcome = load_text(site_file, dump(site))
    assert isinstance(outcome, SiteError)
    expected = re.compile(rf"^{re.escape(str(site_file))}:\d+: "
                          rf"{re.escape(field_path((*loc, key)))}: unknown key")
    assert any(expected.match(line) for line in outcome.lines), (loc, outcome.lines)


def test_model_maps_cover_nested_lists() -> None:
    locs = set(model_maps(BASES["bare-metal"]))
    assert ("nodes", "gpu01", "vllm", "services", 1) in locs
    assert ("nodes",) not in locs and ("groups",) not in locs
    assert not any("sysctl" in loc for loc in locs)


# --- wrong types for known fields -----------------------------------------------------------

def all_locs(data: Any, loc: Loc = ()) -> Iterator[Loc]:
    if loc:
        yield loc
    if isinstance(data, dict):
        for key, value in data.items():
            yield from all_locs(value, (*loc, key))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            yield from all_locs(item, (*loc, i))


@FUZZ
@given(st.sampled_from(sorted(BASES)), st.data(), values)
def test_wrong_type_for_known_field(site_file: Path, base: str, data: st.DataObject,
                                    value: Any) -> None:
    site = copy.deepcopy(BASES[base])
    loc = data.draw(st.sampled_from(list(all_locs(site))), label="where")
    at(site, loc[:-1])[loc[-1]] = value
    load_text(site_file, dump(site))


@FUZZ
@given(st.sampled_from(sorted(BASES)), st.data())
def test_deleting_any_field(site_file: Path, base: str, data: st.DataObject) -> None:
    site = copy.deepcopy(BASES[base])
    loc = data.draw(st.sampled_from(list(all_locs(site))), label="where")
    del at(site, loc[:-1])[loc[-1]]
    load_text(site_file, dump(site))
