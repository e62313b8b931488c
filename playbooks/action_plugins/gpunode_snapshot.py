"""Action: read the host with gpunode's ONE batched snapshot command (the same script the
pyinfra deploy runs) and return the decisions gpunode derives from it as facts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpunode_desired import load_node  # noqa: E402


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True  # read-only
    _supports_async = False

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        from gpunode.ansible_plan import command, observed

        result = super().run(tmp, task_vars)
        host = (task_vars or {}).get("inventory_hostname")
        try:
            p = load_node(self, task_vars or {})
        except ValueError as exc:
            return {**result, "failed": True, "msg": f"{host}: {exc}"}
        res = self._low_level_execute_command(command(p), sudoable=True)
        if res.get("rc") != 0:
            err = (res.get("stderr") or res.get("stdout") or "").strip()[-2000:]
            return {**result, "failed": True,
                    "msg": f"{host}: reading the host (python3 snapshot script) failed with "
                    f"exit {res.get('rc')}: {err}; check that python3 runs there"}
        try:
            data = json.loads(res["stdout"])
        except ValueError:
            return {**result, "failed": True,
                    "msg": f"{host}: the snapshot script printed no JSON: "
                    f"{res['stdout'][:500]!r}"}
        facts = observed(p, data, boolean(self._task.args.get("skip_unchanged", True)))
        result.update(changed=False, ansible_facts={"gpunode": facts})
        return result
