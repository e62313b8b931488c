"""What the lab needs on the host, and installing it from Debian's archive."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from gpunode.lab.errors import LabError


@dataclass(frozen=True)
class Need:
    what: str  # a command on PATH or an absolute file path
    package: str  # the Debian package providing it
    alternatives: tuple[str, ...] = ()  # any of these satisfies the need too

    def present(self) -> bool:
        return any(_present(w) for w in (self.what, *self.alternatives))


def _present(what: str) -> bool:
    if what.startswith("/"):
        return Path(what).exists()
    return shutil.which(what) is not None or any(
        Path(d, what).exists() for d in ("/usr/sbin", "/sbin")
    )


NEEDS = [
    Need("qemu-system-x86_64", "qemu-system-x86"),
    Need("qemu-img", "qemu-utils"),
    Need("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"),
    Need("/usr/share/OVMF/OVMF_VARS_4M.fd", "ovmf"),
    Need("xorriso", "xorriso", ("genisoimage",)),
    Need("ssh", "openssh-client"),
    Need("ssh-keygen", "openssh-client"),
    # building the base image
    Need("debootstrap", "debootstrap"),
    Need("/usr/share/keyrings/debian-archive-keyring.gpg", "debian-archive-keyring"),
    Need("sfdisk", "fdisk"),
    Need("mkfs.vfat", "dosfstools"),
    Need("mkfs.ext4", "e2fsprogs"),
    Need("mmd", "mtools"),
    Need("mcopy", "mtools"),
    Need("losetup", "mount"),
    Need("blkid", "util-linux"),
    Need("fstrim", "util-linux"),
    # the simulated repositories' tests index packages the way a Debian archive does
    Need("apt-ftparchive", "apt-utils"),
    Need("gpgv", "gpgv"),
    # the checks' NUMA parsing is also tested against this machine's own numactl
    Need("numactl", "numactl"),
]


def missing() -> list[Need]:
    return [n for n in NEEDS if not n.present()]


def missing_packages() -> list[str]:
    return sorted({n.package for n in missing()})


def install_command(pkgs: list[str]) -> str:
    return "apt-get install -y --no-install-recommends " + " ".join(pkgs)


def ensure(install: bool = False) -> list[str]:
    """Check the lab's host dependencies; returns the packages installed now.

    Missing packages are installed with apt-get when `install` is set and we are root;
    otherwise a LabError names the exact command to run. Never silently skips.
    """
    pkgs = missing_packages()
    if not pkgs:
        return []
    what = ", ".join(n.what for n in missing())
    cmd = install_command(pkgs)
    if not install:
        raise LabError(f"the lab needs {what}. Install with: sudo {cmd} "
                       "(or run `gpunode lab deps --install` as root)")
    if os.geteuid() != 0:
        raise LabError(f"the lab needs {what}, and installing needs root. Run: sudo {cmd}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    res = subprocess.run(cmd.split(), env=env, capture_output=True, text=True)
    if res.returncode != 0:
        # The package lists may be missing or stale (fresh containers): refresh once.
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        res = subprocess.run(cmd.split(), env=env, capture_output=True, text=True)
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-10:])
        raise LabError(f"`{cmd}` failed (exit {res.returncode}):\n{tail}")
    still = missing_packages()
    if still:
        raise LabError(f"after installing, still missing: {', '.join(still)}")
    return pkgs
