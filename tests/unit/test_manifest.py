"""gpunode.core.manifest: built from the deploys' snapshot (SIMULATED snapshot data here), the
same bytes through both engines' paths, and `gpunode manifest NODE`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpunode import facts
from gpunode.cli.main import app
from gpunode.core import lock, manifest
from gpunode.engines.ansible import plan as ansible_plan
from gpunode.inventory import load_site

REPO = Path(__file__).resolve().parents[2]
PROC = (REPO / "tests/fixtures/nvidia/h100_580.159.04/proc_driver_version.txt").read_text()


@pytest.fixture
def profile():
    return next(iter(load_site(REPO / "inventory" / "examples" / "lab.yaml").nodes.values()))


def converged(p) -> dict:
    files = {path: {"mode": "0644", "owner": "root", "group": "root", "sha256": "ab" * 32}
             for path in facts.managed_paths(p)}
    files["/etc/vllm"] = {"mode": "0750", "owner": "root", "group": "vllm", "dir": True}
    return {"os": {"id": "debian", "version_id": "12"}, "kernel": "6.1.0-30-amd64",
            "nvidia_proc_version": PROC,
            "packages": {"nvidia-driver-cuda": "580.82.07-1", "libcuda1": "580.82.07-1",
                         "libnccl2": "2.28.3-1+cuda13.0", "python3": "3.11.2-1+b1",
                         "cuda-keyring": "1.1-1", "curl": "7.88.1-10"},
            "holds": ["libcuda1", "nvidia-driver-cuda"], "files": files,
            "venvs": {f"{p.vllm.prefix}/venv": {"vllm": "0.33.0+gpunodesim", "pyyaml": "6.0.3"}},
            "cmds": {manifest.GPU_IDS_KEY: {"rc": 0, "err": "", "out":
                     "GPU-0a1b, 94.02.5C.00.02\nGPU-9f8e, 94.02.5C.00.02\n"}}}


def test_manifest_records_what_the_issue_asks_for(profile):
    m = manifest.build(profile, converged(profile))
    assert m["kernel"] == "6.1.0-30-amd64"
    assert m["driver_module"] == "580.159.04"  # from a real /proc/driver/nvidia/version
    assert m["gpus"] == [{"uuid": "GPU-0a1b", "vbios": "94.02.5C.00.02"},
                         {"uuid": "GPU-9f8e", "vbios": "94.02.5C.00.02"}]
    assert m["packages"] == {"cuda-keyring": "1.1-1", "libcuda1": "580.82.07-1",
                             "libnccl2": "2.28.3-1+cuda13.0", "nvidia-driver-cuda": "580.82.07-1"}
    assert m["holds"] == ["libcuda1", "nvidia-driver-cuda"]
    assert m["vllm"]["version"] == "0.33.0+gpunodesim"
    assert m["vllm"]["dependency_hash"] == lock.dependency_hash(
        {"vllm": "0.33.0+gpunodesim", "PyYAML": "6.0.3"})
    assert m["models"] == {"tiny": {"model": "/var/lib/vllm/models/tiny-sim", "revision": None}}
    assert "/etc/vllm/tiny.yaml" in m["files"]
    assert "/etc/vllm" not in m["files"]  # directories have no hash
    assert "/etc/vllm/credentials/tiny.key" in converged(profile)["files"]
    assert "/etc/vllm/credentials/tiny.key" not in m["files"]  # no hash of a secret
    assert manifest.MANIFEST_PATH not in m["files"]


def test_manifest_bytes_are_deterministic_and_shared_by_both_engines(profile):
    data = converged(profile)
    f = manifest.manifest_file(profile, data)
    assert f.content == manifest.manifest_file(profile, json.loads(json.dumps(data))).content
    assert f.path == manifest.MANIFEST_PATH and f.mode == 0o644
    # the Ansible role writes what gpunode.engines.ansible.plan computes from the same snapshot
    observed_data = {**_fresh(), **data}
    job = ansible_plan.observed(profile, observed_data)["manifest"]
    assert job["content"] == f.content and job["path"] == f.path and not job["ok"]
    # the one snapshot spec (both engines) asks for GPU UUIDs and VBIOS
    assert facts.node_spec(profile)["commands"][manifest.GPU_IDS_KEY] == \
        manifest.GPU_IDS_COMMAND
    assert manifest.MANIFEST_PATH in facts.managed_paths(profile)


def test_manifest_on_the_host_is_ok_when_bytes_match(profile):
    import hashlib

    data = {**_fresh(), **converged(profile)}
    content = manifest.manifest_file(profile, data).content
    data["files"][manifest.MANIFEST_PATH] = {"mode": "0644", "owner": "root", "group": "root",
                                             "sha256": hashlib.sha256(content.encode()).hexdigest()}
    # the manifest's own hash is not in it, so writing it does not change it
    assert manifest.manifest_file(profile, data).content == content
    assert ansible_plan.observed(profile, data)["manifest"]["ok"]


def test_driver_module_and_gpu_ids_parsers():
    assert manifest.driver_module_version(None) is None
    assert manifest.driver_module_version(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.82.07  Wed Aug 27 2025") == "580.82.07"
    assert manifest.parse_gpu_ids("No devices were found\n") == []


def test_deploys_name_the_manifest_concern():
    text = (REPO / "src/gpunode/engines/pyinfra/__init__.py").read_text()
    assert "manifest.deploy_manifest(p)" in text
    play = (REPO / "playbooks/gpu_node.yml").read_text()
    assert play.rstrip().endswith("name: gpunode_manifest")


def _fresh() -> dict:
    return {"os": {"id": "debian", "version_id": "12"}, "kernel": "6.1.0-30-amd64",
            "kernels": ["6.1.0-30-amd64"], "cmdline": "", "virt": "kvm", "cpufreq": False,
            "governors": [], "secure_boot": False, "efi": True, "boot": ["grub"], "modules": [],
            "reboot_required": False, "reboot_required_pkgs": [], "nvidia_proc_version": None,
            "packages": {}, "holds": [], "apt_lists_mtime": 0, "files": {}, "units": {},
            "sysctl": {}, "thp": {}, "hugepages": {}, "memory_kib": 1, "nvidia_smi":
            {"present": False}, "venvs": {}, "users": [], "globs": {}, "cmds": {}}


def test_manifest_command_prints_it_or_fails(profile, monkeypatch):
    doc = manifest.build(profile, converged(profile))
    monkeypatch.setattr(manifest, "run_on", lambda p, cmd: (0, json.dumps(doc), ""))
    site = str(REPO / "inventory/examples/lab.yaml")
    res = CliRunner().invoke(app, ["manifest", profile.name, "--site", site, "--json"])
    assert res.exit_code == 0 and json.loads(res.output) == doc
    res = CliRunner().invoke(app, ["manifest", profile.name, "--site", site])
    assert "GPU-0a1b  VBIOS 94.02.5C.00.02" in res.output and "libcuda1 580.82.07-1" in res.output
    monkeypatch.setattr(manifest, "run_on", lambda p, cmd: (1, "", "No such file"))
    res = CliRunner().invoke(app, ["manifest", profile.name, "--site", site])
    assert res.exit_code == 1 and "has gpunode deploy run on it" in res.output
    res = CliRunner().invoke(app, ["manifest", "nope", "--site", site])
    assert res.exit_code == 2


def test_ssh_argv_uses_sudo_for_a_non_root_user(profile):
    argv = manifest.ssh_argv(profile, "cat /x")
    assert argv[-2] == f"{profile.connection.user}@{profile.connection.address}"
    assert argv[-1].startswith("sudo -n sh -c ")


def test_write_command_writes_the_exact_bytes(profile, tmp_path):
    import subprocess

    f = manifest.manifest_file(profile, converged(profile))
    target = tmp_path / "sub" / "manifest.json"
    from dataclasses import replace

    mine = replace(f, path=str(target), owner=_me(), group=_my_group())
    subprocess.run(["sh", "-c", manifest.write_command(mine)], check=True)
    assert target.read_text() == f.content
    assert oct(target.stat().st_mode & 0o777) == "0o644"


def _me() -> str:
    import os
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _my_group() -> str:
    import grp
    import os

    return grp.getgrgid(os.getgid()).gr_name


def test_a_rebuild_reproduces_all_but_the_gpu_uuids():
    a = {"node": "n", "gpus": [{"uuid": "GPU-1", "vbios": "94.02"}], "packages": {"x": "1"}}
    b = {"node": "n", "gpus": [{"uuid": "GPU-2", "vbios": "94.02"}], "packages": {"x": "1"}}
    assert manifest.reproducible(a) == manifest.reproducible(b)
    assert a["gpus"][0]["uuid"] == "GPU-1"  # the input is left alone
    for change in ({"gpus": [{"uuid": "GPU-1", "vbios": "95.00"}]}, {"packages": {"x": "2"}}):
        assert manifest.reproducible(a | change) != manifest.reproducible(a)
