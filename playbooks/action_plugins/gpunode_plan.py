"""Action: read the host with gpunode's one snapshot command and return a concern's plan
(gpunode.core.plan): the steps, each with whether it is needed and why. The role loops over
them with standard modules and decides nothing itself."""

from __future__ import annotations

from typing import Any

from gpunode.engines.ansible.actions import HostReadAction


class ActionModule(HostReadAction):
    def decider(self, p: Any) -> Any:
        from gpunode.core.plan import planner
        from gpunode.facts import Snapshot

        plan = planner(str(self._task.args.get("concern", "")))
        return lambda data: {"gpunode_plan": [s.as_dict() for s in plan(p, Snapshot(data))]}
