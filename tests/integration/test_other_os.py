"""Every lab OS the converged pair does not run (`make test-matrix`): a lab guest of that OS
converged with the SIMULATED NVIDIA stack from its simulated repository: a dry run of each
engine on the fresh guest, the full pyinfra deploy, `gpunode check`, and a second run that
changes nothing. With the pair on Ubuntu 24.04 (convergence.CONVERGED_OS) these are
Debian 12 and Ubuntu 22.04. An Ubuntu 22.04 guest runs no vLLM service (its python3 is
3.10; see labsite.lab_site), so there the deploy must install no vLLM venv.

An Ubuntu guest is skipped, with the reason, when Ubuntu's archive cannot be reached from
this machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from convergence import converged_os, gpunode_cli, pyinfra, ubuntu_archive_unreachable

from gpunode.inventory import load_site
from gpunode.lab import image, labsite
from gpunode.lab.core import Lab
from gpunode.lab.errors import LabError
from gpunode.model.parts import OS_PYTHON

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.matrix]

SHAPE = {"cpus": 2, "memory_mib": 3072, "numa": 2, "disk_gib": 8}  # as the converged VMs'
TINY_MODEL = "/var/lib/vllm/models/tiny-sim"
RELEASE = {"debian-12": "Debian GNU/Linux 12", "ubuntu-22.04": "Ubuntu 22.04",
           "ubuntu-24.04": "Ubuntu 24.04"}


def _vm(lab: Lab, os_name: str):
    if os_name.startswith("ubuntu") and (why := ubuntu_archive_unreachable()):
        pytest.skip(why)
    try:
        return lab.up("lab" + os_name.replace("-", "").replace(".", ""), os_name=os_name,
                      **SHAPE)
    except LabError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.mark.parametrize("os_name", image.LAB_OS)
def test_a_guest_of_another_os_converges_passes_its_checks_and_stays_converged(
        lab, tmp_path, os_name):
    if os_name == converged_os()[0]:
        pytest.skip(f"{os_name} is the converged pair's OS (tests/integration/conftest.py), "
                    "proven in make test")
    vm = _vm(lab, os_name)
    facts = labsite.prepare_lab(lab.dir)
    labsite.prepare_guest(vm, models=(TINY_MODEL,))
    assert RELEASE[os_name] in vm.check("cat /etc/os-release")
    doc = labsite.lab_site(lab, facts)
    doc["nodes"] = {vm.name: doc["nodes"][vm.name]}
    site = Path(tmp_path / "site.yaml")
    site.write_text(yaml.safe_dump(doc, sort_keys=False))
    node = doc["nodes"][vm.name]
    serves = bool(load_site(site).nodes[vm.name].vllm.services)
    assert node["os"] == os_name
    assert serves == (os_name != "ubuntu-22.04")
    if serves:
        assert node["vllm"]["python"] == OS_PYTHON[os_name]

    # On the fresh guest, a dry run of each engine says what it would change and changes
    # nothing (Ansible's check mode without python3-apt, the units or the vLLM user yet).
    for engine in ("pyinfra", "ansible"):
        rc, out, _ = gpunode_cli("deploy", vm.name, "--site", str(site), "--engine", engine,
                                 "--dry-run")
        assert rc == 0, f"{engine} --dry-run: {out[-3000:]}"
        assert ("would change" in out) if engine == "pyinfra" else ("changed=" in out), out[-3000:]
    assert vm.run("ls /var/lib/gpunode /etc/sysctl.d/60-gpunode.conf")[0] != 0

    rc, results, seconds = pyinfra(site, [vm.name])
    assert rc == 0, results[vm.name].errors
    print(f"\nfresh deploy of the {os_name} guest: {seconds:.0f} s")
    assert "Open Kernel Module" in vm.check("cat /proc/driver/nvidia/version")
    assert "nouveau" not in vm.check("cat /proc/modules")
    venv = f"{doc['groups']['lab']['vllm'].get('prefix', '/opt/vllm')}/venv"
    if serves:
        python = vm.check(f"{venv}/bin/python --version")
        assert python.split()[1].startswith(OS_PYTHON[os_name] + "."), python
    else:
        assert vm.check(f"test -e {venv} && echo venv || echo none").strip() == "none"

    rc, out, _ = gpunode_cli("check", vm.name, "--site", str(site))
    assert rc == 0, out

    rc, results, _ = pyinfra(site, [vm.name])
    assert rc == 0, results[vm.name].errors
    assert not results[vm.name].changed, results[vm.name].changed
