"""Simulated NVIDIA guest tools (SIMULATION) run on this host against a temp GPUNODE_SIM_ROOT.

Formats are compared with the real capture in tests/fixtures/nvidia/h100_580.159.04/ by
describing that very H100 to the simulator and diffing the outputs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpunode.core import paths
from gpunode.lab.sim import gpus as simgpus
from gpunode.lab.sim import guest

REPO = Path(__file__).resolve().parents[2]
GUEST = REPO / "src/gpunode/lab/sim/guest"
FIX = REPO / "tests/fixtures/nvidia/h100_580.159.04"
CAPTURE_FIELDS = re.search(r"^FIELDS=(\S+)", (FIX.parent / "capture.sh").read_text(), re.M)
assert CAPTURE_FIELDS
FIELDS = CAPTURE_FIELDS.group(1)


def fixture(name: str) -> tuple[str, int]:
    """(output, exit code) of one capture file (the capture appends `__rc=N`)."""
    text = (FIX / name).read_text()
    m = re.search(r"__rc=(\d+)\n?$", text)
    assert m, name
    return text[: m.start()], int(m.group(1))


class Guest:
    def __init__(self, root: Path) -> None:
        self.root = root

    def run(self, tool: str, *args: str, env: dict[str, str] | None = None):
        e = dict(os.environ, GPUNODE_SIM_ROOT=str(self.root))
        e.update(env or {})
        return subprocess.run(
            [sys.executable, str(GUEST / tool), *args],
            capture_output=True,
            text=True,
            env=e,
            timeout=30,
        )

    def smi(self, *args: str):
        return self.run("nvidia-smi", *args)

    def write(self, rel: str, text: str) -> None:
        p = self.root / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def read(self, rel: str) -> str:
        return (self.root / rel.lstrip("/")).read_text()

    def install(self, driver: str = "580.95.05", flavour: str = "open") -> None:
        self.write("/usr/lib/gpunode-sim/installed/driver", driver + "\n")
        self.write("/usr/lib/gpunode-sim/installed/kmod", f"{driver} {flavour}\n")
        self.write("/etc/modprobe.d/nvidia-blacklists-nouveau.conf", "blacklist nouveau\n")

    def boot(self) -> str:
        r = self.run("gpunode-sim-boot")
        assert r.returncode == 0, r.stderr
        return r.stdout

    def state(self) -> dict:
        return json.loads(self.read("/var/lib/gpunode-sim/state.json"))


def _h100() -> simgpus.GpuSpec:
    return simgpus.GpuSpec(
        index=0,
        uuid="GPU-3f7d6e7f-bafc-d33b-65bd-affad9270b29",
        serial="1652924077958",
        pci_bus_id="00000000:00:06.0",
        numa_node=0,
        model=simgpus.H100_80GB_HBM3,
        readings=simgpus.Readings(
            temperature_c=36,
            power_draw_w=123.86,
            pstate="P0",
            utilization_percent=0,
            memory_used_mib=0,
            pcie_gen_current=5,
            clock_graphics=1980,
            clock_sm=1980,
            clock_memory=2619,
            clock_video=1545,
        ),
    )


@pytest.fixture
def a6000(tmp_path: Path) -> Guest:
    g = Guest(tmp_path)
    g.write("/etc/gpunode-sim/gpus.json", simgpus.to_json(simgpus.default_a6000x2()))
    g.write("/sys/devices/system/node/node0/cpulist", "0\n")
    g.write("/sys/devices/system/node/node1/cpulist", "1\n")
    g.install()
    g.boot()
    return g


@pytest.fixture
def h100(tmp_path: Path) -> Guest:
    """The captured H100 machine: 580.159.04 open module, 16 CPUs on one node, pm on."""
    g = Guest(tmp_path)
    g.write("/etc/gpunode-sim/gpus.json", simgpus.to_json([_h100()]))
    g.write("/sys/devices/system/node/node0/cpulist", "0-15\n")
    g.install("580.159.04")
    g.boot()
    assert g.smi("-pm", "1").returncode == 0
    return g


# ----------------------------------------------------------------- against the capture


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("L.txt", ["-L"]),
        ("L_bad_index.txt", ["-i", "7", "-L"]),
        ("query_bad_index.txt", ["-i", "7", "--query-gpu=index", "--format=csv"]),
        ("query_bogus_field.txt", ["--query-gpu=index,bogus.field", "--format=csv"]),
        ("query_csv.txt", [f"--query-gpu={FIELDS}", "--format=csv"]),
        ("query_csv_noheader.txt", [f"--query-gpu={FIELDS}", "--format=csv,noheader"]),
        ("query_csv_nounits.txt", [f"--query-gpu={FIELDS}", "--format=csv,nounits"]),
        (
            "query_csv_noheader_nounits.txt",
            [f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits"],
        ),
        ("topo_m.txt", ["topo", "-m"]),
        ("version.txt", ["--version"]),
    ],
)
def test_output_equals_real_capture(h100: Guest, name: str, args: list[str]) -> None:
    want, rc = fixture(name)
    r = h100.smi(*args)
    assert r.stdout == want
    assert r.returncode == rc


def test_default_table_equals_capture_except_timestamp(h100: Guest) -> None:
    want, _ = fixture("plain.txt")
    got = h100.smi().stdout
    w, g = want.splitlines(), got.splitlines()
    assert re.fullmatch(r"\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}       ", g[0])
    assert g[1:] == w[1:]


def _keys(text: str) -> list[tuple[int, str]]:
    """(indent, key) of every -q line, checking the 55-column key layout on the way."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("="):
            continue
        if ": " in line and len(line) > 55 and line[55:57] == ": ":
            key = line[:55].rstrip()
        else:
            assert ":" not in line[:55] or line.startswith("GPU "), line
            key = line
        out.append((len(key) - len(key.lstrip()), key.strip()))
    return out


def test_q_key_layout_equals_capture(h100: Guest) -> None:
    want, _ = fixture("q.txt")
    got = h100.smi("-q").stdout
    assert _keys(got) == _keys(want)
    assert got.startswith("\n==============NVSMI LOG==============\n\nTimestamp ")
    assert got.endswith("        EGM                                            : disabled\n\n")
    for line in ("GPU Memory Power Readings ", "Driver Version", "CUDA Version", "Bus Id"):
        assert line in got
    # values the simulator takes from the description match the capture
    for key in ("Product Name", "GPU UUID", "Serial Number", "Device Id", "Sub System Id"):
        assert (
            re.search(rf"^ *{key} +: (.*)$", got, re.M)[1]
            == re.search(  # type: ignore[index]
                rf"^ *{key} +: (.*)$", want, re.M
            )[1]
        )  # type: ignore[index]


def test_q_display_sections_equal_capture(h100: Guest) -> None:
    want, _ = fixture("q_ecc_power_clock.txt")
    got = h100.smi("-q", "-d", "ECC,POWER,CLOCK,PERFORMANCE,COMPUTE").stdout
    assert _keys(got) == _keys(want)


def test_help_query_gpu_knows_every_simulated_field() -> None:
    real = set(re.findall(r'"([^"]+)"', (FIX / "help_query_gpu.txt").read_text()))
    smi = _load_smi()
    missing = sorted(n for n in [*smi.FIELDS, *smi.ALIASES] if n not in real)
    assert missing == []


def _load_smi():
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("sim_nvidia_smi", str(GUEST / "nvidia-smi"))
    spec = importlib.util.spec_from_loader("sim_nvidia_smi", loader)
    assert spec
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------- the A6000 lab machine


def test_a6000_csv_and_list(a6000: Guest) -> None:
    r = a6000.smi(
        "--query-gpu=index,name,pci.device_id,pci.bus_id,memory.total,power.limit,"
        "power.min_limit,ecc.mode.current,mig.mode.current,pcie.link.gen.max,"
        "pcie.link.width.max,persistence_mode,compute_mode,driver_version",
        "--format=csv,noheader",
    )
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0] == (
        "0, NVIDIA RTX A6000, 0x223010DE, 00000000:01:00.0, 49140 MiB, 300.00 W, 100.00 W, "
        "Disabled, [N/A], 4, 16, Disabled, Default, 580.95.05"
    )
    assert lines[1].startswith("1, NVIDIA RTX A6000, 0x223010DE, 00000000:02:00.0")
    listing = a6000.smi("-L").stdout.splitlines()
    assert len(listing) == 2
    for i, line in enumerate(listing):
        assert re.fullmatch(
            rf"GPU {i}: NVIDIA RTX A6000 \(UUID: GPU-[0-9a-f]{{8}}(-[0-9a-f]{{4}}){{3}}-[0-9a-f]{{12}}\)",
            line,
        )
    uuid1 = listing[1].split("UUID: ")[1].rstrip(")")
    for sel in ("1", uuid1, "00000000:02:00.0", "02:00.0"):
        out = a6000.smi("-i", sel, "--query-gpu=index", "--format=csv,noheader").stdout
        assert out == "1\n"


def test_a6000_topology_two_numa_nodes(a6000: Guest) -> None:
    lines = a6000.smi("topo", "-m").stdout.splitlines()
    assert lines[0] == "\t\x1b[4mGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m"
    assert lines[1] == "GPU0\t X \tSYS\t0\t0\t\tN/A"
    assert lines[2] == "GPU1\tSYS\t X \t1\t1\t\tN/A"


def test_setters_persist_and_reboot_resets_volatile_settings(a6000: Guest) -> None:
    r = a6000.smi("-pm", "1")
    assert r.stdout == (
        "Enabled Legacy persistence mode for GPU 00000000:01:00.0.\n"
        "Enabled Legacy persistence mode for GPU 00000000:02:00.0.\nAll done.\n"
    )
    assert a6000.smi("-pm", "1").stdout.startswith("Persistence mode is already Enabled")
    r = a6000.smi("-i", "0", "-pl", "250")
    assert r.stdout == (
        "Power limit for GPU 00000000:01:00.0 was set to 250.00 W from 300.00 W.\nAll done.\n"
    )
    r = a6000.smi("-lgc", "1400,1800")
    assert r.returncode == 0
    assert 'GPU clocks set to "(gpuClkMin 1400, gpuClkMax 1800)" for GPU 00000000:01:00.0' in (r.stdout)
    assert a6000.smi("-c", "EXCLUSIVE_PROCESS").stdout.startswith(
        "Set compute mode to EXCLUSIVE_PROCESS for GPU 00000000:01:00.0.\n"
    )
    q = "--query-gpu=persistence_mode,power.limit,enforced.power.limit,compute_mode"
    out = a6000.smi(q, "--format=csv,noheader").stdout.splitlines()
    assert out == [
        "Enabled, 250.00 W, 250.00 W, Exclusive_Process",
        "Enabled, 300.00 W, 300.00 W, Exclusive_Process",
    ]
    table = a6000.smi().stdout
    assert "|   0  NVIDIA RTX A6000               On  |   00000000:01:00.0 Off |" in table
    assert "250W /  250W" not in table and " /  250W |" in table
    assert "   E. Process |" in table
    a6000.boot()  # reboot
    out = a6000.smi(q, "--format=csv,noheader").stdout.splitlines()
    assert out == ["Disabled, 300.00 W, 300.00 W, Default"] * 2
    assert all(v["locked_clocks"] is None for v in a6000.state()["gpus"].values())


def test_power_limit_range_error(a6000: Guest) -> None:
    r = a6000.smi("-pl", "350")
    assert r.returncode == 2
    assert r.stdout == (
        "Provided power limit 350.00 W is not a valid power limit which should be between "
        "100.00 W and 300.00 W for GPU 00000000:01:00.0\nTerminating early due to previous errors.\n"
    )
    q = a6000.smi("--query-gpu=power.limit", "--format=csv,noheader,nounits")
    assert q.stdout == "300.00\n300.00\n"


def test_ecc_is_pending_until_reboot(a6000: Guest) -> None:
    r = a6000.smi("-e", "1")
    assert r.stdout.endswith("All done.\nReboot required.\n")
    assert "Enabled ECC support for GPU 00000000:02:00.0.\n" in r.stdout
    q = ("--query-gpu=ecc.mode.current,ecc.mode.pending,memory.total", "--format=csv,noheader")
    assert a6000.smi(*q).stdout == "Disabled, Enabled, 49140 MiB\n" * 2
    qd = a6000.smi("-i", "0", "-q", "-d", "ECC").stdout
    assert re.search(r"Current +: Disabled\n +Pending +: Enabled", qd)
    a6000.boot()
    assert a6000.smi(*q).stdout == "Enabled, Enabled, 46068 MiB\n" * 2
    assert "|                    0 |" in a6000.smi().stdout


def test_driver_not_loaded_and_mismatch(tmp_path: Path) -> None:
    g = Guest(tmp_path)
    g.write("/etc/gpunode-sim/gpus.json", simgpus.to_json(simgpus.default_a6000x2()))
    g.install("580.95.05")
    r = g.smi()
    assert (r.returncode, r.stdout) == (
        9,
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
        "Make sure that the latest NVIDIA driver is installed and running.\n",
    )
    g.boot()
    assert g.smi("-L").returncode == 0
    g.install("580.105.08")  # package upgrade without reboot
    r = g.smi("-L")
    assert (r.returncode, r.stdout) == (
        18,
        "Failed to initialize NVML: Driver/library version mismatch\nNVML library version: 580.105\n",
    )
    g.boot()
    assert g.smi("--version").stdout.splitlines()[0] == "NVIDIA-SMI version  : 580.105.08"


def test_nouveau_blocks_the_module(tmp_path: Path) -> None:
    g = Guest(tmp_path)
    g.write("/etc/gpunode-sim/gpus.json", simgpus.to_json(simgpus.default_a6000x2()))
    g.install()
    (tmp_path / "etc/modprobe.d/nvidia-blacklists-nouveau.conf").unlink()
    assert "nouveau" in g.boot()
    assert g.smi().returncode == 9
    g.write("/etc/modprobe.d/blacklist-nouveau.conf", "blacklist nouveau\noptions nouveau modeset=0\n")
    g.boot()
    assert g.smi().returncode == 0


def test_boot_writes_proc_version_and_device_nodes(a6000: Guest) -> None:
    text = a6000.read("/proc/driver/nvidia/version")
    assert re.fullmatch(
        r"NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580\.95\.05  Release Build  "
        r"\(\S+@\S+\)  \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d UTC \d{4}\nGCC version:  gcc version .* \n",
        text,
    )
    for dev in ("nvidia0", "nvidia1", "nvidiactl"):
        assert (a6000.root / "dev" / dev).exists()
    a6000.install("580.95.05", "proprietary")
    a6000.boot()
    assert a6000.read("/proc/driver/nvidia/version").startswith(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05  "
    )


def test_persistenced_enables_persistence_while_running(a6000: Guest) -> None:
    v = a6000.run("nvidia-persistenced", "--version")
    assert v.stdout == fixture("ctk.txt")[0].replace("580.159.04", "580.95.05")
    q = ("--query-gpu=persistence_mode", "--format=csv,noheader")
    env = {"GPUNODE_SIM_FOREGROUND": "1"}
    for flags, expect in (([], "Enabled"), (["--no-persistence-mode"], "Disabled")):
        p = subprocess.Popen(
            [sys.executable, str(GUEST / "nvidia-persistenced"), "--user", "root", *flags],
            env=dict(os.environ, GPUNODE_SIM_ROOT=str(a6000.root), **env),
        )
        try:
            pidfile = a6000.root / "var/run/nvidia-persistenced/nvidia-persistenced.pid"
            for _ in range(100):
                if pidfile.exists():
                    break
                time.sleep(0.05)
            assert a6000.smi(*q).stdout == f"{expect}\n" * 2
        finally:
            p.terminate()
            p.wait(10)
        assert a6000.smi(*q).stdout == "Disabled\n" * 2
    bad = a6000.run("nvidia-persistenced", "--user", "no-such-user-xyz")
    assert bad.returncode == 1


def test_nvcc_version_equals_capture(a6000: Guest) -> None:
    a6000.write("/usr/lib/gpunode-sim/installed/cuda", "13.0.88\n")
    assert a6000.run("nvcc", "--version").stdout == fixture("nvcc_version.txt")[0]


def test_nccl_header_macros_match_capture() -> None:
    want = [ln for ln in fixture("nccl.txt")[0].splitlines() if ln.startswith("#define")][:5]
    files = guest.nccl_files("2.28.3")
    header = files["libnccl-dev"]["/usr/include/nccl.h"]
    got = [
        ln
        for ln in header.splitlines()
        if re.match(r"#define NCCL_(MAJOR|MINOR|PATCH|SUFFIX|VERSION_CODE) ", ln)
    ]
    assert got == want
    assert files["libnccl2"]["/usr/lib/x86_64-linux-gnu/libnccl.so.2"] == "symlink:libnccl.so.2.28.3"


def test_ctk_runtime_configure_and_cdi(a6000: Guest) -> None:
    a6000.write("/etc/docker/daemon.json", '{"log-driver": "journald"}\n')
    r = a6000.run("nvidia-ctk", "runtime", "configure", "--runtime=docker", "--set-as-default")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(a6000.read("/etc/docker/daemon.json"))
    assert cfg == {
        "log-driver": "journald",
        "default-runtime": "nvidia",
        "runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}},
    }
    a6000.write(
        "/etc/containerd/config.toml",
        'version = 2\n\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "overlayfs"\n',
    )
    r = a6000.run("nvidia-ctk", "runtime", "configure", "--runtime=containerd", "--set-as-default")
    assert r.returncode == 0, r.stderr
    import tomllib

    # toolkit 1.18: the runtime goes into a drop-in, which the main config imports
    top = tomllib.loads(a6000.read("/etc/containerd/config.toml"))
    assert top["imports"] == ["/etc/containerd/conf.d/*.toml"]
    assert top["plugins"]["io.containerd.grpc.v1.cri"]["containerd"] == {"snapshotter": "overlayfs"}
    doc = tomllib.loads(a6000.read("/etc/containerd/conf.d/99-nvidia.toml"))
    ctd = doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert ctd["default_runtime_name"] == "nvidia"
    assert ctd["runtimes"]["nvidia"]["options"]["BinaryName"] == "/usr/bin/nvidia-container-runtime"
    again = a6000.run("nvidia-ctk", "runtime", "configure", "--runtime=containerd")
    assert again.returncode == 0 and tomllib.loads(
        a6000.read("/etc/containerd/config.toml"))["imports"] == ["/etc/containerd/conf.d/*.toml"]
    r = a6000.run("nvidia-ctk", "runtime", "configure", "--runtime=crio")
    assert r.returncode == 0, r.stderr
    assert "runtime_path" in a6000.read("/etc/crio/conf.d/99-nvidia.toml")
    assert not (a6000.root / "etc/crio/crio.conf").exists()  # the main file is left alone
    r = a6000.run("nvidia-ctk", "cdi", "generate", "--output=/etc/cdi/nvidia.yaml")
    assert r.returncode == 0, r.stderr
    listed = a6000.run("nvidia-ctk", "cdi", "list").stdout.splitlines()
    uuids = [ln.split("UUID: ")[1].rstrip(")") for ln in a6000.smi("-L").stdout.splitlines()]
    assert listed == [
        "nvidia.com/gpu=0",
        "nvidia.com/gpu=1",
        f"nvidia.com/gpu={uuids[0]}",
        f"nvidia.com/gpu={uuids[1]}",
        "nvidia.com/gpu=all",
    ]


def test_dcgmi_discovery_needs_the_host_engine(a6000: Guest) -> None:
    assert a6000.run("dcgmi", "discovery", "-l").returncode == 255
    p = subprocess.Popen(
        [sys.executable, str(GUEST / "nv-hostengine"), "-n"],
        env=dict(os.environ, GPUNODE_SIM_ROOT=str(a6000.root)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        assert p.stdout.readline().startswith("Started host engine version ")
        for _ in range(100):
            if (a6000.root / "run/gpunode-sim/hostengine.json").exists():
                break
            time.sleep(0.05)
        out = a6000.run("dcgmi", "discovery", "-l").stdout.splitlines()
    finally:
        p.terminate()
        p.wait(10)
    assert out[0] == "2 GPUs found."
    assert "| 0      | Name: NVIDIA RTX A6000" in out[4]
    assert len({len(ln) for ln in out[1:-5]}) == 1  # a rectangular box


def test_container_tools_report_versions(a6000: Guest) -> None:
    a6000.write("/usr/lib/gpunode-sim/installed/ctk", "1.17.8\n")
    assert a6000.run("nvidia-ctk", "--version").stdout.startswith(
        "NVIDIA Container Toolkit CLI version 1.17.8\n"
    )
    assert a6000.run("nvidia-container-cli", "--version").stdout.startswith("cli-version: 1.17.8")
    info = a6000.run("nvidia-container-cli", "info").stdout
    assert "NVRM version:   580.95.05" in info and info.count("Model:          NVIDIA RTX A6000") == 2
    assert a6000.run("nvidia-modprobe").returncode == 0


def test_install_manifest_points_at_existing_files() -> None:
    for f in guest.INSTALL:
        assert guest.read(f.source)
        if f.mode & 0o111:
            assert guest.read(f.source).startswith("#!/usr/bin/python3\n")


def test_ctk_config_writes_default_and_sets_keys(a6000: Guest) -> None:
    import tomllib

    cfgfile = "/etc/nvidia-container-runtime/config.toml"
    r = a6000.run("nvidia-ctk", "--quiet", "config", f"--config-file={cfgfile}", "--in-place")
    assert r.returncode == 0, r.stderr
    doc = tomllib.loads(a6000.read(cfgfile))
    assert doc["nvidia-container-runtime"]["mode"] == "auto"
    assert "no-cgroups" not in doc["nvidia-container-cli"]
    r = a6000.run("nvidia-ctk", "config", "--set", "nvidia-container-cli.no-cgroups", "--in-place")
    assert r.returncode == 0, r.stderr
    doc = tomllib.loads(a6000.read(cfgfile))
    assert doc["nvidia-container-cli"]["no-cgroups"] is True
    assert doc["nvidia-container-cli"]["load-kmods"] is True


# Exact texts and exit codes probed on the same real H100 / 580.159.04 (read-only commands,
# 2026-11-23; the capture.sh fixtures do not include them).
PROBED = [
    (
        ["--query-gpu=gpu_name,gpu_uuid,clocks.gr,gpu_bus_id", "--format=csv"],
        "name, uuid, clocks.current.graphics [MHz], pci.bus_id\n"
        "NVIDIA H100 80GB HBM3, GPU-3f7d6e7f-bafc-d33b-65bd-affad9270b29, 1980 MHz, 00000000:00:06.0\n",
        0,
    ),
    (
        ["--query-compute-apps=pid,process_name,gpu_uuid,used_memory", "--format=csv"],
        "pid, process_name, gpu_uuid, used_gpu_memory [MiB]\n",
        0,
    ),
    (["--query-compute-apps=pid,name,used_gpu_memory", "--format=csv,noheader"], "", 0),
    (["--query-gpu=index"], "index\n0\n", 0),
    (["--query-gpu=index", "--format=json"], "Format modifier is not recognized.\n", 2),
    (["-q", "-d", "BOGUS"], "Failed to parse --display/-d flags\n", 2),
    (["-i", "7", "-q"], "No devices were found\n", 6),
    (
        ["-i", "0", "-L"],
        "ERROR: Option -i is not valid for this command. Please run 'nvidia-smi -h' for help.\n\n",
        2,
    ),
    (["--bogus"], "ERROR: Option --bogus is not recognized. Please run 'nvidia-smi -h'.\n\n", 255),
    (["topo", "-x"], 'Option "-x" is not recognized.\n', 2),
    (["-pm", "5"], "Invalid persistence mode: 5\nTerminating early due to previous errors.\n", 2),
    (["-c", "9"], "Invalid compute mode: 9\nTerminating early due to previous errors.\n", 2),
    (["-e", "5"], "Invalid ECC configuration code: 5\nTerminating early due to previous errors.\n", 2),
    (
        ["-lgc", "abc"],
        "Specified clocks \"abc\" are not valid. Please format input as 'gpuClkMin,gpuClkMax' or "
        "'gpuClkVal' e.g. '--lock-gpu-clocks=1500,1500', '--lock-gpu-clocks=1500', or "
        "'--lock-gpu-clocks=tdp,unlimited'\nTerminating early due to previous errors.\n",
        2,
    ),
    (["-pl", "abc"], "ERROR: Option abc is invalid for -pl. Please run 'nvidia-smi -h' for help.\n\n", 2),
    (
        ["-ac", "abc"],
        'Specified clocks "abc" are not valid. Please format input as memClk,smClk e.g. '
        "--applications-clocks=2000,300\nTerminating early due to previous errors.\n",
        2,
    ),
    (
        ["-d", "ECC"],
        "Invalid combination of input arguments. Specify -q/--query and -d/--display to run a "
        "filtered query.  Please run 'nvidia-smi -h' for help.\n\n",
        2,
    ),
    (["-i", "00:06.0", "--query-gpu=index", "--format=csv,noheader"], "0\n", 0),
    (
        [
            "--query-gpu=count,compute_cap,pstate,fan.speed,memory.reserved,pci.domain,pci.bus,"
            "utilization.memory,clocks.default_applications.graphics,display_active",
            "--format=csv",
        ],
        "count, compute_cap, pstate, fan.speed [%], memory.reserved [MiB], pci.domain, pci.bus, "
        "utilization.memory [%], clocks.default_applications.graphics [MHz], display_active\n"
        "1, 9.0, P0, [N/A], 480 MiB, 0x0000, 0x00, 0 %, 1980 MHz, Disabled\n",
        0,
    ),
]


@pytest.mark.parametrize(("args", "stdout", "rc"), PROBED)
def test_texts_probed_on_real_h100(h100: Guest, args: list[str], stdout: str, rc: int) -> None:
    r = h100.smi(*args)
    assert (r.stdout, r.returncode) == (stdout, rc)


def test_q_memory_utilization_sections_as_probed(h100: Guest) -> None:
    out = h100.smi("-q", "-d", "MEMORY,UTILIZATION,TEMPERATURE,PIDS").stdout
    sections = [k for ind, k in _keys(out) if ind == 4]
    assert sections == [
        "FB Memory Usage",
        "BAR1 Memory Usage",
        "Conf Compute Protected Memory Usage",
        "Utilization",
        "GPU Utilization Samples",
        "Memory Utilization Samples",
        "ENC Utilization Samples",
        "DEC Utilization Samples",
        "JPG Utilization Samples",
        "OFA Utilization Samples",
        "Temperature",
        "Processes",
    ]
    assert out.endswith("    Processes                                          : None\n\n")
    assert h100.smi("topo").returncode == 0
    info = h100.read("/proc/driver/nvidia/gpus/0000:00:06.0/information")
    assert "GPU Firmware: \t 580.159.04\n" in info and info.startswith("Model: \t\t NVIDIA H100")


@pytest.mark.parametrize("runtime", ["docker", "containerd", "crio"])
def test_the_deploys_runtime_probe_reads_the_file_nvidia_ctk_writes(a6000: Guest, runtime: str) -> None:
    """The deploys configure a runtime when its probe file lacks nvidia; reading the wrong
    file (CRI-O's crio.conf.d, containerd's config.toml before 1.18) reconfigures and
    restarts the runtime on every run."""

    r = a6000.run("nvidia-ctk", "runtime", "configure", f"--runtime={runtime}")
    assert r.returncode == 0, r.stderr
    assert "nvidia" in a6000.read(paths.RUNTIME_CONFIG[runtime])


# ---------------------------------------------------------------- nvidia-uvm (SIMULATION)

UVM = ("/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")


def _exists(g: Guest, rel: str) -> bool:
    return (g.root / rel.lstrip("/")).exists()


def test_nvidia_module_alone_creates_no_uvm_node(a6000: Guest) -> None:
    """nvidia.ko loading makes /dev/nvidia<N> and nvidiactl here, never nvidia-uvm."""
    assert _exists(a6000, "/dev/nvidiactl")
    assert not any(_exists(a6000, n) for n in UVM)
    assert not _exists(a6000, "/run/gpunode-sim/loaded-uvm")


@pytest.mark.parametrize("listing", ["/etc/modules-load.d/gpunode-nvidia.conf",
                                     "/usr/lib/modules-load.d/x.conf", "/etc/modules"])
def test_modules_load_loads_uvm_and_nvidia_modprobe_creates_its_nodes(a6000: Guest, listing):
    a6000.write(listing, "# comment\nnvidia-uvm\n")
    a6000.boot()
    assert _exists(a6000, "/run/gpunode-sim/loaded-uvm")
    assert not any(_exists(a6000, n) for n in UVM)  # NVIDIA's Debian packages: no udev rule
    assert a6000.run("nvidia-modprobe", "-u", "-c=0").returncode == 0
    assert all(_exists(a6000, n) for n in UVM)
    a6000.write(listing, "# nvidia-uvm\n")
    a6000.boot()  # a reboot starts with an empty /dev
    assert not any(_exists(a6000, n) for n in UVM)


def test_nvidia_modprobe_loads_uvm_on_demand(a6000: Guest) -> None:
    assert a6000.run("nvidia-modprobe", "-u").returncode == 0
    assert _exists(a6000, "/run/gpunode-sim/loaded-uvm")
    assert not _exists(a6000, UVM[0])
    assert a6000.run("nvidia-modprobe", "-c0", "-u").returncode == 0
    assert all(_exists(a6000, n) for n in UVM)


def test_nvidia_modprobe_fails_without_the_nvidia_module(a6000: Guest) -> None:
    (a6000.root / "run/gpunode-sim/loaded-kmod").unlink()
    assert a6000.run("nvidia-modprobe", "-u", "-c=0").returncode == 1
    assert not _exists(a6000, UVM[0])


def test_ubuntu_udev_rule_loads_uvm_and_creates_its_nodes_at_boot(a6000: Guest) -> None:
    from gpunode.lab.sim import packages

    a6000.write("/lib/udev/rules.d/71-nvidia.rules", packages._UBUNTU_UDEV_RULES)
    a6000.boot()
    assert _exists(a6000, "/run/gpunode-sim/loaded-uvm")
    assert all(_exists(a6000, n) for n in UVM)


def test_nvidia_modprobe_does_nothing_for_a_user_under_no_new_privs(a6000, monkeypatch):
    """The setuid bit is ignored under no_new_privs (NoNewPrivileges=): a non-root caller
    cannot load nvidia-uvm nor create its nodes; root (an ExecStartPre=+ line) can."""
    monkeypatch.setenv("GPUNODE_SIM_ROOT", str(a6000.root))
    monkeypatch.syspath_prepend(str(GUEST))
    import gpunode_sim

    monkeypatch.setattr(gpunode_sim, "no_new_privs", lambda: True)
    monkeypatch.setattr(gpunode_sim.os, "geteuid", lambda: 1000)
    assert gpunode_sim.modprobe(["-u", "-c=0"]) == 1
    assert not _exists(a6000, "/run/gpunode-sim/loaded-uvm") and not _exists(a6000, UVM[0])
    monkeypatch.setattr(gpunode_sim, "no_new_privs", lambda: False)  # setuid root works
    assert gpunode_sim.modprobe(["-u", "-c=0"]) == 0
    assert all(_exists(a6000, n) for n in UVM)


def test_modprobe_nvidia_uvm_runs_the_simulated_load(a6000: Guest) -> None:
    """gpunode-sim-base's modprobe.d install line: `modprobe nvidia-uvm` in a lab VM."""
    from gpunode.lab.sim import packages

    conf = {f.path: f for f in packages.sim_base().files}["/lib/modprobe.d/gpunode-sim.conf"]
    line = [ln for ln in conf.data.decode().splitlines() if ln.startswith("install ")]
    assert line[0].split()[:3] == ["install", "nvidia_uvm",
                                   "/usr/lib/gpunode-sim/gpunode-sim-boot"]
    assert a6000.run("gpunode-sim-boot", *line[0].split()[3:]).returncode == 0
    assert _exists(a6000, "/run/gpunode-sim/loaded-uvm")


def test_proc_devices_shows_the_nvidia_majors(tmp_path: Path, monkeypatch) -> None:
    """The text bind-mounted over /proc/devices in lab VMs, so DeviceAllow=char-nvidia-uvm
    resolves: the real list plus the NVIDIA majors, nvidia-uvm on the highest free dynamic
    major, block devices untouched."""
    monkeypatch.setenv("GPUNODE_SIM_ROOT", str(tmp_path))
    monkeypatch.syspath_prepend(str(GUEST))
    import gpunode_sim

    real = "Character devices:\n  1 mem\n254 gpiochip\n\nBlock devices:\n  8 sd\n"
    gpunode_sim.write_text(gpunode_sim.PROC_DEVICES + ".orig", real)
    assert gpunode_sim.uvm_major() == 253
    text = gpunode_sim._proc_devices(gpunode_sim.uvm_major())
    assert text == ("Character devices:\n  1 mem\n195 nvidia\n253 nvidia-uvm\n"
                    "254 gpiochip\n\nBlock devices:\n  8 sd\n")
    assert "nvidia-uvm" not in gpunode_sim._proc_devices(None)
    gpunode_sim.write_text(gpunode_sim.LOADED_KMOD, "580.95.05 proprietary\n")
    assert "195 nvidia-frontend\n" in gpunode_sim._proc_devices(None)


def test_nvidia_ctk_runs_on_python_3_10_with_tomli(a6000: Guest, tmp_path: Path) -> None:
    """Ubuntu 22.04 guests run the stand-ins with Python 3.10, which has no tomllib; the
    lab image carries python3-tomli there (image.JAMMY_PRESEED). Was: nvidia-ctk died on
    `import tomllib`, so no 22.04 guest got its container runtimes configured."""
    from gpunode.lab import image

    assert "python3-tomli" in image.recipe("ubuntu-22.04")["preseed"]
    py310 = tmp_path / "py310"
    py310.mkdir()
    # Python 3.10: no tomllib. tomli (python3-tomli) has the same API; here it is tomllib.
    (py310 / "sitecustomize.py").write_text("import sys\nsys.modules['tomllib'] = None\n")
    (py310 / "tomli.py").write_text("import sys\ndel sys.modules['tomllib']\n"
                                    "from tomllib import TOMLDecodeError, loads  # noqa: F401\n")
    env = {"PYTHONPATH": str(py310)}
    r = a6000.run("nvidia-ctk", "runtime", "configure", "--runtime=containerd", env=env)
    assert r.returncode == 0, r.stderr
    assert "nvidia" in a6000.read("/etc/containerd/conf.d/99-nvidia.toml")
    a6000.write("/etc/containerd/config.toml", "version = [\n")  # broken: refused, as before
    r = a6000.run("nvidia-ctk", "runtime", "configure", "--runtime=containerd", env=env)
    assert r.returncode != 0
