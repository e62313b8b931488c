"""Action: read the host with gpunode's ONE batched snapshot command (the same script the
pyinfra deploy runs) and return the decisions gpunode derives from it as facts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpunode_desired import load_node, read_host  # noqa: E402


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True  # read-only
    _supports_async = False

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        from gpunode.ansible_plan import observed

        result = super().run(tmp, task_vars)
        host = (task_vars or {}).get("inventory_hostname")
        try:
            p = load_node(self, task_vars or {})
        except ValueError as exc:
            return {**result, "failed": True, "msg": f"{host}: {exc}"}
        data = read_host(self, p, host)
        if isinstance(data, str):
            return {**result, "failed": True, "msg": data}
        facts = observed(p, data, boolean(self._task.args.get("skip_unchanged", True)))
        result.update(changed=False, ansible_facts={"gpunode": facts})
        return result
