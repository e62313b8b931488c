"""Action: create, converge or destroy this host's Proxmox VM through gpunode.proxmox.

The same library call as `gpunode provision` / `gpunode destroy` (no second
implementation): runs on the controller, talks to the PVE API, never to the host itself.
Check mode is gpunode's dry run: the plan is returned and nothing changes."""

from __future__ import annotations

from typing import Any

from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True
    _supports_async = False

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        from gpunode.inventory import SiteError, load_site
        from gpunode.proxmox import run as prun

        result = super().run(tmp, task_vars)
        task_vars = task_vars or {}
        args = self._task.args
        host = args.get("node") or task_vars.get("inventory_hostname")
        state = args.get("state", "present")
        site_path = args.get("site") or task_vars.get("gpunode_site")
        wait = str(args.get("wait", True)).lower() not in ("false", "0", "no", "off")
        if state not in ("present", "absent"):
            return {**result, "failed": True, "msg": f"state: {state!r} is not present or "
                    "absent"}
        if not site_path:
            return {**result, "failed": True, "msg": f"{host}: no site file: use gpunode's "
                    "inventory (hostvar gpunode_site) or pass site="}
        try:
            site = load_site(site_path)
            endpoints = prun.endpoints_for(site, [host])
        except SiteError as exc:
            return {**result, "failed": True, "msg": "\n".join(exc.lines)}
        except prun.PveInputError as exc:
            return {**result, "failed": True, "msg": str(exc)}
        check = bool(self._play_context.check_mode)
        if state == "absent":
            if check:
                report = prun.provision(endpoints, dry_run=True)
                exists = any(n.plan is not None and n.plan.changes and
                             n.plan.changes[0].action not in ("create", "clone")
                             for n in report.nodes)
                node_report = report.nodes[0]
                return {**result, "changed": exists and node_report.result.ok,
                        "failed": not node_report.result.ok,
                        "msg": node_report.result.error or ("would destroy" if exists else
                                                            "absent")}
            report = prun.destroy(endpoints)
        else:
            report = prun.provision(endpoints, dry_run=check, wait_agent=wait)
            if not check:
                prun.record_addresses(site.path, report)
        n = report.nodes[0]
        r = n.result
        plan = [c.row() for c in (n.plan.changes if n.plan else [])]
        changed = (n.plan.changed if (check and n.plan) else r.changed) or \
            any(c.applied for c in report.mappings)
        out = {**result, "changed": bool(changed), "vmid": n.vmid, "plan": plan,
               "done": [c.row() for c in r.done], "address": r.address,
               "warnings": r.warnings, "mappings": [c.row() for c in report.mappings]}
        if r.held:
            out["held"] = [c.row() for c in r.held]
        if not r.ok:
            out.update(failed=True, msg=r.error)
        else:
            out["msg"] = (f"vm {n.vmid}: {len(plan)} planned change(s)" if check else
                          f"vm {n.vmid}: {len(r.done)} change(s)")
        return out
