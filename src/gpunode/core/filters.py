"""The only custom Jinja filters. Both engines register exactly these (the Ansible
filter plugin imports this module), so templates render byte for byte alike."""

from __future__ import annotations

import json
from typing import Any

import yaml


def to_sysctl_value(value: Any) -> str:
    """sysctl.d value: lists become space-separated; a line break is refused (it would
    start another key = value line)."""
    if isinstance(value, list | tuple):
        text = " ".join(str(v) for v in value)
    elif isinstance(value, bool):
        text = "1" if value else "0"
    else:
        text = str(value)
    if any(c in text for c in "\n\r\x00"):
        raise ValueError(f"refusing to write a sysctl value with a line break: {text!r}")
    return text


def to_systemd_bool(value: Any) -> str:
    return "yes" if value else "no"


def to_yaml_block(value: Any) -> str:
    """Deterministic block YAML (sorted keys, no trailing newline)."""
    return yaml.safe_dump(value, default_flow_style=False, sort_keys=True).rstrip("\n")


def to_json_compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _refuse_control(text: str, what: str) -> str:
    """Defence in depth behind the model's types: a control character would start a new
    line (a new directive or variable) in the file being written."""
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in text):
        raise ValueError(f"refusing to write {what} with a control character: {text!r}")
    return text


def env_quote(value: Any) -> str:
    """Quote a value for a systemd EnvironmentFile line (double quotes; backslash and
    double quote escaped; EnvironmentFile= expands no variables)."""
    text = _refuse_control(str(value), "an environment value")
    if text and all(c.isascii() and (c.isalnum() or c in "-_./:,=@+") for c in text):
        return text
    escaped = "".join("\\" + c if c in '\\"' else c for c in text)
    return f'"{escaped}"'


def pam_memlock(value: Any) -> str:
    """LimitMEMLOCK's value (infinity, bytes, or a size with K/M/G/T) as pam_limits wants
    it in limits.d: "unlimited" or KiB."""
    text = str(value)
    if text == "infinity":
        return "unlimited"
    units = {"K": 1, "M": 1024, "G": 1024**2, "T": 1024**3}
    if text[-1:] in units:
        return str(int(text[:-1]) * units[text[-1]])
    return str(int(text) // 1024)


def unit_word(value: Any) -> str:
    """A unit-file value that must be one plain word (User=, Group=): refused otherwise."""
    text = str(value)
    if not text or not all(c.isascii() and (c.isalnum() or c in "-_.@") for c in text):
        raise ValueError(f"refusing to write {text!r} as a unit-file word")
    return text


def systemd_quote(value: Any) -> str:
    """One argument of a unit's Exec*= line or one path of a path list: double-quoted with
    C escapes when it is not plain, % and $ doubled (systemd's specifier and variable
    expansion)."""
    text = _refuse_control(str(value), "a unit-file argument")
    text = text.replace("%", "%%").replace("$", "$$")
    if text and all(c.isascii() and (c.isalnum() or c in "-_./:@+=,") for c in text):
        return text
    escaped = "".join("\\" + c if c in '\\"\'' else c for c in text)
    return f'"{escaped}"'



def _profile(node: dict[str, Any]):  # noqa: ANN202 - avoids an import cycle at load time
    from gpunode.model import NodeProfile

    return NodeProfile.model_validate(node)


def node_sysctls(node: dict[str, Any]) -> dict[str, str]:
    from gpunode.core import desired

    return desired.sysctls(_profile(node))


def node_sysctl_reasons(node: dict[str, Any]) -> dict[str, str]:
    from gpunode.core import desired

    return desired.sysctl_reasons(_profile(node))


def node_block_kernels(node: dict[str, Any]) -> dict[str, str]:
    """The udev KERNEL pattern of each disk class (desired.BLOCK_CLASSES)."""
    from gpunode.core import desired

    return {cls: pattern for cls, (pattern, _) in desired.BLOCK_CLASSES.items()}


def node_cuda_repo_line(node: dict[str, Any]) -> str:
    from gpunode.core import desired

    return desired.cuda_repo_line(_profile(node))


def node_debian_contrib_source(node: dict[str, Any]) -> str:
    from gpunode.core import desired

    return desired.debian_contrib_source(_profile(node)).rstrip("\n")


def node_ctk_repo_line(node: dict[str, Any]) -> str:
    from gpunode.core import desired

    return desired.ctk_repo_line(_profile(node))


def node_driver_preferences(node: dict[str, Any]) -> str:
    from gpunode.core import desired

    return (desired.driver_preferences(_profile(node)) or "").rstrip("\n")


def node_unattended_blacklist(node: dict[str, Any]) -> list[str]:
    from gpunode.core import desired

    return list(desired.UNATTENDED_BLACKLIST)


def node_tuning_profile(node: dict[str, Any]) -> str:
    from gpunode.core import desired

    return desired.tuning_profile(_profile(node))


def service_config(service: dict[str, Any]) -> dict[str, Any]:
    from gpunode.core import desired

    return desired.vllm_config(service)


def service_environment(service: dict[str, Any], node: dict[str, Any]) -> dict[str, str]:
    from gpunode.core import desired

    return desired.vllm_environment(node["vllm"], service)


def service_start_after(service: dict[str, Any], node: dict[str, Any]) -> list[str]:
    from gpunode.core import desired

    return desired.start_after(node["vllm"], service)


FILTERS = {
    "node_sysctls": node_sysctls,
    "node_sysctl_reasons": node_sysctl_reasons,
    "node_block_kernels": node_block_kernels,
    "node_cuda_repo_line": node_cuda_repo_line,
    "node_ctk_repo_line": node_ctk_repo_line,
    "node_debian_contrib_source": node_debian_contrib_source,
    "node_driver_preferences": node_driver_preferences,
    "node_unattended_blacklist": node_unattended_blacklist,
    "node_tuning_profile": node_tuning_profile,
    "service_config": service_config,
    "service_environment": service_environment,
    "service_start_after": service_start_after,
    "sysctl_value": to_sysctl_value,
    "systemd_bool": to_systemd_bool,
    "yaml_block": to_yaml_block,
    "json_compact": to_json_compact,
    "env_quote": env_quote,
    "unit_word": unit_word,
    "pam_memlock": pam_memlock,
    "systemd_quote": systemd_quote,
}
