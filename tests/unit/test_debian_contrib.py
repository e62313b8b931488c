"""debian-12 from NVIDIA's CUDA repository: Debian's contrib component enabled through a
managed sources file, and the stop before the driver changes when its DKMS package needs a
newer dkms than apt can install (plan.dkms_refusal, compared by lock.unmet_requirement)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from gpunode.core import hostcmd, lock, paths, plan
from gpunode.core.files import driver_files
from gpunode.facts import Snapshot, node_spec
from gpunode.model import NodeProfile


def profile(os: str = "debian-12", **nvidia) -> NodeProfile:
    return NodeProfile.model_validate({"name": "gpu01", "connection": {"address": "h"},
                                       "os": os, "nvidia": nvidia})


def contrib(p: NodeProfile) -> str | None:
    return next((f.content for f in driver_files(p)
                 if f.path == paths.DEBIAN_CONTRIB_SOURCES), None)


def test_debian12_from_the_cuda_repo_gets_debians_contrib_component():
    text = contrib(profile())
    assert text is not None
    lines = text.splitlines()
    assert "Components: contrib" in lines and "URIs: http://deb.debian.org/debian" in lines
    assert "Suites: bookworm bookworm-updates" in lines
    assert f"Signed-By: {paths.DEBIAN_ARCHIVE_KEYRING}" in lines
    mirror = contrib(profile(debian_mirror="http://mirror.example/debian/"))
    assert mirror is not None and "URIs: http://mirror.example/debian\n" in mirror


# Debian 12's two stock forms of the archive entry the contrib file sits beside.
DEB822 = ("Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
          "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
ONE_LINE = "deb http://deb.debian.org/debian bookworm main\n"


@pytest.mark.skipif(not shutil.which("apt-get"), reason="needs apt-get (Debian or Ubuntu)")
@pytest.mark.parametrize("stock", ["deb822", "one-line"])
def test_apt_reads_the_contrib_file_beside_either_stock_entry(tmp_path: Path, stock):
    """apt itself parses the host's entry plus gpunode's file: one Signed-By per URI and
    suite, or "Conflicting values set for option Signed-By" and no apt at all."""
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    main = tmp_path / "sources.list"
    main.write_text(ONE_LINE if stock == "one-line" else "")
    if stock == "deb822":
        (parts / "debian.sources").write_text(DEB822)
    text = contrib(profile())
    assert text is not None
    (parts / Path(paths.DEBIAN_CONTRIB_SOURCES).name).write_text(text)
    proc = subprocess.run(["apt-get", "-o", f"Dir::Etc::sourcelist={main}", "-o",
                           f"Dir::Etc::sourceparts={parts}", "-o", f"Dir::State::lists={tmp_path}",
                           "indextargets"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr


@pytest.mark.parametrize("os", ["ubuntu-24.04", "ubuntu-22.04"])
def test_ubuntu_gets_no_debian_contrib_source(os):
    assert contrib(profile(os)) is None
    assert hostcmd.dkms_offer_command(profile(os)) is None
    assert hostcmd.DKMS_OFFER_KEY not in node_spec(profile(os))["commands"]


def test_the_snapshot_asks_apt_for_dkms_and_the_dkms_package_by_flavour():
    assert "nvidia-kernel-open-dkms" in node_spec(profile())["commands"][hostcmd.DKMS_OFFER_KEY]
    closed = hostcmd.dkms_offer_command(profile(open_kernel_modules=False))
    assert closed is not None and "show --no-all-versions nvidia-kernel-dkms " in closed


@pytest.mark.parametrize(("installed", "asked"), [
    ("installed 580.95.05-1", False),  # converged (held): apt is not asked (seconds a no-op)
    ("installed 580.82.07-1", True),  # a driver bump: the new pin is to install
    ("config-files 580.95.05-1", True),  # removed, its configuration left
    ("half-configured 580.95.05-1", True),
    ("", True),  # not installed
])
def test_the_dkms_probe_asks_apt_only_when_the_package_is_not_at_its_pin(tmp_path, installed,
                                                                       asked):
    command = hostcmd.dkms_offer_command(profile(version="580.95.05"))
    assert command is not None and "580.95.05-1" in command
    assert hostcmd.dkms_offer_command(profile()).startswith("apt-cache")  # no pin: always
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if installed:
        (bin_dir / "dpkg-query").write_text(f"#!/bin/sh\nprintf '%s' '{installed}'\n")
    else:
        (bin_dir / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "apt-cache").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/asked\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    proc = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "asked").exists() == asked


@pytest.mark.parametrize(("depends", "available", "unmet"), [
    ("dkms (>= 3.1.8), nvidia-kernel-support--v1", ["3.0.10-8+deb12u1"], "dkms (>= 3.1.8)"),
    ("dkms (>= 3.1.8)", ["3.0.10-8+deb12u1", "3.1.8-1"], None),
    ("dkms (>= 3.1.8)", ["3.1.8~rc1-1"], "dkms (>= 3.1.8)"),  # ~ sorts before the release
    ("dkms (>= 3.1.8)", ["1:3.0.10-8"], None),  # the epoch wins
    ("dkms (>= 3.1.8-1)", ["3.1.10-1"], None),  # numeric, not string, order
    ("dkms", [], "dkms"),
    ("dkms, foo (>= 9)", ["3.0.10-8"], None),
    ("dkms (>= 3.1.8) | dkms-ng", [], None),  # other alternatives: apt decides
])
def test_unmet_requirement_orders_like_dpkg(depends, available, unmet):
    assert lock.unmet_requirement(depends, "dkms", available) == unmet


def snap(out: str, **packages: str) -> Snapshot:
    return Snapshot({"packages": packages, "cmds": {hostcmd.DKMS_OFFER_KEY: {"rc": 0,
                                                                            "out": out}}})


NEW = ("dkms 3.0.10-8+deb12u1\nversion 580.95.05-1\n"
       "depends dkms (>= 3.1.8), nvidia-kernel-support--v1, nvidia-kernel-common\n")


def test_a_dkms_package_needing_a_newer_dkms_stops_the_host_with_the_fix():
    msg = plan.dkms_refusal(profile(), snap(NEW, dkms="3.0.10-8+deb12u1"))
    assert msg is not None
    assert msg.startswith("gpu01: nvidia-kernel-open-dkms 580.95.05-1 depends on dkms (>= 3.1.8)")
    assert "available: 3.0.10-8+deb12u1" in msg and "nvidia.version" in msg
    assert "NVIDIA's repository" in msg


def test_no_stop_when_apt_offers_a_dkms_that_satisfies_it_or_nothing_is_to_install():
    offered = "dkms 3.1.8-1\n" + NEW
    assert plan.dkms_refusal(profile(), snap(offered)) is None
    installed = snap(NEW, **{"nvidia-kernel-open-dkms": "580.95.05-1"})
    assert plan.dkms_refusal(profile(), installed) is None  # converged: nothing changes
    assert plan.dkms_refusal(profile(), snap("")) is None  # no lists yet: apt will say
    old = "dkms 3.0.10-8+deb12u1\nversion 570.86.15-1\ndepends dkms, nvidia-kernel-support--v1\n"
    assert plan.dkms_refusal(profile(), snap(old)) is None
    assert plan.dkms_refusal(profile("ubuntu-24.04"), snap(NEW)) is None
