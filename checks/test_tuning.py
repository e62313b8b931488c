"""Host tuning: governor, NUMA balancing, THP, huge pages, sysctls, disks' I/O scheduler and
read-ahead, kernel arguments, limits, irqbalance kept off the pinned CPUs."""

from __future__ import annotations

import pytest

from gpunode.checks import expect
from gpunode.core import desired, paths, plan
from gpunode.core.files import banned_cpus


def test_cpu_governor(node, facts):
    """sysfs has the profile's governor, and the unit that sets it late in every boot (after
    what else sets governors) is enabled and has run."""
    want = node.tuning.governor
    if want is None:
        pytest.skip("the profile sets no CPU governor")
    unit = facts.unit(paths.CPU_GOVERNOR_UNIT)
    state = (unit.get("UnitFileState"), unit.get("ActiveState"))
    assert state == ("enabled", "active"), (
        f"{paths.CPU_GOVERNOR_UNIT}: expected enabled/active, is "
        f"{'/'.join(str(s) for s in state)}")
    data = facts.snap.data
    if not data["cpufreq"]:
        pytest.skip(f"no cpufreq on this host (virtualization: {data['virt']}): the governor "
                    "does not apply here, as VM guests have none")
    assert data["governors"] == [want], (
        f"CPU governor differs: expected {want}, host has {data['governors']}")


def test_numa_balancing(node, facts):
    want = "1" if node.numa_balancing else "0"
    actual = facts.snap.data["sysctl"].get("kernel.numa_balancing")
    assert actual == want, f"kernel.numa_balancing differs: expected {want}, host has {actual}"


def test_transparent_hugepages(node, facts):
    actual = facts.snap.data["thp"]
    want = {"enabled": node.tuning.thp, "defrag": node.tuning.thp_defrag}
    diff = expect.map_diff(want, actual)
    assert not diff, f"THP differs (expected, actual): {diff}"


def test_hugepages(node, facts):
    hp = node.tuning.hugepages
    size_kib = 2048 if hp.size == "2M" else 1048576
    pools = facts.snap.data["hugepages"]
    actual = pools.get(f"hugepages-{size_kib}kB")
    assert actual == hp.count, (
        f"{hp.size} huge pages differ: expected {hp.count} reserved, host has {actual}")


def test_block_io(node, facts):
    """Each whole disk of a class gpunode tunes (NVMe, sd/vd/xvd) has the profile's I/O
    scheduler and read-ahead, read from sysfs; a scheduler the kernel does not offer for a
    disk is a failure too (the deploy cannot set it)."""
    if not node.tuning.block_io.enabled:
        pytest.skip("tuning.block_io.enabled is false")
    wrong = []
    for dev, setting, have, want, offered in plan.block_mismatches(node, facts.snap.data):
        if setting == "scheduler":
            wrong.append(f"{dev}: I/O scheduler {have}, expected {want} "
                         f"(the kernel offers: {', '.join(offered) or 'none listed'})")
        else:
            wrong.append(f"{dev}: read-ahead {have} KiB, expected {want}")
    assert not wrong, "; ".join(wrong)


def test_sysctls(node, facts):
    """Every sysctl gpunode sets, compared as one map."""
    want = {k: expect.normalize_sysctl(v) for k, v in desired.sysctls(node).items()}
    actual = {k: expect.normalize_sysctl(v) for k, v in facts.snap.data["sysctl"].items()}
    diff = expect.map_diff(want, actual)
    assert not diff, f"sysctl differ (expected, actual): {diff}"


def test_kernel_arguments(node, facts):
    missing = desired.missing_kernel_args(node, facts.snap.data["cmdline"],
                                          facts.snap.thp_default)
    assert not missing, (f"kernel command line lacks {missing} (it is "
                         f"{facts.snap.data['cmdline']!r}); reboot after the deploy")


def test_vllm_unit_limits(node, facts):
    if not node.vllm.services:
        pytest.skip("no vLLM services on this node")
    want = {"LimitNOFILE": str(node.tuning.limits.nofile),
            "LimitMEMLOCK": str(node.tuning.limits.memlock)}
    diff = {}
    for unit in desired.vllm_units(node):
        props = facts.unit(unit)
        d = expect.map_diff(want, {k: props.get(k) for k in want})
        if d:
            diff[unit] = d
    assert not diff, f"unit limits differ (expected, actual): {diff}"


@pytest.mark.gpu
def test_irqbalance_avoids_service_cpus(node, facts):
    if node.tuning.irqbalance != "ban-service-cpus":
        pytest.skip(f"tuning.irqbalance is {node.tuning.irqbalance}")
    try:
        cpus = banned_cpus(node, facts.gpus)
    except ValueError as exc:
        pytest.fail(f"cannot compute the pinned service CPUs from the host's GPUs: {exc}",
                    pytrace=False)
    if not cpus:
        pytest.skip("no CPUs to keep interrupts off (none pinned, or the services cover "
                    "every CPU, where a ban would leave interrupts nowhere)")
    unit = facts.unit(expect.IRQBALANCE_UNIT)
    want = f"IRQBALANCE_BANNED_CPULIST={cpus}"
    problems = []
    if unit.get("ActiveState") != "active":
        problems.append(f"{expect.IRQBALANCE_UNIT} is {unit.get('ActiveState')}, expected active")
    if want not in unit.get("Environment", "").split():
        problems.append(f"its environment lacks {want} (has {unit.get('Environment')!r})")
    assert not problems, expect.explain("irqbalance differs", problems)


def test_tuning_files_match(node, facts):
    problems = facts.file_problems("tuning")
    assert not problems, expect.explain("tuning files differ from the profile", problems)
