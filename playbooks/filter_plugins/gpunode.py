"""gpunode's Jinja filters for Ansible: exactly gpunode.core.filters.FILTERS, nothing else.

Ansible hands filters its own str/dict subclasses (AnsibleUnsafeText, ...); each filter
gets plain JSON data first, so yaml/json output is the same as under gpunode.core.render."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from gpunode.core.filters import FILTERS


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _plain_args(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*(_plain(a) for a in args), **{k: _plain(v) for k, v in kwargs.items()})

    return wrapper


class FilterModule:
    def filters(self) -> dict[str, Callable[..., Any]]:
        return {name: _plain_args(func) for name, func in FILTERS.items()}
