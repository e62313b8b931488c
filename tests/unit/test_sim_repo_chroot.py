"""SIMULATION equipment test: install the simulated NVIDIA packages with real dpkg/apt.

Runs in `make test` (as root, like the lab): the chroot is the root file system of the lab's
base image (the Debian 12 debootstrap `gpunode lab image` builds and caches), copied out once
into `~/.cache/gpunode/lab/chroot/<image>/` and used through an overlay, so every test starts
from the same pristine tree. $GPUNODE_SIM_CHROOT names another Debian 12 root file system
instead (never changed). The chroot shares the host's network namespace, so it reaches the
server on 127.0.0.1 as a lab guest reaches 10.0.2.2.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpunode.lab import image, paths
from gpunode.lab.errors import LabError
from gpunode.lab.sim import packages as cat
from gpunode.lab.sim import repo
from gpunode.lab.sim.server import serving

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, loop devices, mounts), "
                       "as the lab does: run `make test` as root"),
]


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def extract_root(qcow2: Path, target: Path) -> Path:
    """Copy the root partition of a lab image into `target` (once; later calls reuse it)."""
    if (target / "usr/bin/apt-get").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "usr/bin/apt-get").exists():
            return target
        work = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
        raw, mnt, loop = work / "disk.raw", work / "mnt", ""
        mnt.mkdir()
        try:
            _sh("qemu-img", "convert", "-O", "raw", str(qcow2), str(raw))
            loop = _sh("losetup", "-f", "--show", "-r", "-o", str(image.ROOT_START_MIB << 20),
                       "--sizelimit", str(image.ROOT_MIB << 20), str(raw))
            _sh("mount", "-o", "ro", loop, str(mnt))
            _sh("cp", "-a", f"{mnt}/.", str(work / "root"))
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
            if loop:
                subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)
            raw.unlink(missing_ok=True)
        (work / "root").rename(target)
        shutil.rmtree(work, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def base_root() -> Path:
    override = os.environ.get("GPUNODE_SIM_CHROOT")
    if override:
        return Path(override)
    try:
        qcow2 = image.ensure_image()  # cached; built (as root) when missing, as `lab up` does
    except LabError as exc:
        pytest.fail(f"the lab base image is needed for the chroot: {exc}", pytrace=False)
    return extract_root(qcow2, paths.cache_root() / "chroot" / qcow2.stem)


V_OLD, V_NEW = cat.DRIVER_VERSIONS


class Chroot:
    def __init__(self, root: Path) -> None:
        self.root = root

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
               "DEBIAN_FRONTEND": "noninteractive"}
        proc = subprocess.run(["chroot", str(self.root), "/bin/sh", "-ec", script], env=env,
                              capture_output=True, text=True, timeout=300)
        if check:
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    def read(self, path: str) -> str:
        return (self.root / path.lstrip("/")).read_text()


@pytest.fixture
def chroot(base_root: Path) -> Iterator[tuple[Chroot, str, Path]]:
    tmp = Path(tempfile.mkdtemp(prefix="gsimch-"))
    root = tmp / "root"
    for d in ("root", "upper", "work"):
        (tmp / d).mkdir()
    overlay = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={base_root},upperdir="
         f"{tmp / 'upper'},workdir={tmp / 'work'}", str(root)], capture_output=True).returncode == 0
    if not overlay:  # no overlayfs here: a copy (slower, same result)
        root.rmdir()
        subprocess.run(["cp", "-a", str(base_root), str(root)], check=True)
    # Our repository only (the image's Debian sources are not reachable from a test).
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    for f in (root / "etc/apt/sources.list.d").glob("*"):
        f.unlink()
    # The image's initramfs-tools rebuilds (MODULES=dep) need /sys of a booted guest; what
    # these tests prove is apt/dpkg's handling of the repository, so the chroot skips them.
    conf = root / "etc/initramfs-tools/update-initramfs.conf"
    if conf.exists():
        conf.write_text("update_initramfs=no\nbackup_initramfs=no\n")
    if not Path(root, "usr/bin/dkms").exists():  # a bare debootstrap: a stand-in for dkms
        fake_dkms = cat.Package(name="dkms", version="3.0.10-8", architecture="all",
                                section="kernel", maintainer="lab <lab@gpunode.invalid>",
                                description="test stand-in for Debian's dkms")
        (root / "root/dkms.deb").write_bytes(repo.build_deb(fake_dkms)[0])
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        www = _build(tmp)
        with serving(www, 0) as url:
            yield Chroot(root), url, www
    finally:
        subprocess.run(["umount", str(root / "proc")], check=False)
        if overlay:
            subprocess.run(["umount", str(root)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def _build(tmp: Path) -> Path:
    www = tmp / "www"
    # The server's port is only known later; the keyring's .list is rewritten in the test.
    repo.build(www, base_url="http://127.0.0.1:1", key_dir=tmp / "key")
    return www


def test_install_pin_upgrade_switch_and_purge(chroot: tuple[Chroot, str, Path]) -> None:
    from gpunode.core import desired
    from gpunode.model import NodeProfile

    defaults = NodeProfile.model_validate({
        "name": "n", "connection": {"address": "h"}, "os": "debian-12",
        "cudnn": {"enabled": True}, "container_toolkit": {"enabled": True}})
    ch, url, www = chroot
    d = f"{url}/compute/cuda/repos/debian12/x86_64"
    ch.sh("test ! -e /root/dkms.deb || dpkg -i /root/dkms.deb")
    ch.sh(f"python3 -c \"import urllib.request as u; open('/root/k.deb','wb')"
          f".write(u.urlopen('{d}/cuda-keyring_1.1-1_all.deb').read())\" && dpkg -i /root/k.deb")
    lst = "etc/apt/sources.list.d/cuda-debian12-x86_64.list"
    assert ch.read(lst).startswith("deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg]")
    (ch.root / lst).write_text(ch.read(lst).replace("http://127.0.0.1:1", url))
    ch.sh("apt-get update")
    ch.sh(f"apt-get install -y nvidia-driver-pinning-{V_OLD}")
    ch.sh("apt-get install -y nvidia-driver-cuda nvidia-kernel-open-dkms")
    assert ch.read("/usr/lib/gpunode-sim/installed/kmod") == f"{V_OLD} open\n"
    assert ch.read("/usr/lib/gpunode-sim/installed/driver") == f"{V_OLD}\n"
    assert (ch.root / "etc/modprobe.d/nvidia-blacklists-nouveau.conf").exists()
    assert (ch.root / "etc/systemd/system/sysinit.target.wants/gpunode-sim-boot.service"
            ).is_symlink()
    # apt-mark hold keeps the held library back; the branch pin then allows the upgrade.
    ch.sh("apt-mark hold libnvidia-ml1 && apt-get install -y nvidia-driver-pinning-580 && "
          "apt-get upgrade -y")
    assert ch.read("/usr/lib/gpunode-sim/installed/driver") == f"{V_OLD}\n"
    ch.sh("apt-mark unhold libnvidia-ml1 && apt-get upgrade -y")
    assert ch.read("/usr/lib/gpunode-sim/installed/driver") == f"{V_NEW}\n"
    assert ch.read("/usr/lib/gpunode-sim/installed/kmod") == f"{V_NEW} open\n"
    # open -> proprietary: apt removes the conflicting flavour.
    ch.sh("apt-get install -y nvidia-kernel-dkms")
    assert ch.read("/usr/lib/gpunode-sim/installed/kmod") == f"{V_NEW} proprietary\n"
    ch.sh("apt-get install -y cuda-toolkit-13-0 libnccl-dev datacenter-gpu-manager-4-cuda13")
    assert ch.read("/usr/lib/gpunode-sim/installed/cuda") == f"{cat.NVCC_VERSION}\n"
    assert os.readlink(ch.root / "usr/local/cuda") == "/etc/alternatives/cuda"
    # cuDNN as gpunode names it (the model's defaults): -dev brings the headers it needs.
    ch.sh("apt-get install -y " + " ".join(x.spec for x in desired.cudnn_packages(defaults)))
    assert os.readlink(ch.root / "etc/alternatives/libcudnn") == \
        "/usr/include/x86_64-linux-gnu/cudnn_v9.h"
    assert "#define CUDNN_MAJOR 9" in ch.read("/usr/include/x86_64-linux-gnu/cudnn_version_v9.h")
    assert os.readlink(ch.root / "usr/lib/x86_64-linux-gnu/libcudnn.so") == "libcudnn.so.9"
    # Container toolkit repo: its own key (the docs' gpgkey, dearmored) and $(ARCH) line.
    keyring = ch.root / cat.CTK_KEYRING_PATH.lstrip("/")
    keyring.write_bytes(subprocess.run(
        ["gpg", "--dearmor"], input=(www / "libnvidia-container/gpgkey").read_bytes(),
        capture_output=True, check=True).stdout)
    (ch.root / "etc/apt/sources.list.d/nvidia-container-toolkit.list").write_text(
        f"deb [signed-by={cat.CTK_KEYRING_PATH}] {url}/libnvidia-container/stable/deb/$(ARCH) /\n")
    # the model's default toolkit as gpunode pins it, then the newest, as an upgrade
    ch.sh("apt-get update && apt-get install -y " + " ".join(
        x.spec for x in desired.container_toolkit_packages(defaults)))
    assert (ch.root / "etc/systemd/system/nvidia-cdi-refresh.path").is_file()
    ver = "1.18.1-1"
    ch.sh(f"apt-get install -y nvidia-container-toolkit={ver} "
          f"nvidia-container-toolkit-base={ver} libnvidia-container-tools={ver} "
          f"libnvidia-container1={ver}")
    assert (ch.root / "etc/nvidia-container-runtime/config.toml").is_file()
    assert os.readlink(ch.root / "usr/bin/nvidia-container-toolkit") == \
        "nvidia-container-runtime-hook"
    ch.sh("apt-get purge -y nvidia-kernel-dkms libnvidia-ml1")
    assert not (ch.root / "usr/lib/gpunode-sim/installed/kmod").exists()
    assert not (ch.root / "usr/lib/gpunode-sim/installed/driver").exists()


def test_uv_and_vllm_standin_from_the_local_index(chroot: tuple[Chroot, str, Path]) -> None:
    """The guest path without pip-over-https: uv's wheel over plain HTTP, unpacked with the
    stdlib; then uv installs the vLLM stand-in from the local index (downloads once)."""
    from gpunode.lab.sim import pyindex

    ch, url, www = chroot
    facts = pyindex.build(www)
    uv_wheel = next(f for f in facts["projects"]["uv"])
    ch.sh(
        "python3 -c \"import urllib.request as u; open('/root/uv.whl','wb')"
        f".write(u.urlopen('{url}/pypi/files/{uv_wheel}').read())\" && "
        "python3 -m zipfile -e /root/uv.whl /root/uvx && "
        f"install -m 0755 /root/uvx/uv-{pyindex.UV_VERSION}.data/scripts/uv /usr/local/bin/uv"
    )
    assert pyindex.UV_VERSION in ch.sh("uv --version").stdout
    if facts["standin_wheel"]:
        ch.sh("uv venv --python /usr/bin/python3 /opt/vllm && "
              f"uv pip install --python /opt/vllm/bin/python --index-url {url}/pypi/simple/ vllm")
        proc = ch.sh("/opt/vllm/bin/vllm serve --swap-space 4 m", check=False)
        assert proc.returncode != 0  # unknown flag, as vLLM 0.33.0's argparse rejects it
