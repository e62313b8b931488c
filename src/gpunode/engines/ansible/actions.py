"""What gpunode's Ansible action plugins share (playbooks/action_plugins/ are thin wrappers):
the host's profile from hostvars `node`, and the one snapshot read of the host. Runs in the
ansible-playbook process on the controller, which imports gpunode from its own Python."""

from __future__ import annotations

import json
from typing import Any

from ansible.plugins.action import ActionBase


def load_node(action: ActionBase, task_vars: dict[str, Any]) -> Any:
    """The host's resolved profile from hostvars `node`, validated by the model."""
    return validate_node(action._templar.template(task_vars.get("node")))


def validate_node(node: Any) -> Any:
    """hostvar `node` as a NodeProfile, or ValueError naming every problem by its field path
    (the roles' argument specs check only that `node` is a mapping: this is the check)."""
    from pydantic import ValidationError

    from gpunode.model import NodeProfile

    if not isinstance(node, dict):
        raise ValueError("hostvar `node` is missing: use gpunode's inventory "
                         "(inventory/ansible_inventory.py) for this host")
    try:
        return NodeProfile.model_validate(json.loads(json.dumps(node)))
    except ValidationError as exc:
        problems = [line for err in exc.errors() for line in _problems(err)]
        raise ValueError(f"hostvar `node` does not match gpunode's model ({len(problems)} "
                         "problem(s)): " + "; ".join(problems)) from None


def _problems(err: Any) -> list[str]:
    """One line per problem, as `node.<field path>: what`; the model validator's
    cross-field problems (ProfileProblems) each on their own."""
    from gpunode.model.profile import ProfileProblems

    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ProfileProblems):
        return [f"node.{x.path}: {x.message}" if x.path else f"node: {x.message}"
                for x in cause.problems]
    path = "node" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in err["loc"])
    return [f"{path}: {str(err['msg']).removeprefix('Value error, ')}"]


def read_host(action: ActionBase, p: Any, host: str | None) -> dict[str, Any] | str:
    """The host read with gpunode's ONE snapshot command (gpunode.facts.node_spec, the
    pyinfra deploy's), or the error message."""
    from gpunode.facts import node_spec, snapshot_command

    res = action._low_level_execute_command(snapshot_command(node_spec(p)), sudoable=True)
    if res.get("rc") != 0:
        err = (res.get("stderr") or res.get("stdout") or "").strip()[-2000:]
        return (f"{host}: reading the host (python3 snapshot script) failed with exit "
                f"{res.get('rc')}: {err}; check that python3 runs there")
    try:
        return json.loads(res["stdout"])
    except ValueError:
        return f"{host}: the snapshot script printed no JSON: {res['stdout'][:500]!r}"


class HostReadAction(ActionBase):
    """An action that reads the host with the one snapshot command and returns facts
    decided from it: `decider(p)` gives the function from snapshot data to facts (it raises
    ValueError for bad task arguments, before the host is read)."""

    TRANSFERS_FILES = False
    _supports_check_mode = True  # read-only
    _supports_async = False

    def decider(self, p: Any) -> Any:
        raise NotImplementedError

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars)
        host = (task_vars or {}).get("inventory_hostname")
        try:
            p = load_node(self, task_vars or {})
            decide = self.decider(p)
        except ValueError as exc:
            return {**result, "failed": True, "msg": f"{host}: {exc}"}
        data = read_host(self, p, host)
        if isinstance(data, str):
            return {**result, "failed": True, "msg": data}
        result.update(changed=False, ansible_facts=decide(data))
        return result
