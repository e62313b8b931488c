"""gpunode.checks.expect: the comparisons and parsers the checks use, on small made-up inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpunode import facts
from gpunode.checks import expect
from gpunode.core import desired, paths
from gpunode.core.files import ManagedFile, node_files
from gpunode.core.topology import Gpu, Placement
from gpunode.inventory import load_site, to_ansible

LAB = Path(__file__).resolve().parents[2] / "inventory" / "examples" / "lab.yaml"


@pytest.fixture(scope="module")
def lab():
    return load_site(LAB)


@pytest.fixture(scope="module")
def labnode(lab):
    return lab.nodes["labgpu1"]


def _gpus(n: int = 2) -> list[Gpu]:
    return [Gpu(index=i, uuid=f"GPU-{i}", name="NVIDIA RTX A6000", bus_id=f"00000000:0{i}:00.0",
                memory_mib=49140, driver_version="580.95.05", cpus=[i], numa_node=i)
            for i in range(n)]


def test_managed_paths_include_gpu_dependent_files(labnode):
    # a host with a GPU (and CPUs) no service uses: every GPU-dependent path exists
    every = {f.path for f in node_files(labnode, _gpus(3))}
    assert {paths.vllm_unit_dropin("tiny"), paths.IRQ_DROPIN} <= every
    assert every <= set(expect.core_spec(labnode)["contents"])  # the checks diff them
    assert every <= set(facts.managed_paths(labnode))  # the one snapshot stats them


def _info(f: ManagedFile, **over) -> dict:
    info = {"mode": f"{f.mode:04o}", "owner": f.owner, "group": f.group,
            "sha256": expect.sha256_text(f.content)}
    info.update(over)
    return info


def test_file_problems_say_what_differs():
    f = ManagedFile("tuning", "/etc/x.conf", "tuning/x.j2", "a = 1\nb = 2\n", 0o640, group="vllm")
    assert expect.file_problems([f], {f.path: _info(f)}) == []
    assert expect.file_problems([f], {}) == ["/etc/x.conf: missing (expected from tuning/x.j2)"]
    problems = expect.file_problems([f], {f.path: _info(f, mode="0644", group="root")})
    assert problems == ["/etc/x.conf: mode 0644, expected 0640",
                        "/etc/x.conf: owner root:root, expected root:vllm"]
    changed = "a = 1\nb = 3\n"
    [problem] = expect.file_problems([f], {f.path: _info(f, sha256=expect.sha256_text(changed))},
                                     {f.path: changed})
    assert "content differs from tuning/x.j2" in problem
    assert "-b = 2" in problem and "+b = 3" in problem


def test_map_diff_reports_expected_and_actual():
    diff = expect.map_diff({"vm.swappiness": "10", "a": "1"}, {"vm.swappiness": "60", "a": "1"})
    assert diff == {"vm.swappiness": ("10", "60")}
    assert expect.map_diff({"k": "1"}, {}) == {"k": ("1", None)}
    assert expect.normalize_sysctl("4096\t87380   6291456\n") == "4096 87380 6291456"


@pytest.mark.parametrize(("nodes", "want"), [((0,), "bind:0"), ((0, 1), "interleave:0-1"),
                                             ((), "default")])
def test_expected_numa_policy(nodes, want):
    assert expect.expected_numa_policy(Placement(("GPU-0",), (0, 1), nodes)) == want


def test_numa_maps_dominant_policy():
    text = ("55d0c0a00000 bind:0 file=/usr/bin/python3.11 mapped=1 N0=1\n"
            "55d0c0b00000 bind:0 heap anon=10 dirty=10 N0=10\n"
            "7f00 interleave:0-1 anon=2 N0=1 N1=1\n"
            "7ffd bind:0 stack anon=3 dirty=3 N0=3\n")
    assert expect.numa_policies(text) == {"bind:0": 3, "interleave:0-1": 1}
    assert expect.dominant_numa_policy(text) == "bind:0"
    assert expect.dominant_numa_policy("") is None


def test_parse_exposure():
    text = "  NAME  DESCRIPTION  EXPOSURE\n...\n→ Overall exposure level for vllm@tiny.service: 3.4 OK :-)\n"
    assert expect.parse_exposure(text) == 3.4
    assert expect.parse_exposure("Unit vllm@x.service not found.") is None


def test_cdi_names():
    out = "INFO[0000] Found 5 CDI devices\nnvidia.com/gpu=0\nnvidia.com/gpu=GPU-0\nnvidia.com/gpu=all\n"
    listed = expect.parse_cdi_list(out)
    assert listed == ["nvidia.com/gpu=0", "nvidia.com/gpu=GPU-0", "nvidia.com/gpu=all"]
    want = expect.expected_cdi_devices(_gpus(2))
    assert [n for n in want if n not in listed] == ["nvidia.com/gpu=1", "nvidia.com/gpu=GPU-1"]


def test_cdi_problems_read_the_spec_the_toolkit_keeps_and_refuse_a_second_one(labnode):
    """Was: the check only asked `nvidia-ctk cdi list`, which passes with the spec gpunode
    wrote into /etc/cdi beside toolkit 1.18's /var/run/cdi one (each device twice)."""
    gpus = _gpus(2)
    names = ["0", "1", "GPU-0", "GPU-1", "all"]
    spec = ("---\ncdiVersion: 0.5.0\ndevices:\n"
            + "".join(f"- containerEdits:\n    deviceNodes:\n    - path: /dev/nvidia0\n"
                      f"  name: \"{n}\"\n" for n in names) + "kind: nvidia.com/gpu\n")
    once = [f"nvidia.com/gpu={n}" for n in names]
    assert expect.cdi_spec_devices(spec) == once
    assert expect.cdi_problems(labnode, gpus, spec, once) == []
    assert expect.cdi_problems(labnode, gpus, None, []) == ["/var/run/cdi/nvidia.yaml is missing"]
    twice = expect.cdi_problems(labnode, gpus, spec, once + once)
    assert len(twice) == 1 and "more than one CDI spec defines" in twice[0]
    short = spec.replace('name: "1"', 'name: "7"')
    assert expect.cdi_problems(labnode, gpus, short, once) == [
        "/var/run/cdi/nvidia.yaml lacks nvidia.com/gpu=1"]
    old = labnode.model_copy(update={"container_toolkit": labnode.container_toolkit.model_copy(
        update={"version": "1.17.8"})})
    assert expect.cdi_problems(old, gpus, None, []) == ["/etc/cdi/nvidia.yaml is missing"]
    assert desired.cdi_spec(labnode) in expect.core_spec(labnode)["contents"]
    assert "nvidia-cdi-refresh.path" in expect.core_spec(labnode)["units"]


def test_dkms_status():
    rows = expect.parse_dkms_status("nvidia/580.95.05, 6.1.0-28-amd64, x86_64: installed\n"
                                    "Error! something\n")
    assert rows == [{"module": "nvidia", "version": "580.95.05", "kernel": "6.1.0-28-amd64",
                     "arch": "x86_64", "state": "installed"}]


def test_proc_driver_version_and_flavour():
    open_ = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build"
             "  (dvs-builder@U16-I3-B03-4-3)  Tue Sep 23 09:25:26 UTC 2025\n")
    prop = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05  Tue Sep 23 2025\n"
    assert expect.proc_driver_flavour(open_) == "open"
    assert expect.proc_driver_flavour(prop) == "proprietary"
    assert expect.proc_driver_version(open_) == expect.proc_driver_version(prop) == "580.95.05"
    assert expect.proc_driver_flavour(None) is None


def test_apt_config_list():
    dump = ('APT::Periodic::Enable "1";\nUnattended-Upgrade::Package-Blacklist "";\n'
            'Unattended-Upgrade::Package-Blacklist:: "nvidia-";\n'
            'Unattended-Upgrade::Package-Blacklist:: "libcuda";\n')
    assert expect.apt_config_list(dump, "Unattended-Upgrade::Package-Blacklist") == [
        "nvidia-", "libcuda"]


def test_listeners_and_binding():
    text = ('LISTEN 0 2048 127.0.0.1:8000 0.0.0.0:* users:(("vllm",pid=812,fd=14))\n'
            'LISTEN 0 128 [::]:22 [::]:* users:(("sshd",pid=500,fd=4))\n')
    ls = expect.parse_ss_listeners(text)
    assert ls[0] == expect.Listener("127.0.0.1", 8000, (812,))
    assert ls[1].address == "::" and ls[1].port == 22
    assert expect.bound_ok("127.0.0.1", "127.0.0.1")
    assert not expect.bound_ok("127.0.0.1", "0.0.0.0")
    assert expect.bound_ok("0.0.0.0", "0.0.0.0") and not expect.bound_ok("0.0.0.0", "127.0.0.1")
    assert expect.probe_address("0.0.0.0") == "127.0.0.1"
    assert expect.probe_address("::") == "::1"


def test_package_problems():
    from gpunode.core.desired import Pkg

    pkgs = [Pkg("libnccl2", "2.28.3-1+cuda13.0"), Pkg("libnccl-dev", "2.28.3-1+cuda13.0")]
    installed = {"libnccl2": "2.28.3-1+cuda13.0", "libnccl-dev": "2.27.0-1+cuda13.0"}
    assert expect.package_problems(pkgs, installed, {"libnccl2"}, hold=True) == [
        "libnccl-dev: version 2.27.0-1+cuda13.0, expected 2.28.3-1+cuda13.0",
        "libnccl-dev: not held (apt-mark hold)"]
    assert expect.package_problems(pkgs, {}, set(), hold=False) == [
        "libnccl2: not installed", "libnccl-dev: not installed"]


def test_expected_memory():
    assert expect.expected_memory_mib("NVIDIA RTX A6000", ecc_on=False) == 49140
    assert expect.expected_memory_mib("NVIDIA RTX A6000", ecc_on=True) == 46068
    assert expect.expected_memory_mib("Some Future GPU", ecc_on=False) is None


def test_resolve_profile_from_ansible_hostvars(lab, labnode):
    hostvars = to_ansible(lab)["_meta"]["hostvars"]["labgpu1"]
    got = expect.resolve_profile(None, "labgpu1", None, hostvars)
    assert got == labnode


def test_resolve_profile_by_name_and_address(lab, labnode):
    assert expect.resolve_profile(lab.nodes, "labgpu1") == labnode
    c = labnode.connection
    assert expect.resolve_profile(lab.nodes, c.address, c.port) == labnode
    with pytest.raises(expect.UnknownHost, match="known nodes: labgpu1"):
        expect.resolve_profile(lab.nodes, "gpu99")
    with pytest.raises(expect.UnknownHost, match="no site"):
        expect.resolve_profile(None, "gpu99")


def test_specs_carry_paths_not_secrets(tmp_path, labnode):
    core = expect.core_spec(labnode)
    assert "/etc/sysctl.d/60-gpunode.conf" in core["contents"]
    assert "/etc/docker/daemon.json" in core["contents"]  # lab: docker + containerd
    assert not any("/credentials/" in p for p in core["contents"])
    spec = expect.vllm_spec(labnode)
    [svc] = spec["services"]
    assert svc["key_path"] == "/etc/vllm/credentials/tiny.key"
    assert svc["served"] == ["tiny-sim"] and svc["address"] == "127.0.0.1"
    assert "/etc/vllm/tiny.yaml" in svc["scan_paths"]
    assert "/etc/systemd/system/vllm@tiny.service.d/gpunode.conf" in svc["scan_paths"]
    json.dumps(spec)  # plain data


def test_clean_failure():
    msg = "AssertionError: sysctl differ: {'a': ('1', '2')}\nassert not {'a': ('1', '2')}"
    assert expect.clean_failure(msg) == "sysctl differ: {'a': ('1', '2')}"
    assert expect.clean_failure("Failed: cannot read the host: x") == "cannot read the host: x"
