"""The one Jinja environment. pyinfra deploys, `gpunode render` and the checks render
through here; Ansible's template tasks use the same options and filters (a parity test
compares the bytes)."""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2

from gpunode.core.filters import FILTERS
from gpunode.core.resources import data_path
from gpunode.model import NodeProfile

TEMPLATES = data_path("templates")
MANAGED_HEADER = "Managed by gpunode; local changes are overwritten on the next deploy."
#: The environment options every engine must use.
JINJA_OPTIONS: dict[str, Any] = {
    "trim_blocks": True,
    "lstrip_blocks": True,
    "keep_trailing_newline": True,
}


@cache
def environment(root: str | None = None) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(root or str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - config files, not HTML
        **JINJA_OPTIONS,
    )
    env.filters.update(FILTERS)
    return env


def context(node: NodeProfile | dict[str, Any], **scope: Any) -> dict[str, Any]:
    """Template context: `node` (the profile as JSON data), `managed_header`, and the
    per-instance values a template declares (e.g. `service`, `placement`)."""
    data = node.model_dump(mode="json") if isinstance(node, NodeProfile) else node
    return {"node": data, "managed_header": MANAGED_HEADER, **scope}


def render(template: str, node: NodeProfile | dict[str, Any], **scope: Any) -> str:
    """Render templates/<concern>/<file>.j2 for a node."""
    return environment().get_template(template).render(context(node, **scope))


def template_names() -> list[str]:
    return sorted(str(p.relative_to(TEMPLATES)) for p in TEMPLATES.rglob("*.j2"))
