"""Role argument specs are generated, committed current, and take what a role takes from its
caller (`node`, a mapping); the profile inside is validated once, by the model, in the first
task every role runs (gpunode_facts -> gpunode_desired -> ansible_actions.validate_node),
which accepts every example profile and names each problem of a broken one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

from gpunode.engines.ansible import specs as ansible_specs
from gpunode.engines.ansible.actions import validate_node
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
    assert not stale, (f"stale argument specs (run `python -m gpunode.engines.ansible.specs`): "
                       f"{[str(p.relative_to(REPO)) for p in stale]}")


def test_every_deploy_concern_has_a_role():
    concerns = {p.stem for p in (REPO / "src" / "gpunode" / "engines" / "pyinfra").glob("*.py")
                if p.stem not in ("__init__", "ops")}
    assert {r.name.removeprefix("gpunode_") for r in ROLES} == concerns | {"facts"}


def test_example_profiles_pass_role_validation(example):
    for role in ROLES:
        spec = _spec(role)
        for name, p in load_site(example).nodes.items():
            node = p.model_dump(mode="json")
            result = ArgumentSpecValidator(spec).validate({"node": node})
            assert not result.error_messages, (example.name, name, result.error_messages)
            assert validate_node(node) == p


def test_a_role_takes_node_as_a_mapping_and_refuses_anything_else():
    for role in ROLES:
        result = ArgumentSpecValidator(_spec(role)).validate({"node": "gpu01"})
        assert result.error_messages, role.name
        assert ArgumentSpecValidator(_spec(role)).validate({}).error_messages, role.name


def test_every_role_validates_the_profile_first():
    """The validation the specs leave out happens before any task of any role: a GPU node's
    role depends on gpunode_facts, whose first task is the gpunode_desired action; the
    Proxmox host's role starts with the gpunode_plan action. Both load `node` through
    ansible_actions.load_node."""
    def first_action(role: str) -> str:
        tasks = yaml.safe_load((REPO / "roles" / role / "tasks" / "main.yml").read_text())
        return next(k for k in tasks[0] if k.startswith("gpunode_"))

    for role in ROLES:
        meta = yaml.safe_load((role / "meta" / "main.yml").read_text())
        deps = [d["role"] for d in meta.get("dependencies") or []]
        first = first_action(deps[0] if deps else role.name)
        assert deps in ([], ["gpunode_facts"]), role.name
        assert first == ("gpunode_desired" if deps or role.name == "gpunode_facts"
                         else "gpunode_plan"), (role.name, first)
    for action in ("gpunode_desired", "gpunode_plan"):
        text = (REPO / "playbooks" / "action_plugins" / f"{action}.py").read_text()
        assert "import load_node" in text or "import HostReadAction" in text, action


@pytest.mark.parametrize(("path", "value", "named"), [
    (("os",), "windows-11", "node.os: Input should be"),
    (("vllm", "services"), "not-a-list", "node.vllm.services: Input should be a valid list"),
    (("connection",), None, "node.connection: Input should be"),
    (("tuning", "bogus"), 1, "node.tuning.bogus: Extra inputs are not permitted"),
])
def test_broken_profile_is_refused_naming_the_field(example, path, value, named):
    p = next(iter(load_site(example).nodes.values()))
    node = p.model_dump(mode="json")
    target = node
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValueError, match="does not match gpunode's model") as exc:
        validate_node(node)
    assert named in str(exc.value), str(exc.value)
