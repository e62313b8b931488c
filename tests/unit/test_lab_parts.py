"""Lab pieces that need no VM: qemu command lines, NUMA split, image recipe, mirror
detection, cloud-init seed content, host dependency checks, the CLI's error handling."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gpunode.lab import deps, image, qemu, seed
from gpunode.lab.cli import app
from gpunode.lab.errors import LabError, LabInputError


def _spec(tmp_path: Path, **kw: object) -> qemu.MachineSpec:
    base: dict[str, object] = dict(
        name="n1", cpus=4, memory_mib=4096, numa=2, disk=tmp_path / "d.qcow2",
        seed=tmp_path / "s.iso", vars=tmp_path / "v.fd", serial_log=tmp_path / "serial.log",
        pidfile=tmp_path / "q.pid", qmp_socket=tmp_path / "q.qmp",
        qga_socket=tmp_path / "q.qga", ssh_port=2222, forwards={8000: 18000})
    base.update(kw)
    return qemu.MachineSpec(**base)  # type: ignore[arg-type]


def test_argv_binds_only_loopback_and_uses_memdev_numa(tmp_path: Path) -> None:
    argv = qemu.build_argv(_spec(tmp_path), "tcg")
    joined = " ".join(argv)
    assert "-accel tcg,thread=multi -cpu max" in joined
    assert "-enable-kvm" not in argv and "host" not in argv
    net = argv[argv.index("-netdev") + 1]
    assert net == ("user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,"
                   "hostfwd=tcp:127.0.0.1:18000-:8000")
    assert "memory-backend-ram,id=mem0,size=2048M" in argv
    assert "node,nodeid=0,memdev=mem0,cpus=0-1" in argv
    assert "node,nodeid=1,memdev=mem1,cpus=2-3" in argv
    assert not any(",mem=" in a for a in argv)
    assert "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0" in argv
    assert f"file:{tmp_path / 'serial.log'}" in argv
    assert "q35" in argv and str(qemu.OVMF_CODE) in joined


def test_numa_layout_splits_cpus_and_memory() -> None:
    assert qemu.numa_layout(2, 2048, 2) == [([0], 1024), ([1], 1024)]
    assert qemu.numa_layout(3, 1000, 2) == [([0], 500), ([1, 2], 500)]
    assert qemu.numa_layout(1, 1025, 2) == [([], 512), ([0], 513)]
    with pytest.raises(LabInputError):
        qemu.numa_layout(2, 2048, 0)


def test_single_node_and_memory_only_node_argv(tmp_path: Path) -> None:
    argv = qemu.build_argv(_spec(tmp_path, cpus=1, memory_mib=1024, numa=2), "kvm")
    assert "node,nodeid=0,memdev=mem0" in argv  # no CPUs on node 0
    assert "-accel" in argv and argv[argv.index("-accel") + 1] == "kvm"


def test_recipe_hash_changes_with_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    h = image.recipe_hash()
    assert h == image.recipe_hash() and len(h) == 16
    monkeypatch.setitem(image.RECIPE, "packages", [*image.PACKAGES, "htop"])
    assert image.recipe_hash() != h
    assert image.image_path().name.endswith(".qcow2")


def test_recipe_has_what_the_lab_promises() -> None:
    for pkg in ("openssh-server", "python3", "sudo", "cloud-init", "qemu-guest-agent",
                "linux-image-amd64", "grub-efi-amd64", "numactl", "ca-certificates"):
        assert pkg in image.PACKAGES
    assert image.FILES["etc/modules-load.d/gpunode-lab-nouveau.conf"].strip().endswith(
        "nouveau")
    assert "console=ttyS0" in image.FILES["etc/default/grub"]


@pytest.mark.parametrize(("os_name", "suite"), [("ubuntu-22.04", "jammy"),
                                               ("ubuntu-24.04", "noble")])
def test_an_ubuntu_recipe_builds_its_release_from_ubuntus_archive(os_name: str,
                                                                  suite: str) -> None:
    """Each Ubuntu guest: debootstrap of its own release (main + universe, the gutsy script),
    the virtual kernel plus its extra modules (nouveau), and apt sources for the release,
    -updates and -security; one image per OS."""
    r = image.recipe(os_name)
    assert os_name in image.LAB_OS and r["os"] == os_name
    assert (r["suite"], r["components"], r["script"]) == (suite, ["main", "universe"], "gutsy")
    assert "linux-image-virtual" in r["packages"] and "linux-image-amd64" not in r["packages"]
    assert r["kernel_extra"] == "linux-modules-extra-"
    for pkg in ("openssh-server", "python3", "cloud-init", "qemu-guest-agent", "grub-efi-amd64"):
        assert pkg in r["packages"]
    assert {"dkms", "linux-headers-generic", "python3-venv"} <= set(r["preseed"])
    assert r["files"]["etc/apt/sources.list"].splitlines() == [
        f"deb http://archive.ubuntu.com/ubuntu {suite} main universe",
        f"deb http://archive.ubuntu.com/ubuntu {suite}-updates main universe",
        f"deb http://security.ubuntu.com/ubuntu {suite}-security main universe"]
    assert len({image.recipe_hash(o) for o in image.LAB_OS}) == len(image.LAB_OS)


def test_host_mirror_from_deb822_and_list(tmp_path: Path) -> None:
    d = tmp_path / "apt"
    (d / "sources.list.d").mkdir(parents=True)
    (d / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    assert image.host_mirror(d) == "http://mirror.example/debian"
    (d / "sources.list").write_text("deb [arch=amd64] http://other.example/debian/ bookworm main\n")
    assert image.host_mirror(d) == "http://other.example/debian"
    assert image.host_mirror(tmp_path / "none") == image.DEFAULT_MIRROR


def test_seed_user_data() -> None:
    text = seed.user_data("gpu01", "ssh-ed25519 AAAA test\n")
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    assert doc["hostname"] == "gpu01"
    user = doc["users"][0]
    assert user["name"] == "gpunode" and user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert user["ssh_authorized_keys"] == ["ssh-ed25519 AAAA test"]
    assert yaml.safe_load(seed.meta_data("gpu01", "i-1")) == {
        "instance-id": "i-1", "local-hostname": "gpu01"}


def test_deps_missing_package_names_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deps, "NEEDS", [deps.Need("/nonexistent/qemu-thing", "qemu-utils"),
                                        deps.Need("sh", "dash")])
    assert deps.missing_packages() == ["qemu-utils"]
    with pytest.raises(LabError, match="apt-get install -y --no-install-recommends qemu-utils"):
        deps.ensure(install=False)
    monkeypatch.setattr(deps.os, "geteuid", lambda: 1000)
    with pytest.raises(LabError, match="needs root. Run: sudo apt-get install"):
        deps.ensure(install=True)


def test_deps_alternatives_satisfy() -> None:
    assert deps.Need("/nonexistent/xorriso", "xorriso", ("sh",)).present()


def test_cli_unknown_vm_exits_2_without_traceback(tmp_path: Path) -> None:
    runner = CliRunner()
    for args in (["down", "ghost"], ["reset", "ghost"], ["ssh", "ghost"]):
        res = runner.invoke(app, [*args, "--state-dir", str(tmp_path)])
        assert res.exit_code == 2, res.output
        assert "no lab VM named 'ghost'" in res.output
        assert "Traceback" not in res.output


def test_cli_bad_forward_and_status(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["up", "n1", "--forward", "x:1", "--state-dir", str(tmp_path)])
    assert res.exit_code == 2 and "GUEST_PORT" in res.output
    res = runner.invoke(app, ["status", "--state-dir", str(tmp_path)])
    assert res.exit_code == 0 and "no VMs" in res.output
    res = runner.invoke(app, ["down", "--state-dir", str(tmp_path)])
    assert res.exit_code == 2 and "--all" in res.output


def _ubuntu_keyring_or_skip() -> Path:
    """The lab's Ubuntu archive keyring, or a skip with the reason when the archive cannot
    be reached from this machine."""
    from gpunode.lab.errors import LabError

    try:
        return image.ubuntu_keyring()
    except LabError as exc:
        if "cannot be reached" in str(exc):
            pytest.skip(str(exc))
        raise


def test_the_lab_site_gives_each_guest_its_os_keyring_and_python(tmp_path: Path) -> None:
    """An Ubuntu 24.04 guest gets the simulated ubuntu2404 repository's keyring checksum and
    Python 3.12 (was: Debian's checksum and 3.11 for every guest, which validate refuses).
    An Ubuntu 22.04 guest (python3 3.10, too old for vLLM; the lab has no Python mirror) gets
    its ubuntu2204 keyring and no vLLM services, and the site validates."""
    import yaml

    from gpunode.inventory import load_site
    from gpunode.lab import labsite
    from gpunode.lab.core import Lab

    lab = Lab(tmp_path / "lab")

    class Vm:
        def __init__(self, name: str, os: str) -> None:
            self.name, self.os, self.running = name, os, True

    vms = [Vm("labgpu1", "debian-12"), Vm("labubu1", "ubuntu-24.04"),
           Vm("labjammy1", "ubuntu-22.04")]
    lab.status = lambda: vms  # type: ignore[method-assign]

    def site(base):
        nodes = dict(base.get("nodes") or {})
        for vm in vms:
            node = dict(nodes.get(vm.name) or {"groups": ["lab"]})
            node["connection"] = {"address": "127.0.0.1", "port": 2222, "user": "gpunode",
                                  "key": str(tmp_path / "key"), "become": True}
            node["os"] = vm.os
            nodes[vm.name] = node
        return {**base, "nodes": nodes}

    lab.site = site  # type: ignore[method-assign]
    facts = {"nvidia_repo_url": "http://10.0.2.2:18087/compute/cuda/repos",
             "keyring_sha256": "d" * 64,
             "keyring_sha256_by_distro": {"debian12": "d" * 64, "ubuntu2204": "2" * 64,
                                          "ubuntu2404": "4" * 64},
             "driver_versions": ["580.82.07", "580.95.05"],
             "container_toolkit_repo_url": "http://10.0.2.2:18087/libnvidia-container/"
                                           "stable/deb/$(ARCH)",
             "container_toolkit_versions": ["1.18.1-1"],
             "pypi_index_url": "http://10.0.2.2:18087/pypi/simple/", "uv_version": "0.13.9"}
    doc = labsite.lab_site(lab, facts, key_dir=tmp_path / "keys")
    (tmp_path / "key").write_text("k\n")
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(doc))
    nodes = load_site(path).nodes
    assert nodes["labubu1"].os == "ubuntu-24.04"
    assert nodes["labubu1"].nvidia.keyring_sha256 == "4" * 64
    assert nodes["labubu1"].vllm.python == "3.12"
    assert nodes["labgpu1"].nvidia.keyring_sha256 == "d" * 64
    assert nodes["labgpu1"].vllm.python == "3.11"
    assert nodes["labgpu1"].vllm.services and nodes["labubu1"].vllm.services
    jammy = nodes["labjammy1"]
    assert jammy.os == "ubuntu-22.04" and jammy.nvidia.keyring_sha256 == "2" * 64
    assert not jammy.vllm.services and jammy.vllm.index_url is None
    assert jammy.vllm.hf_token_file is None
    assert jammy.cuda.enabled and jammy.nccl.enabled
    assert jammy.dcgm.enabled and jammy.container_toolkit.enabled
    assert nodes["labubu1"].vllm.index_url  # the override is the 22.04 node's only


def test_the_ubuntu_image_trusts_only_the_pinned_archive_key(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """debootstrap checks noble's Release files against a keyring holding exactly the key
    whose fingerprint the lab pins; a keyring package without it is refused."""
    import subprocess

    from gpunode.lab.errors import LabError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    keyring = _ubuntu_keyring_or_skip()
    listed = subprocess.run(["gpg", "--batch", "--with-colons", "--import-options", "show-only",
                             "--homedir", str(tmp_path), "--import", str(keyring)],
                            capture_output=True, text=True, check=True).stdout
    assert [ln.split(":")[9] for ln in listed.splitlines() if ln.startswith("fpr:")] == [
        image.UBUNTU_ARCHIVE_KEY]
    keyring.unlink()
    monkeypatch.setattr(image, "UBUNTU_ARCHIVE_KEY", "0" * 40)
    with pytest.raises(LabError, match="does not hold the Ubuntu archive key 0000"):
        image.ubuntu_keyring()


@pytest.mark.parametrize("os_name", [o for o in image.LAB_OS if o.startswith("ubuntu")])
def test_the_pinned_archive_key_signs_each_ubuntu_release(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          os_name: str) -> None:
    """debootstrap trusts only the pinned key: it must be what signs the release's InRelease
    (jammy's and noble's are signed by the 2018 key alone)."""
    import subprocess

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    url = f"{image.UBUNTU_MIRROR}/dists/{image.recipe(os_name)['suite']}/InRelease"
    release = tmp_path / "InRelease"
    keyring = _ubuntu_keyring_or_skip()
    if subprocess.run(["curl", "-fsSL", "--retry", "3", "-o", str(release), url]).returncode:
        pytest.skip(f"{url} cannot be reached")
    res = subprocess.run(["gpgv", "--status-fd", "1", "--keyring", str(keyring), str(release)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"VALIDSIG {image.UBUNTU_ARCHIVE_KEY}" in res.stdout


def test_the_sim_serves_the_default_nccl_build_and_only_builds_validate_knows() -> None:
    """A lab deploy with the model's default nccl.version and cuda.version must find its
    libnccl2 in the sim, and the sim must not serve a pair that NVIDIA never built
    (validate's table, model.parts.NCCL_BUILDS, refuses those)."""
    from gpunode.core import desired
    from gpunode.lab.sim import packages as cat
    from gpunode.model import NodeProfile
    from gpunode.model.parts import NCCL_BUILDS

    served = {(x.name, x.version) for x in cat.nccl()}
    default = NodeProfile.model_validate({"name": "n", "connection": {"address": "h"},
                                         "nccl": {"enabled": True}})
    assert {(x.name, x.version) for x in desired.nccl_packages(default)} <= served
    for name, version in served:
        nccl, _, cuda = version.partition("-1+cuda")
        assert nccl in NCCL_BUILDS.get(cuda, ()), (name, version)
