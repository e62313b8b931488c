"""Action: read the host with gpunode's one snapshot command and return a concern's plan
(gpunode.plan): the steps, each with whether it is needed and why. The role loops over
them with standard modules and decides nothing itself."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ansible.plugins.action import ActionBase

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpunode_desired import load_node, read_host  # noqa: E402


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True  # read-only
    _supports_async = False

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        from gpunode.facts import Snapshot
        from gpunode.plan import planner

        result = super().run(tmp, task_vars)
        host = (task_vars or {}).get("inventory_hostname")
        try:
            p = load_node(self, task_vars or {})
            plan = planner(str(self._task.args.get("concern", "")))
        except ValueError as exc:
            return {**result, "failed": True, "msg": f"{host}: {exc}"}
        data = read_host(self, p, host)
        if isinstance(data, str):
            return {**result, "failed": True, "msg": data}
        steps = [s.as_dict() for s in plan(p, Snapshot(data))]
        result.update(changed=False, ansible_facts={"gpunode_plan": steps})
        return result
