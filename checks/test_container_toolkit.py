"""NVIDIA Container Toolkit: pinned packages, runtimes configured, CDI spec lists every GPU."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib

import pytest

from gpunode.checks import expect
from gpunode.core import desired, paths


@pytest.fixture(autouse=True)
def _enabled(node):
    if not node.container_toolkit.enabled:
        pytest.skip("container_toolkit.enabled is false for this node")


def test_toolkit_packages(node, facts):
    problems = expect.package_problems(desired.container_toolkit_packages(node), facts.packages,
                                       facts.holds, hold=node.nvidia.hold)
    assert not problems, expect.explain("container toolkit packages differ", problems)


def test_toolkit_cli_version(node, facts):
    res = facts.cmd("ctk_version")
    m = re.search(r"version (\S+)", res["out"])
    actual = m.group(1) if m else None
    assert actual == node.container_toolkit.version, (
        f"nvidia-ctk reports version {actual}, expected {node.container_toolkit.version} "
        f"({res['err'].strip() or res['out'].strip()[:200]})")


def _has_nvidia_runtime(data: object) -> bool:
    """A `runtimes` table with an `nvidia` entry anywhere in a parsed config."""
    if isinstance(data, dict):
        runtimes = data.get("runtimes")
        if isinstance(runtimes, dict) and "nvidia" in runtimes:
            return True
        return any(_has_nvidia_runtime(v) for v in data.values())
    return False


def _containerd_imports(facts, drop_in: str) -> list[str]:
    """containerd reads the nvidia drop-in only when its config.toml imports it."""
    top = paths.CONTAINERD_CONFIG
    text = facts.content(top)
    try:
        imports = tomllib.loads(text or "").get("imports", [])
    except tomllib.TOMLDecodeError as exc:
        return [f"containerd: {top} does not parse: {exc}"]
    if not any(fnmatch.fnmatch(drop_in, pattern) for pattern in imports):
        return [f"containerd: {top} does not import {drop_in} (imports: {imports})"]
    return []


def test_runtimes_configured(node, facts):
    problems = []
    for runtime in node.container_toolkit.runtimes:
        path = expect.RUNTIME_CONFIG.get(runtime)
        if path is None:  # podman: CDI only
            continue
        text = facts.content(path)
        if text is None:
            problems.append(f"{runtime}: {path} is missing")
            continue
        try:
            data = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            problems.append(f"{runtime}: {path} does not parse: {exc}")
            continue
        if not _has_nvidia_runtime(data):
            problems.append(f"{runtime}: {path} defines no 'nvidia' runtime")
        if runtime == "containerd":
            problems += _containerd_imports(facts, path)
    assert not problems, expect.explain("container runtimes not configured", problems)


@pytest.mark.gpu
def test_cdi_spec_lists_every_gpu(node, facts):
    if not node.container_toolkit.cdi:
        pytest.skip("container_toolkit.cdi is false for this node")
    assert facts.snap.smi_ok, "nvidia-smi fails, so the GPUs to expect are unknown"
    res = facts.cmd("cdi_list")
    problems = expect.cdi_problems(node, facts.gpus, facts.content(desired.cdi_spec(node)),
                                   expect.parse_cdi_list(res["out"]))
    assert not problems, expect.explain("CDI spec differs", problems)


def test_cdi_refresh_units(node, facts):
    units = desired.cdi_refresh_units(node)
    if not units:
        pytest.skip("no CDI refresh units: cdi is off or the toolkit is older than 1.18")
    state = {u: (facts.unit(u).get("UnitFileState"), facts.unit(u).get("ActiveState"))
             for u in units}
    path, service = state[desired.CDI_REFRESH_PATH], state[desired.CDI_REFRESH_SERVICE]
    assert path == ("enabled", "active") and service[0] == "enabled", (
        f"CDI refresh units (UnitFileState, ActiveState): {state}; expected the .path unit "
        "enabled and active, the .service enabled")


def test_container_toolkit_files_match(node, facts):
    problems = facts.file_problems("container_toolkit")
    assert not problems, expect.explain("container toolkit files differ", problems)
