"""An Ubuntu 24.04 lab guest with the HWE kernel (`gpunode lab up --kernel hwe`,
`make test-matrix`): it boots that kernel, and the deploy's headers rule, fed the guest's
real `uname -r`, picks the HWE headers meta-package, which the image already carries along
with the running kernel's headers (so a deploy of it downloads none).

Skipped, with the reason, when Ubuntu's archive cannot be reached from this machine."""

from __future__ import annotations

import pytest
from convergence import ubuntu_archive_unreachable

from gpunode.core import desired
from gpunode.lab.errors import LabError
from gpunode.model import NodeProfile

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.matrix]

OS_NAME = "ubuntu-24.04"


def test_an_hwe_guest_boots_the_hwe_kernel_and_the_deploy_keeps_its_headers(lab):
    if why := ubuntu_archive_unreachable():
        pytest.skip(why)
    try:
        vm = lab.up("labhwe", os_name=OS_NAME, kernel="hwe", cpus=2, memory_mib=2048)
    except LabError as exc:
        pytest.fail(str(exc), pytrace=False)
    assert vm.kernel == "hwe"
    release = vm.check("uname -r").strip()
    assert not release.startswith(desired.UBUNTU_GA_SERIES[OS_NAME] + "."), release
    installed = vm.check("dpkg-query -W -f '${Package} ${Status}\\n' 'linux-image-*' "
                         "'linux-headers-*'")
    ok = {ln.split()[0] for ln in installed.splitlines() if ln.endswith(" installed")}
    assert {"linux-image-virtual-hwe-24.04", f"linux-image-{release}"} <= ok, installed
    assert "linux-image-virtual" not in ok
    assert "nouveau" in vm.check("cat /proc/modules")

    p = NodeProfile.model_validate({"name": vm.name, "connection": {"address": vm.address},
                                    "os": OS_NAME, "gpus": {"count": 1}})
    kernels = vm.check("ls /lib/modules").split()
    assert desired.header_packages(p, release, kernels) == [
        "linux-headers-generic-hwe-24.04", f"linux-headers-{release}"]
    assert {"linux-headers-generic-hwe-24.04", f"linux-headers-{release}"} <= ok, installed
