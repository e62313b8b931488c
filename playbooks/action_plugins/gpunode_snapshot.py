"""Action: read the host with gpunode's ONE batched snapshot command (the same script the
pyinfra deploy runs) and return the decisions gpunode derives from it as facts."""

from __future__ import annotations

from typing import Any

from ansible.module_utils.parsing.convert_bool import boolean

from gpunode.engines.ansible.actions import HostReadAction


class ActionModule(HostReadAction):
    def decider(self, p: Any) -> Any:
        from gpunode.engines.ansible.plan import observed

        skip = boolean(self._task.args.get("skip_unchanged", True))
        return lambda data: {"gpunode": observed(p, data, skip)}
