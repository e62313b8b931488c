"""The lab's kernel choice (`--kernel generic|hwe`): Ubuntu guests with the release's HWE
kernel, a recipe (and cached image) of their own, refused for Debian, kept by the VM across
restart, snapshot and fork. No image is built and no VM booted (the fake qemu of
test_lab_core)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_lab_core import fake_qemu, fake_qemu_img, fork_of_snapshot_without, lab  # noqa: F401
from typer.testing import CliRunner

from gpunode.lab import cli, core, image
from gpunode.lab.core import Lab
from gpunode.lab.errors import LabInputError


def test_generic_recipes_are_the_ones_the_cached_images_were_built_from() -> None:
    """The kernel choice adds nothing to the generic recipes, so their hashes (the names of
    images already cached) stay as they were."""
    for os_name in image.LAB_OS:
        assert image.recipe(os_name) is image.RECIPES[os_name]
        assert image.recipe(os_name, "generic") is image.RECIPES[os_name]
        assert "kernel" not in image.RECIPES[os_name]
        assert image.recipe_hash(os_name) == image.recipe_hash(os_name, "generic")
        assert image.image_path(os_name) == image.image_path(os_name, "generic")


@pytest.mark.parametrize(("os_name", "release", "extra"), [
    ("ubuntu-22.04", "22.04", "linux-modules-extra-"),
    ("ubuntu-24.04", "24.04", None),
])
def test_hwe_recipe_differs_only_in_the_kernel(os_name: str, release: str,
                                               extra: str | None) -> None:
    generic, hwe = image.recipe(os_name), image.recipe(os_name, "hwe")
    changed = {k for k in generic.keys() | hwe.keys() if generic.get(k) != hwe.get(k)}
    assert changed <= {"kernel", "packages", "preseed", "kernel_extra"}
    assert hwe["kernel"] == "hwe"
    assert [p for p in hwe["packages"] if p.startswith("linux-")] == [
        f"linux-image-virtual-hwe-{release}"]
    assert set(hwe["packages"]) - {f"linux-image-virtual-hwe-{release}"} == \
        set(generic["packages"]) - {"linux-image-virtual"}
    # the headers meta-package the deploy keeps for an HWE kernel (desired.headers_meta)
    assert f"linux-headers-generic-hwe-{release}" in hwe["preseed"]
    assert "linux-headers-generic" not in hwe["preseed"]
    assert hwe["kernel_extra"] == extra
    # -updates and -security, where the HWE kernels live, are in the guest's sources
    sources = hwe["files"]["etc/apt/sources.list"]
    assert f"{hwe['suite']}-updates main" in sources and f"{hwe['suite']}-security main" in sources
    assert image.recipe_hash(os_name, "hwe") != image.recipe_hash(os_name)
    assert image.image_path(os_name, "hwe") != image.image_path(os_name)


def test_debian_has_no_hwe_kernel_and_unknown_kernels_are_refused() -> None:
    with pytest.raises(LabInputError, match="debian-12 has no HWE kernel"):
        image.recipe("debian-12", "hwe")
    with pytest.raises(LabInputError, match="debian-12 has no HWE kernel"):
        image.ensure_image(os_name="debian-12", kernel="hwe")
    with pytest.raises(LabInputError, match="unknown lab kernel 'lowlatency'"):
        image.recipe("ubuntu-24.04", "lowlatency")


@pytest.mark.parametrize("argv", [
    ["image", "--os", "debian-12", "--kernel", "hwe"],
    ["up", "deb", "--os", "debian-12", "--kernel", "hwe"],
])
def test_cli_refuses_hwe_for_debian_with_exit_2(argv: list[str], tmp_path: Path) -> None:
    state = tmp_path / "s"
    extra = ["--state-dir", str(state)] if argv[0] == "up" else []
    res = CliRunner().invoke(cli.app, [*argv, *extra])
    assert res.exit_code == 2, res.output
    assert "debian-12 has no HWE kernel" in res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    assert not (state / "deb").exists()  # nothing was made


def test_cli_passes_the_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    def fake_up(self: Lab, name: str, **kw: object) -> object:
        seen.update(kw)
        raise LabInputError("stop here")

    def fake_image(**kw: object) -> Path:
        seen.update(kw)
        return tmp_path / "img.qcow2"

    monkeypatch.setattr(Lab, "up", fake_up)
    monkeypatch.setattr(image, "ensure_image", fake_image)
    state = ["--state-dir", str(tmp_path / "s")]
    res = CliRunner().invoke(cli.app, ["up", "x", "--os", "ubuntu-24.04", "--kernel", "hwe",
                                       *state])
    assert res.exit_code == 2 and (seen["os_name"], seen["kernel"]) == ("ubuntu-24.04", "hwe")
    CliRunner().invoke(cli.app, ["up", "x", *state])
    assert seen["kernel"] == "generic"
    res = CliRunner().invoke(cli.app, ["image", "--os", "ubuntu-22.04", "--kernel", "hwe"])
    assert res.exit_code == 0 and (seen["os_name"], seen["kernel"]) == ("ubuntu-22.04", "hwe")
    assert res.output.strip() == str(tmp_path / "img.qcow2")


def test_kernel_is_kept_across_restart_snapshot_and_fork(lab: Lab,  # noqa: F811
                                                         fake_qemu_img: None,  # noqa: F811
                                                         ) -> None:
    vm = lab.up("hwe", numa=1, wait=False, os_name="ubuntu-24.04", kernel="hwe")
    assert (vm.os, vm.kernel) == ("ubuntu-24.04", "hwe") and vm.info()["kernel"] == "hwe"
    assert json.loads((lab.vm_dir("hwe") / "vm.json").read_text())["kernel"] == "hwe"
    lab.down("hwe")
    assert lab.up("hwe", numa=1, wait=False).kernel == "hwe"  # an existing VM keeps its own
    lab.down("hwe")
    lab.snapshot("hwe", "hwesnap")
    meta = json.loads(lab.snapshot_path("hwesnap").with_suffix(".json").read_text())
    assert (meta["os"], meta["kernel"]) == ("ubuntu-24.04", "hwe")
    fork = lab.fork("hwesnap", "hwe2", wait=False)
    assert (fork.os, fork.kernel) == ("ubuntu-24.04", "hwe")
    assert lab.vm("hwe2").kernel == "hwe"


def test_old_vm_json_and_snapshot_without_the_key_are_generic(lab: Lab,  # noqa: F811
                                                              fake_qemu_img: None,  # noqa: F811
                                                              tmp_path: Path) -> None:
    path = tmp_path / "vm.json"
    path.write_text(json.dumps({
        "name": "old", "cpus": 2, "memory_mib": 2048, "numa": 2, "disk_gib": 8,
        "ssh_port": 2222, "forwards": {}, "instance_id": "old-1",
        "origin": {"kind": "base"}, "os": "ubuntu-24.04"}))
    assert core.VMConfig.load(path).kernel == "generic"
    child = fork_of_snapshot_without(lab, "kernel", os_name="ubuntu-22.04")
    assert (child.os, child.kernel) == ("ubuntu-22.04", "generic")


def test_hwe_lab_vm_status_line_names_its_kernel(lab: Lab) -> None:  # noqa: F811
    lab.up("hwe", wait=False, os_name="ubuntu-24.04", kernel="hwe")
    lab.up("ga", wait=False, os_name="ubuntu-24.04")
    res = CliRunner().invoke(cli.app, ["status", "--state-dir", str(lab.dir)])
    lines = {ln.split()[0]: ln for ln in res.output.splitlines() if ln.startswith("  ")}
    assert "kernel=hwe" in lines["hwe"] and "kernel=" not in lines["ga"]
