"""Ubuntu 24.04 lab guest (debootstrapped from Ubuntu's archive, its signing key checked)
converged with the SIMULATED NVIDIA stack from the simulated ubuntu2404 repository: the
full deploy, `gpunode check`, and a second run that changes nothing.

Skipped, with the reason, when Ubuntu's archive cannot be reached from this machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from convergence import gpunode_cli

from gpunode.deploy_cli import run_pyinfra
from gpunode.lab import image, labsite
from gpunode.lab.core import Lab
from gpunode.lab.errors import LabError

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.matrix]

UBUNTU_VM = "labnoble"
SHAPE = {"cpus": 2, "memory_mib": 3072, "numa": 2, "disk_gib": 8}  # as the converged VMs'
TINY_MODEL = "/var/lib/vllm/models/tiny-sim"


def _ubuntu_vm(lab: Lab):
    try:
        image.ubuntu_keyring()
    except LabError as exc:
        if "cannot be reached" in str(exc):
            pytest.skip(str(exc))
        raise
    try:
        return lab.up(UBUNTU_VM, os_name="ubuntu-24.04", **SHAPE)
    except LabError as exc:
        pytest.fail(str(exc), pytrace=False)


def test_an_ubuntu_2404_guest_converges_passes_its_checks_and_stays_converged(lab, tmp_path):
    vm = _ubuntu_vm(lab)
    facts = labsite.prepare_lab(lab.dir)
    labsite.prepare_guest(vm, models=(TINY_MODEL,))
    assert "Ubuntu 24.04" in vm.check("cat /etc/os-release")
    doc = labsite.lab_site(lab, facts)
    doc["nodes"] = {UBUNTU_VM: doc["nodes"][UBUNTU_VM]}
    site = Path(tmp_path / "site.yaml")
    site.write_text(yaml.safe_dump(doc, sort_keys=False))
    node = doc["nodes"][UBUNTU_VM]
    assert node["os"] == "ubuntu-24.04" and node["vllm"]["python"] == "3.12"
    assert node["nvidia"]["keyring_sha256"] == facts["keyring_sha256_by_distro"]["ubuntu2404"]

    rc, results, seconds = run_pyinfra(site, [UBUNTU_VM])
    assert rc == 0, results[UBUNTU_VM].errors
    print(f"\nfresh deploy of the Ubuntu 24.04 guest: {seconds:.0f} s")
    assert "Open Kernel Module" in vm.check("cat /proc/driver/nvidia/version")
    assert "nouveau" not in vm.check("cat /proc/modules")
    installed = vm.check("dpkg-query -W -f '${Package} ${Version}\\n' 'nvidia-*' 'libnvidia-*'")
    assert "ubuntu" in installed, installed  # Ubuntu's version strings (0ubuntu1)
    python = vm.check(f"{doc['groups']['lab']['vllm'].get('prefix', '/opt/vllm')}"
                      "/venv/bin/python --version")
    assert python.strip().startswith("Python 3.12"), python

    rc, out, _ = gpunode_cli("check", UBUNTU_VM, "--site", str(site))
    assert rc == 0, out

    rc, results, _ = run_pyinfra(site, [UBUNTU_VM])
    assert rc == 0, results[UBUNTU_VM].errors
    assert not results[UBUNTU_VM].changed, results[UBUNTU_VM].changed
