"""The shell commands and host paths both engines use (pyinfra operations and the Ansible
roles through gpunode.engines.ansible.plan), so the two run the same thing on a host. No pyinfra
imports here."""

from __future__ import annotations

import base64
import shlex
from urllib.parse import urlparse

from gpunode.core import desired, paths
from gpunode.model import NodeProfile

OS_IDS = {"ubuntu-22.04": ("ubuntu", "22.04"), "ubuntu-24.04": ("ubuntu", "24.04"),
          "debian-12": ("debian", "12"), "debian-13": ("debian", "13")}
#: The environment of every apt/dpkg command (no prompts, needrestart restarts on its own).
APT_ENV_VARS = {"DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}
APT_ENV = " ".join(f"{k}={v}" for k, v in APT_ENV_VARS.items())


def initramfs_current(boot: str = "/boot", blacklist: str = paths.NOUVEAU_BLACKLIST) -> str:
    """Exits 0 when every initramfs image in `boot` was built after `blacklist` was
    last written (so it carries the current blacklist); 1 otherwise, or without images."""
    return (f"(for f in {boot}/initrd.img-*; do [ \"$f\" -nt {shlex.quote(blacklist)} ] "
            "|| exit 1; done)")


#: Commands run once per value of a key; a stamp file under STAMPS records the last success.
STAMP_COMMANDS = {
    "grub": "if command -v update-grub >/dev/null; then update-grub; "
            "else grub-mkconfig -o /boot/grub/grub.cfg; fi",
    # The driver packages' dpkg trigger usually rebuilt the newest kernel's image a moment
    # ago (with the blacklist already in place): rebuild only when an image predates it.
    "initramfs": f"{initramfs_current()} || update-initramfs -u -k all",
    "cdi": f"nvidia-ctk cdi generate --output={paths.ETC_CDI_SPEC}",  # toolkit 1.17
    # toolkit 1.18: its own service writes the spec; a skipped start (its ExecCondition finds
    # no nvidia.ko in modules.dep) leaves no spec, and records no stamp
    "cdi-refresh": f"systemctl start {desired.CDI_REFRESH_SERVICE} && test -s {paths.CDI_SPEC}",
}


#: Apply gpunode's sysctls, and its THP settings now (both engines run these).
SYSCTL_APPLY = f"sysctl -q -p {paths.SYSCTL_CONF}"
TMPFILES_APPLY = f"systemd-tmpfiles --create {paths.TMPFILES_CONF}"
#: Apply gpunode's disk rules now (they apply by themselves at every boot).
BLOCK_APPLY = ("udevadm control --reload && udevadm trigger --action=change "
               "--subsystem-match=block && udevadm settle --timeout=60")


def remove_service(name: str) -> list[str]:
    """Stop vLLM service `name` and remove its files (it left the profile)."""
    unit = paths.vllm_unit(name)
    return [f"systemctl disable --now {unit} || true",
            f"rm -rf {' '.join(paths.service_paths(name))} && systemctl daemon-reload && "
            f"(systemctl reset-failed {unit} || true)"]


def etc_cdi_cleanup() -> str:
    """Remove the spec gpunode generated into /etc/cdi (and its stamp, the sign that
    gpunode wrote it) once the toolkit's refresh service keeps the spec in /var/run/cdi."""
    return f"rm -f {paths.ETC_CDI_SPEC} {paths.stamp_path('cdi')}"


def stamped_command(command: str, name: str, key: str) -> str:
    """`command`, then record `key` in the stamp (only when the command succeeded)."""
    stamp = paths.stamp_path(name)
    return (f"{command} && install -d {paths.STAMPS} && printf '%s\\n' {shlex.quote(key)} "
            f"> {stamp} && chmod 644 {stamp}")


def apt_get(p: NodeProfile, args: str) -> str:
    """An apt-get command that waits (bounded) for a dpkg lock held by another process and
    keeps existing configuration files."""
    return (f"{APT_ENV} apt-get -q -y --no-install-recommends "
            f"-o DPkg::Lock::Timeout={p.apt_lock_timeout_s} -o Dpkg::Options::=--force-confdef "
            f"-o Dpkg::Options::=--force-confold {args}")


#: Exits 0 when nobody holds dpkg's frontend lock (the fcntl lock apt and dpkg take).
DPKG_LOCK_FREE = ("python3 -c 'import fcntl; fcntl.lockf(open(\"/var/lib/dpkg/lock-frontend\", "
                  "\"a\"), fcntl.LOCK_EX | fcntl.LOCK_NB)' 2>/dev/null")


def dpkg_lock_retry(p: NodeProfile, command: str) -> str:
    """`command` (one that fails at once when dpkg's lock is held: apt-mark, dpkg), retried
    every 5 s while another process holds the lock, for at most apt_lock_timeout_s; any
    other failure ends it at once. Runs in a subshell, so it chains with && and ||."""
    return (f"(n=0; until {command}; do {DPKG_LOCK_FREE} && exit 1; n=$((n+5)); "
            f"[ $n -gt {p.apt_lock_timeout_s} ] && exit 1; sleep 5; done)")


def apt_mark(p: NodeProfile, action: str, names: list[str]) -> str:
    """apt-mark hold/unhold (dpkg --set-selections underneath, which does not wait for the
    lock), retried while the dpkg lock is held."""
    return dpkg_lock_retry(p, f"apt-mark {action} {' '.join(names)}")


def keyring_install(p: NodeProfile) -> str | None:
    """Download cuda-keyring, check its published SHA-256, install it (None: no checksum
    is known for the URL, and the deploy must stop). A mismatch names the field, the OS and
    both checksums on stderr."""
    url, sha = desired.keyring_url(p), desired.keyring_sha256(p)
    if sha is None:
        return None
    deb = f"/tmp/{desired.KEYRING_DEB}"
    whose = ("the site's value" if p.nvidia.keyring_sha256 else
             f"the checksum NVIDIA publishes for {p.distro}")
    mismatch = shlex.quote(f"nvidia.keyring_sha256 ({p.os}): %s has sha256 %s, expected {sha} "
                           f"({whose}); a mirror serving another keyring needs its own "
                           "nvidia.keyring_sha256\n")
    return (f"curl -fsSL --retry 3 -o {deb} {shlex.quote(url)} && "
            f"got=$(sha256sum {deb} | cut -d' ' -f1) && "
            f"{{ [ \"$got\" = {sha} ] || {{ printf {mismatch} {shlex.quote(url)} \"$got\" >&2; "
            f"rm -f {deb}; false; }}; }} && "
            f"{apt_get(p, f'install --reinstall {deb}')} && rm -f {deb}")


def _offered(package: str) -> str:
    """Prints the distinct versions of `package` the host's apt metadata offers, one a line."""
    return (f"apt-cache madison {package} 2>/dev/null "
            "| awk -F'|' '{gsub(/[ \\t]/, \"\", $2); if ($2 != \"\") print $2}' | sort -uV")


def _joined(suffix: str) -> str:
    """awk: the lines ending in `suffix` (every line when empty), joined with ", "."""
    return (f"awk -v s={shlex.quote(suffix)} 'substr($0, length($0) - length(s) + 1) == s "
            "{o = o (n++ ? \", \" : \"\") $0} END {print o}'")


def nccl_available(p: NodeProfile) -> str | None:
    """Exits 0 when the host's apt metadata offers the pinned libnccl2 (None: NCCL is off).
    Otherwise names the host, the fields, the wanted version and the builds the host's
    repositories offer for the pinned CUDA (and all of them) on stderr and fails: apt-get
    install would only say the version was not found, after the install had begun."""
    pkg = next((x for x in desired.nccl_packages(p) if x.name == "libnccl2" and x.version),
               None)
    if pkg is None:
        return None
    cuda = p.cuda.version
    head = (f"{p.name}: nccl.version {p.nccl.version} with cuda.version {cuda}: "
            f"libnccl2={pkg.version} is not in this host's apt repositories; "
            f"they offer for CUDA {cuda}: ")
    return (f"have=$({_offered('libnccl2')}); "
            f"printf '%s\\n' \"$have\" | grep -qxF -- {shlex.quote(pkg.version)} || {{ "
            f"for_cuda=$(printf '%s\\n' \"$have\" | {_joined('+cuda' + cuda)}); "
            f"all=$(printf '%s\\n' \"$have\" | {_joined('')}); "
            f"printf '%s%s (all libnccl2 builds: %s)\\n' {shlex.quote(head)} "
            "\"${for_cuda:-none}\" \"${all:-none}\" >&2; false; }")


#: The snapshot command's key: what apt offers for dkms and the DKMS package's candidate.
DKMS_OFFER_KEY = "apt:dkms"


def dkms_offer_command(p: NodeProfile) -> str | None:
    """Prints `dkms <version>` for every dkms build the host's apt metadata offers, then the
    DKMS kernel-module package's candidate as `version ...` and `depends ...` (apt-cache
    show honours the driver's preferences pin); nothing when that package is installed at
    the pinned version. None: not a debian-12 CUDA-repo node."""
    pkg = desired.dkms_kernel_package(p)
    if pkg is None:
        return None
    probe = (f"{_offered('dkms')} | sed 's/^/dkms /'; "
             f"apt-cache show --no-all-versions {pkg} 2>/dev/null "
             "| sed -n 's/^Version: /version /p; s/^Depends: /depends /p'")
    pinned = desired.driver_deb_version(p)
    if pinned is None:
        return probe
    # Installed at the pin already (a converged node): nothing is to install, so nothing
    # to refuse, and the two apt-cache runs (seconds each on a small VM) are skipped. dpkg's
    # status word, not its abbreviation: gpunode holds the package ("hi", not "ii").
    installed = f"dpkg-query -W -f='${{db:Status-Status}} ${{Version}}' {pkg} 2>/dev/null"
    return f'[ "$({installed})" = {shlex.quote("installed " + pinned)} ] || {{ {probe}; }}'


def ctk_key_install(p: NodeProfile) -> str:
    """Fetch the container toolkit repository's signing key into its keyring file."""
    base = p.container_toolkit.repo_url.rstrip("/")
    url = base.removesuffix("/stable/deb").removesuffix("/deb") + "/gpgkey"
    return (f"curl -fsSL --retry 3 {shlex.quote(url)} | gpg --batch --yes --dearmor "
            f"-o {paths.CTK_KEYRING} && chmod 644 {paths.CTK_KEYRING}")


def runtime_configure(runtime: str) -> str:
    """Add the NVIDIA runtime to a container engine's configuration, keeping the rest."""
    return (f"nvidia-ctk runtime configure --runtime={runtime} && "
            f"(systemctl try-restart {runtime}.service || true)")


def driver_to_version(p: NodeProfile, stale: list[str]) -> str:
    """Move the installed driver packages `stale` to the pinned version (the preferences'
    candidate), up or down, through their holds (held again by a later step)."""
    return (f"{apt_mark(p, 'unhold', stale)} && "
            + apt_get(p, "install --allow-change-held-packages --allow-downgrades "
                      + " ".join(stale)))


def dpkg_configure_pending(p: NodeProfile) -> str:
    """Finish what an interrupted dpkg run left, waiting for the lock like apt does."""
    return dpkg_lock_retry(p, f"{APT_ENV} dpkg --force-confdef --force-confold --configure -a")


def venv_command(p: NodeProfile) -> str:
    """Bootstrap uv into <prefix>/uv and install vLLM at the pinned version into
    <prefix>/venv (from the index override, when set). Every site value is quoted."""
    v = p.vllm
    q = shlex.quote
    prefix = v.prefix
    pip_index = uv_index = ""
    if v.index_url:
        host_name = urlparse(v.index_url).hostname or ""
        pip_index = f"--index-url {q(v.index_url)}"
        uv_index = f"--index-url {q(v.index_url)}"
        if v.index_url.startswith("http://"):
            pip_index += f" --trusted-host {q(host_name)}"
            uv_index += f" --allow-insecure-host {q(host_name)}"
    # With a package index override uv must not fetch Python from the internet: the OS's
    # python3 (validated against vllm.python), or a build from the site's Python mirror.
    # A Python uv installs goes below the prefix (root's home is closed to the service user).
    env = (f"UV_PYTHON_DOWNLOADS={'never' if v.index_url and not v.python_mirror else 'automatic'}"
           f" UV_PYTHON_INSTALL_DIR={q(prefix + '/python')}")
    if v.python_mirror:
        env += f" UV_PYTHON_INSTALL_MIRROR={q(v.python_mirror)}"
    uv_dir, venv, uv = q(f"{prefix}/uv"), q(f"{prefix}/venv"), q(f"{prefix}/uv/bin/uv")
    python = q(prefix + "/venv/bin/python")
    requirements = desired.vllm_requirements(p)
    if requirements:  # the lock's exact set, every wheel checked against its hash
        req = q(f"{prefix}/requirements.lock")
        data = base64.b64encode(requirements.encode()).decode()
        install = [f"printf %s {data} | base64 -d > {req}",
                   f"{env} {uv} pip sync -q --require-hashes "
                   f"--python {python} {uv_index} {req}"]
    else:
        install = [f"{env} {uv} pip install -q "
                   f"--python {python} {uv_index} {q('vllm==' + v.version)}"]
    return " && ".join([
        f"install -d -m 755 {q(prefix)}",
        f"(test -x {uv} || python3 -m venv {uv_dir})",
        f"{q(prefix + '/uv/bin/python')} -m pip install -q --disable-pip-version-check "
        f"{pip_index} {q('uv==' + v.uv_version)}",
        f"{env} {uv} venv -q --allow-existing "
        f"--python {q(v.python)} {venv}",
        *install,
    ])


def user_command(p: NodeProfile) -> str:
    """Create the vLLM system user (and its group)."""
    return (f"useradd --system --user-group --home-dir {paths.VLLM_HOME} --shell /usr/sbin/nologin "
            f"{shlex.quote(p.vllm.user)}")


def unit_names(p: NodeProfile) -> list[str]:
    """Every unit the snapshot reports on."""
    units = ["nvidia-persistenced.service", "gpunode-gpu-settings.service", "irqbalance.service",
             "nvidia-dcgm.service", "docker.service", "containerd.service",
             paths.CPU_GOVERNOR_UNIT]
    return units + desired.cdi_refresh_units(p) + desired.vllm_units(p)
