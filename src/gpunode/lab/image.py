"""The lab's base images: Debian 12, Ubuntu 22.04 or 24.04 built with debootstrap from the
distribution's archive (its signing key verified), booted by GRUB through OVMF.

Built once per OS into `~/.cache/gpunode/lab/images/<recipe-hash>.qcow2`; every lab VM is a
qcow2 overlay on top of one. The hash covers the OS's recipe below and this file's source,
so any change to how an image is made produces a new image.

Disk layout (GPT): partition 1 = EFI system partition (FAT32, GRUB installed to the removable
path EFI/BOOT/BOOTX64.EFI), partition 2 = ext4 root (last, so cloud-init can grow it).

Needs root (debootstrap, loop devices, mounting ext4). Loop devices are attached with offsets
rather than partition scanning, because containers often lack partition device nodes; the ESP
is filled with mtools (no vfat mount needed) and GRUB's EFI image is made with grub-mkimage
(what `grub-install --removable` would write), since grub-install insists on a mounted ESP.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gpunode.lab import paths
from gpunode.lab.errors import LabError, LabInputError

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: The OSes the lab builds guests of (gpunode.model OS names).
LAB_OS = ("debian-12", "ubuntu-22.04", "ubuntu-24.04")
UBUNTU_MIRROR = "http://archive.ubuntu.com/ubuntu"
#: The Ubuntu archive's signing key (2018), which alone signs jammy's and noble's Release
#: files (InRelease and Release.gpg; the 2012 key signs neither): the trust anchor of an
#: Ubuntu build. Its key comes out of the archive's ubuntu-keyring package and
#: counts only when its fingerprint is exactly this.
UBUNTU_ARCHIVE_KEY = "F6ECB3762474EDA9D21B7022871920D1991BC93C"
UBUNTU_KEYRING_DEB = "pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1_all.deb"

PACKAGES = [
    # boot and base system
    "systemd", "systemd-sysv", "udev", "dbus", "kmod", "procps", "netbase",
    "linux-image-amd64", "initramfs-tools", "grub-efi-amd64", "dosfstools", "e2fsprogs",
    # access and provisioning
    "openssh-server", "sudo", "python3", "cloud-init", "cloud-guest-utils",
    # debootstrap does not resolve virtual packages (python3-cffi-backend-api-*) by itself
    "python3-cffi-backend",
    "qemu-guest-agent",
    # small things any cloud image has
    "ca-certificates", "curl", "gnupg", "iproute2", "iputils-ping", "numactl", "less",
]

# Installed after debootstrap from bookworm, -updates and -security: the newest kernel (so a
# deploy does not pull in a kernel upgrade) and what every GPU deploy installs first (DKMS,
# its compiler and the kernel headers). A fresh real host downloads these during the deploy;
# the lab carries them so that every CI run does not spend minutes on them under TCG.
PRESEED_PACKAGES = ["dkms", "linux-headers-amd64", "python3-venv", "pciutils", "irqbalance"]

# Ubuntu 22.04 and 24.04: the same guest, with the virtual kernel (no firmware packages) plus its
# extra modules (nouveau), from main and universe (qemu-guest-agent).
UBUNTU_PACKAGES = [p if p != "linux-image-amd64" else "linux-image-virtual" for p in PACKAGES]
UBUNTU_PRESEED = ["dkms", "linux-headers-generic", "python3-venv", "pciutils", "irqbalance"]
#: Ubuntu 22.04's python3 is 3.10, without tomllib: the simulated nvidia-ctk (sim/guest)
#: reads TOML with tomli there (universe). Lab-only: the real nvidia-ctk is a Go binary.
JAMMY_PRESEED = [*UBUNTU_PRESEED, "python3-tomli"]

# Written last (after every package install in the chroot, whose initramfs must keep all
# modules): initramfs rebuilds inside a lab VM include only the modules it uses.
LATE_FILES: dict[str, str] = {
    "etc/initramfs-tools/conf.d/gpunode-lab.conf": (
        "# gpunode lab: small initramfs images, quick to rebuild under TCG.\n"
        "MODULES=dep\n"
    ),
}

DISK_MIB = 3072
ESP_MIB = 127
ESP_START_MIB = 1
ROOT_START_MIB = ESP_START_MIB + ESP_MIB
ROOT_MIB = DISK_MIB - ROOT_START_MIB - 1  # the last MiB holds the backup GPT

# Files written into the image. Lab choices are named `gpunode-lab*` so they are obvious.
FILES: dict[str, str] = {
    "etc/default/grub": (
        "# gpunode lab image: serial console, no menu delay.\n"
        "GRUB_DEFAULT=0\n"
        "GRUB_TIMEOUT=0\n"
        "GRUB_DISTRIBUTOR=`( . /etc/os-release; echo ${NAME:-Debian} ) 2>/dev/null || echo Debian`\n"
        'GRUB_CMDLINE_LINUX_DEFAULT="quiet"\n'
        'GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8"\n'
        'GRUB_TERMINAL="serial console"\n'
        'GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"\n'
    ),
    "etc/systemd/network/20-gpunode-lab.network": (
        "# gpunode lab: qemu user-mode networking, DHCP on the one NIC.\n"
        "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"
    ),
    # qemu user networking's DNS forwarder.
    "etc/resolv.conf": "nameserver 10.0.2.3\n",
    "etc/cloud/cloud.cfg.d/90-gpunode-lab.cfg": (
        "# gpunode lab: seeds come only from a NoCloud ISO; networking is systemd-networkd.\n"
        "datasource_list: [NoCloud, None]\n"
        "network: {config: disabled}\n"
        "# RSA host key generation is slow under TCG; clients all speak ed25519/ecdsa.\n"
        "ssh_genkeytypes: [ed25519, ecdsa]\n"
        "# Only the modules the lab's seeds use: every module costs seconds under TCG, and\n"
        "# set-passwords would restart sshd after the VM already answered SSH.\n"
        "cloud_init_modules: [seed_random, growpart, resizefs, set_hostname, update_hostname,\n"
        "  update_etc_hosts, users-groups, ssh]\n"
        "cloud_config_modules: []\n"
        "cloud_final_modules: [final-message]\n"
    ),
    # Password logins off in the image (users are created with locked passwords anyway),
    # so the seed need not ask cloud-init to change sshd's configuration.
    "etc/ssh/sshd_config.d/gpunode-lab.conf": (
        "# gpunode lab: keys only.\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
    ),
    # Debian does not blacklist nouveau, but without an NVIDIA device udev never loads it.
    # A fresh GPU host has nouveau loaded; the lab reproduces that state on purpose.
    "etc/modules-load.d/gpunode-lab-nouveau.conf": (
        "# gpunode lab: load nouveau like on a fresh host with an NVIDIA GPU.\nnouveau\n"
    ),
    # Modules a VM guest never needs that udev would load from CPU features under TCG,
    # each costing boot time.
    "etc/modprobe.d/gpunode-lab-vm.conf": (
        "# gpunode lab: not needed in a lab VM, slow to load under TCG.\n"
        "blacklist kvm_amd\nblacklist kvm_intel\nblacklist kvm\nblacklist cfg80211\n"
        "blacklist powernow_k8\nblacklist pcspkr\n"
    ),
    "etc/apt/sources.list": (
        "deb http://deb.debian.org/debian bookworm main\n"
        "deb http://deb.debian.org/debian bookworm-updates main\n"
        "deb http://deb.debian.org/debian-security bookworm-security main\n"
    ),
    "etc/hostname": "debian\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
}


def _ubuntu_files(suite: str) -> dict[str, str]:
    """The Debian guest's files with the Ubuntu release's archive, -updates and -security."""
    return {
        **FILES,
        "etc/apt/sources.list": (
            f"deb http://archive.ubuntu.com/ubuntu {suite} main universe\n"
            f"deb http://archive.ubuntu.com/ubuntu {suite}-updates main universe\n"
            f"deb http://security.ubuntu.com/ubuntu {suite}-security main universe\n"
        ),
        "etc/hostname": "ubuntu\n",
    }


# Timers that would wake up under TCG in the middle of a test and eat scarce CPU.
MASKED_UNITS = ["apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                "fstrim.timer"]

RECIPE = {
    "suite": SUITE,
    "packages": PACKAGES,
    "disk_mib": DISK_MIB,
    "esp_mib": ESP_MIB,
    "files": FILES,
    "masked": MASKED_UNITS,
    "preseed": PRESEED_PACKAGES,
    "late_files": LATE_FILES,
}
#: Per lab OS: the debootstrap suite, components and script, packages, files, the
#: distributor's name in the boot menu, and the extra kernel modules package to add.
RECIPES: dict[str, dict] = {
    "debian-12": RECIPE,
    **{os_name: {
        **RECIPE,
        "os": os_name,
        "suite": suite,
        "components": ["main", "universe"],
        "script": "gutsy",  # debootstrap's script for every Ubuntu release since 7.10
        "packages": UBUNTU_PACKAGES,
        "files": _ubuntu_files(suite),
        "preseed": preseed,
        "kernel_extra": "linux-modules-extra-",
        "distributor": "Ubuntu",
    } for os_name, suite, preseed in (("ubuntu-22.04", "jammy", JAMMY_PRESEED),
                                      ("ubuntu-24.04", "noble", UBUNTU_PRESEED))},
}


#: The guest kernels the lab builds: the release's own (GA) kernel, or Ubuntu's HWE kernel.
KERNELS = ("generic", "hwe")
#: Ubuntu's HWE kernels, from -updates and -security (the release pocket's HWE meta-packages
#: still point at the GA kernel; the build's dist-upgrade moves them on): the virtual image
#: meta-package, the headers meta-package a deploy keeps (desired.headers_meta) and the
#: extra modules package, where the HWE kernel still splits one off. Checked against the
#: archive's Packages indices: jammy-updates' linux-image-virtual-hwe-22.04 is 6.8 with
#: linux-modules-extra-6.8.0-*; noble-updates' linux-image-virtual-hwe-24.04 is 7.0, whose
#: linux-modules-7.0.0-* holds every module (nouveau too) and has no -extra package.
HWE = {"ubuntu-22.04": ("22.04", "linux-modules-extra-"), "ubuntu-24.04": ("24.04", None)}


def _hwe_recipe(r: dict, release: str, extra: str | None) -> dict:
    """An Ubuntu recipe with the release's HWE kernel in place of its GA kernel."""
    return {
        **r,
        "kernel": "hwe",
        "packages": [f"linux-image-virtual-hwe-{release}" if p == "linux-image-virtual" else p
                     for p in r["packages"]],
        "preseed": [f"linux-headers-generic-hwe-{release}" if p == "linux-headers-generic"
                    else p for p in r["preseed"]],
        "kernel_extra": extra,
    }


HWE_RECIPES: dict[str, dict] = {
    os_name: _hwe_recipe(RECIPES[os_name], release, extra)
    for os_name, (release, extra) in HWE.items()
}


def recipe(os_name: str, kernel: str = "generic") -> dict:
    """The recipe of `os_name`'s image with `kernel` (KERNELS). The generic recipes carry no
    kernel key, so their hashes (and the images cached under them) predate the choice."""
    if os_name not in RECIPES:
        raise LabError(f"the lab builds guests of {', '.join(LAB_OS)}, not {os_name}")
    if kernel not in KERNELS:
        raise LabInputError(f"unknown lab kernel {kernel!r}: use {' or '.join(KERNELS)}")
    if kernel == "generic":
        return RECIPES[os_name]
    if os_name not in HWE_RECIPES:
        raise LabInputError(
            f"{os_name} has no HWE kernel (Ubuntu's hardware enablement kernels exist only on "
            f"{', '.join(HWE_RECIPES)}); leave --kernel out or use --kernel generic")
    return HWE_RECIPES[os_name]


def recipe_hash(os_name: str = "debian-12", kernel: str = "generic") -> str:
    """Hash of the OS's recipe and of the functions that build the image (not of error
    texts or helpers elsewhere, so editing those does not force a rebuild)."""
    h = hashlib.sha256()
    h.update(json.dumps(recipe(os_name, kernel), sort_keys=True).encode())
    for fn in (_build, _configure, _fstab, _install_grub, _write_grub_cfg):
        h.update(inspect.getsource(fn).encode())
    h.update(" ".join(GRUB_MODULES).encode())
    return h.hexdigest()[:16]


def image_path(os_name: str = "debian-12", kernel: str = "generic") -> Path:
    return paths.images_dir() / f"{recipe_hash(os_name, kernel)}.qcow2"


def host_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses (bookworm, main), else deb.debian.org."""
    candidates: list[Path] = [apt_dir / "sources.list"]
    sdir = apt_dir / "sources.list.d"
    if sdir.is_dir():
        candidates += sorted(sdir.glob("*.list")) + sorted(sdir.glob("*.sources"))
    for f in candidates:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (ln.partition(":") for ln in stanza.splitlines())
                    if not k.startswith("#") and v
                )
                suites = fields.get("suites", "").split()
                for uri in fields.get("uris", "").split():
                    if SUITE in suites and uri.startswith("http") and "security" not in uri:
                        return uri.rstrip("/")
        else:
            for ln in text.splitlines():
                ln = re.sub(r"\[[^\]]*\]", " ", ln)  # drop [arch=... signed-by=...] options
                parts = ln.split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[1].startswith("http") \
                        and parts[2] == SUITE:
                    return parts[1].rstrip("/")
    return DEFAULT_MIRROR


def _run(cmd: list[str], log: Path, **kw: object) -> None:
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, **kw)  # type: ignore[call-overload]
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise LabError(
            f"building the lab image failed: `{' '.join(cmd[:3])} ...` exited {rc}.\n"
            f"Last lines of {log}:\n{tail}"
        )


def _out(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_image(rebuild: bool = False, mirror: str | None = None,
                 os_name: str = "debian-12", kernel: str = "generic") -> Path:
    """Return the OS's cached base image with `kernel` (KERNELS), building it first when
    missing (or when `rebuild`)."""
    target = image_path(os_name, kernel)
    with _lock(paths.images_dir() / ".build.lock"):
        if target.exists() and not rebuild:
            return target
        if os.geteuid() != 0:
            raise LabError(
                f"the lab base image {target} does not exist and building it needs root "
                "(debootstrap, loop devices). Run once as root: "
                "`sudo .venv/bin/python -m gpunode.lab.cli image`"
            )
        if os_name == "debian-12":
            _build(target, mirror or host_mirror(), RECIPE, None)
        else:
            _build(target, mirror or UBUNTU_MIRROR, recipe(os_name, kernel), ubuntu_keyring())
    return target


def ubuntu_keyring() -> Path:
    """The Ubuntu archive's signing key as a keyring for debootstrap (cached): taken from
    the archive's ubuntu-keyring package, kept only when its fingerprint is
    UBUNTU_ARCHIVE_KEY."""
    out = paths.cache_root() / "keyrings" / f"ubuntu-archive-{UBUNTU_ARCHIVE_KEY[-8:]}.gpg"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # gpg's home is short (its sockets' paths are limited) and private (gpg insists).
    work = Path(tempfile.mkdtemp(prefix="gpunode-keyring-"))
    try:
        deb = work / "ubuntu-keyring.deb"
        url = f"{UBUNTU_MIRROR}/{UBUNTU_KEYRING_DEB}"
        res = subprocess.run(["curl", "-fsSL", "--retry", "3", "-o", str(deb), url],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise LabError(f"the Ubuntu archive cannot be reached ({url}: "
                           f"{res.stderr.strip() or 'curl exit ' + str(res.returncode)})")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True,
                       capture_output=True)
        gpg = ["gpg", "--batch", "--no-default-keyring", "--homedir", str(work),
               "--keyring", str(work / "all.gpg")]
        subprocess.run([*gpg, "--import",
                        str(work / "x/usr/share/keyrings/ubuntu-archive-keyring.gpg")],
                       check=True, capture_output=True)
        key = subprocess.run([*gpg, "--export", UBUNTU_ARCHIVE_KEY], check=True,
                             capture_output=True).stdout
        listed = subprocess.run(["gpg", "--batch", "--with-colons", "--import-options",
                                 "show-only", "--homedir", str(work), "--import"], input=key,
                                capture_output=True).stdout.decode() if key else ""
        fprs = [ln.split(":")[9] for ln in listed.splitlines() if ln.startswith("fpr:")]
        if not fprs or fprs[0] != UBUNTU_ARCHIVE_KEY:
            raise LabError(f"{url} does not hold the Ubuntu archive key {UBUNTU_ARCHIVE_KEY} "
                           f"(found {fprs or 'none'}); refusing to build from it")
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(key)
        tmp.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _build(target: Path, mirror: str, r: dict, keyring: Path | None) -> None:
    work = target.with_suffix(".build")
    if work.exists():
        _cleanup_mounts(work / "mnt")
        shutil.rmtree(work)
    (work / "mnt").mkdir(parents=True)
    log = target.with_suffix(".build.log")
    log.write_text(f"gpunode lab image build {time.strftime('%F %T')} mirror={mirror}\n")
    raw = work / "disk.raw"
    mnt = work / "mnt"
    loops: list[str] = []
    try:
        with raw.open("wb") as fh:
            fh.truncate(DISK_MIB << 20)
        layout = (
            "label: gpt\n"
            f"start={ESP_START_MIB}MiB, size={ESP_MIB}MiB, type=U, name=esp\n"
            f"start={ROOT_START_MIB}MiB, size={ROOT_MIB}MiB, type=L, name=root\n"
        )
        subprocess.run(["sfdisk", "-q", str(raw)], input=layout, text=True, check=True,
                       capture_output=True)
        esp_loop = _out(["losetup", "-f", "--show", "-o", str(ESP_START_MIB << 20),
                         "--sizelimit", str(ESP_MIB << 20), str(raw)])
        loops.append(esp_loop)
        root_loop = _out(["losetup", "-f", "--show", "-o", str(ROOT_START_MIB << 20),
                          "--sizelimit", str(ROOT_MIB << 20), str(raw)])
        loops.append(root_loop)
        root_uuid = str(uuid.uuid4())
        _run(["mkfs.vfat", "-F", "32", "-n", "EFI", esp_loop], log)
        _run(["mkfs.ext4", "-q", "-L", "root", "-U", root_uuid, "-E", "discard", root_loop], log)
        esp_uuid = _out(["blkid", "-s", "UUID", "-o", "value", esp_loop])
        _run(["mount", root_loop, str(mnt)], log)
        (mnt / "boot/efi").mkdir(parents=True)
        # fstab before the packages: initramfs-tools reads the root fs type from it when it
        # builds the initrd during debootstrap.
        (mnt / "etc").mkdir()
        (mnt / "etc/fstab").write_text(_fstab(root_uuid, esp_uuid))
        debs = paths.cache_root() / ("debs" if r["suite"] == SUITE else f"debs-{r['suite']}")
        debs.mkdir(parents=True, exist_ok=True)
        options = [f"--components={','.join(r['components'])}"] if r.get("components") else []
        options += [f"--keyring={keyring}"] if keyring else []
        script = [f"/usr/share/debootstrap/scripts/{r['script']}"] if r.get("script") else []
        try:
            _run(["debootstrap", "--variant=minbase", *options,
                  f"--include={','.join(r['packages'])}", f"--cache-dir={debs}", r["suite"],
                  str(mnt), mirror, *script], log)
        except LabError as exc:
            dlog = mnt / "debootstrap/debootstrap.log"
            detail = dlog.read_text(errors="replace").splitlines()[-30:] if dlog.exists() else []
            raise LabError(f"{exc}\nLast lines of debootstrap.log:\n" + "\n".join(detail)) from None
        _configure(mnt, root_uuid, esp_uuid, log, r)
        efi = mnt / "boot/grub/BOOTX64.EFI"
        os.environ.setdefault("MTOOLS_SKIP_CHECK", "1")
        _run(["mmd", "-i", esp_loop, "::/EFI", "::/EFI/BOOT"], log)
        _run(["mcopy", "-i", esp_loop, str(efi), "::/EFI/BOOT/BOOTX64.EFI"], log)
        efi.unlink()
        _run(["fstrim", str(mnt)], log)
    finally:
        _cleanup_mounts(mnt)
        for lp in reversed(loops):
            subprocess.call(["losetup", "-d", lp])
    tmp = target.with_suffix(".qcow2.tmp")
    _run(["qemu-img", "convert", "-O", "qcow2", "-c", "-o", "compression_type=zstd",
          str(raw), str(tmp)], log)
    tmp.chmod(0o444)  # VMs only ever read it (overlays); old images stay for their overlays
    tmp.rename(target)
    shutil.rmtree(work)


def _fstab(root_uuid: str, esp_uuid: str) -> str:
    return (f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n"
            f"UUID={esp_uuid} /boot/efi vfat umask=0077 0 2\n")


def _configure(mnt: Path, root_uuid: str, esp_uuid: str, log: Path, r: dict) -> None:
    for rel, text in r["files"].items():
        dest = mnt / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink():
            dest.unlink()
        dest.write_text(text)
    (mnt / "etc/fstab").write_text(_fstab(root_uuid, esp_uuid))
    # Each VM gets its own machine-id and SSH host keys at first boot.
    (mnt / "etc/machine-id").write_text("")
    (mnt / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for key in (mnt / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    binds = ["dev", "dev/pts", "proc", "sys"]
    try:
        for b in binds:
            _run(["mount", "--bind", f"/{b}", str(mnt / b)], log)
        chroot = ["chroot", str(mnt)]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "DEBIAN_FRONTEND": "noninteractive"}
        _run([*chroot, "systemctl", "enable", "systemd-networkd", "qemu-guest-agent"], log,
             env=env)
        _run([*chroot, "systemctl", "mask", *r["masked"]], log, env=env)
        apt = [*chroot, "apt-get", "-q", "-y", "--no-install-recommends"]
        _run([*chroot, "apt-get", "-q", "update"], log, env=env)
        _run([*apt, "dist-upgrade"], log, env=env)
        _run([*apt, "install", *r["preseed"]], log, env=env)
        if r.get("kernel_extra"):  # the newest kernel's modules beyond the virtual set
            _run([*chroot, "sh", "-c", "apt-get -q -y --no-install-recommends install "
                  f"{r['kernel_extra']}$(ls /lib/modules | sort -V | tail -1)"], log, env=env)
        # Keep one kernel (the newest): every initramfs rebuild in a VM covers each kernel.
        _run([*chroot, "sh", "-c", "newest=$(ls /lib/modules | sort -V | tail -1); "
              "old=$(dpkg-query -W -f '${Package}\\n' 'linux-image-[0-9]*' "
              "'linux-modules-[0-9]*' 2>/dev/null | grep -v -- \"${newest%-*}-\" || true); "
              "[ -z \"$old\" ] || apt-get -q -y purge $old"], log, env=env)
        _install_grub(mnt, root_uuid, log, env)
        _write_grub_cfg(mnt, root_uuid, r)
        _run([*chroot, "apt-get", "clean"], log, env=env)
        for rel, text in LATE_FILES.items():
            (mnt / rel).parent.mkdir(parents=True, exist_ok=True)
            (mnt / rel).write_text(text)
    finally:
        for b in reversed(binds):
            subprocess.call(["umount", "-l", str(mnt / b)], stderr=subprocess.DEVNULL)
    for d in ("var/lib/apt/lists", "var/cache/apt"):
        for p in (mnt / d).glob("*"):
            if p.is_file() and p.name != "lock":
                p.unlink()
    for p in (mnt / "var/log").rglob("*"):
        if p.is_file():
            p.write_text("")
    _verify(mnt)


GRUB_MODULES = [
    "part_gpt", "part_msdos", "fat", "ext2", "search", "search_fs_uuid", "search_label",
    "normal", "configfile", "linux", "boot", "echo", "test", "gzio", "all_video", "efi_gop",
    "serial", "terminal", "ls", "cat", "reboot", "halt",
]


def _install_grub(mnt: Path, root_uuid: str, log: Path, env: dict[str, str]) -> None:
    """Write /boot/grub/x86_64-efi and a removable-path EFI image that finds the root fs."""
    moddir = mnt / "boot/grub/x86_64-efi"
    moddir.mkdir(parents=True, exist_ok=True)
    for f in (mnt / "usr/lib/grub/x86_64-efi").iterdir():
        if f.suffix in (".mod", ".lst", ".o") or f.name == "modinfo.sh":
            shutil.copy2(f, moddir / f.name)
    (mnt / "boot/grub/early.cfg").write_text(
        f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
        "set prefix=($root)/boot/grub\n"
    )
    _run(["chroot", str(mnt), "grub-mkimage", "-O", "x86_64-efi", "-o",
          "/boot/grub/BOOTX64.EFI", "-p", "/boot/grub", "-c", "/boot/grub/early.cfg",
          *GRUB_MODULES], log, env=env)
    (mnt / "boot/grub/early.cfg").unlink()


def _write_grub_cfg(mnt: Path, root_uuid: str, r: dict) -> None:
    """The first boot's grub.cfg.

    `update-grub` cannot be used at build time: its 10_linux script skips root file systems
    on file-backed loop devices. The guest's own `update-grub` (on /dev/vda2) replaces this
    file the first time the toolkit changes the kernel command line.
    """
    kernels = sorted((mnt / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise LabError("lab image build: no kernel in /boot")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    grub = r["files"]["etc/default/grub"]
    args = " ".join(m.group(1) for m in re.finditer(
        r'^GRUB_CMDLINE_LINUX(?:_DEFAULT)?="([^"]*)"', grub, re.M) if m.group(1))
    (mnt / "boot/grub/grub.cfg").write_text(
        "# Written by the gpunode lab image build; `update-grub` in the guest replaces it.\n"
        "serial --unit=0 --speed=115200\n"
        "terminal_input serial console\n"
        "terminal_output serial console\n"
        "set timeout=0\n"
        "set default=0\n"
        "insmod part_gpt\n"
        "insmod ext2\n"
        "insmod gzio\n"
        f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
        f"menuentry '{r.get('distributor', 'Debian GNU/Linux')}, with Linux {version}' {{\n"
        f"\tlinux /boot/vmlinuz-{version} root=UUID={root_uuid} ro {args}\n"
        f"\tinitrd /boot/initrd.img-{version}\n"
        "}\n"
    )


def _verify(mnt: Path) -> None:
    """Fail the build when the image would not give the lab what it promises."""
    if not (mnt / "boot/grub/BOOTX64.EFI").is_file():
        raise LabError("lab image build: grub-mkimage wrote no EFI image")
    if "menuentry" not in (mnt / "boot/grub/grub.cfg").read_text():
        raise LabError("lab image build: /boot/grub/grub.cfg has no kernel entry")
    if not list((mnt / "usr/lib/modules").glob("*/kernel/drivers/gpu/drm/nouveau/nouveau.ko*")):
        raise LabError("lab image build: the kernel ships no nouveau module")
    for d in ("etc/modprobe.d", "usr/lib/modprobe.d", "lib/modprobe.d"):
        for f in (mnt / d).glob("*.conf") if (mnt / d).is_dir() else []:
            if re.search(r"^\s*blacklist\s+nouveau", f.read_text(), re.M):
                raise LabError(f"lab image build: {f} blacklists nouveau")


def _cleanup_mounts(mnt: Path) -> None:
    """Unmount everything below `mnt` (deepest first), e.g. after an interrupted build."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = str(mnt.resolve())
    points = [m.split()[1] for m in mounts if len(m.split()) > 1]
    for p in sorted((p for p in points if p == prefix or p.startswith(prefix + "/")),
                    key=len, reverse=True):
        subprocess.call(["umount", "-l", p], stderr=subprocess.DEVNULL)
