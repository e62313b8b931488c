"""SIMULATION equipment tests: the lab's simulated NVIDIA apt repositories (gpunode.lab.sim.repo).

Built into a temporary www root with throwaway keys and checked with the real Debian tools
(dpkg-deb, apt-ftparchive, gpgv, apt-get/apt-cache under a private apt configuration).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpunode.core import paths
from gpunode.lab.sim import packages as cat
from gpunode.lab.sim import repo
from gpunode.lab.sim.server import serving

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("gpg", "gpgv", "dpkg-deb", "apt-get", "apt-ftparchive")),
    reason="needs gpg, gpgv, dpkg-deb, apt-get, apt-ftparchive",
)

V_OLD, V_NEW = cat.DRIVER_VERSIONS
DEB_OLD, DEB_NEW = f"{V_OLD}-1", f"{V_NEW}-1"
BASE = "http://10.0.2.2:18087"


@pytest.fixture(scope="module")
def built() -> Iterator[tuple[Path, dict]]:
    # Short paths: gpg-agent sockets live in the key dir and must stay under ~100 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="gsimrepo-"))
    try:
        manifest = repo.build(tmp / "www", base_url=BASE, key_dir=tmp / "key")
        yield tmp / "www", manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def repo_dir(www: Path, distro: str = "debian12") -> Path:
    return www / cat.cuda_repo_path(distro)


def parse_packages(text: str) -> list[dict[str, str]]:
    stanzas = []
    for block in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line.startswith(" ") and key:
                fields[key] += "\n" + line
            else:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        stanzas.append(fields)
    return stanzas


def index(www: Path, distro: str = "debian12") -> dict[tuple[str, str], dict[str, str]]:
    text = (repo_dir(www, distro) / "Packages").read_text()
    return {(s["Package"], s["Version"]): s for s in parse_packages(text)}


def extract(deb: Path, dest: Path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    return dest


# ----------------------------------------------------------------------- metadata


def test_layout_like_nvidia_cuda_repo(built: tuple[Path, dict]) -> None:
    www, manifest = built
    for distro in ("debian12", "ubuntu2204", "ubuntu2404"):
        d = repo_dir(www, distro)
        for name in ("Packages", "Packages.gz", "Release", "Release.gpg", "InRelease",
                     "cuda-keyring_1.1-1_all.deb"):
            assert (d / name).is_file(), f"{distro}: {name} missing"
        assert gzip.decompress((d / "Packages.gz").read_bytes()) == (d / "Packages").read_bytes()
        release = (d / "Release").read_text()
        assert "Origin: NVIDIA\n" in release and "Label: NVIDIA CUDA\n" in release
        packages_sha = hashlib.sha256((d / "Packages").read_bytes()).hexdigest()
        assert packages_sha in release
    ctk = www / cat.CTK_REPO_PATH
    assert (ctk / "InRelease").is_file() and (www / "libnvidia-container/gpgkey").is_file()
    saved = json.loads((www / repo.MANIFEST).read_text())
    assert saved["cuda"]["distros"]["debian12"]["keyring_sha256"] == hashlib.sha256(
        (repo_dir(www) / "cuda-keyring_1.1-1_all.deb").read_bytes()).hexdigest()
    assert manifest == saved


def test_packages_index_agrees_with_apt_ftparchive(built: tuple[Path, dict]) -> None:
    www, _ = built
    for d in (repo_dir(www), www / cat.CTK_REPO_PATH):
        ours = {(s["Package"], s["Version"]): s
                for s in parse_packages((d / "Packages").read_text())}
        out = subprocess.run(["apt-ftparchive", "packages", "."], cwd=d, check=True,
                             capture_output=True, text=True).stdout
        theirs = {(s["Package"], s["Version"]): s for s in parse_packages(out)}
        assert ours.keys() == theirs.keys()
        for key, s in theirs.items():
            for field in ("Architecture", "Depends", "Provides", "Conflicts", "Size", "SHA256",
                          "Installed-Size", "Multi-Arch"):
                assert ours[key].get(field) == s.get(field), (key, field)
            assert ours[key]["Filename"] == s["Filename"]


def test_every_deb_readable_by_dpkg_deb(built: tuple[Path, dict]) -> None:
    www, _ = built
    debs = sorted(repo_dir(www).glob("*.deb")) + sorted((www / cat.CTK_REPO_PATH).glob("*.deb"))
    assert len(debs) > 60
    for deb in debs:
        info = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version"], check=True,
                              capture_output=True, text=True).stdout
        name, version = deb.name[:-4].split("_")[:2]
        assert f"Package: {name}\n" in info
        assert version in info  # DCGM's epoch is in Version only
        subprocess.run(["dpkg-deb", "-c", str(deb)], check=True, capture_output=True)


def test_both_driver_versions_of_every_driver_package(built: tuple[Path, dict]) -> None:
    www, _ = built
    for distro, suffix in (("debian12", "-1"), ("ubuntu2204", "-0ubuntu1"),
                           ("ubuntu2404", "-0ubuntu1")):
        pkgs = index(www, distro)
        old = {n for n, v in pkgs if v == V_OLD + suffix} - {f"nvidia-driver-pinning-{V_OLD}"}
        new = {n for n, v in pkgs if v == V_NEW + suffix} - {f"nvidia-driver-pinning-{V_NEW}"}
        assert len(old) >= 20 and old == new, distro


def test_debian12_names_and_exact_relations(built: tuple[Path, dict]) -> None:
    pkgs = index(built[0])
    for name in ("nvidia-open", "cuda-drivers", "cuda-drivers-580", "nvidia-driver",
                 "nvidia-driver-cuda", "nvidia-driver-libs", "nvidia-kernel-dkms",
                 "nvidia-kernel-open-dkms", "nvidia-kernel-support", "nvidia-alternative",
                 "firmware-nvidia-gsp", "libcuda1", "libnvidia-ml1", "nvidia-smi",
                 "nvidia-modprobe", "nvidia-persistenced"):
        assert (name, DEB_NEW) in pkgs and (name, DEB_OLD) in pkgs, name
    libcuda = pkgs[("libcuda1", DEB_OLD)]["Depends"]
    assert f"libnvidia-ptxjitcompiler1 (= {DEB_OLD})" in libcuda
    cuda_meta = pkgs[("nvidia-driver-cuda", DEB_NEW)]["Depends"]
    assert f"libcuda1 (= {DEB_NEW})" in cuda_meta and f"nvidia-smi (= {DEB_NEW})" in cuda_meta
    assert "nvidia-kernel-dkms" in pkgs[("nvidia-kernel-open-dkms", DEB_NEW)]["Conflicts"]
    assert pkgs[("nvidia-open", DEB_NEW)]["Depends"].endswith(f"nvidia-kernel-open-dkms (>= {V_NEW})")
    pin = pkgs[("nvidia-driver-pinning-580", "580-5")]
    assert pin["Provides"] == pin["Conflicts"] == "nvidia-driver-pinning"
    assert pkgs[("libnccl-dev", cat.NCCL_DEB_VERSION)]["Depends"] == \
        f"libnccl2 (= {cat.NCCL_DEB_VERSION})"
    dcgm = pkgs[("datacenter-gpu-manager-4-cuda13", cat.DCGM_DEB_VERSION)]
    assert dcgm["Depends"] == f"datacenter-gpu-manager-4-core (= {cat.DCGM_DEB_VERSION})"
    assert dcgm["Filename"] == "./datacenter-gpu-manager-4-cuda13_4.4.2-1_amd64.deb"
    assert ("cuda-toolkit-13-0", "13.0.2-1") in pkgs and ("cuda-nvcc-13-0", "13.0.88-1") in pkgs


def test_dcgm_relations_as_nvidia_publishes_them(built: tuple[Path, dict]) -> None:
    v = cat.DCGM_DEB_VERSION
    for distro in cat.CUDA_DISTROS:
        pkgs = index(built[0], distro)
        cuda13 = pkgs[("datacenter-gpu-manager-4-cuda13", v)]
        assert "datacenter-gpu-manager-4-proprietary-cuda13" in cuda13["Recommends"]
        assert "datacenter-gpu-manager-4-proprietary" in \
            pkgs[("datacenter-gpu-manager-4-core", v)]["Recommends"]
        assert pkgs[("datacenter-gpu-manager-4-proprietary", v)]["Depends"] == \
            f"datacenter-gpu-manager-4-core (= {v})"
        for exporter in cat.DCGM_EXPORTERS:
            needs = pkgs[("datacenter-gpu-manager-exporter", f"{exporter}-1")]["Depends"]
            assert f"datacenter-gpu-manager-4-core (= {v})" in needs, distro


SIM_OS = {"debian12": "debian-12", "ubuntu2204": "ubuntu-22.04", "ubuntu2404": "ubuntu-24.04"}


def test_every_version_the_model_defaults_to_is_served(built: tuple[Path, dict]) -> None:
    """A site that enables everything at the model's defaults (each driver the sim serves
    pinned) finds every package=version gpunode installs in the distro's CUDA repository
    or the container toolkit repository."""
    from gpunode.core import desired
    from gpunode.model import NodeProfile

    www = built[0]
    ctk = {(s["Package"], s["Version"])
           for s in parse_packages((www / cat.CTK_REPO_PATH / "Packages").read_text())}
    assert SIM_OS.keys() == set(cat.CUDA_DISTROS)
    for distro, os_name in SIM_OS.items():
        served = set(index(www, distro)) | ctk
        names = {n for n, _ in served}
        for driver in cat.DRIVER_VERSIONS:
            p = NodeProfile.model_validate({
                "name": "n", "connection": {"address": "h"}, "gpus": {"count": 1},
                "os": os_name, "nvidia": {"version": driver}, "cuda": {"enabled": True},
                "nccl": {"enabled": True}, "cudnn": {"enabled": True},
                "dcgm": {"enabled": True, "exporter": True},
                "container_toolkit": {"enabled": True}})
            deb = desired.driver_deb_version(p)
            wanted = [desired.Pkg(n, deb) for n in desired.driver_packages(p)]
            pin = desired.pinning_package(p)
            assert pin is not None
            wanted.append(desired.Pkg(pin))
            wanted += (desired.cuda_packages(p) + desired.nccl_packages(p)
                       + desired.cudnn_packages(p) + desired.container_toolkit_packages(p)
                       + desired.dcgm_packages(p))
            missing = [x.spec for x in wanted if x.name not in names
                       or (x.version and (x.name, x.version) not in served)]
            assert not missing, (distro, driver, missing)


def test_cudnn_relations_and_files(built: tuple[Path, dict], tmp_path: Path) -> None:
    v = cat.CUDNN_DEB_VERSION
    for distro in cat.CUDA_DISTROS:
        pkgs = index(built[0], distro)
        assert pkgs[("libcudnn9-dev-cuda-13", v)]["Depends"] == \
            f"libcudnn9-cuda-13 (= {v}), libcudnn9-headers-cuda-13 (= {v})"
        assert pkgs[("libcudnn9-cuda-13", v)]["Provides"] == "libcudnn9"
    d = repo_dir(built[0])
    so = ".".join(cat.CUDNN_VERSION.split(".")[:3])
    lib = extract(d / f"libcudnn9-cuda-13_{v}_amd64.deb", tmp_path / "l")
    assert (lib / f"usr/lib/x86_64-linux-gnu/libcudnn.so.{so}").is_file()
    assert os.readlink(lib / "usr/lib/x86_64-linux-gnu/libcudnn.so.9") == f"libcudnn.so.{so}"
    hdr = extract(d / f"libcudnn9-headers-cuda-13_{v}_amd64.deb", tmp_path / "h")
    major, minor, patch = so.split(".")
    text = (hdr / "usr/include/x86_64-linux-gnu/cudnn_version_v9.h").read_text()
    assert f"#define CUDNN_MAJOR {major}\n#define CUDNN_MINOR {minor}\n" \
        f"#define CUDNN_PATCHLEVEL {patch}\n" in text


def test_ubuntu_names_are_branch_suffixed(built: tuple[Path, dict]) -> None:
    pkgs = index(built[0], "ubuntu2404")
    uv = f"{V_NEW}-0ubuntu1"
    for name in ("nvidia-driver-580-open", "nvidia-dkms-580-open", "libnvidia-compute-580",
                 "nvidia-utils-580", "nvidia-headless-580-open", "nvidia-open-580",
                 "cuda-drivers-580", "nvidia-kernel-common-580"):
        assert (name, uv) in pkgs, name
    assert ("nvidia-driver-cuda", uv) not in pkgs
    headless = pkgs[("nvidia-headless-no-dkms-580-open", uv)]["Depends"]
    assert "nvidia-utils-580" not in headless  # headless does not bring nvidia-smi
    assert f"nvidia-utils-580 (= {uv})" in pkgs[("nvidia-driver-580-open", uv)]["Depends"]


def test_container_toolkit_relations(built: tuple[Path, dict]) -> None:
    d = built[0] / cat.CTK_REPO_PATH
    pkgs = {(s["Package"], s["Version"]): s for s in parse_packages((d / "Packages").read_text())}
    new = pkgs[("nvidia-container-toolkit", "1.18.1-1")]["Depends"]
    assert "nvidia-container-toolkit-base (= 1.18.1-1)" in new
    assert "libnvidia-container-tools (= 1.18.1-1)" in new
    old = pkgs[("nvidia-container-toolkit", "1.17.8-1")]["Depends"]
    assert "libnvidia-container-tools (>= 1.17.8-1)" in old
    listing = (built[0] / "libnvidia-container/stable/deb/nvidia-container-toolkit.list")
    assert listing.read_text().startswith(f"deb {BASE}/libnvidia-container/stable/deb/$(ARCH) /")


def test_every_dependency_resolves_inside_the_repo(built: tuple[Path, dict]) -> None:
    """Each Depends alternative names a package or Provides of the same repo, or one of the
    few Debian packages the lab guest gets from Debian's archive."""
    external = {"dkms", "adduser", "python3", "dpkg", "libc6", "ocl-icd-libopencl1"}
    www = built[0]
    for d in [repo_dir(www, x) for x in cat.CUDA_DISTROS] + [www / cat.CTK_REPO_PATH]:
        stanzas = parse_packages((d / "Packages").read_text())
        names = {s["Package"] for s in stanzas}
        versions = {(s["Package"], s["Version"]) for s in stanzas}
        provided = {p.strip().split(" ")[0] for s in stanzas
                    for p in s.get("Provides", "").split(",") if p.strip()}
        for s in stanzas:
            for dep in filter(None, (x.strip() for x in s.get("Depends", "").split(","))):
                alts = [a.strip() for a in dep.split("|")]
                ok = False
                for alt in alts:
                    name = alt.split(" ")[0]
                    if "(= " in alt and name in names:
                        ok = ok or (name, alt.split("(= ")[1].rstrip(")")) in versions
                    else:
                        ok = ok or name in names or name in provided or name in external
                assert ok, f"{d.name}: {s['Package']} {s['Version']}: unresolvable {dep!r}"


def test_maintainer_scripts_are_valid_sh(built: tuple[Path, dict], tmp_path: Path) -> None:
    debs = sorted(repo_dir(built[0]).glob("*.deb")) + sorted(
        (built[0] / cat.CTK_REPO_PATH).glob("*.deb"))
    checked = 0
    for deb in debs:
        ctl = tmp_path / deb.name
        subprocess.run(["dpkg-deb", "-e", str(deb), str(ctl)], check=True)
        for script in ("preinst", "postinst", "prerm", "postrm"):
            if (ctl / script).is_file():
                subprocess.run(["sh", "-n", str(ctl / script)], check=True)
                checked += 1
    assert checked >= 10


def test_kmod_and_library_packages_record_their_state(built: tuple[Path, dict],
                                                      tmp_path: Path) -> None:
    d = repo_dir(built[0])
    open_root = extract(d / f"nvidia-kernel-open-dkms_{DEB_OLD}_amd64.deb", tmp_path / "o")
    assert (open_root / "usr/lib/gpunode-sim/installed/kmod").read_text() == f"{V_OLD} open\n"
    prop_root = extract(d / f"nvidia-kernel-dkms_{DEB_NEW}_amd64.deb", tmp_path / "p")
    assert (prop_root / "usr/lib/gpunode-sim/installed/kmod").read_text() == \
        f"{V_NEW} proprietary\n"
    ml = extract(d / f"libnvidia-ml1_{DEB_NEW}_amd64.deb", tmp_path / "m")
    assert (ml / "usr/lib/gpunode-sim/installed/driver").read_text() == f"{V_NEW}\n"
    pd = extract(d / f"nvidia-persistenced_{DEB_NEW}_amd64.deb", tmp_path / "pd")
    unit = (pd / "lib/systemd/system/nvidia-persistenced.service").read_text()
    assert "ExecStart=/usr/bin/nvidia-persistenced" in unit
    assert (pd / "usr/bin/nvidia-persistenced").stat().st_mode & 0o111
    base = extract(d / "gpunode-sim-base_0.1-1_all.deb", tmp_path / "b")
    assert (base / "usr/lib/gpunode-sim/gpunode_sim.py").read_bytes() == \
        cat.guest_file("gpunode_sim.py")
    assert (base / "lib/systemd/system/gpunode-sim-boot.service").is_file()


# ---------------------------------------------------------------------- keyring / gpg


def test_toolkit_118_ships_and_starts_its_cdi_refresh_units(built: tuple[Path, dict],
                                                           tmp_path: Path) -> None:
    from gpunode.core import desired

    d = built[0] / cat.CTK_REPO_PATH
    deb = d / "nvidia-container-toolkit-base_1.18.1-1_amd64.deb"
    new = extract(deb, tmp_path / "n")
    units = new / "etc/systemd/system"
    assert f"Environment=NVIDIA_CTK_CDI_OUTPUT_FILE_PATH={paths.CDI_SPEC}\n" in (
        units / desired.CDI_REFRESH_SERVICE).read_text()
    assert "PathChanged=/lib/modules/%v/modules.dep\n" in (units / desired.CDI_REFRESH_PATH
                                                           ).read_text()
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path / "c")], check=True)
    post = (tmp_path / "c/postinst").read_text()
    # as the real postinst: enable both units, then start the service once
    assert post.index("enable --now nvidia-cdi-refresh.path") < post.index(
        "systemctl start nvidia-cdi-refresh.service")
    old = extract(d / "nvidia-container-toolkit-base_1.17.8-1_amd64.deb", tmp_path / "o")
    assert not (old / "etc/systemd/system").exists()


def test_dkms_records_the_module_where_the_cdi_refresh_condition_looks(
        built: tuple[Path, dict], tmp_path: Path) -> None:
    """dkms's depmod puts the module in modules.dep; nvidia-cdi-refresh.service's
    ExecCondition greps for it there (else the service is skipped and no spec is made)."""
    root, k = tmp_path / "root", "6.1.0-30-amd64"
    kdir = root / "lib/modules" / k
    (kdir / "build").mkdir(parents=True)
    (kdir / "modules.dep").write_text("kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko\n")
    (root / f"usr/src/nvidia-{V_NEW}").mkdir(parents=True)
    ctl = tmp_path / "ctl"
    subprocess.run(["dpkg-deb", "-e", str(repo_dir(built[0]) /
                    f"nvidia-kernel-open-dkms_{DEB_NEW}_amd64.deb"), str(ctl)], check=True)

    def run(script: str, *args: str) -> None:
        text = (ctl / script).read_text()
        for path in ("/var/lib/dkms", "/lib/modules", "/usr/src"):
            text = text.replace(path, f"{root}{path}")
        subprocess.run(["sh", "-c", text, script, *args], check=True, capture_output=True)

    ctk = extract(built[0] / cat.CTK_REPO_PATH / "nvidia-container-toolkit-base_1.18.1-1_amd64.deb",
                  tmp_path / "ctk")
    unit = (ctk / "etc/systemd/system/nvidia-cdi-refresh.service").read_text()
    pattern = unit.split("ExecCondition=/usr/bin/grep -qE '")[1].split("'")[0]

    def condition() -> int:
        return subprocess.run(["grep", "-qE", pattern, str(kdir / "modules.dep")]).returncode

    assert condition() == 1
    run("postinst", "configure")
    run("postinst", "configure")  # once only
    assert condition() == 0
    assert (kdir / "modules.dep").read_text().count("nvidia.ko") == 1
    run("prerm", "remove")
    assert condition() == 1 and "ext4.ko" in (kdir / "modules.dep").read_text()


def test_dkms_installs_the_module_for_every_kernel_with_headers_and_later_kernels(
        built: tuple[Path, dict], tmp_path: Path) -> None:
    """As dkms: the postinst puts nvidia.ko in updates/dkms of every kernel with headers (not
    one without), the kernel hooks (gpunode-sim-base, beside dkms's own) do it for a kernel
    whose image or headers come later, and the prerm takes it out of every kernel."""
    root = tmp_path / "root"
    old, bare, later = "6.1.0-30-amd64", "6.1.0-29-amd64", "6.1.0-31-amd64"
    for k in (old, bare, later):
        (root / "lib/modules" / k / "kernel").mkdir(parents=True)
    (root / "lib/modules" / old / "build").mkdir()
    (root / f"usr/src/nvidia-{V_NEW}").mkdir(parents=True)
    kmod = extract(repo_dir(built[0]) / f"nvidia-kernel-open-dkms_{DEB_NEW}_amd64.deb",
                   tmp_path / "kmod")
    (root / cat.INSTALLED.lstrip("/")).mkdir(parents=True)
    shutil.copy(kmod / cat.INSTALLED.lstrip("/") / "kmod", root / cat.INSTALLED.lstrip("/"))
    ctl = tmp_path / "ctl"
    subprocess.run(["dpkg-deb", "-e", str(repo_dir(built[0]) /
                    f"nvidia-kernel-open-dkms_{DEB_NEW}_amd64.deb"), str(ctl)], check=True)
    base = extract(repo_dir(built[0]) / f"gpunode-sim-base_{cat.SIM_BASE_VERSION}_all.deb",
                   tmp_path / "base")

    def run(path: Path, *args: str) -> None:
        text = path.read_text()
        for prefix in ("/var/lib/dkms", "/lib/modules", "/usr/src", cat.INSTALLED):
            text = text.replace(prefix, f"{root}{prefix}")
        subprocess.run(["sh", "-c", text, path.name, *args], check=True, capture_output=True)

    def with_module() -> list[str]:
        return sorted(k for k in (old, bare, later)
                      if (root / "lib/modules" / k / "updates/dkms/nvidia.ko").is_file())

    hooks = [base / h.lstrip("/") for h in cat.DKMS_HOOKS]
    assert [h.stat().st_mode & 0o777 for h in hooks] == [0o755, 0o755]
    run(ctl / "postinst", "configure")
    assert with_module() == [old]
    assert "open" in (root / "lib/modules" / old / "updates/dkms/nvidia.ko").read_text()
    run(hooks[0], later, f"/boot/vmlinuz-{later}")  # the image first: no headers, no build
    assert with_module() == [old]
    (root / "lib/modules" / later / "build").mkdir()
    run(hooks[1], later)  # then linux-headers-<later>
    assert with_module() == [old, later]
    run(ctl / "prerm", "remove")
    assert with_module() == []
    run(hooks[1], bare)  # the module gone from the DKMS tree: the hook builds nothing
    (root / "lib/modules" / bare / "build").mkdir()
    run(hooks[1], bare)
    assert with_module() == []


def test_keyring_package_and_signatures(built: tuple[Path, dict], tmp_path: Path) -> None:
    www, _ = built
    for distro in cat.CUDA_DISTROS:
        d = repo_dir(www, distro)
        root = extract(d / "cuda-keyring_1.1-1_all.deb", tmp_path / distro)
        keyring = root / "usr/share/keyrings/cuda-archive-keyring.gpg"
        line = (root / f"etc/apt/sources.list.d/cuda-{distro}-x86_64.list").read_text()
        assert line == (f"deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] "
                        f"{BASE}/compute/cuda/repos/{distro}/x86_64/ /\n")
        pin = root / "etc/apt/preferences.d/cuda-repository-pin-600"
        assert pin.is_file() == distro.startswith("ubuntu")
        assert (d / f"cuda-{distro}.pin").is_file() == distro.startswith("ubuntu")
        if pin.is_file():
            assert "Pin: release l=NVIDIA CUDA\nPin-Priority: 600" in pin.read_text()
        subprocess.run(["gpgv", "--keyring", str(keyring), str(d / "InRelease")], check=True,
                       capture_output=True)
        subprocess.run(["gpgv", "--keyring", str(keyring), str(d / "Release.gpg"),
                        str(d / "Release")], check=True, capture_output=True)
        tampered = tmp_path / f"{distro}-Release"
        tampered.write_text((d / "Release").read_text().replace("NVIDIA CUDA", "NVIDIA CUDB"))
        bad = subprocess.run(["gpgv", "--keyring", str(keyring), str(d / "Release.gpg"),
                              str(tampered)], capture_output=True)
        assert bad.returncode != 0
    # The container toolkit repo has its own key, as on nvidia.github.io.
    cuda_keyring = tmp_path / "debian12/usr/share/keyrings/cuda-archive-keyring.gpg"
    ctk_in = www / cat.CTK_REPO_PATH / "InRelease"
    wrong = subprocess.run(["gpgv", "--keyring", str(cuda_keyring), str(ctk_in)],
                           capture_output=True)
    assert wrong.returncode != 0
    ctk_keyring = tmp_path / "ctk.gpg"
    subprocess.run(["gpg", "--dearmor", "-o", str(ctk_keyring),
                    str(www / "libnvidia-container/gpgkey")], check=True,
                   env={"GNUPGHOME": str(tmp_path / "gh"), "PATH": "/usr/bin:/bin"})
    subprocess.run(["gpgv", "--keyring", str(ctk_keyring), str(ctk_in)], check=True,
                   capture_output=True)


def test_secret_key_not_in_www_root(built: tuple[Path, dict]) -> None:
    www, _ = built
    for path in www.rglob("*"):
        if path.is_file() and path.suffix != ".deb":
            assert b"PRIVATE KEY" not in path.read_bytes(), path


# --------------------------------------------------------------------------- caching


def test_build_is_cached_and_invalidated_by_inputs(built: tuple[Path, dict]) -> None:
    www, manifest = built
    key_dir = www.parent / "key"
    packages = repo_dir(www) / "Packages"
    before = packages.stat().st_mtime_ns
    again = repo.build(www, base_url=BASE, key_dir=key_dir)
    assert again == manifest and packages.stat().st_mtime_ns == before
    other = repo.build(www, base_url="http://10.0.2.2:18999", key_dir=key_dir)
    assert other["input_hash"] != manifest["input_hash"]
    assert "10.0.2.2:18999" in (www / cat.CTK_REPO_ROOT / "stable/deb/nvidia-container-toolkit.list"
                                ).read_text()
    # Put the module's build back for the tests that follow.
    assert repo.build(www, base_url=BASE, key_dir=key_dir)["input_hash"] == \
        manifest["input_hash"]


def test_a_later_release_is_published_beside_the_others_and_withdrawn(
        built: tuple[Path, dict]) -> None:
    """What the driver-bump lab test does: NVIDIA publishes a newer R580 release (the same
    package set, its own version pin package), the keyring is untouched, and the default
    build takes it back out."""
    www, manifest = built
    key_dir = www.parent / "key"
    later = "580.105.08"
    published = repo.build(www, base_url=BASE, key_dir=key_dir,
                           driver_versions=(*cat.DRIVER_VERSIONS, later))
    try:
        assert published["driver_versions"] == [*cat.DRIVER_VERSIONS, later]
        got = index(www)
        for name in ("nvidia-driver-cuda", "libcuda1", "nvidia-kernel-open-dkms"):
            assert (name, f"{later}-1") in got and (name, f"{cat.DRIVER_VERSIONS[-1]}-1") in got
        assert (f"nvidia-driver-pinning-{later}", f"{later}-1") in got
        d12 = published["cuda"]["distros"]["debian12"]
        assert d12["keyring_sha256"] == manifest["cuda"]["distros"]["debian12"]["keyring_sha256"]
    finally:
        again = repo.build(www, base_url=BASE, key_dir=key_dir)
        assert again["input_hash"] == manifest["input_hash"]
    assert not any(v == f"{later}-1" for _, v in index(www))


def test_identical_inputs_give_identical_debs() -> None:
    pkg = cat.pinning_packages("debian12")[0]
    assert repo.build_deb(pkg) == repo.build_deb(pkg)


# ------------------------------------------------------------------ apt, for real


class PrivateApt:
    """apt-get/apt-cache with a configuration and state rooted in a temp dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("etc/preferences.d", "etc/sources.list.d", "etc/trusted.gpg.d", "etc/apt.conf.d",
                    "state/lists/partial", "cache/archives/partial"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        status = root / "state/status"
        # Debian packages a lab guest already has or gets from Debian's archive.
        status.write_text("".join(
            f"Package: {n}\nStatus: install ok installed\nPriority: optional\nSection: misc\n"
            f"Maintainer: lab <lab@gpunode.invalid>\nArchitecture: amd64\nVersion: {v}\n"
            "Description: stand-in for a Debian package\n\n"
            for n, v in (("dkms", "3.0.10-8"), ("adduser", "3.134"), ("python3", "3.11.2-1"),
                         ("dpkg", "1.21.22"), ("libc6", "2.36-9"),
                         ("ocl-icd-libopencl1", "2.3.1-1"))))
        e, s, c = root / "etc", root / "state", root / "cache"
        self.conf = root / "apt.conf"
        self.conf.write_text(
            f'Dir::Etc "{e}/";\nDir::Etc::sourcelist "{e}/sources.list";\n'
            f'Dir::Etc::sourceparts "{e}/sources.list.d/";\n'
            f'Dir::Etc::preferences "{e}/preferences";\n'
            f'Dir::Etc::preferencesparts "{e}/preferences.d/";\n'
            f'Dir::Etc::trusted "{e}/trusted.gpg";\nDir::Etc::trustedparts "{e}/trusted.gpg.d/";\n'
            f'Dir::State "{s}/";\nDir::State::status "{status}";\nDir::Cache "{c}/";\n'
            'APT::Architecture "amd64";\nAPT::Architectures { "amd64"; };\n'
            'APT::Sandbox::User "root";\nDebug::NoLocking "true";\n'
            'Acquire::http::Proxy "DIRECT";\nAcquire::Languages "none";\n'
        )

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {"APT_CONFIG": str(self.conf), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
               "LC_ALL": "C"}
        proc = subprocess.run(list(args), env=env, capture_output=True, text=True)
        if check:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def sources(self, line: str) -> None:
        (self.root / "etc/sources.list").write_text(line + "\n")

    def prefer(self, deb: Path) -> None:
        prefs = self.root / "etc/preferences.d"
        for old in prefs.iterdir():
            old.unlink()
        tmp = extract(deb, self.root / f"x-{deb.stem}")
        for f in (tmp / "etc/apt/preferences.d").iterdir():
            shutil.copy(f, prefs / f.name)

    def candidate(self, package: str) -> tuple[str, str]:
        out = self.run("apt-cache", "policy", package).stdout
        cand = next(x.split(":", 1)[1].strip() for x in out.splitlines()
                    if x.strip().startswith("Candidate:"))
        prio = next((x.split()[-1] for x in out.splitlines()
                     if x.replace("***", "").split()[:1] == [cand]), "")
        return cand, prio

    def simulate(self, *packages: str) -> dict[str, str]:
        out = self.run("apt-get", "-s", "install", *packages).stdout
        return {x.split()[1]: x.split()[2].strip("(") for x in out.splitlines()
                if x.startswith("Inst ")}


@pytest.fixture
def apt_debian12(built: tuple[Path, dict], tmp_path: Path) -> Iterator[tuple[PrivateApt, Path]]:
    www, _ = built
    keyroot = extract(repo_dir(www) / "cuda-keyring_1.1-1_all.deb", tmp_path / "kr")
    keyring = keyroot / "usr/share/keyrings/cuda-archive-keyring.gpg"
    apt = PrivateApt(tmp_path / "apt")
    with serving(www, 0) as url:
        apt.sources(f"deb [signed-by={keyring}] {url}/compute/cuda/repos/debian12/x86_64/ /")
        yield apt, www


def test_apt_update_accepts_signature_and_sees_both_versions(
    apt_debian12: tuple[PrivateApt, Path],
) -> None:
    apt, _ = apt_debian12
    update = apt.run("apt-get", "update")
    assert "W:" not in update.stderr and "E:" not in update.stderr, update.stderr
    policy = apt.run("apt-cache", "policy", "nvidia-open").stdout
    assert DEB_OLD in policy and DEB_NEW in policy
    assert apt.candidate("nvidia-open")[0] == DEB_NEW
    plan = apt.simulate("nvidia-driver-cuda", "nvidia-kernel-open-dkms")
    assert plan["nvidia-kernel-open-dkms"] == DEB_NEW and "nvidia-kernel-dkms" not in plan
    assert plan["libnvidia-ml1"] == DEB_NEW and "gpunode-sim-base" in plan
    proprietary = apt.simulate("cuda-drivers")
    assert "nvidia-kernel-dkms" in proprietary and "nvidia-kernel-open-dkms" not in proprietary
    assert set(apt.simulate("cuda-toolkit-13-0")) >= {"cuda-nvcc-13-0", "cuda-cudart-13-0"}


def test_apt_installs_what_gpunode_names_for_dcgm_as_nvidias_install_does(
    apt_debian12: tuple[PrivateApt, Path],
) -> None:
    """NVIDIA's instructions install -cuda13 with Recommends; gpunode installs its own list
    without them: apt must end with the same DCGM packages, and the exporter next to them."""
    from gpunode.core import desired
    from gpunode.model import NodeProfile

    apt, _ = apt_debian12
    apt.run("apt-get", "update")
    p = NodeProfile.model_validate({"name": "n", "connection": {"address": "h"},
                                    "gpus": {"count": 1}, "os": "debian-12",
                                    "dcgm": {"enabled": True, "exporter": True}})
    specs = [x.spec for x in desired.dcgm_packages(p)]
    ours = apt.simulate("--no-install-recommends", *specs)
    nvidias = apt.simulate("--install-recommends", "datacenter-gpu-manager-4-cuda13")
    dcgm = {n: v for n, v in ours.items() if n.startswith("datacenter-gpu-manager")}
    assert dcgm == {x.name: x.version for x in desired.dcgm_packages(p)}
    assert {n: v for n, v in nvidias.items() if n.startswith("datacenter-gpu-manager")} == \
        {n: v for n, v in dcgm.items() if n != "datacenter-gpu-manager-exporter"}


def test_apt_rejects_repo_signed_by_other_key(built: tuple[Path, dict], tmp_path: Path) -> None:
    www, _ = built
    ctk_keyring = tmp_path / "ctk.gpg"
    subprocess.run(["gpg", "--dearmor", "-o", str(ctk_keyring),
                    str(www / "libnvidia-container/gpgkey")], check=True,
                   env={"GNUPGHOME": str(tmp_path / "gh"), "PATH": "/usr/bin:/bin"})
    apt = PrivateApt(tmp_path / "apt")
    with serving(www, 0) as url:
        apt.sources(f"deb [signed-by={ctk_keyring}] {url}/compute/cuda/repos/debian12/x86_64/ /")
        bad = apt.run("apt-get", "update", check=False)
    assert "NO_PUBKEY" in bad.stderr or "not signed" in bad.stderr, bad.stderr
    # and the container repo itself, with its own key and the $(ARCH) line of its .list:
    apt2 = PrivateApt(tmp_path / "apt2")
    with serving(www, 0) as url:
        apt2.sources(f"deb [signed-by={ctk_keyring}] {url}/libnvidia-container/stable/deb/$(ARCH) /")
        ok = apt2.run("apt-get", "update")
        assert "W:" not in ok.stderr, ok.stderr
        plan = apt2.simulate("nvidia-container-toolkit")
    assert plan["nvidia-container-toolkit"] == plan["nvidia-container-toolkit-base"] == "1.18.1-1"


def test_version_pin_package_pins_the_older_driver(apt_debian12: tuple[PrivateApt, Path]) -> None:
    apt, www = apt_debian12
    apt.run("apt-get", "update")
    apt.prefer(repo_dir(www) / f"nvidia-driver-pinning-{V_OLD}_{DEB_OLD}_all.deb")
    assert apt.candidate("nvidia-open") == (DEB_OLD, "1000")
    assert apt.candidate("libnvidia-ml1") == (DEB_OLD, "1000")
    plan = apt.simulate("nvidia-open")
    assert plan["nvidia-open"] == plan["nvidia-kernel-open-dkms"] == plan["libcuda1"] == DEB_OLD
    # non-driver packages keep their normal priority
    assert apt.candidate("libnccl2") == (cat.NCCL_DEB_VERSION, "500")


def test_the_deploys_nccl_check_reads_the_sim_repo_through_real_apt(
        apt_debian12: tuple[PrivateApt, Path]) -> None:
    """hostcmd.nccl_available parses real `apt-cache madison` output of the sim repo: the
    default build passes, a release validate knows but the repository lacks stops."""
    from gpunode.core import hostcmd
    from gpunode.model import NodeProfile

    apt, _ = apt_debian12
    apt.run("apt-get", "update")

    def check(nccl: str) -> subprocess.CompletedProcess[str]:
        p = NodeProfile.model_validate({"name": "lab1", "connection": {"address": "h"},
                                        "nccl": {"enabled": True, "version": nccl}})
        command = hostcmd.nccl_available(p)
        assert command is not None
        return apt.run("sh", "-c", command, check=False)

    ok = check(cat.NCCL_VERSION)
    assert (ok.returncode, ok.stderr) == (0, "")
    lacking = check("2.28.9")
    assert lacking.returncode == 1
    assert lacking.stderr == (
        f"lab1: nccl.version 2.28.9 with cuda.version {cat.CUDA_MINOR}: libnccl2=2.28.9-1+cuda"
        f"{cat.CUDA_MINOR} is not in this host's apt repositories; they offer for CUDA "
        f"{cat.CUDA_MINOR}: {cat.NCCL_DEB_VERSION} (all libnccl2 builds: "
        f"{cat.NCCL_DEB_VERSION})\n")


def test_branch_pin_package_follows_the_branch(apt_debian12: tuple[PrivateApt, Path]) -> None:
    apt, www = apt_debian12
    apt.run("apt-get", "update")
    apt.prefer(repo_dir(www) / "nvidia-driver-pinning-580_580-5_all.deb")
    assert apt.candidate("nvidia-driver-cuda") == (DEB_NEW, "1000")
    assert apt.candidate("nvidia-driver-pinning-580") == ("580-5", "500")


def test_ubuntu_keyring_pin_file_gives_cuda_repo_600(built: tuple[Path, dict],
                                                     tmp_path: Path) -> None:
    www, _ = built
    d = repo_dir(www, "ubuntu2404")
    keyroot = extract(d / "cuda-keyring_1.1-1_all.deb", tmp_path / "kr")
    apt = PrivateApt(tmp_path / "apt")
    apt.prefer(d / "cuda-keyring_1.1-1_all.deb")
    keyring = keyroot / "usr/share/keyrings/cuda-archive-keyring.gpg"
    with serving(www, 0) as url:
        apt.sources(f"deb [signed-by={keyring}] {url}/compute/cuda/repos/ubuntu2404/x86_64/ /")
        apt.run("apt-get", "update")
    assert apt.candidate("nvidia-open") == (f"{V_NEW}-0ubuntu1", "600")
    plan = apt.simulate("nvidia-open")
    assert plan["nvidia-dkms-580-open"] == f"{V_NEW}-0ubuntu1" and "nvidia-dkms-580" not in plan


# ------------------------------------------------------------------------- prepare()


def test_prepare_returns_site_facts(tmp_path: Path) -> None:
    from gpunode.lab import sim

    key_dir = Path(tempfile.mkdtemp(prefix="gsimprep-"))
    try:
        facts = sim.prepare(tmp_path / "www", port=18123, key_dir=key_dir, python_index=False)
    finally:
        shutil.rmtree(key_dir, ignore_errors=True)
    assert facts["simulation"] is True
    assert facts["nvidia_repo_url"] == "http://10.0.2.2:18123/compute/cuda/repos"
    assert facts["pypi_index_url"] == "http://10.0.2.2:18123/pypi/simple/"
    keyring = tmp_path / "www/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb"
    assert facts["keyring_sha256"] == hashlib.sha256(keyring.read_bytes()).hexdigest()
    assert facts["keyring_url"].endswith("/debian12/x86_64/cuda-keyring_1.1-1_all.deb")
    assert facts["driver_versions"] == list(cat.DRIVER_VERSIONS)
    assert facts["driver_deb_versions"] == [DEB_OLD, DEB_NEW]
    assert facts["container_toolkit_versions"] == ["1.17.8-1", "1.18.0-1", "1.18.1-1"]
    assert Path(facts["manifest"]).is_file()
