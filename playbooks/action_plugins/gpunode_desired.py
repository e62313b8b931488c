"""Action: gpunode's desired values for this host's `node` (computed on the controller)."""

from __future__ import annotations

from typing import Any

from ansible.plugins.action import ActionBase

from gpunode.engines.ansible.actions import load_node

__all__ = ["ActionModule", "load_node"]


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True
    _supports_async = False

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        from gpunode.core.topology import Gpu
        from gpunode.engines.ansible.plan import desired

        result = super().run(tmp, task_vars)
        try:
            p = load_node(self, task_vars or {})
        except ValueError as exc:
            host = (task_vars or {}).get("inventory_hostname")
            return {**result, "failed": True, "msg": f"{host}: {exc}"}
        gpus = self._task.args.get("gpus")
        gpu_list = [Gpu(**g) for g in gpus] if gpus is not None else None
        result.update(changed=False, ansible_facts={"gpunode_desired": desired(p, gpu_list)})
        return result
