"""The checks' parsers against the lab's SIMULATED NVIDIA tools (run here on a temporary
GPUNODE_SIM_ROOT, as tests/unit/test_sim_nvidia_smi.py does): what the checks read from a
lab VM parses into the values the lab profile expects, and a changed setting shows up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpunode.checks import expect
from gpunode.core import desired, paths
from gpunode.core.files import placements
from gpunode.core.topology import NVIDIA_SMI_QUERY, attach_topology, parse_query_gpu, parse_topo
from gpunode.inventory import load_site
from gpunode.lab.sim import gpus as simgpus

REPO = Path(__file__).resolve().parents[2]
GUEST = REPO / "src" / "gpunode" / "lab" / "sim" / "guest"
DRIVER = "580.95.05"


class SimHost:
    """A simulated lab guest under a temporary root (SIMULATION)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, rel: str, text: str) -> None:
        path = self.root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def read(self, rel: str) -> str:
        return (self.root / rel.lstrip("/")).read_text()

    def run(self, command: str) -> str:
        tool, *args = command.split()
        res = subprocess.run([sys.executable, str(GUEST / tool), *args], capture_output=True,
                             text=True, timeout=60,
                             env={**os.environ, "GPUNODE_SIM_ROOT": str(self.root)})
        assert res.returncode == 0, f"{command}: {res.stderr}"
        return res.stdout


@pytest.fixture
def profile():
    return load_site(REPO / "inventory" / "examples" / "lab.yaml").nodes["labgpu1"]


@pytest.fixture
def sim(tmp_path) -> SimHost:
    host = SimHost(tmp_path)
    host.write("/etc/gpunode-sim/gpus.json", simgpus.to_json(simgpus.default_a6000x2()))
    host.write("/sys/devices/system/node/node0/cpulist", "0\n")
    host.write("/sys/devices/system/node/node1/cpulist", "1\n")
    for component, value in (("driver", DRIVER), ("kmod", f"{DRIVER} open"), ("ctk", "1.18.1"),
                             ("dcgm", "4.4.2"), ("cuda", "13.0.88")):
        host.write(f"/usr/lib/gpunode-sim/installed/{component}", value + "\n")
    host.write("/etc/modprobe.d/blacklist-nouveau.conf", "blacklist nouveau\n")
    res = subprocess.run([sys.executable, str(GUEST / "gpunode-sim-boot")], capture_output=True,
                         text=True, env={**os.environ, "GPUNODE_SIM_ROOT": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    return host


def _gpus(sim: SimHost):
    gpus = parse_query_gpu(sim.run(NVIDIA_SMI_QUERY))
    return attach_topology(gpus, parse_topo(sim.run("nvidia-smi topo -m")))


def test_gpu_identity_memory_and_locality(sim, profile):
    gpus = _gpus(sim)
    assert len(gpus) == profile.gpus.count
    assert {g.name for g in gpus} == {profile.gpus.model}
    assert {g.memory_mib for g in gpus} == {expect.expected_memory_mib(profile.gpus.model, False)}
    assert all(g.cpus and g.numa_node is not None for g in gpus)  # NUMA affinity known
    where = placements(profile, gpus)["tiny"]
    assert where.cpu_list == "0-1"
    assert expect.expected_numa_policy(where) == "interleave:0-1"


def test_pcie_query_parses_to_the_models_link(sim, profile):
    rows = [[c.strip() for c in line.split(",")] for line in
            sim.run(expect.PCIE_QUERY).splitlines() if line.strip()]
    gen, width = expect.PCIE_LINK[profile.gpus.model]
    assert rows == [[str(i), str(gen), str(width), str(width)] for i in range(len(rows))]


def test_loaded_module_version_and_flavour(sim):
    text = sim.read("/proc/driver/nvidia/version")
    assert expect.proc_driver_version(text) == DRIVER
    assert expect.proc_driver_flavour(text) == "open"


def test_gpu_settings_drift_flips_with_a_setting(sim, profile):
    """The check's comparison (desired.gpu_settings_drift) sees the power limit change."""
    limit = profile.nvidia.settings.power_limit_w
    for g in _gpus(sim):
        sim.run(f"nvidia-smi -i {g.index} -pm 1")
        sim.run(f"nvidia-smi -i {g.index} -pl {limit}")
    assert desired.gpu_settings_drift(profile, _gpus(sim)) == []
    sim.run(f"nvidia-smi -i 1 -pl {limit + 10}")
    drift = desired.gpu_settings_drift(profile, _gpus(sim))
    assert len(drift) == 1 and drift[0].startswith("GPU 1: power limit")


def test_cdi_list_names_every_gpu(sim):
    sim.run("nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml")
    listed = expect.parse_cdi_list(sim.run("nvidia-ctk cdi list"))
    gpus = _gpus(sim)
    assert [n for n in expect.expected_cdi_devices(gpus) if n not in listed] == []


def test_dcgm_and_cuda_versions(sim, profile):
    assert re.search(r"version:\s*(\S+)", sim.run("dcgmi --version")).group(1) == \
        profile.dcgm.version
    # the simulated host engine is "running" when its record names a live process
    sim.write("/run/gpunode-sim/hostengine.json", f'{{"pid": {os.getpid()}}}')
    discovery = sim.run("dcgmi discovery -l")
    assert all(g.uuid in discovery for g in _gpus(sim))
    nvcc = sim.run("nvcc --version")
    assert re.search(r"release (\d+\.\d+)", nvcc).group(1) == profile.cuda.version
    ctk = re.search(r"version (\S+)", sim.run("nvidia-ctk --version")).group(1)
    assert ctk == "1.18.1"


def test_containerd_counts_as_configured_only_when_its_config_imports_the_nvidia_drop_in(sim):
    """toolkit 1.18 writes containerd's nvidia runtime into a drop-in; the check proves the
    drop-in defines it and that containerd's config.toml imports it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ctk_checks", REPO / "checks" /
                                                  "test_container_toolkit.py")
    assert spec is not None and spec.loader is not None
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)

    class Facts:
        def content(self, path):
            f = sim.root / path.lstrip("/")
            return f.read_text() if f.exists() else None

    sim.write(paths.CONTAINERD_CONFIG, "version = 2\n")
    sim.run("nvidia-ctk runtime configure --runtime=containerd")
    drop_in = paths.RUNTIME_CONFIG["containerd"]
    assert checks._containerd_imports(Facts(), drop_in) == []
    sim.write(paths.CONTAINERD_CONFIG, "version = 2\n")  # imports removed by hand
    assert checks._containerd_imports(Facts(), drop_in) == [
        f"containerd: {paths.CONTAINERD_CONFIG} does not import {drop_in} (imports: [])"]
