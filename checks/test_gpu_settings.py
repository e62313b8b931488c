"""GPUs: count, model, UUIDs, PCI addresses, memory, settings as configured, PCIe link,
NUMA locality, and the unit that applies the settings at boot."""

from __future__ import annotations

import pytest

from gpunode.checks import expect
from gpunode.core import desired, paths

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpus(node, facts):
    if node.gpus.count == 0:  # module fixtures run before the per-test skip
        pytest.skip("the profile expects no GPUs (gpus.count is 0)")
    if not facts.snap.smi_ok:
        error = facts.snap.data["nvidia_smi"].get("error") or "not installed"
        pytest.fail(f"nvidia-smi fails: {error}", pytrace=False)
    return facts.gpus


def test_gpu_count(node, gpus):
    assert len(gpus) == node.gpus.count, (
        f"GPU count differs: expected {node.gpus.count}, nvidia-smi lists {len(gpus)}")


def test_gpu_model(node, gpus):
    wrong = {g.index: g.name for g in gpus if g.name != node.gpus.model}
    assert not wrong, f"GPU model differs: expected {node.gpus.model!r}, found {wrong}"


def test_gpu_uuids(node, gpus):
    if not node.gpus.uuids:
        pytest.skip("the profile lists no GPU UUIDs (gpus.uuids)")
    actual = [g.uuid for g in sorted(gpus, key=lambda g: g.index)]
    assert actual == node.gpus.uuids, (
        f"GPU UUIDs differ (index order): expected {node.gpus.uuids}, found {actual}")


def test_gpu_pci_addresses(node, gpus):
    if not node.gpus.pci_addresses:
        pytest.skip("the profile lists no GPU PCI addresses (gpus.pci_addresses)")
    actual = [g.pci_address for g in sorted(gpus, key=lambda g: g.index)]
    want = [a if "." in a else f"{a}.0" for a in node.gpus.pci_addresses]
    assert actual == want, f"GPU PCI addresses differ: expected {want}, found {actual}"


def test_gpu_memory(node, gpus):
    wrong = {}
    for g in gpus:
        ecc_on = g.values.get("ecc.mode.current") == "Enabled"
        want = expect.expected_memory_mib(g.name, ecc_on)
        if (want is not None and g.memory_mib != want) or not g.memory_mib:
            wrong[g.index] = (want, g.memory_mib)
    assert not wrong, f"GPU memory.total differs (expected MiB, actual MiB): {wrong}"


def test_gpu_settings_as_configured(node, gpus):
    """Persistence, power limit, compute mode, ECC (pending: applied at the next reboot,
    which test_base's reboot check reports) and application clocks, compared by the same
    function the deploy uses."""
    drift = desired.gpu_settings_drift(node, gpus)
    assert not drift, expect.explain("GPU settings differ from the profile", drift)


def test_pcie_link(node, facts, gpus):
    """Full-width link, and the generation/width the GPU model supports."""
    res = facts.cmd("pcie")
    assert res["rc"] == 0, f"nvidia-smi PCIe query failed: {res['err'].strip()}"
    want = expect.PCIE_LINK.get(node.gpus.model)
    problems = []
    for line in res["out"].splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 4:
            continue
        index, gen_max, width_max, width_now = cells
        if width_now != width_max:
            problems.append(f"GPU {index}: link trained at x{width_now}, GPU supports "
                            f"x{width_max}")
        if want and (gen_max, width_max) != (str(want[0]), str(want[1])):
            problems.append(f"GPU {index}: PCIe Gen{gen_max} x{width_max}, expected "
                            f"Gen{want[0]} x{want[1]} for {node.gpus.model}")
    assert not problems, expect.explain("PCIe link differs", problems)


def test_numa_affinity_known(gpus):
    unknown = [g.index for g in gpus if not g.cpus or g.numa_node is None]
    assert not unknown, (f"GPU(s) {unknown}: nvidia-smi topo -m reports no CPU/NUMA affinity, "
                         "so services cannot be placed on GPU-local CPUs")


def test_gpu_settings_unit(facts):
    unit = facts.unit(expect.GPU_SETTINGS_UNIT)
    state = (unit.get("UnitFileState"), unit.get("ActiveState"), unit.get("Result"))
    assert state == ("enabled", "active", "success"), (
        f"{expect.GPU_SETTINGS_UNIT}: expected enabled/active/success, is "
        f"{'/'.join(str(s) for s in state)}")


def test_uvm_device_nodes(facts):
    """CUDA needs /dev/nvidia-uvm{,-tools}; the GPU settings unit creates them at boot
    (nvidia-modprobe -u -c=0) from the nvidia-uvm module that modules-load.d loads."""
    nodes = facts.extra.get("char_devices", {})
    wrong = {p: "absent" if nodes.get(p) is None else "not a character device"
             for p in desired.UVM_DEVICES if not nodes.get(p)}
    assert not wrong, (f"NVIDIA unified memory device nodes missing: {wrong}; CUDA fails with "
                       f"'CUDA unknown error' (check {paths.MODULES_LOAD} and "
                       f"{expect.GPU_SETTINGS_UNIT})")


def test_gpu_settings_files_match(node, facts):
    problems = facts.file_problems("gpu_settings")
    assert not problems, expect.explain("GPU settings files differ from the profile", problems)
