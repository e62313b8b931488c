"""DCGM 4: pinned packages, host engine running, dcgmi sees every GPU."""

from __future__ import annotations

import re

import pytest

from gpunode.checks import expect
from gpunode.core import desired


@pytest.fixture(autouse=True)
def _enabled(node):
    if not node.dcgm.enabled:
        pytest.skip("dcgm.enabled is false for this node")


def test_dcgm_packages(node, facts):
    problems = expect.package_problems(desired.dcgm_packages(node), facts.packages,
                                       facts.holds, hold=node.nvidia.hold)
    assert not problems, expect.explain("DCGM packages differ", problems)


def test_dcgmi_version(node, facts):
    res = facts.cmd("dcgmi_version")
    m = re.search(r"version:\s*(\S+)", res["out"])
    actual = m.group(1) if m else None
    assert actual == node.dcgm.version, (
        f"dcgmi reports version {actual}, expected {node.dcgm.version}")


def test_host_engine_running(facts):
    unit = facts.unit(expect.DCGM_UNIT)
    state = (unit.get("UnitFileState"), unit.get("ActiveState"))
    assert state == ("enabled", "active"), (
        f"{expect.DCGM_UNIT}: expected enabled/active, is {state[0]}/{state[1]}")


@pytest.mark.gpu
def test_dcgm_discovers_every_gpu(facts):
    assert facts.snap.smi_ok, "nvidia-smi fails, so the GPUs to expect are unknown"
    res = facts.cmd("dcgmi_discovery")
    missing = [g.uuid for g in facts.gpus if g.uuid not in res["out"]]
    assert res["rc"] == 0 and not missing, (
        f"dcgmi discovery -l (exit {res['rc']}) does not list GPU(s) {missing}: "
        f"{res['out'].strip()[:300]}")
