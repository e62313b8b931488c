"""SIMULATION: the catalogue of simulated NVIDIA packages served by the lab's apt repositories.

Package names, version strings and dependency relations follow NVIDIA's repositories as
recorded in shared/research/nvidia-repo.md; package *contents* are small scripts and text
files standing in for NVIDIA's binaries (lab equipment, never production software).
Each stanza's long description says SIMULATION.

Facts marked INFERRED below are not verified against a live NVIDIA index (none was
reachable); the rest is VERIFIED or CORROBORATED in nvidia-repo.md.

Two repositories are modelled:
- the CUDA repository, one flat repo per distro (`compute/cuda/repos/<distro>/x86_64/`):
  debian12 uses Debian-style names (nvidia-driver-cuda, nvidia-kernel-open-dkms, ...),
  ubuntu2204/ubuntu2404 the branch-suffixed names (nvidia-driver-580-open, ...);
- the container toolkit repository (`libnvidia-container/stable/deb/amd64/`), like
  nvidia.github.io/libnvidia-container, signed with a different key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Two real R580 point releases (CUDA 13.0.1 and 13.0.2 ship with them), oldest first.
DRIVER_BRANCH = "580"
DRIVER_VERSIONS: tuple[str, ...] = ("580.82.07", "580.95.05")
CUDA_TOOLKIT = "13.0.2"  # cuda-toolkit-13-0 13.0.2-1 (pairs with 580.95.05)
NVCC_VERSION = "13.0.88"
CUDART_VERSION = "13.0.96"
CCCL_VERSION = "13.0.85"
CUDA_MINOR = ".".join(CUDA_TOOLKIT.split(".")[:2])  # 13.0, the toolkit's major.minor
# NCCL's default release, built for the toolkit's CUDA as NVIDIA builds it (a pair that
# gpunode.model.parts.NCCL_BUILDS lists: validate takes both from there)
NCCL_VERSION = "2.28.3"
NCCL_DEB_VERSION = f"{NCCL_VERSION}-1+cuda{CUDA_MINOR}"
DCGM_VERSION = "4.4.2"
DCGM_DEB_VERSION = f"1:{DCGM_VERSION}-1"  # the epoch is in Version, not in the file name
DCGM_EXPORTERS: tuple[str, ...] = ("4.7.0", "4.7.1")  # both tagged 4.4.2-<exporter>, oldest first
# container toolkit, oldest first: 1.18.0 is the model's default container_toolkit.version
CTK_VERSIONS: tuple[str, ...] = ("1.17.8", "1.18.0", "1.18.1")
# cuDNN 9 for the toolkit's CUDA major at the model's default cudnn.version, the build
# research/nvidia-repo.md §4.2 pairs with cuda 13.0.2
CUDNN_VERSION = "9.15.0.58"
CUDNN_DEB_VERSION = f"{CUDNN_VERSION}-1"
KEYRING_VERSION = "1.1-1"
SIM_BASE_VERSION = "0.1-1"

CUDA_DISTROS: tuple[str, ...] = ("debian12", "ubuntu2204", "ubuntu2404")
CUDA_KEYRING_PATH = "/usr/share/keyrings/cuda-archive-keyring.gpg"
CTK_KEYRING_PATH = "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"
PIN_FILE = "/etc/apt/preferences.d/nvidia-driver-pin"
INSTALLED = "/usr/lib/gpunode-sim/installed"
CUDA_PREFIX = "/usr/local/cuda-13.0"
LIBDIR = "/usr/lib/x86_64-linux-gnu"

NV_MAINTAINER = "cudatools <cudatools@nvidia.com>"
CTK_MAINTAINER = "NVIDIA CORPORATION <cudatools@nvidia.com>"
SIM_NOTE = "SIMULATION: gpunode lab stand-in with NVIDIA's package metadata; not NVIDIA software."

GUEST_DIR = Path(__file__).resolve().parent / "guest"


@dataclass(frozen=True)
class File:
    """One entry of a package's data.tar: a regular file (data) or a symlink (link)."""

    path: str
    data: bytes = b""
    mode: int = 0o644
    link: str | None = None


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    description: str
    architecture: str = "amd64"
    section: str = "NVIDIA"
    priority: str = "optional"
    maintainer: str = NV_MAINTAINER
    multi_arch: str | None = None
    pre_depends: tuple[str, ...] = ()
    depends: tuple[str, ...] = ()
    recommends: tuple[str, ...] = ()
    suggests: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    breaks: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()
    files: tuple[File, ...] = ()
    scripts: tuple[tuple[str, str], ...] = ()  # (postinst|prerm|postrm|preinst, text)
    triggers: str | None = None
    long_description: str = SIM_NOTE

    @property
    def file_version(self) -> str:
        """Version as it appears in the .deb file name (no epoch, like dpkg-name)."""
        return self.version.split(":", 1)[1] if ":" in self.version else self.version

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.file_version}_{self.architecture}.deb"

    def conffiles(self) -> list[str]:
        return sorted(f.path for f in self.files if f.path.startswith("/etc/") and f.link is None)

    def control_fields(self) -> list[tuple[str, str]]:
        """The control stanza in dpkg's field order (Installed-Size added by the builder)."""
        fields: list[tuple[str, str]] = [
            ("Package", self.name),
            ("Version", self.version),
            ("Architecture", self.architecture),
            ("Maintainer", self.maintainer),
        ]
        if self.multi_arch:
            fields.append(("Multi-Arch", self.multi_arch))
        for key, values in (
            ("Pre-Depends", self.pre_depends),
            ("Depends", self.depends),
            ("Recommends", self.recommends),
            ("Suggests", self.suggests),
            ("Breaks", self.breaks),
            ("Conflicts", self.conflicts),
            ("Replaces", self.replaces),
            ("Provides", self.provides),
        ):
            if values:
                fields.append((key, ", ".join(values)))
        fields += [("Section", self.section), ("Priority", self.priority)]
        long = "\n".join(" " + (line if line.strip() else ".") for line in
                         self.long_description.splitlines())
        fields.append(("Description", f"{self.description}\n{long}"))
        return fields


@dataclass(frozen=True)
class AptRepo:
    """One flat apt repository (suite `/`) under the www root."""

    name: str  # "cuda-debian12", "libnvidia-container"
    path: str  # relative to the www root
    origin: str
    label: str
    architecture: str  # the Release file's Architecture field
    key: str  # which throwaway signing key: "cuda" | "ctk"
    packages: tuple[Package, ...] = field(default=())


# --------------------------------------------------------------------------- guest files


def guest_file(name: str) -> bytes:
    """Content of a guest-side tool from `sim/guest/<name>`, or a placeholder until it exists.

    This is the one place that decides which file goes into the packages, so a guest tool
    written later is picked up by the next (cache-invalidated) repository build.
    """
    path = GUEST_DIR / name
    if path.is_file():
        return path.read_bytes()
    return _placeholder(name)


_BOOT_SCRIPT = """#!/usr/bin/python3
\"\"\"SIMULATION: 'load' the simulated nvidia kernel module at boot (gpunode lab).\"\"\"
import sys

sys.path.insert(0, "/usr/lib/gpunode-sim")
import gpunode_sim  # noqa: E402

sys.exit(gpunode_sim.boot())
"""

_BOOT_UNIT = """[Unit]
Description=SIMULATION: gpunode lab simulated NVIDIA kernel module load
After=systemd-modules-load.service local-fs.target
Before=nvidia-persistenced.service nvidia-dcgm.service nvidia-cdi-refresh.service
Before=multi-user.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/lib/gpunode-sim/gpunode-sim-boot

[Install]
WantedBy=multi-user.target
"""

_DEFAULTS = {"gpunode-sim-boot": _BOOT_SCRIPT, "gpunode-sim-boot.service": _BOOT_UNIT}


def _placeholder(name: str) -> bytes:
    if name in _DEFAULTS:
        return _DEFAULTS[name].encode()
    if name.endswith(".service"):
        return (
            "[Unit]\nDescription=SIMULATION placeholder for " + name + "\n\n"
            "[Service]\nType=oneshot\nExecStart=/bin/true\n"
        ).encode()
    if name.endswith(".py"):
        return f'"""SIMULATION placeholder for {name} (guest tool not built yet)."""\n'.encode()
    return (
        "#!/usr/bin/python3\n"
        f'"""SIMULATION placeholder for {name}: the guest tool is not built yet."""\n'
        "import sys\n\n"
        f'sys.stderr.write("gpunode lab SIMULATION: {name} placeholder, no behaviour yet\\n")\n'
        "sys.exit(1)\n"
    ).encode()


def _exe(path: str, guest_name: str) -> File:
    return File(path, guest_file(guest_name), 0o755)


def _text(path: str, text: str, mode: int = 0o644) -> File:
    return File(path, text.encode(), mode)


#: SIMULATION ONLY. A real GPU keeps its settings (power limit, clocks, ECC) in the device;
#: the simulated one keeps them in /var/lib/gpunode-sim and /run/gpunode-sim. gpunode's GPU
#: settings unit is sandboxed (read-only file system), so the simulated nvidia-smi package
#: lets that unit write its state there, and nothing more.
_SETTINGS_SIM_DROPIN = _text(
    "/usr/lib/systemd/system/gpunode-gpu-settings.service.d/gpunode-sim.conf",
    "# SIMULATION: the simulated GPUs' state lives in these files (see gpunode.lab.sim).\n"
    "[Service]\nReadWritePaths=-/var/lib/gpunode-sim -/run/gpunode-sim\n")


def _doc(name: str) -> File:
    return _text(f"/usr/share/doc/{name}/README.gpunode-sim", SIM_NOTE + "\n")


def _stub_lib(path: str) -> File:
    # Not an ELF object: the simulation never loads these libraries.
    return _text(path, f"SIMULATION stand-in for {Path(path).name}\n")


def _installed(component: str, value: str) -> File:
    return _text(f"{INSTALLED}/{component}", value + "\n")


def _lib_with_links(soname_base: str, version: str, soname_major: str) -> tuple[File, ...]:
    real = f"{LIBDIR}/{soname_base}.{version}"
    return (
        _stub_lib(real),
        File(f"{LIBDIR}/{soname_base}.{soname_major}", link=f"{soname_base}.{version}"),
    )


# ------------------------------------------------------------------------ shared scripts

_SH = "#!/bin/sh\nset -e\n"


def _enable_unit_postinst(unit: str, start: bool) -> str:
    """What dh_installsystemd generates, reduced: enable on configure, start if systemd runs."""
    text = (
        'if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || '
        '[ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ]; then\n'
        f"    deb-systemd-helper unmask '{unit}' >/dev/null || true\n"
        f"    if deb-systemd-helper --quiet was-enabled '{unit}'; then\n"
        f"        deb-systemd-helper enable '{unit}' >/dev/null || true\n"
        "    else\n"
        f"        deb-systemd-helper update-state '{unit}' >/dev/null || true\n"
        "    fi\n"
        "    if [ -d /run/systemd/system ]; then\n"
        "        systemctl --system daemon-reload >/dev/null || true\n"
    )
    if start:
        text += f"        deb-systemd-invoke restart '{unit}' >/dev/null || true\n"
    text += "    fi\nfi\n"
    return text


def _unit_prerm(unit: str) -> str:
    return (
        _SH + 'if [ -d /run/systemd/system ] && [ "$1" = remove ]; then\n'
        f"    deb-systemd-invoke stop '{unit}' >/dev/null || true\nfi\n"
    )


def _unit_postrm(unit: str) -> str:
    return (
        _SH + 'if [ "$1" = remove ] && [ -d /run/systemd/system ]; then\n'
        "    systemctl --system daemon-reload >/dev/null || true\nfi\n"
        'if [ "$1" = purge ]; then\n'
        f"    deb-systemd-helper purge '{unit}' >/dev/null || true\n"
        f"    deb-systemd-helper unmask '{unit}' >/dev/null || true\nfi\n"
    )


def _dkms_build() -> str:
    """One kernel's simulated `dkms build` and `install` ($v, $flavour, $dir set; skipped
    without the kernel's headers, as dkms does): the built and installed module,
    modules.dep and the kernel-<k>-<arch> link, as in a real DKMS tree."""
    return (
        'if [ -e "$dir/build" ]; then\n'
        '    k=${dir##*/}\n'
        '    built="/var/lib/dkms/nvidia/$v/$k/x86_64/module"\n'
        '    mkdir -p "$built" "$dir/updates/dkms"\n'
        "    printf 'SIMULATION: %s nvidia.ko %s for %s\\n' \"$flavour\" \"$v\" \"$k\" "
        '> "$built/nvidia.ko"\n'
        '    cp "$built/nvidia.ko" "$dir/updates/dkms/nvidia.ko"\n'
        "    grep -qs '^updates/dkms/nvidia.ko:' \"$dir/modules.dep\" || "
        "echo 'updates/dkms/nvidia.ko:' >> \"$dir/modules.dep\"\n"
        '    ln -sfn "$v/$k/x86_64" "/var/lib/dkms/nvidia/kernel-$k-x86_64"\n'
        '    echo "SIMULATION: $flavour module $v recorded for kernel $k"\n'
        "fi\n"
    )


def _dkms_postinst(version: str, flavour: str) -> str:
    """Real DKMS postinsts run `dkms add/build/install` for every kernel with headers. The
    simulation builds nothing but leaves the same DKMS tree (source with dkms.conf, built
    and installed module per kernel, the kernel-<k>-<arch> link), so `dkms status` reports
    `installed` exactly where a real build would have (kernels whose headers exist), puts
    a stand-in nvidia.ko in /lib/modules/<k>/updates/dkms, and records the module in the
    kernel's modules.dep as dkms's depmod run does (the toolkit's nvidia-cdi-refresh.service
    runs only when modules.dep names nvidia.ko).

    The kmod state itself is the dpkg-owned file installed/kmod, so upgrades and removals
    keep it right without scripts.
    """
    return (
        _SH + 'if [ "$1" = configure ]; then\n'
        f'    echo "Loading new nvidia-{version} DKMS files..."\n'
        f"    v={version} flavour={flavour}\n"
        "    src=/usr/src/nvidia-$v\n"
        "    printf '%s\\n' 'PACKAGE_NAME=\"nvidia\"' \"PACKAGE_VERSION=\\\"$v\\\"\" \\\n"
        "        'BUILT_MODULE_NAME[0]=\"nvidia\"' 'DEST_MODULE_LOCATION[0]=\"/updates/dkms\"' \\\n"
        "        '# SIMULATION (gpunode lab): nothing to build' 'AUTOINSTALL=\"no\"' \\\n"
        "        > $src/dkms.conf\n"
        "    mkdir -p /var/lib/dkms/nvidia/$v\n"
        "    ln -sfn $src /var/lib/dkms/nvidia/$v/source\n"
        "    for dir in /lib/modules/*; do\n"
        + _indent(_indent(_dkms_build()))
        + "    done\n"
        "fi\n"
    )


def _dkms_prerm(version: str) -> str:
    """Like `dkms remove`: the module leaves every kernel (upgrades re-add the new one)."""
    return (
        _SH + f"v={version}\n"
        "for link in /var/lib/dkms/nvidia/kernel-*; do\n"
        '    [ "$(readlink $link 2>/dev/null | cut -d/ -f1)" = "$v" ] || continue\n'
        "    k=${link#/var/lib/dkms/nvidia/kernel-}; k=${k%-x86_64}\n"
        "    rm -f $link /lib/modules/$k/updates/dkms/nvidia.ko\n"
        "    sed -i '/^updates\\/dkms\\/nvidia.ko:/d' /lib/modules/$k/modules.dep 2>/dev/null || true\n"
        "done\n"
        "rm -rf /var/lib/dkms/nvidia/$v /usr/src/nvidia-$v/dkms.conf\n"
    )


#: The simulated DKMS kernel hooks (gpunode-sim-base), beside dkms's own
#: /etc/kernel/postinst.d/dkms (run by a new linux-image's postinst) and
#: /etc/kernel/header_postinst.d/dkms (by linux-headers'). dkms's `autoinstall` skips the
#: simulated module (its dkms.conf says AUTOINSTALL="no": there is no source to build), so
#: these record it for a kernel installed later instead.
DKMS_HOOKS = ("/etc/kernel/postinst.d/gpunode-sim-dkms",
              "/etc/kernel/header_postinst.d/gpunode-sim-dkms")


def _dkms_hook() -> str:
    """`dkms autoinstall -k <kernel>` for the simulated module (kernel hooks get the kernel
    as $1): the installed kmod package's version and flavour (installed/kmod), nothing while
    none is installed or its module is not in the DKMS tree."""
    return (
        _SH + "# SIMULATION (gpunode lab): dkms's kernel hook for the simulated NVIDIA module\n"
        f'kmod=$(cat {INSTALLED}/kmod 2>/dev/null) || exit 0\n'
        'v=${kmod%% *} flavour=${kmod#* }\n'
        '[ -n "$1" ] && [ -e "/var/lib/dkms/nvidia/$v/source" ] || exit 0\n'
        'dir="/lib/modules/$1"\n'
        + _dkms_build()
    )


# --------------------------------------------------------------------------- sim base


def sim_base() -> Package:
    """The one package that exists only in the simulation (clearly named as such)."""
    unit = "gpunode-sim-boot.service"
    return Package(
        name="gpunode-sim-base",
        version=SIM_BASE_VERSION,
        architecture="all",
        section="misc",
        maintainer="gpunode lab <lab@gpunode.invalid>",
        description="SIMULATION: shared module and boot unit of the simulated NVIDIA stack",
        long_description=(
            "gpunode lab equipment, not an NVIDIA package. Provides the shared module of the\n"
            "simulated NVIDIA tools and gpunode-sim-boot.service, which 'loads' the simulated\n"
            "nvidia kernel module at boot when a kmod package is installed and nouveau is not\n"
            "loaded."
        ),
        depends=("python3",),
        files=(
            _text("/usr/lib/gpunode-sim/gpunode_sim.py", guest_file("gpunode_sim.py").decode()),
            _exe("/usr/lib/gpunode-sim/gpunode-sim-boot", "gpunode-sim-boot"),
            File(f"/lib/systemd/system/{unit}", guest_file(unit)),
            # No real nvidia_uvm.ko exists in a lab VM: `modprobe nvidia-uvm` (and
            # systemd-modules-load) runs the simulation's load instead of failing.
            _text("/lib/modprobe.d/gpunode-sim.conf",
                  "# SIMULATION (gpunode lab): nvidia-uvm is simulated by gpunode-sim-boot\n"
                  "install nvidia_uvm /usr/lib/gpunode-sim/gpunode-sim-boot --load-uvm\n"),
            *(_text(path, _dkms_hook(), 0o755) for path in DKMS_HOOKS),
        ),
        scripts=(
            ("postinst", _SH + _enable_unit_postinst(unit, start=False)),
            ("prerm", _unit_prerm(unit)),
            ("postrm", _unit_postrm(unit)),
        ),
    )


# ------------------------------------------------------------------------- cuda-keyring


# cuda-<distro>.pin as published next to the Ubuntu repos (VERIFIED text, ubuntu2204).
UBUNTU_PIN = (
    "Package: nsight-compute\nPin: origin *ubuntu.com*\nPin-Priority: -1\n\n"
    "Package: nsight-systems\nPin: origin *ubuntu.com*\nPin-Priority: -1\n\n"
    "Package: *\nPin: release l=NVIDIA CUDA\nPin-Priority: 600\n"
)


def cuda_keyring(distro: str, keyring: bytes, repo_base_url: str) -> Package:
    """cuda-keyring 1.1-1: keyring + sources.list.d entry (+ pin file on Ubuntu).

    The .list points at the lab mirror, the way an air-gapped mirror's keyring package is
    rebuilt. debian12 has no pin file (INFERRED: none published for debian12).
    """
    url = f"{repo_base_url.rstrip('/')}/{distro}/x86_64/"
    files = [
        File(CUDA_KEYRING_PATH, keyring),
        _text(
            f"/etc/apt/sources.list.d/cuda-{distro}-x86_64.list",
            f"deb [signed-by={CUDA_KEYRING_PATH}] {url} /\n",
        ),
    ]
    if distro.startswith("ubuntu"):
        files.append(_text("/etc/apt/preferences.d/cuda-repository-pin-600", UBUNTU_PIN))
    postinst = (
        _SH + 'if [ "$1" = configure ] && [ -f /etc/apt/trusted.gpg ] && '
        "grep -q 7fa2af80 /etc/apt/trusted.gpg 2>/dev/null; then\n"
        '    echo "A deprecated public CUDA GPG key appears to be installed."\n'
        '    echo "To remove the key, run this command:"\n'
        '    echo "sudo apt-key del 7fa2af80"\nfi\n'
    )
    return Package(
        name="cuda-keyring",
        version=KEYRING_VERSION,
        architecture="all",
        section="multiverse/devel",  # one source template for all distros
        description="GPG keyring for the CUDA repository",
        long_description=(
            f"Enrolls public key: SIMULATION throwaway key\nand enables repo: {distro}/x86_64\n"
            + SIM_NOTE
        ),
        files=tuple(files),
        scripts=(("postinst", postinst),),
    )


# ---------------------------------------------------------------------- pinning packages

# Which packages the driver pin covers. INFERRED (only a 595 version-pin stanza is known):
# the driver-versioned packages of each naming scheme, as globs apt_preferences accepts.
_PIN_PACKAGES = {
    "debian": (
        "cuda-drivers* nvidia-open* nvidia-driver nvidia-driver-* nvidia-kernel-* "
        "nvidia-alternative nvidia-smi nvidia-modprobe nvidia-persistenced nvidia-settings "
        "nvidia-xconfig firmware-nvidia-gsp libcuda1 libcudadebugger1 libnvidia-* "
        "xserver-xorg-video-nvidia"
    ),
    "ubuntu": (
        "cuda-drivers* nvidia-open* *-580 *-580-open nvidia-modprobe nvidia-persistenced "
        "nvidia-settings libxnvctrl*"
    ),
}


def pinning_packages(distro: str, versions: tuple[str, ...] = DRIVER_VERSIONS) -> list[Package]:
    family = "debian" if distro.startswith("debian") else "ubuntu"
    pkgs = _PIN_PACKAGES[family]
    out = []
    # Branch pin: 580-5 on debian12 (CORROBORATED), 580-1ubuntu1 on Ubuntu (INFERRED).
    branch_version = "580-5" if family == "debian" else "580-1ubuntu1"
    targets: list[tuple[str, str, str, str]] = [
        (f"nvidia-driver-pinning-{DRIVER_BRANCH}", branch_version, f"{DRIVER_BRANCH}.*",
         f"branch {DRIVER_BRANCH}"),
    ]
    # Version pins (existence at these two versions INFERRED; later 580 ones are listed).
    for v in versions:
        targets.append((f"nvidia-driver-pinning-{v}", _drv_version(v, distro), f"{v}-*",
                        f"version {v}"))
    for name, version, pin, what in targets:
        out.append(
            Package(
                name=name,
                version=version,
                architecture="all",
                description=f"APT driver pinning file for driver {what}",
                provides=("nvidia-driver-pinning",),
                conflicts=("nvidia-driver-pinning",),
                replaces=("nvidia-driver-pinning",),
                files=(_text(PIN_FILE, f"Package: {pkgs}\nPin: version {pin}\n"
                                       "Pin-Priority: 1000\n"),),
            )
        )
    return out


def _drv_version(v: str, distro: str) -> str:
    """Debian CUDA repo: <ver>-1 (INFERRED from later 580s); Ubuntu: <ver>-0ubuntu1."""
    return f"{v}-1" if distro.startswith("debian") else f"{v}-0ubuntu1"


# ------------------------------------------------------------- persistenced unit/scripts


def _persistenced_unit(user: str, family: str) -> bytes:
    name = f"nvidia-persistenced.{family}.service"
    path = GUEST_DIR / name
    if path.is_file():
        return path.read_bytes()
    generic = GUEST_DIR / "nvidia-persistenced.service"
    if generic.is_file():
        return generic.read_bytes()
    if family == "ubuntu":  # VERIFIED Ubuntu unit: static, started by udev
        return (
            "[Unit]\nDescription=NVIDIA Persistence Daemon\nWants=syslog.target\n"
            "StopWhenUnneeded=true\nBefore=systemd-backlight@backlight:nvidia_0.service\n\n"
            "[Service]\nType=forking\n"
            f"ExecStart=/usr/bin/nvidia-persistenced --user {user} --no-persistence-mode "
            "--verbose\nExecStopPost=/bin/rm -rf /var/run/nvidia-persistenced\n"
        ).encode()
    # INFERRED for the Debian CUDA-repo build: upstream's template with the Debian user.
    return (
        "[Unit]\nDescription=NVIDIA Persistence Daemon\nWants=syslog.target\n"
        "IgnoreOnIsolate=true\n\n[Service]\nType=forking\n"
        f"ExecStart=/usr/bin/nvidia-persistenced --user {user} --no-persistence-mode\n"
        "ExecStopPost=/bin/rm -rf /var/run/nvidia-persistenced\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    ).encode()


def _persistenced(distro: str, v: str, cfg_dep: str) -> Package:
    family = "debian" if distro.startswith("debian") else "ubuntu"
    user = "nvpd" if family == "debian" else "nvidia-persistenced"
    unit = "nvidia-persistenced.service"
    unit_dir = "/lib/systemd/system"
    unit_text = _persistenced_unit(user, family)
    # The postinst creates whichever user the shipped unit runs the daemon as.
    found = re.search(rb"--user[= ]([A-Za-z0-9_.-]+)", unit_text)
    user = found.group(1).decode() if found else user
    adduser = (
        f"if ! getent passwd {user} >/dev/null; then\n"
        f"    adduser --system --group --home /var/run/{user}/ --gecos 'NVIDIA Persistence Daemon' "
        f"--no-create-home {user} >/dev/null\nfi\n"
    )
    if family == "debian":
        adduser += f"adduser {user} video >/dev/null 2>&1 || true\n"
        postinst = _SH + 'if [ "$1" = configure ]; then\n' + _indent(adduser) + "fi\n"
        postinst += _enable_unit_postinst(unit, start=True)
        scripts: tuple[tuple[str, str], ...] = (
            ("postinst", postinst),
            ("prerm", _unit_prerm(unit)),
            ("postrm", _unit_postrm(unit)),
        )
    else:  # static unit: no enable, udev starts it on real hardware
        postinst = _SH + 'if [ "$1" = configure ]; then\n' + _indent(adduser) + "fi\n"
        postinst += (
            'if [ -d /run/systemd/system ]; then systemctl --system daemon-reload '
            ">/dev/null || true; fi\n"
        )
        scripts = (("postinst", postinst), ("prerm", _unit_prerm(unit)))
    return Package(
        name="nvidia-persistenced",
        version=_drv_version(v, distro),
        description="daemon to maintain persistent software state in the NVIDIA driver",
        section="NVIDIA" if family == "debian" else "multiverse/utils",
        depends=("adduser", cfg_dep, "gpunode-sim-base"),
        files=(
            _exe("/usr/bin/nvidia-persistenced", "nvidia-persistenced"),
            File(f"{unit_dir}/{unit}", unit_text),
        ),
        scripts=scripts,
    )


def _indent(text: str) -> str:
    return "".join("    " + line + "\n" for line in text.splitlines())


# -------------------------------------------------------------- debian12 driver packages

_NOUVEAU_DEBIAN = (
    '# You need to run "update-initramfs -u" after editing this file.\n\n'
    "# see #580894\nblacklist nouveau\n"
)
_NOUVEAU_UBUNTU = "blacklist nouveau\nblacklist lbm-nouveau\nalias nouveau off\nalias lbm-nouveau off\n"


def debian_driver(v: str) -> list[Package]:
    """Debian-style R580 set of the debian12 CUDA repo at driver version v.

    Names VERIFIED (Dataproc and debian12 install scripts, 595 listing). Relations follow
    NVIDIA's Debian template (535) with the metapackages as in nvidia-repo.md §9 (INFERRED
    details noted inline). Archive dependencies that would pull X or contrib packages into
    a lab VM (xserver-xorg-core, nvidia-kernel-common from contrib) are left out.
    """
    d = "debian12"
    dv = _drv_version(v, d)
    eq = f"(= {dv})"
    ge = f"(>= {v})"
    kmod_virtual = f"nvidia-kernel-{v}"
    pk = Package

    def simple(name: str, desc: str, deps: Iterable[str] = (), **kw: object) -> Package:
        return pk(name=name, version=dv, description=desc, depends=tuple(deps),
                  files=kw.pop("files", (_doc(name),)), **kw)  # type: ignore[arg-type]

    def kmod(name: str, flavour: str, desc: str, other: str) -> Package:
        return pk(
            name=name,
            version=dv,
            description=desc,
            section="NVIDIA",
            depends=("dkms", "nvidia-kernel-support--v1", "gpunode-sim-base"),
            provides=(kmod_virtual,),
            conflicts=(other,),
            replaces=(other,),
            files=(
                _installed("kmod", f"{v} {flavour}"),
                _text(f"/usr/src/nvidia-{v}/README.gpunode-sim",
                      f"SIMULATION: {flavour} kernel module source {v} (no real source).\n"),
            ),
            scripts=(("postinst", _dkms_postinst(v, flavour)), ("prerm", _dkms_prerm(v))),
        )

    alt = f"nvidia-alternative {eq}"
    return [
        simple("nvidia-alternative", "allows the selection of NVIDIA as GLX provider",
               ("dpkg (>= 1.17.5)",)),
        simple("firmware-nvidia-gsp", "NVIDIA GSP firmware",
               files=(_text(f"/lib/firmware/nvidia/{v}/gsp_ga10x.bin",
                            "SIMULATION stand-in for the GSP firmware\n"),)),
        simple("nvidia-modprobe",
               "utility to load NVIDIA kernel modules and create device nodes",
               files=(_exe("/usr/bin/nvidia-modprobe", "nvidia-modprobe"),)),
        simple(
            "nvidia-kernel-support",
            "NVIDIA binary kernel module support files",
            (alt, "nvidia-modprobe (>= 352)"),
            provides=("nvidia-kernel-support-any", "nvidia-kernel-support--v1"),
            files=(
                _text("/etc/nvidia/nvidia-blacklists-nouveau.conf", _NOUVEAU_DEBIAN),
                _text("/etc/nvidia/nvidia-modprobe.conf",
                      "install nvidia modprobe -i nvidia-current $CMDLINE_OPTS\n"),
                _text("/etc/nvidia/nvidia-load.conf", "nvidia-drm\n"),
                File("/etc/modprobe.d/nvidia-blacklists-nouveau.conf",
                     link="../nvidia/nvidia-blacklists-nouveau.conf"),
                File("/etc/modprobe.d/nvidia.conf", link="../nvidia/nvidia-modprobe.conf"),
                _text("/etc/modprobe.d/nvidia-options.conf",
                      "#options nvidia-current NVreg_DeviceFileUID=0 NVreg_DeviceFileGID=44 "
                      "NVreg_DeviceFileMode=0660\n"),
            ),
            triggers="activate-noawait update-initramfs\n",
        ),
        kmod("nvidia-kernel-dkms", "proprietary",
             "NVIDIA binary kernel module DKMS source", "nvidia-kernel-open-dkms"),
        kmod("nvidia-kernel-open-dkms", "open",
             "NVIDIA binary kernel module DKMS source open flavor", "nvidia-kernel-dkms"),
        simple("libnvidia-ptxjitcompiler1", "NVIDIA PTX JIT Compiler library", (alt,),
               multi_arch="same", files=_lib_with_links("libnvidia-ptxjitcompiler.so", v, "1")),
        simple("libnvidia-nvvm4", "NVIDIA NVVM Compiler library", (alt,), multi_arch="same",
               files=_lib_with_links("libnvidia-nvvm.so", v, "4")),
        simple("libnvidia-cfg1", "NVIDIA binary OpenGL/GLX configuration library", (alt,),
               multi_arch="same", provides=("libnvidia-cfg1-any",),
               files=_lib_with_links("libnvidia-cfg.so", v, "1")),
        simple("libcudadebugger1", "NVIDIA CUDA Debugger Library", (alt,), multi_arch="same",
               files=_lib_with_links("libcudadebugger.so", v, "1")),
        simple(
            "libnvidia-ml1",
            "NVIDIA Management Library (NVML) runtime library",
            (alt,),
            multi_arch="same",
            provides=(f"libnvidia-ml.so.1 (= {v})",),
            # The user-space library version the simulated NVML reports (CONTRACT.md).
            files=(*_lib_with_links("libnvidia-ml.so", v, "1"), _installed("driver", v)),
        ),
        simple(
            "libcuda1",
            "NVIDIA CUDA Driver Library",
            (alt, f"libnvidia-ptxjitcompiler1 {eq}",
             f"libnvidia-nvvm4 {eq}"),
            multi_arch="same",
            recommends=(f"nvidia-kernel-dkms {eq} | {kmod_virtual}", f"nvidia-smi {eq}",
                        f"libnvidia-cfg1 {eq}", "nvidia-persistenced"),
            provides=(f"libcuda.so.1 (= {v})", "libcuda-13.0-1"),
            files=_lib_with_links("libcuda.so", v, "1"),
        ),
        simple(
            "nvidia-smi",
            "NVIDIA System Management Interface",
            (alt, f"libnvidia-ml1 {eq}", "gpunode-sim-base"),
            recommends=(f"nvidia-kernel-dkms {eq} | {kmod_virtual}",),
            files=(_exe("/usr/bin/nvidia-smi", "nvidia-smi"), _SETTINGS_SIM_DROPIN),
        ),
        _persistenced(d, v, f"libnvidia-cfg1 {ge} | libnvidia-cfg1-any"),
        # nvidia-driver-cuda: CONFLICT in the research (does it fold nvidia-smi in?). For
        # these pre-580.126 versions the model keeps nvidia-smi separate and depends on it.
        simple(
            "nvidia-driver-cuda",
            "NVIDIA driver CUDA integration components",
            (alt, f"libcuda1 {eq}", f"libnvidia-ml1 {eq}", f"libnvidia-cfg1 {eq}",
             f"nvidia-smi {eq}", f"nvidia-persistenced {ge}", f"nvidia-modprobe {ge}"),
            recommends=(f"libcudadebugger1 {eq}",),
        ),
        simple("libnvidia-glcore", "NVIDIA OpenGL core library", (alt,), multi_arch="same"),
        simple("nvidia-driver-libs", "NVIDIA metapackage (OpenGL/GLX/EGL/GLES libraries)",
               (f"libnvidia-glcore {eq}",), multi_arch="same"),
        simple("nvidia-driver-bin", "NVIDIA driver support binaries", (alt,)),
        simple("xserver-xorg-video-nvidia", "NVIDIA binary Xorg driver", (alt,)),
        simple(
            "nvidia-driver",
            "NVIDIA metapackage",
            (f"nvidia-driver-libs {eq}", f"nvidia-driver-bin {eq}",
             f"xserver-xorg-video-nvidia {eq}", alt,
             f"nvidia-kernel-dkms {eq} | {kmod_virtual}"),
            recommends=(f"libnvidia-cfg1 {eq}", "nvidia-persistenced"),
        ),
        simple("nvidia-open",
               "NVIDIA Driver meta-package, Open GPU kernel modules, latest version",
               (f"nvidia-driver {ge}", f"nvidia-driver-cuda {ge}",
                f"nvidia-kernel-open-dkms {ge}"),
               conflicts=("nvidia-kernel-dkms",)),
        simple(f"cuda-drivers-{DRIVER_BRANCH}", "CUDA Driver meta-package, branch-specific",
               (f"nvidia-driver {ge}", f"nvidia-driver-cuda {ge}", f"nvidia-kernel-dkms {ge}")),
        simple("cuda-drivers", "CUDA Driver meta-package, latest version",
               (f"cuda-drivers-{DRIVER_BRANCH} {ge}",)),
    ]


# -------------------------------------------------------------- ubuntu driver packages


# The lines of Canonical's 71-nvidia.rules (VERIFIED, pop-os/nvidia-graphics-drivers
# debian/71-nvidia.rules) the toolkit relies on: nvidia-persistenced started by udev, and
# nvidia-uvm loaded with its /dev nodes created when the driver binds. gpunode-sim-boot
# reads this file to decide both (lab VMs have no real driver for udev to see).
_UBUNTU_UDEV_RULES = (
    'ACTION=="add", DEVPATH=="/bus/pci/drivers/nvidia", TAG+="systemd", '
    'ENV{SYSTEMD_WANTS}="nvidia-persistenced.service"\n'
    'ACTION=="add", DEVPATH=="/bus/pci/drivers/nvidia", RUN+="/sbin/modprobe nvidia-uvm"\n'
    'ACTION=="remove", DEVPATH=="/bus/pci/drivers/nvidia", RUN+="/sbin/modprobe -r nvidia-uvm"\n'
    'ACTION=="add", DEVPATH=="/bus/pci/drivers/nvidia", RUN+="/sbin/ub-device-create"\n'
    'ACTION=="add", DEVPATH=="/module/nvidia_uvm", SUBSYSTEM=="module", '
    'RUN+="/sbin/ub-device-create"\n'
)


def ubuntu_driver(distro: str, v: str) -> list[Package]:
    """Branch-suffixed R580 set of the Ubuntu CUDA repo (names CORROBORATED by a dpkg -l of
    nvidia-driver-580-open 580.95.05-0ubuntu1; relations from Canonical's packaging).

    Only indexed for unit tests of package selection; the lab boots Debian guests.
    """
    b = DRIVER_BRANCH
    uv = _drv_version(v, distro)
    eq = f"(= {uv})"
    ge = f"(>= {v})"
    pk = Package

    def simple(name: str, desc: str, deps: Iterable[str] = (), **kw: object) -> Package:
        return pk(name=name, version=uv, description=desc, depends=tuple(deps),
                  section=str(kw.pop("section", "multiverse/libs")),
                  files=kw.pop("files", (_doc(name),)), **kw)  # type: ignore[arg-type]

    def dkms(name: str, flavour: str, source: str) -> Package:
        return pk(
            name=name,
            version=uv,
            section="multiverse/kernel",
            description="NVIDIA DKMS package" + (" (open kernel module)" if flavour == "open"
                                                 else ""),
            depends=("dkms", f"{source} {ge}", f"nvidia-kernel-common-{b} {ge}",
                     "gpunode-sim-base"),
            provides=("nvidia-dkms-kernel",),
            conflicts=("nvidia-dkms-kernel",),
            replaces=("nvidia-dkms-kernel",),
            files=(_installed("kmod", f"{v} {flavour}"),),
            scripts=(("postinst", _dkms_postinst(v, flavour)), ("prerm", _dkms_prerm(v))),
        )

    def driver(flavour: str) -> Package:
        sfx = "-open" if flavour == "open" else ""
        return simple(
            f"nvidia-driver-{b}{sfx}",
            "NVIDIA driver" + (" (open kernel) metapackage" if sfx else " metapackage"),
            (f"libnvidia-gl-{b} {eq}", f"nvidia-dkms-{b}{sfx} {ge}",
             f"nvidia-kernel-common-{b} {ge}", f"nvidia-kernel-source-{b}{sfx} {eq}",
             f"libnvidia-compute-{b} {eq}", f"libnvidia-extra-{b} {eq}",
             f"nvidia-compute-utils-{b} {eq}", f"libnvidia-decode-{b} {eq}",
             f"libnvidia-encode-{b} {eq}", f"nvidia-utils-{b} {eq}",
             f"xserver-xorg-video-nvidia-{b} {eq}", f"libnvidia-cfg1-{b} {eq}",
             f"libnvidia-fbc1-{b} {eq}"),
            section="multiverse/libs",
            recommends=("nvidia-settings",),
        )

    def headless(flavour: str) -> list[Package]:
        sfx = "-open" if flavour == "open" else ""
        return [
            simple(f"nvidia-headless-no-dkms-{b}{sfx}",
                   "NVIDIA headless metapackage - no DKMS",
                   (f"nvidia-kernel-common-{b} {ge}", f"nvidia-kernel-source-{b}{sfx} {eq}",
                    f"libnvidia-compute-{b} {eq}", f"nvidia-compute-utils-{b} {eq}",
                    f"libnvidia-cfg1-{b} {eq}")),
            simple(f"nvidia-headless-{b}{sfx}", "NVIDIA headless metapackage",
                   (f"nvidia-headless-no-dkms-{b}{sfx} {eq}", f"nvidia-dkms-{b}{sfx} {eq}"),
                   provides=("nvidia-headless",), conflicts=("nvidia-headless",),
                   replaces=("nvidia-headless",)),
        ]

    pkgs = [
        simple(f"libnvidia-common-{b}", "Shared files used by the NVIDIA libraries",
               architecture="all"),
        simple(f"nvidia-firmware-{b}", "Firmware files used by the kernel module",
               provides=(f"nvidia-firmware-{b}-{v}",),
               files=(_text(f"/lib/firmware/nvidia/{v}/gsp_ga10x.bin",
                            "SIMULATION stand-in for the GSP firmware\n"),)),
        simple(
            f"nvidia-kernel-common-{b}",
            "Shared files used with the kernel module",
            (f"nvidia-firmware-{b}-{v}",),
            section="multiverse/libs",
            provides=("nvidia-kernel-common", f"nvidia-kernel-common-{b}-{v}"),
            conflicts=("nvidia-kernel-common",),
            replaces=("nvidia-kernel-common",),
            files=(
                _text("/lib/modprobe.d/nvidia-graphics-drivers.conf", _NOUVEAU_UBUNTU),
                _text("/etc/modprobe.d/nvidia-graphics-drivers-kms.conf",
                      f"# This file was generated by nvidia-driver-{b}\n"
                      "# Set value to 0 to disable modesetting\noptions nvidia_drm modeset=1\n"),
                _text("/lib/udev/rules.d/71-nvidia.rules", _UBUNTU_UDEV_RULES),
            ),
            triggers="activate-noawait update-initramfs\n",
        ),
        simple(
            f"libnvidia-compute-{b}",
            "NVIDIA libcompute package",
            ("ocl-icd-libopencl1",),
            multi_arch="same",
            provides=("libnvidia-compute", "nvidia-opencl-icd", "opencl-icd",
                      f"libnvidia-ml.so.1 {eq}", f"libnvidia-ml1 {eq}",
                      f"libcuda.so.1 {eq}", f"libcuda1 {eq}"),
            conflicts=("libnvidia-compute", "nvidia-opencl-icd"),
            replaces=("libnvidia-compute",),
            files=(*_lib_with_links("libcuda.so", v, "1"),
                   *_lib_with_links("libnvidia-ml.so", v, "1"),
                   _installed("driver", v)),
        ),
        simple(
            f"nvidia-utils-{b}",
            "NVIDIA driver support binaries",
            (f"libnvidia-compute-{b} {ge}", f"nvidia-kernel-common-{b} {eq}",
             "gpunode-sim-base"),
            section="multiverse/x11",
            suggests=(f"nvidia-driver-{b}",),
            provides=("nvidia-utils", "nvidia-smi"),
            conflicts=("nvidia-utils", "nvidia-smi"),
            replaces=("nvidia-utils", "nvidia-smi"),
            files=(_exe("/usr/bin/nvidia-smi", "nvidia-smi"), _SETTINGS_SIM_DROPIN),
        ),
        simple(
            f"nvidia-compute-utils-{b}",
            "NVIDIA compute utilities",
            (f"libnvidia-compute-{b} {eq}", "adduser"),
            section="multiverse/libs",
            provides=("nvidia-compute-utils",),
            conflicts=("nvidia-compute-utils",),
            replaces=("nvidia-compute-utils",),
        ),
        _persistenced(distro, v, f"libnvidia-cfg1-{b} {ge}"),
        simple("nvidia-modprobe",
               "Load the NVIDIA kernel driver and create device files",
               section="multiverse/utils",
               files=(_exe("/usr/bin/nvidia-modprobe", "nvidia-modprobe"),)),
        simple(f"nvidia-kernel-source-{b}-open", "NVIDIA kernel source package",
               section="multiverse/kernel",
               files=(_text(f"/usr/src/nvidia-{v}/README-open.gpunode-sim",
                            "SIMULATION: open kernel module source (no real source)\n"),)),
        simple(f"nvidia-kernel-source-{b}", "NVIDIA kernel source package",
               section="multiverse/kernel",
               files=(_text(f"/usr/src/nvidia-{v}/README-proprietary.gpunode-sim",
                            "SIMULATION: kernel module source (no real source)\n"),)),
        dkms(f"nvidia-dkms-{b}-open", "open", f"nvidia-kernel-source-{b}-open"),
        dkms(f"nvidia-dkms-{b}", "proprietary", f"nvidia-kernel-source-{b}"),
    ]
    for name, desc in (
        (f"libnvidia-cfg1-{b}", "NVIDIA binary OpenGL/GLX configuration library"),
        (f"libnvidia-gl-{b}", "NVIDIA OpenGL/GLX/EGL/GLES GLVND libraries and Vulkan ICD"),
        (f"libnvidia-extra-{b}", "Extra libraries for the NVIDIA driver"),
        (f"libnvidia-decode-{b}", "NVIDIA Video Decoding runtime libraries"),
        (f"libnvidia-encode-{b}", "NVENC Video Encoding runtime library"),
        (f"libnvidia-fbc1-{b}", "NVIDIA OpenGL-based Framebuffer Capture runtime library"),
        (f"libnvidia-gpucomp-{b}", "NVIDIA binary GPU compiler library"),
        (f"xserver-xorg-video-nvidia-{b}", "NVIDIA binary Xorg driver"),
    ):
        pkgs.append(simple(name, desc, multi_arch="same" if name.startswith("lib") else None))
    pkgs += [driver("open"), driver("proprietary"), *headless("open"),
             *headless("proprietary")]
    pkgs += [
        simple(f"nvidia-open-{b}", "NVIDIA Open GPU kernel modules meta-package, branch-specific",
               (f"nvidia-driver-{b}-open {ge} | nvidia-driver-{b}-server-open {ge}",),
               conflicts=(f"cuda-drivers-{b}", f"nvidia-driver-{b}", f"nvidia-driver-{b}-server")),
        simple("nvidia-open", "NVIDIA Open GPU kernel modules meta-package, latest version",
               (f"nvidia-open-{b} {ge}",)),
        simple(f"cuda-drivers-{b}", "CUDA Driver meta-package, branch-specific",
               (f"nvidia-driver-{b} {ge}",)),
        simple("cuda-drivers", "CUDA Driver meta-package, latest version",
               (f"cuda-drivers-{b} {ge}",)),
    ]
    return pkgs


# ------------------------------------------------------ CUDA toolkit, NCCL, DCGM (shared)


def cuda_toolkit() -> list[Package]:
    """A minimal cuda-toolkit-13-0 chain (versions CORROBORATED, relations INFERRED)."""
    tk = f"{CUDA_TOOLKIT}-1"
    ge_tk = f"(>= {CUDA_TOOLKIT})"
    cfg = f"{NVCC_VERSION}-1"
    pk = Package

    def meta(name: str, desc: str, deps: Iterable[str], version: str = tk) -> Package:
        return pk(name=name, version=version, description=desc, section="devel",
                  depends=tuple(deps), files=(_doc(name),))

    alternatives_postinst = (
        _SH + 'if [ "$1" = configure ]; then\n'
        f"    update-alternatives --install /usr/local/cuda cuda {CUDA_PREFIX} 130\n"
        f"    update-alternatives --install /usr/local/cuda-13 cuda-13 {CUDA_PREFIX} 130\n"
        "fi\n"
    )
    alternatives_prerm = (
        _SH + 'if [ "$1" = remove ] || [ "$1" = deconfigure ]; then\n'
        f"    update-alternatives --remove cuda {CUDA_PREFIX}\n"
        f"    update-alternatives --remove cuda-13 {CUDA_PREFIX}\n"
        "fi\n"
    )
    cudart_lib = f"{CUDA_PREFIX}/targets/x86_64-linux/lib"
    return [
        pk(name="cuda-toolkit-config-common", version=cfg, architecture="all",
           section="devel", description="Common config package for CUDA Toolkit.",
           files=(_doc("cuda-toolkit-config-common"),)),
        pk(name="cuda-toolkit-13-config-common", version=cfg, architecture="all",
           section="devel", description="Common config package for CUDA Toolkit 13.",
           files=(_doc("cuda-toolkit-13-config-common"),)),
        pk(name="cuda-toolkit-13-0-config-common", version=cfg, architecture="all",
           section="devel", description="Common config package for CUDA Toolkit 13.0.",
           files=(_text("/etc/ld.so.conf.d/988_cuda-13.conf", f"{cudart_lib}\n"),),
           scripts=(("postinst", alternatives_postinst), ("prerm", alternatives_prerm))),
        pk(name="cuda-cudart-13-0", version=f"{CUDART_VERSION}-1", section="devel",
           description="CUDA Runtime native Libraries",
           depends=("cuda-toolkit-13-0-config-common", "cuda-toolkit-13-config-common",
                    "cuda-toolkit-config-common"),
           files=(_stub_lib(f"{cudart_lib}/libcudart.so.{CUDART_VERSION}"),
                  File(f"{cudart_lib}/libcudart.so.13", link=f"libcudart.so.{CUDART_VERSION}"))),
        pk(name="cuda-driver-dev-13-0", version=f"{CUDART_VERSION}-1", section="devel",
           description="CUDA Driver native dev stub library",
           files=(_stub_lib(f"{cudart_lib}/stubs/libcuda.so"),)),
        pk(name="cuda-cccl-13-0", version=f"{CCCL_VERSION}-1", section="devel",
           description="CUDA CCCL", files=(_doc("cuda-cccl-13-0"),)),
        pk(name="cuda-cudart-dev-13-0", version=f"{CUDART_VERSION}-1", section="devel",
           description="CUDA Runtime native dev links, headers",
           depends=(f"cuda-cudart-13-0 (>= {CUDART_VERSION})", "cuda-cccl-13-0",
                    "cuda-driver-dev-13-0"),
           files=(_text(f"{CUDA_PREFIX}/targets/x86_64-linux/include/cuda_runtime_api.h",
                        "/* SIMULATION stand-in header */\n#define CUDART_VERSION 13000\n"),)),
        pk(name="cuda-crt-13-0", version=f"{NVCC_VERSION}-1", section="devel",
           description="CUDA crt", files=(_doc("cuda-crt-13-0"),)),
        pk(name="cuda-nvcc-13-0", version=f"{NVCC_VERSION}-1", section="devel",
           description="CUDA nvcc",
           depends=(f"cuda-crt-13-0 (>= {NVCC_VERSION})", "gpunode-sim-base"),
           files=(_exe(f"{CUDA_PREFIX}/bin/nvcc", "nvcc"), _installed("cuda", NVCC_VERSION))),
        meta("cuda-compiler-13-0", "CUDA compiler", (f"cuda-nvcc-13-0 (>= {NVCC_VERSION})",)),
        meta("cuda-libraries-13-0", "CUDA Libraries 13.0 meta-package",
             (f"cuda-cudart-13-0 (>= {CUDART_VERSION})",)),
        meta("cuda-libraries-dev-13-0", "CUDA Libraries 13.0 development meta-package",
             (f"cuda-cudart-dev-13-0 (>= {CUDART_VERSION})",)),
        meta("cuda-toolkit-13-0", "CUDA Toolkit 13.0 meta-package",
             (f"cuda-compiler-13-0 {ge_tk}", f"cuda-libraries-13-0 {ge_tk}",
              f"cuda-libraries-dev-13-0 {ge_tk}", "cuda-toolkit-13-0-config-common",
              "cuda-toolkit-13-config-common", "cuda-toolkit-config-common")),
        # The runtime/full metas pull the driver, as the real ones do.
        meta("cuda-runtime-13-0", "CUDA Runtime 13.0 meta-package",
             (f"cuda-libraries-13-0 {ge_tk}", f"cuda-drivers (>= {DRIVER_VERSIONS[-1]})")),
        meta("cuda-13-0", "CUDA 13.0 meta-package",
             (f"cuda-runtime-13-0 {ge_tk}", f"cuda-toolkit-13-0 {ge_tk}")),
        meta("cuda", "CUDA meta-package", (f"cuda-13-0 {ge_tk}",)),
    ]


def nccl() -> list[Package]:
    """libnccl2/libnccl-dev as NVIDIA/nccl pkg/debian builds them (VERIFIED layout)."""
    major, minor, patch = NCCL_VERSION.split(".")
    code = int(major) * 10000 + int(minor) * 100 + int(patch)
    header = (
        "/* SIMULATION stand-in for nccl.h: only the version macros are real-format. */\n"
        "#ifndef NCCL_H_\n#define NCCL_H_\n\n"
        f"#define NCCL_MAJOR {major}\n#define NCCL_MINOR {minor}\n#define NCCL_PATCH {patch}\n"
        '#define NCCL_SUFFIX ""\n\n'
        f"#define NCCL_VERSION_CODE {code}\n"
        "#define NCCL_VERSION(X,Y,Z) (((X) <= 2 && (Y) <= 8) ? (X) * 1000 + (Y) * 100 + (Z) : "
        "(X) * 10000 + (Y) * 100 + (Z))\n\n#endif\n"
    )
    return [
        Package(name="libnccl2", version=NCCL_DEB_VERSION, section="libs",
                description="NVIDIA Collective Communication Library (NCCL) Runtime",
                files=(*_lib_with_links("libnccl.so", NCCL_VERSION, "2"),
                       _installed("nccl", NCCL_VERSION))),
        Package(name="libnccl-dev", version=NCCL_DEB_VERSION, section="libdevel",
                description="NVIDIA Collective Communication Library (NCCL) Development Files",
                depends=(f"libnccl2 (= {NCCL_DEB_VERSION})",),
                files=(_text("/usr/include/nccl.h", header),
                       File(f"{LIBDIR}/libnccl.so", link="libnccl.so.2"),
                       _stub_lib(f"{LIBDIR}/libnccl_static.a"),
                       _exe("/usr/bin/ncclras", "ncclras"))),
    ]


def cudnn() -> list[Package]:
    """cuDNN 9 for CUDA 13: runtime, headers and dev at one version (names and version
    CORROBORATED, nvidia-repo.md §4.2).

    Files: the runtime puts libcudnn.so.<9.x.y> and its sub-libraries in the multiarch
    libdir, the headers are /usr/include/x86_64-linux-gnu/cudnn*_v9.h (both VERIFIED from a
    container layer of libcudnn9-cuda-12 / -dev-cuda-12 9.7.0, where -dev still held the
    headers; their move to -headers, split off later, is INFERRED from the package's name).
    -dev's postinst makes /usr/include/cudnn.h the `libcudnn` alternative for cudnn_v9.h
    (CORROBORATED: "update-alternatives: using /usr/include/x86_64-linux-gnu/cudnn_v9.h to
    provide /usr/include/cudnn.h (libcudnn)" while setting up libcudnn9-dev-cuda-12; its
    priority is INFERRED). Relations: the runtime Provides libcudnn9 (CORROBORATED,
    NVIDIA-ISAAC-ROS/isaac_ros_common issue 210); -dev Depends -headers at its exact version
    (CORROBORATED, coreweave/nccl-tests PR 63 and public pinned installs, which must name all
    three) and the runtime (= v) (INFERRED, as libnccl-dev does). The .so.9 links and
    libcudnn.so in -dev are INFERRED (Debian's usual split)."""
    v, major = CUDNN_DEB_VERSION, CUDA_MINOR.split(".")[0]
    so = ".".join(CUDNN_VERSION.split(".")[:3])  # libcudnn.so.9.15.0
    c_major, c_minor, c_patch = (int(x) for x in so.split("."))
    inc = "/usr/include/x86_64-linux-gnu"
    version_h = (
        "/* SIMULATION stand-in for cudnn_version.h: only the version macros are real-format. */\n"
        f"#define CUDNN_MAJOR {c_major}\n#define CUDNN_MINOR {c_minor}\n"
        f"#define CUDNN_PATCHLEVEL {c_patch}\n\n"
        "#define CUDNN_VERSION (CUDNN_MAJOR * 10000 + CUDNN_MINOR * 100 + CUDNN_PATCHLEVEL)\n"
    )
    libs = ("libcudnn", "libcudnn_adv", "libcudnn_cnn", "libcudnn_engines_precompiled",
            "libcudnn_engines_runtime_compiled", "libcudnn_graph", "libcudnn_heuristic",
            "libcudnn_ops")
    headers = ("cudnn", "cudnn_adv", "cudnn_backend", "cudnn_cnn", "cudnn_graph", "cudnn_ops")
    runtime, dev = f"libcudnn9-cuda-{major}", f"libcudnn9-dev-cuda-{major}"
    hdrs = f"libcudnn9-headers-cuda-{major}"
    return [
        Package(name=runtime, version=v, section="libs", provides=("libcudnn9",),
                description=f"cuDNN runtime libraries for CUDA {major}",
                files=tuple(f for lib in libs for f in _lib_with_links(f"{lib}.so", so, "9"))),
        Package(name=hdrs, version=v, section="libdevel",
                description=f"cuDNN header files for CUDA {major}",
                files=(*(_text(f"{inc}/{h}_v9.h", "/* SIMULATION stand-in header */\n")
                         for h in headers),
                       _text(f"{inc}/cudnn_version_v9.h", version_h))),
        Package(name=dev, version=v, section="libdevel",
                description=f"cuDNN development libraries for CUDA {major}",
                depends=(f"{runtime} (= {v})", f"{hdrs} (= {v})"),
                files=(File(f"{LIBDIR}/libcudnn.so", link="libcudnn.so.9"),),
                scripts=(("postinst", _SH + 'if [ "$1" = configure ]; then\n'
                          "    update-alternatives --install /usr/include/cudnn.h libcudnn "
                          f"{inc}/cudnn_v9.h 90\nfi\n"),
                         ("prerm", _SH + 'if [ "$1" = remove ] || [ "$1" = deconfigure ]; then\n'
                          f"    update-alternatives --remove libcudnn {inc}/cudnn_v9.h\nfi\n"))),
    ]


_DCGM_UNIT = (
    "[Unit]\nDescription=NVIDIA DCGM service\nConflicts=dcgm.service\n\n"
    "[Service]\nUser=root\nPrivateTmp=false\n"
    "ExecStart=/usr/bin/nv-hostengine -n --service-account nvidia-dcgm\n"
    "Restart=on-abort\n\n[Install]\nWantedBy=multi-user.target\n"
)


def dcgm() -> list[Package]:
    """DCGM 4 with the epoch in Version (CORROBORATED); unit text INFERRED.

    Relations: -cuda13 Depends -core (= v) (CORROBORATED; NVIDIA/DCGM cmake/packaging.cmake
    VERIFIED, which also gives its Recommends libnuma1). `apt-cache depends` of the real
    -cuda13 shows Recommends datacenter-gpu-manager-4-proprietary-cuda13, and NVIDIA's
    install (--install-recommends) ends with -core, -cuda13, -proprietary and
    -proprietary-cuda13 at one version (CORROBORATED, code index id 69595206213); -core
    lists -proprietary as an optional (Recommends) dependency (CORROBORATED, dstack PR
    #2399). -cuda13 Provides datacenter-gpu-manager-4 and -core Conflicts
    datacenter-gpu-manager (VERIFIED, packaging.cmake). The -proprietary packages' own
    Depends (= v) are INFERRED. The exporter
    Depends -core and -proprietary (= v) of the DCGM its release is built for
    (CORROBORATED from Microsoft's repackaged dcgm-exporter, index id 65924874804;
    pairing from NVIDIA/dcgm-exporter tags `<dcgm>-<exporter>`)."""
    unit = "nvidia-dcgm.service"
    unit_bytes = (GUEST_DIR / unit).read_bytes() if (GUEST_DIR / unit).is_file() \
        else _DCGM_UNIT.encode()
    v = DCGM_DEB_VERSION
    core, prop = "datacenter-gpu-manager-4-core", "datacenter-gpu-manager-4-proprietary"
    return [
        Package(
            name=core,
            version=v,
            section="utils",
            description="NVIDIA® Datacenter GPU Management Tools",
            depends=("gpunode-sim-base",),
            recommends=(prop,),
            conflicts=("datacenter-gpu-manager",),
            files=(
                _exe("/usr/bin/dcgmi", "dcgmi"),
                _exe("/usr/bin/nv-hostengine", "nv-hostengine"),
                File(f"/usr/lib/systemd/system/{unit}", unit_bytes),
                _installed("dcgm", DCGM_VERSION),
            ),
            scripts=(("postinst", _SH + 'if [ -d /run/systemd/system ]; then systemctl '
                      "--system daemon-reload >/dev/null || true; fi\n"),),
        ),
        Package(
            name="datacenter-gpu-manager-4-cuda13",
            version=v,
            section="utils",
            description="NVIDIA® Datacenter GPU Management Tools - CUDA 13 support",
            depends=(f"{core} (= {v})",),
            recommends=("libnuma1", f"{prop}-cuda13"),
            provides=(f"datacenter-gpu-manager-4 (= {v})",),
            files=(_doc("datacenter-gpu-manager-4-cuda13"),),
        ),
        Package(
            name=prop,
            version=v,
            section="utils",
            description="NVIDIA® Datacenter GPU Management Tools - proprietary modules "
                        "(profiling, DCP metrics)",
            depends=(f"{core} (= {v})",),
            files=(_stub_lib(f"{LIBDIR}/libdcgmmoduleprofiling.so.4"),),
        ),
        Package(
            name=f"{prop}-cuda13",
            version=v,
            section="utils",
            description="NVIDIA® Datacenter GPU Management Tools - proprietary CUDA 13 support",
            depends=(f"{prop} (= {v})",),
            files=(_doc(f"{prop}-cuda13"),),
        ),
        *(Package(
            name="datacenter-gpu-manager-exporter",
            version=f"{exporter}-1",
            section="utils",
            description="NVIDIA DCGM exporter for Prometheus",
            depends=(f"{core} (= {v})", f"{prop} (= {v})"),
            files=(_doc("datacenter-gpu-manager-exporter"),),
        ) for exporter in DCGM_EXPORTERS),
    ]


# --------------------------------------------------------------------- container toolkit


def container_toolkit(version: str) -> list[Package]:
    """The four container toolkit packages at one version (control VERIFIED per tag)."""
    dv = f"{version}-1"
    newer = tuple(int(x) for x in version.split(".")) >= (1, 18, 0)
    # 1.18 pins libnvidia-container-tools exactly; 1.17 only with >= (PR #1100).
    tools_dep = f"libnvidia-container-tools (= {dv})" if newer \
        else f"libnvidia-container-tools (>= {dv})"
    base_files = [
        _exe("/usr/bin/nvidia-ctk", "nvidia-ctk"),
        _exe("/usr/bin/nvidia-container-runtime", "nvidia-container-runtime"),
        _exe("/usr/bin/nvidia-cdi-hook", "nvidia-cdi-hook"),
        _installed("ctk", version),
    ]
    base_post = (
        _SH + 'if [ "$1" = configure ]; then\n'
        # Real postinst; the simulated nvidia-ctk must implement `config --in-place`.
        "    /usr/bin/nvidia-ctk --quiet config "
        "--config-file=/etc/nvidia-container-runtime/config.toml --in-place || "
        'echo "SIMULATION: nvidia-ctk config failed" >&2\n'
    )
    if newer:
        base_files += [
            _text("/etc/systemd/system/nvidia-cdi-refresh.service",
                  "[Unit]\nDescription=Refresh NVIDIA CDI specification file\n"
                  "ConditionPathExists=|/usr/bin/nvidia-smi\n"
                  "ConditionPathExists=|/usr/sbin/nvidia-smi\n"
                  "ConditionPathExists=/usr/bin/nvidia-ctk\n\n[Service]\nType=oneshot\n"
                  "# Values from Environment will be replaced if defined in EnvironmentFile\n"
                  "Environment=NVIDIA_CTK_CDI_OUTPUT_FILE_PATH=/var/run/cdi/nvidia.yaml\n"
                  "EnvironmentFile=-/etc/nvidia-container-toolkit/nvidia-cdi-refresh.env\n"
                  "ExecCondition=/usr/bin/grep -qE '/nvidia.ko' /lib/modules/%v/modules.dep\n"
                  "ExecStart=/usr/bin/nvidia-ctk cdi generate\n"
                  "CapabilityBoundingSet=CAP_SYS_MODULE CAP_SYS_ADMIN CAP_MKNOD\n\n"
                  "[Install]\nWantedBy=multi-user.target\n"),
            _text("/etc/systemd/system/nvidia-cdi-refresh.path",
                  "[Unit]\nDescription=Trigger CDI refresh on NVIDIA driver or toolkit install "
                  "/ upgrade events\n\n[Path]\nPathChanged=/lib/modules/%v/modules.dep\n"
                  "PathChanged=/lib/modules/%v/modules.dep.bin\n"
                  "PathChanged=/usr/bin/nvidia-ctk\n\n[Install]\nWantedBy=multi-user.target\n"),
            _text("/etc/nvidia-container-toolkit/nvidia-cdi-refresh.env",
                  "# NVIDIA_CTK_CDI_OUTPUT_FILE_PATH=/var/run/cdi/nvidia.yaml\n"),
        ]
        base_post += (
            "    if command -v systemctl >/dev/null 2>&1; then\n"
            "        SYSTEMD_STATE=$(systemctl is-system-running 2>/dev/null || true)\n"
            '        case "$SYSTEMD_STATE" in\n'
            "            running|degraded)\n"
            "                systemctl daemon-reload || true\n"
            "                systemctl enable --now nvidia-cdi-refresh.path || true\n"
            "                systemctl enable --now nvidia-cdi-refresh.service || true\n"
            "                systemctl start nvidia-cdi-refresh.service || true\n"
            "                ;;\n        esac\n    fi\n"
        )
    base_post += "fi\n"
    toolkit_post = (
        _SH + 'if [ "$1" = configure ] && [ ! -e /usr/bin/nvidia-container-toolkit ]; then\n'
        "    ln -s nvidia-container-runtime-hook /usr/bin/nvidia-container-toolkit\nfi\n"
    )
    return [
        Package(name="libnvidia-container1", version=dv, section="libs",
                maintainer=CTK_MAINTAINER, multi_arch="same",
                description="NVIDIA container runtime library",
                depends=("libc6 (>= 2.34)",),
                files=_lib_with_links("libnvidia-container.so", version, "1")),
        Package(name="libnvidia-container-tools", version=dv, section="utils",
                maintainer=CTK_MAINTAINER,
                description="NVIDIA container runtime library (command-line tools)",
                depends=("libc6 (>= 2.34)", f"libnvidia-container1 (>= {dv})"),
                files=(_exe("/usr/bin/nvidia-container-cli", "nvidia-container-cli"),)),
        Package(name="nvidia-container-toolkit-base", version=dv, section="utils",
                maintainer=CTK_MAINTAINER, description="NVIDIA Container Toolkit Base",
                depends=("gpunode-sim-base",),
                breaks=("nvidia-container-runtime (<= 3.5.0-1)", "nvidia-container-runtime-hook",
                        "nvidia-container-toolkit (<= 1.10.0-1)"),
                replaces=("nvidia-container-runtime (<= 3.5.0-1)",
                          "nvidia-container-runtime-hook"),
                files=tuple(base_files), scripts=(("postinst", base_post),)),
        Package(name="nvidia-container-toolkit", version=dv, section="utils",
                maintainer=CTK_MAINTAINER, description="NVIDIA Container toolkit",
                depends=(f"nvidia-container-toolkit-base (= {dv})", tools_dep,
                         "libnvidia-container-tools (<< 2.0.0)"),
                breaks=("nvidia-container-runtime (<= 3.5.0-1)", "nvidia-container-runtime-hook"),
                replaces=("nvidia-container-runtime (<= 3.5.0-1)",
                          "nvidia-container-runtime-hook"),
                files=(_exe("/usr/bin/nvidia-container-runtime-hook",
                            "nvidia-container-runtime-hook"),),
                scripts=(("postinst", toolkit_post),)),
    ]


# ------------------------------------------------------------------------- repositories

CUDA_REPO_ROOT = "compute/cuda/repos"
CTK_REPO_ROOT = "libnvidia-container"
CTK_REPO_PATH = f"{CTK_REPO_ROOT}/stable/deb/amd64"


def cuda_repo_path(distro: str) -> str:
    return f"{CUDA_REPO_ROOT}/{distro}/x86_64"


def catalogue(keyrings: dict[str, bytes], base_url: str,
              driver_versions: tuple[str, ...] = DRIVER_VERSIONS) -> list[AptRepo]:
    """All simulated repositories. keyrings: {"cuda": binary keyring, "ctk": ...};
    base_url: how guests reach the www root (e.g. http://10.0.2.2:18087); driver_versions:
    the R580 releases published (a test publishes a newer one, as NVIDIA does)."""
    base = base_url.rstrip("/")
    repos = []
    for distro in CUDA_DISTROS:
        pkgs: list[Package] = [cuda_keyring(distro, keyrings["cuda"], f"{base}/{CUDA_REPO_ROOT}"),
                               sim_base()]
        pkgs += pinning_packages(distro, driver_versions)
        for v in driver_versions:  # oldest first, as NVIDIA appends new blocks
            pkgs += debian_driver(v) if distro.startswith("debian") else ubuntu_driver(distro, v)
        pkgs += cuda_toolkit() + nccl() + cudnn() + dcgm()
        repos.append(AptRepo(name=f"cuda-{distro}", path=cuda_repo_path(distro),
                             origin="NVIDIA", label="NVIDIA CUDA", architecture="x86_64",
                             key="cuda", packages=tuple(pkgs)))
    ctk: list[Package] = [sim_base()]
    for v in CTK_VERSIONS:
        ctk += container_toolkit(v)
    # Origin/Label of nvidia.github.io's Release were not seen (INFERRED).
    repos.append(AptRepo(name="libnvidia-container", path=CTK_REPO_PATH,
                         origin="https://nvidia.github.io/libnvidia-container",
                         label="libnvidia-container", architecture="amd64", key="ctk",
                         packages=tuple(ctk)))
    return repos


def ctk_list_file(base_url: str) -> str:
    """nvidia-container-toolkit.list as the docs' curl|sed pipeline consumes it."""
    base = base_url.rstrip("/")
    return (
        f"deb {base}/{CTK_REPO_ROOT}/stable/deb/$(ARCH) /\n"
        f"#deb {base}/{CTK_REPO_ROOT}/experimental/deb/$(ARCH) /\n"
    )
