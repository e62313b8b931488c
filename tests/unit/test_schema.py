"""schema/site.schema.json is current, and agrees with the loader on real sites."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpunode.model import NodeProfile, SiteSchema
from gpunode.model.profile import FROM_LOCK
from gpunode.model.site import SITE_KEYS

jsonschema = pytest.importorskip("jsonschema")

# Examples whose partial layers the current schema rejects (bug, see the xfail reason).
PARTIAL_NESTED_LAYERS: set[str] = set()


def committed(repo: Path) -> dict[str, Any]:
    return json.loads((repo / "schema" / "site.schema.json").read_text())


def test_committed_schema_is_current(repo: Path) -> None:
    text = json.dumps(SiteSchema.json_schema(), indent=2, sort_keys=True) + "\n"
    assert (repo / "schema" / "site.schema.json").read_text() == text, (
        "schema/site.schema.json is stale: run `gpunode schema --out schema/site.schema.json`")


def test_schema_is_valid_draft_2020_12(repo: Path) -> None:
    jsonschema.Draft202012Validator.check_schema(committed(repo))


def test_schema_shape(repo: Path) -> None:
    schema = committed(repo)
    assert set(schema["properties"]) == set(SITE_KEYS)
    assert schema["required"] == ["nodes"]
    layer = schema["$defs"]["Layer"]["properties"]
    assert set(layer) == set(NodeProfile.model_fields) - {"name", *FROM_LOCK}
    assert "groups" not in schema["$defs"]["GroupLayer"]["properties"]
    for name, prop in layer.items():
        assert prop.get("description"), f"Layer.{name} has no description"


def validator(repo: Path) -> Any:
    return jsonschema.Draft202012Validator(committed(repo))


def test_examples_validate_against_schema(repo: Path, example: Path,
                                          request: pytest.FixtureRequest) -> None:
    if example.stem in PARTIAL_NESTED_LAYERS:
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "bug: model/site.py SiteSchema.json_schema() drops `required` only at the top of "
            "Layer; nested maps keep theirs (Connection.address, VmSpec.pve_node/vmid, "
            "PveApi...), so a group layer such as `connection: {user: root}` fails the "
            "schema although the loader accepts it")))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator(repo).iter_errors(yaml.safe_load(example.read_text()))]
    assert errors == []


@pytest.mark.parametrize("text,where", [
    ("nodes:\n  a:\n    connection: {address: h}\n    tunning: {}\n", "nodes/a"),
    ("node: {}\nnodes:\n  a: {connection: {address: h}}\n", ""),
    ("defaults: {name: x}\nnodes:\n  a: {connection: {address: h}}\n", "defaults"),
    ("defaults: {groups: [g]}\nnodes:\n  a: {connection: {address: h}}\n", "defaults"),
    ("groups:\n  Bad-Name: {}\nnodes:\n  a: {connection: {address: h}}\n", "groups"),
    ("nodes:\n  a: {connection: {address: h}, gpus: {count: many}}\n", "nodes/a/gpus/count"),
    ("site: {name: x}\n", ""),
])
def test_schema_rejects_what_the_loader_rejects(repo: Path, text: str, where: str) -> None:
    errors = list(validator(repo).iter_errors(yaml.safe_load(text)))
    assert errors
    assert any("/".join(map(str, e.absolute_path)) == where for e in errors), [
        ("/".join(map(str, e.absolute_path)), e.message) for e in errors]


def test_partial_nested_map_in_a_layer_validates(repo: Path) -> None:
    site = ("defaults:\n  connection: {user: ubuntu}\n"
            "groups:\n  g:\n    connection: {port: 2222}\n"
            "nodes:\n  a: {groups: [g], connection: {address: h}}\n")
    assert list(validator(repo).iter_errors(yaml.safe_load(site))) == []
