"""Role argument specs are generated from the model, committed current, and accept every
example profile (and reject a broken one) the way Ansible validates them at role entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

from gpunode import ansible_specs
from gpunode.inventory import load_site

REPO = Path(__file__).resolve().parents[2]
ROLES = sorted((REPO / "roles").glob("gpunode_*"))


def _spec(role: Path) -> dict:
    def clean(opt: dict) -> dict:
        out = {k: v for k, v in opt.items() if k != "description"}
        if "options" in out:
            out["options"] = {k: clean(v) for k, v in out["options"].items()}
        return out

    doc = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
    return {k: clean(v) for k, v in doc["argument_specs"]["main"]["options"].items()}


def test_committed_argument_specs_are_current():
    assert ROLES, "no roles found"
    stale = ansible_specs.stale()
    assert not stale, (f"stale argument specs (run `python -m gpunode.ansible_specs`): "
                       f"{[str(p.relative_to(REPO)) for p in stale]}")


def test_every_deploy_concern_has_a_role():
    concerns = {p.stem for p in (REPO / "src" / "gpunode" / "deploys").glob("*.py")
                if p.stem not in ("__init__", "ops")}
    assert {r.name.removeprefix("gpunode_") for r in ROLES} == concerns | {"facts"}


def test_example_profiles_pass_role_validation(example):
    spec = _spec(ROLES[0])
    for name, p in load_site(example).nodes.items():
        result = ArgumentSpecValidator(spec).validate({"node": p.model_dump(mode="json")})
        assert not result.error_messages, (example.name, name, result.error_messages)


@pytest.mark.parametrize(("path", "value"), [
    (("os",), "windows-11"),
    (("vllm", "services"), "not-a-list"),
    (("connection",), None),
])
def test_broken_profile_fails_role_validation(example, path, value):
    p = next(iter(load_site(example).nodes.values()))
    node = p.model_dump(mode="json")
    target = node
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    result = ArgumentSpecValidator(_spec(ROLES[0])).validate({"node": node})
    assert result.error_messages, f"{path}={value!r} was accepted"
