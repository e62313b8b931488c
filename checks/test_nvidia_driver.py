"""NVIDIA driver: branch/version, kernel module flavour, holds and pins, unattended-upgrades
exclusions, nouveau, module for the newest kernel and every DKMS kernel with headers, persistence daemon."""

from __future__ import annotations

import fnmatch

import pytest

from gpunode.checks import expect
from gpunode.core import desired, plan

pytestmark = pytest.mark.gpu


def test_driver_packages_installed(node, facts):
    wanted = desired.driver_packages(node)
    pin = desired.pinning_package(node)
    if pin:
        wanted = [pin, *wanted]
    missing = [name for name in wanted if name not in facts.packages]
    assert not missing, f"driver packages not installed: {missing}"


def test_driver_package_versions(node, facts):
    """Every installed driver package is of the profile's branch (and exact version)."""
    want = desired.driver_deb_version(node)
    prefix = f"{node.nvidia.branch}."
    own = desired.driver_own_version_packages(node)
    wrong = {}
    for name, version in sorted(facts.packages.items()):
        if not desired.is_driver_package(name) or name in own:
            continue
        upstream = version.split(":", 1)[-1]
        if want and upstream != want:
            wrong[name] = (want, version)
        elif not want and not upstream.startswith(prefix):
            wrong[name] = (f"{prefix}*", version)
    assert not wrong, f"driver package versions differ (expected, installed): {wrong}"


def test_loaded_driver_version(node, facts):
    """nvidia-smi and the loaded kernel module report the profile's driver."""
    assert facts.snap.smi_ok, (
        f"nvidia-smi fails: {facts.snap.data['nvidia_smi'].get('error') or 'not installed'}")
    loaded = expect.proc_driver_version(facts.snap.data.get("nvidia_proc_version"))
    versions = {g.driver_version for g in facts.gpus} | {loaded}
    want = node.nvidia.version
    ok = versions == {want} if want else all(
        v and v.startswith(f"{node.nvidia.branch}.") for v in versions)
    assert ok, (f"driver version differs: expected {want or str(node.nvidia.branch) + '.*'}, "
                f"nvidia-smi says {sorted({g.driver_version for g in facts.gpus})}, "
                f"/proc/driver/nvidia/version says {loaded}")


def test_kernel_module_flavour(node, facts):
    want = "open" if node.nvidia.open_kernel_modules else "proprietary"
    actual = expect.proc_driver_flavour(facts.snap.data.get("nvidia_proc_version"))
    assert actual == want, (f"kernel module flavour differs: expected {want}, loaded module "
                            f"is {actual or 'not loaded'}")


def test_driver_packages_held(node, facts):
    if not node.nvidia.hold:
        pytest.skip("nvidia.hold is false for this node")
    wanted = desired.driver_hold_set(node, facts.packages)
    assert wanted, "no driver package of the profile's branch is installed, nothing is held"
    unheld = [name for name in wanted if name not in facts.holds]
    assert not unheld, f"driver packages not held (apt-mark hold): {unheld}"


def test_unattended_upgrades_exclude_nvidia(node, facts):
    """apt's effective configuration blacklists every NVIDIA package prefix."""
    dump = facts.cmd("apt_config")
    assert dump["rc"] == 0, f"apt-config dump failed: {dump['err'].strip()}"
    listed = expect.apt_config_list(dump["out"], "Unattended-Upgrade::Package-Blacklist")
    missing = [p for p in desired.UNATTENDED_BLACKLIST if p not in listed]
    assert not missing, (f"unattended-upgrades may upgrade NVIDIA packages: prefixes missing "
                         f"from Unattended-Upgrade::Package-Blacklist: {missing}")


def test_nouveau_not_loaded(facts):
    loaded = [m for m in facts.snap.data["modules"] if m.startswith("nouveau")]
    assert not loaded, f"nouveau is loaded: {loaded}"


def _newest_kernel(facts) -> str:
    return desired.newest_kernel(facts.snap.data["kernels"] or [facts.snap.data["kernel"]])


def test_initramfs_newer_than_nouveau_blacklist(facts):
    """The newest kernel's initramfs was rebuilt after nouveau was blacklisted."""
    kernel = _newest_kernel(facts)
    mtimes = facts.extra["mtimes"]
    blacklists = {p: t for p, t in mtimes.items()
                  if fnmatch.fnmatch(p, expect.NOUVEAU_BLACKLISTS)}
    assert blacklists, f"nouveau is not blacklisted: no {expect.NOUVEAU_BLACKLISTS}"
    initrd = mtimes.get(f"/boot/initrd.img-{kernel}")
    if initrd is None:
        pytest.skip(f"no initramfs for {kernel}: nothing in it can load nouveau")
    stale = [p for p, t in blacklists.items() if t > initrd]
    assert not stale, (f"/boot/initrd.img-{kernel} is older than {stale}: run update-initramfs "
                       "-u -k all so nouveau stays blacklisted at boot")


@pytest.mark.slow
def test_initramfs_blacklists_nouveau(host, facts):
    kernel = _newest_kernel(facts)
    initrd = f"/boot/initrd.img-{kernel}"
    if initrd not in facts.extra["mtimes"]:
        pytest.skip(f"no initramfs for {kernel}")
    listing = host.run(f"lsinitramfs {initrd}")
    assert listing.rc == 0, f"lsinitramfs {initrd} failed: {listing.stderr.strip()}"
    inside = [line for line in listing.stdout.splitlines()
              if fnmatch.fnmatch("/" + line.strip().lstrip("/"), expect.NOUVEAU_BLACKLISTS)]
    assert inside, f"{initrd} has no nouveau blacklist ({expect.NOUVEAU_BLACKLISTS})"


def test_module_built_for_newest_kernel(node, facts):
    kernel = _newest_kernel(facts)
    version = node.nvidia.version
    if node.nvidia.source == "ubuntu-archive":
        flavour = "-open" if node.nvidia.open_kernel_modules else ""
        name = f"linux-modules-nvidia-{node.nvidia.branch}-server{flavour}-{kernel}"
        assert name in facts.packages, f"no prebuilt NVIDIA module for {kernel}: {name} missing"
        return
    status = facts.cmd("dkms")
    rows = [r for r in expect.parse_dkms_status(status["out"])
            if r["module"] == "nvidia" and r["kernel"] == kernel and r["state"] == "installed"]
    if version:
        rows = [r for r in rows if r["version"] == version]
    assert rows, (f"no nvidia DKMS module {version or node.nvidia.branch} installed for the "
                  f"newest kernel {kernel}; dkms status: {status['out'].strip() or status['err']}")


def test_module_present_for_every_kernel_that_may_boot(node, facts):
    """The newest kernel (booted next) and, with DKMS, every kernel with headers has an
    nvidia module, so no reboot or kernel choice comes up without GPUs."""
    lacking = plan.kernels_without_module(node, facts.snap)
    assert not lacking, (
        f"no NVIDIA kernel module for kernel {', '.join(lacking)}: "
        + "; ".join(desired.module_fix(node, k) for k in lacking))


def test_persistence_daemon_running(node, facts):
    unit = facts.unit(expect.PERSISTENCED_UNIT)
    state = (unit.get("UnitFileState"), unit.get("ActiveState"))
    # The packaged unit is static (no [Install]); gpunode makes multi-user.target want it.
    assert state[0] in ("enabled", "static") and state[1] == "active", (
        f"{expect.PERSISTENCED_UNIT}: expected enabled (or static, wanted by "
        f"multi-user.target) and active, is {state[0]}/{state[1]}")


def test_driver_files_match(node, facts):
    problems = facts.file_problems("nvidia_driver")
    assert not problems, expect.explain("driver files differ from the profile", problems)
