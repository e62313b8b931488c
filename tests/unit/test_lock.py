"""gpunode.core.lock: resolution over apt `Packages` metadata and a simple index (fixtures in
tests/fixtures/lock, stanzas in the format of the lab's simulated repository), the lock file,
the site-vs-lock check, and `gpunode lock [--update]` end to end over file:// mirrors."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gpunode.cli.main import app
from gpunode.core import lock as lk
from gpunode.inventory import SiteError, load_site

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "lock"
MIRROR = "http://mirror.test"

SITE = f"""
site: {{name: locktest}}
defaults:
  os: debian-12
  connection: {{address: 127.0.0.1, port: 2299, user: root}}
  nvidia: {{branch: 580, repo_url: {MIRROR}/compute/cuda/repos}}
  cuda: {{enabled: true}}
  nccl: {{enabled: true}}
  dcgm: {{enabled: true, exporter: true}}
  vllm:
    python: "3.11"
    index_url: {MIRROR}/pypi/simple/
    services:
      - name: tiny
        model: /var/lib/vllm/models/tiny
        gpus: [0]
groups:
  fleet: {{gpus: {{count: 1}}}}
nodes:
  gpu01: {{groups: [fleet]}}
  gpu02: {{groups: [fleet], connection: {{port: 2298}}}}
"""


# --- Debian versions ---------------------------------------------------------------------

PAIRS = [("580.95.05-1", "580.82.07-1"), ("1:4.4.2-1", "4.9-1"), ("1.0~rc1-1", "1.0-1"),
         ("2.28.3-1+cuda13.0", "2.28.3-1+cuda12.9"), ("13.0.2-1", "13.0.10-1"),
         ("580.95.05-0ubuntu1", "580.95.05-1ubuntu1"), ("1.0", "1.0-0"), ("1.0a", "1.0")]


@pytest.mark.parametrize(("a", "b"), PAIRS)
def test_compare_versions_orders_like_dpkg(a, b):
    got = lk.compare_versions(a, b)
    assert got == -lk.compare_versions(b, a)
    if shutil.which("dpkg"):
        want = 1 if subprocess.run(["dpkg", "--compare-versions", a, "gt", b]).returncode == 0 \
            else -1 if subprocess.run(["dpkg", "--compare-versions", a, "lt", b]).returncode == 0 \
            else 0
        assert got == want, (a, b)


def test_compare_versions_known_answers():
    assert lk.compare_versions("580.95.05-1", "580.82.07-1") == 1
    assert lk.compare_versions("1.0~rc1-1", "1.0-1") == -1
    assert lk.compare_versions("1:1.0-1", "9.9-1") == 1
    assert lk.compare_versions("13.0.10-1", "13.0.2-1") == 1


# --- apt resolution ----------------------------------------------------------------------

def _site(tmp_path: Path, text: str = SITE):
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return load_site(path)


def _sources(packages: str) -> lk.Sources:
    repo = f"{MIRROR}/compute/cuda/repos/debian12/x86_64/"
    return lk.Sources(apt={repo: lk.parse_packages((FIX / packages).read_text(), repo)})


def test_parse_packages_reads_stanzas_with_continuation_lines():
    debs = lk.parse_packages((FIX / "Packages.v1").read_text(), "M/")
    smi = next(d for d in debs if d.name == "nvidia-smi")
    assert smi.version == "580.82.07-1" and smi.mirror == "M/"
    assert smi.depends == "libnvidia-ml1 (= 580.82.07-1)"
    assert smi.sha256 == hashlib.sha256(b"nvidia-smi_580.82.07-1").hexdigest()


def test_driver_is_the_newest_of_the_branch_with_its_dependencies(tmp_path):
    p = _site(tmp_path).nodes["gpu01"]
    g = lk.resolve_group(p, "nvidia", _sources("Packages.v2"))
    # 580.95.05 is newest in branch 580; 590.44.01 is another branch
    assert g["driver"] == "580.95.05"
    pk = g["packages"]
    for name in ("nvidia-driver-cuda", "nvidia-kernel-open-dkms", "nvidia-persistenced",
                 "libcuda1", "libnvidia-ml1", "nvidia-smi"):
        assert pk[name]["version"] == "580.95.05-1", name
    assert pk["nvidia-driver-pinning-580"]["version"] == "580-5"
    assert pk["libcuda1"]["mirror"] == f"{MIRROR}/compute/cuda/repos/debian12/x86_64/"
    assert "libc6" not in pk and "dkms" not in pk  # from the OS archive, not locked
    assert g["site"]["nvidia.version"] is None


def test_a_site_pin_is_honoured(tmp_path):
    site = _site(tmp_path, SITE.replace("branch: 580,", "branch: 580, version: 580.82.07,"))
    g = lk.resolve_group(site.nodes["gpu01"], "nvidia", _sources("Packages.v2"))
    assert g["driver"] == "580.82.07"
    assert g["packages"]["nvidia-smi"]["version"] == "580.82.07-1"


def test_pinned_sets_resolve_exactly_and_open_ones_to_the_newest(tmp_path):
    p = _site(tmp_path).nodes["gpu01"]
    src = _sources("Packages.v2")
    nccl = lk.resolve_group(p, "nccl", src)["packages"]
    assert nccl["libnccl2"]["version"] == "2.28.3-1+cuda13.0"  # the site's NCCL, not 2.28.7
    cuda = lk.resolve_group(p, "cuda", src)["packages"]
    assert cuda["cuda-toolkit-13-0"]["version"] == "13.0.2-1"
    assert cuda["cuda-nvcc-13-0"]["version"] == "13.0.88-1"
    dcgm = lk.resolve_group(p, "dcgm", src)["packages"]
    # the exporter built for the site's DCGM, not the newest (4.8.2-1 needs DCGM 4.5.3)
    assert dcgm["datacenter-gpu-manager-exporter"]["version"] == "4.7.1-1"
    assert dcgm["datacenter-gpu-manager-4-core"]["version"] == "1:4.4.2-1"
    assert dcgm["datacenter-gpu-manager-4-proprietary-cuda13"]["version"] == "1:4.4.2-1"


def test_missing_pinned_package_names_it(tmp_path):
    p = _site(tmp_path, SITE.replace("nccl: {enabled: true}",
                                     "nccl: {enabled: true, version: 2.99.1}")).nodes["gpu01"]
    with pytest.raises(lk.LockError) as exc:
        lk.resolve_group(p, "nccl", _sources("Packages.v2"))
    assert "libnccl2=2.99.1-1+cuda13.0" in exc.value.lines[0]
    assert "nodes.gpu01.nccl" in exc.value.lines[0]


def test_no_driver_in_the_branch_is_an_error(tmp_path):
    p = _site(tmp_path, SITE.replace("branch: 580,", "branch: 585,")).nodes["gpu01"]
    with pytest.raises(lk.LockError, match="branch 585"):
        lk.resolve_group(p, "nvidia", _sources("Packages.v2"))


# --- Python index ------------------------------------------------------------------------

def _page(*files: str) -> str:
    return "<html><body>\n" + "".join(
        f'<a href="../../files/{f}#sha256={hashlib.sha256(f.encode()).hexdigest()}">{f}</a><br/>\n'
        for f in files) + "</body></html>\n"


INDEX = {
    "vllm": _page("vllm-0.33.0-py3-none-any.whl", "vllm-0.34.0-py3-none-any.whl"),
    "pyyaml": _page("PyYAML-6.0.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                    "PyYAML-6.0.3-cp311-cp311-manylinux_2_17_x86_64.whl",
                    "PyYAML-6.0.3-cp312-cp312-manylinux_2_17_x86_64.whl",
                    "PyYAML-6.0.3-cp311-cp311-win_amd64.whl",
                    "PyYAML-6.0.4-cp312-cp312-manylinux_2_17_x86_64.whl"),
    "numpy": _page("numpy-2.1.0-cp311-cp311-manylinux_2_28_x86_64.whl",
                   "numpy-3.0.0-cp311-cp311-manylinux_2_28_x86_64.whl"),
}
REQUIRES = {
    ("vllm", "0.33.0"): ["pyyaml>=6", "numpy<3; python_version >= '3.10'",
                         "colorama; sys_platform == 'win32'", "uvloop; extra == 'fast'"],
}


def _listing(name: str) -> list[lk.Dist]:
    page = f"{MIRROR}/pypi/simple/{name}/"
    return lk.parse_simple_page(INDEX.get(name, ""), page)


def _metadata(dist: lk.Dist) -> list[str]:
    return REQUIRES.get((dist.project, dist.version), [])


def test_parse_simple_page_reads_names_versions_and_hashes():
    dists = _listing("pyyaml")
    assert {(d.project, d.version) for d in dists} >= {("pyyaml", "6.0.2"), ("pyyaml", "6.0.3")}
    d = dists[0]
    assert d.url.startswith(f"{MIRROR}/pypi/files/") and len(d.sha256) == 64


def test_python_set_pins_every_dependency_with_hashes_for_the_target_python():
    py = lk.resolve_python(["vllm==0.33.0"], "3.11", _listing, _metadata)
    assert {n: v["version"] for n, v in py.packages.items()} == {
        "numpy": "2.1.0", "pyyaml": "6.0.3", "vllm": "0.33.0"}
    # only the cp311 Linux wheel of 6.0.3 fits 3.11 on x86_64
    assert py.packages["pyyaml"]["hashes"] == [
        "sha256:" + hashlib.sha256(b"PyYAML-6.0.3-cp311-cp311-manylinux_2_17_x86_64.whl")
        .hexdigest()]
    assert list(py.packages) == sorted(py.packages)
    assert py.dependency_hash() == lk.dependency_hash(
        {"vllm": "0.33.0", "PyYAML": "6.0.3", "numpy": "2.1.0"})


def test_python_conflicts_and_missing_wheels_are_errors():
    with pytest.raises(lk.LockError, match="vllm==9.9.9: no wheel"):
        lk.resolve_python(["vllm==9.9.9"], "3.11", _listing, _metadata)
    with pytest.raises(lk.LockError, match="numpy: vllm==0.33.0 needs <3"):
        lk.resolve_python(["numpy==3.0.0", "vllm==0.33.0"], "3.11", _listing, _metadata)


def test_wheel_fits():
    assert lk.wheel_fits("a-1-py3-none-any.whl", "3.12")
    assert lk.wheel_fits("a-1-cp39-abi3-manylinux_2_17_x86_64.whl", "3.11")
    assert not lk.wheel_fits("a-1-cp312-cp312-manylinux_2_17_x86_64.whl", "3.11")
    assert not lk.wheel_fits("a-1-cp311-cp311-manylinux_2_17_aarch64.whl", "3.11")
    assert not lk.wheel_fits("a-1.tar.gz", "3.11")


# --- lock file, check, apply -------------------------------------------------------------

def _lock(tmp_path: Path, packages: str = "Packages.v1") -> tuple[object, dict]:
    site = _site(tmp_path)
    src = _sources(packages)
    src.listing = lambda index, name: _listing(name)
    src.metadata = _metadata
    nodes = {n: lk.resolve_node(p, src) for n, p in site.nodes.items()}
    return site, yaml.safe_load(lk.dump_lock(nodes, "site.yaml"))


def test_lock_text_is_stable_and_sorted(tmp_path):
    site, doc = _lock(tmp_path)
    text = lk.dump_lock(doc["nodes"], "site.yaml")
    assert text == lk.dump_lock(dict(reversed(list(doc["nodes"].items()))), "site.yaml")
    assert text.startswith("# gpunode lock")
    assert set(doc["nodes"]["gpu01"]) == {"nvidia", "cuda", "nccl", "dcgm", "vllm", "models"}


def test_consistent_site_passes_and_gets_the_locked_driver(tmp_path):
    site, doc = _lock(tmp_path)
    assert lk.check_lock(site, doc, tmp_path / "site.lock") == []
    applied = lk.apply_lock(site, doc)
    assert applied.nodes["gpu01"].nvidia.version == "580.82.07"
    assert site.nodes["gpu01"].nvidia.version is None  # the loaded site is not changed


def test_the_locked_closure_is_what_both_engines_install_hold_and_check(tmp_path):
    """With a lock, a group's packages are its whole locked closure at exact versions (the
    cuda-toolkit metapackage, unversioned in the site, included)."""
    from gpunode.core import desired

    site, doc = _lock(tmp_path)
    plain, p = site.nodes["gpu01"], lk.apply_lock(site, doc).nodes["gpu01"]
    cuda = doc["nodes"]["gpu01"]["cuda"]["packages"]
    assert [x.spec for x in desired.cuda_packages(p)] == \
        [f"{n}={i['version']}" for n, i in sorted(cuda.items())]
    assert [x.version for x in desired.cuda_packages(plain)] == [None]
    dcgm = {x.name: x.version for x in desired.dcgm_packages(p)}
    assert dcgm["datacenter-gpu-manager-exporter"] and None not in dcgm.values()
    assert set(desired.held_packages(p)) >= set(dcgm)
    assert lk.apply_lock(site, doc).nodes["gpu01"].locked == p.locked  # deterministic
    # a driver library in a closure stays with the driver's pin; the group's own names stay
    p2 = p.model_copy(update={"locked": p.locked | {"dcgm": {
        **p.locked["dcgm"], "libnvidia-ml1": "580.95.05-1"}}})
    assert "libnvidia-ml1" not in {x.name for x in desired.dcgm_packages(p2)}


def test_the_locked_vllm_set_is_installed_hash_checked_and_judged_whole(tmp_path):
    from gpunode.core import desired, hostcmd

    site, doc = _lock(tmp_path)
    plain, p = site.nodes["gpu01"], lk.apply_lock(site, doc).nodes["gpu01"]
    py = doc["nodes"]["gpu01"]["vllm"]["packages"]
    assert set(p.locked_vllm) == set(py)
    req = desired.vllm_requirements(p)
    assert req is not None and desired.vllm_requirements(plain) is None
    for name, pin in py.items():
        assert f"{name}=={pin['version']}" + "".join(f" --hash={h}" for h in pin["hashes"]) \
            in req.splitlines()
    cmd = hostcmd.venv_command(p)
    assert "pip sync -q --require-hashes" in cmd and "vllm==" not in cmd
    assert "pip install -q" in hostcmd.venv_command(plain)
    exact = {n.replace("-", "_"): v["version"] for n, v in py.items()}  # dist-info spelling
    assert desired.venv_current(p, exact)
    assert not desired.venv_current(p, {n: v for n, v in exact.items() if n != "pyyaml"})
    assert not desired.venv_current(p, exact | {"pyyaml": "6.0.2"})
    assert not desired.venv_current(p, exact | {"colorama": "0.4.6"})  # an extra package
    assert desired.venv_off_lock(p, exact | {"colorama": "0.4.6", "pyyaml": "6.0.2"}) == [
        "colorama 0.4.6 (locked nothing)", f"pyyaml 6.0.2 (locked {py['pyyaml']['version']})"]
    assert desired.venv_current(plain, {"vllm": "0.33.0"})


def test_a_hand_edited_wheel_hash_is_refused(tmp_path):
    _, doc = _lock(tmp_path)
    doc["nodes"]["gpu01"]["vllm"]["packages"]["pyyaml"]["hashes"] = ["md5:x; id"]
    (tmp_path / "site.lock").write_text(lk.dump_lock(doc["nodes"], "site.yaml"))
    with pytest.raises(SiteError) as exc:
        lk.locked_site(_site(tmp_path))
    assert "site.lock: nodes.gpu01: locked_vllm.pyyaml.hashes.0" in exc.value.lines[0]


@pytest.mark.parametrize("bad", ["1.0; touch /tmp/x", "{{ lookup('pipe','id') }}", "1.0\nX"])
def test_a_hand_edited_lock_version_is_refused_naming_the_file(tmp_path, bad):
    _, doc = _lock(tmp_path)
    name = next(iter(doc["nodes"]["gpu01"]["nccl"]["packages"]))
    doc["nodes"]["gpu01"]["nccl"]["packages"][name]["version"] = bad
    (tmp_path / "site.lock").write_text(lk.dump_lock(doc["nodes"], "site.yaml"))
    with pytest.raises(SiteError) as exc:
        lk.locked_site(_site(tmp_path))
    assert f"site.lock: nodes.gpu01: locked.nccl.{name}" in exc.value.lines[0]


@pytest.mark.parametrize("key", ["locked", "locked_vllm"])
def test_lock_fields_are_not_site_keys(tmp_path, key):
    for where in ("defaults", "nodes.gpu01"):
        text = SITE.replace("  os: debian-12\n", f"  os: debian-12\n  {key}: {{}}\n") \
            if where == "defaults" else SITE.replace("gpu01: {groups: [fleet]}",
                                                     f"gpu01: {{groups: [fleet], {key}: {{}}}}")
        with pytest.raises(SiteError) as exc:
            _site(tmp_path, text)
        assert f"{where}.{key}: unknown key '{key}'" in "\n".join(exc.value.lines)


@pytest.mark.parametrize(("old", "new", "field", "group"), [
    ("branch: 580,", "branch: 590,", "nvidia.branch", "nvidia"),
    ("nccl: {enabled: true}", "nccl: {enabled: true, version: 2.27.7}", "nccl.version", "nccl"),
    ('python: "3.11"', f'python: "3.12"\n    python_mirror: {MIRROR}/pbs', "vllm.python",
     "vllm"),
])
def test_disagreement_names_the_field_and_the_update(tmp_path, old, new, field, group):
    _, doc = _lock(tmp_path)
    site = _site(tmp_path, SITE.replace(old, new))
    problems = lk.check_lock(site, doc, tmp_path / "site.lock")
    assert problems
    assert f"nodes.gpu01.{field}" in problems[0]
    assert f"gpunode lock --update {group}" in problems[0]


def test_new_node_enabled_group_and_stale_node_are_disagreements(tmp_path):
    _, doc = _lock(tmp_path)
    site = _site(tmp_path, SITE.replace("  gpu02: {groups: [fleet], connection: {port: 2298}}\n",
                                        "  gpu03: {groups: [fleet]}\n")
                 .replace("nccl: {enabled: true}", "nccl: {enabled: false}"))
    text = "\n".join(lk.check_lock(site, doc, tmp_path / "site.lock"))
    assert "nodes.gpu03: not in the lock" in text
    assert "nodes.gpu02: locked but not in the site" in text
    assert "nodes.gpu01.nccl.enabled: off in the site" in text


def test_locked_site_refuses_with_a_site_error(tmp_path):
    _, doc = _lock(tmp_path)
    (tmp_path / "site.lock").write_text(lk.dump_lock(doc["nodes"], "site.yaml"))
    site = _site(tmp_path, SITE.replace("branch: 580,", "branch: 590,"))
    with pytest.raises(SiteError) as exc:
        lk.locked_site(site)
    assert "nvidia.branch" in exc.value.lines[0]
    (tmp_path / "site.lock").write_text("format: 7\n")
    with pytest.raises(SiteError, match="not a gpunode lock file"):
        lk.locked_site(site)


# --- the command, over file:// mirrors ---------------------------------------------------

def _mirror(root: Path, packages: str) -> None:
    repo = root / "compute/cuda/repos/debian12/x86_64"
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "Packages").write_text((FIX / packages).read_text())
    for name, page in INDEX.items():
        d = root / "pypi/simple" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "index.html").write_text(page)
    files = root / "pypi/files"
    files.mkdir(parents=True, exist_ok=True)
    for (project, version), reqs in REQUIRES.items():
        body = "".join(f"Requires-Dist: {r}\n" for r in reqs)
        (files / f"{project}-{version}-py3-none-any.whl.metadata").write_text(
            f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n{body}")
    for f in ("PyYAML-6.0.3-cp311-cp311-manylinux_2_17_x86_64.whl",
              "numpy-2.1.0-cp311-cp311-manylinux_2_28_x86_64.whl"):
        (files / f"{f}.metadata").write_text("Metadata-Version: 2.1\n")


def _run(*args: str) -> object:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_lock_command_and_update_of_one_group(tmp_path):
    root = tmp_path / "www"
    _mirror(root, "Packages.v1")
    site = tmp_path / "site.yaml"
    site.write_text(SITE)
    via = ["--via", f"{MIRROR}=file://{root}"]
    res = _run("lock", "--site", str(site), *via)
    assert res.exit_code == 0, res.output
    lock = tmp_path / "site.lock"
    first = lock.read_text()
    doc = yaml.safe_load(first)
    assert doc["nodes"]["gpu01"]["nvidia"]["driver"] == "580.82.07"
    assert doc["nodes"]["gpu01"]["cuda"]["packages"]["cuda-toolkit-13-0"]["version"] == "13.0.1-1"

    # newer versions appear in the mirror: a plain `lock` keeps what is locked
    _mirror(root, "Packages.v2")
    res = _run("lock", "--site", str(site), *via)
    assert res.exit_code == 0, res.output
    assert lock.read_text() == first and "unchanged" in res.output

    # --update nvidia moves the driver set only
    res = _run("lock", "--update", "nvidia", "--site", str(site), *via)
    assert res.exit_code == 0, res.output
    doc2 = yaml.safe_load(lock.read_text())
    for node in ("gpu01", "gpu02"):
        assert doc2["nodes"][node]["nvidia"]["driver"] == "580.95.05"
        for g in ("cuda", "nccl", "dcgm", "vllm", "models"):
            assert doc2["nodes"][node][g] == doc["nodes"][node][g], g
    assert "gpu01: libcuda1 580.82.07-1 -> 580.95.05-1" in res.output
    assert "cuda-toolkit" not in res.output

    # a package name means its group
    res = _run("lock", "--update", "datacenter-gpu-manager-exporter", "--site", str(site), *via)
    assert res.exit_code == 0, res.output
    doc3 = yaml.safe_load(lock.read_text())
    assert doc3["nodes"]["gpu01"]["dcgm"]["packages"]["datacenter-gpu-manager-exporter"][
        "version"] == "4.7.1-1"
    assert doc3["nodes"]["gpu01"]["cuda"] == doc["nodes"]["gpu01"]["cuda"]

    res = _run("lock", "--update", "no-such-thing", "--site", str(site), *via)
    assert res.exit_code == 2


def test_validate_and_deploy_refuse_before_any_host(tmp_path, monkeypatch):
    root = tmp_path / "www"
    _mirror(root, "Packages.v1")
    site = tmp_path / "site.yaml"
    site.write_text(SITE)
    assert _run("lock", "--site", str(site), "--via", f"{MIRROR}=file://{root}").exit_code == 0
    assert _run("validate", "--site", str(site)).exit_code == 0
    site.write_text(SITE.replace("nccl: {enabled: true}", "nccl: {enabled: true, version: 2.27.7}"))
    from gpunode.cli import deploy as deploy_cli

    def touched(*a, **k):
        raise AssertionError("a host was touched")

    monkeypatch.setattr(deploy_cli, "run_pyinfra", touched)
    monkeypatch.setattr(deploy_cli, "run_ansible", touched)
    # provisioning commands too: `rebuild` must refuse before it destroys anything
    for args in (["validate"], ["deploy", "gpu01"], ["deploy", "gpu01", "--engine", "ansible"],
                 ["rebuild", "gpu01"], ["provision", "gpu01"], ["destroy", "gpu01"]):
        res = _run(*args, "--site", str(site))
        assert res.exit_code == 2, (args, res.output)
        assert "nodes.gpu01.nccl.version" in res.output
        assert "gpunode lock --update nccl" in res.output


def test_engines_inventories_carry_the_locked_driver(tmp_path, monkeypatch):
    root = tmp_path / "www"
    _mirror(root, "Packages.v1")
    site = tmp_path / "site.yaml"
    site.write_text(SITE)
    assert _run("lock", "--site", str(site), "--via", f"{MIRROR}=file://{root}").exit_code == 0
    import json
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {"GPUNODE_SITE": str(site), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(repo / "inventory/ansible_inventory.py"), "--list"],
                         capture_output=True, text=True, env=env, check=True).stdout
    hostvars = json.loads(out)["_meta"]["hostvars"]
    version = hostvars["gpu01"]["node"]["nvidia"]["version"]  # site strings are marked unsafe
    assert version in ("580.82.07", {"__ansible_unsafe": "580.82.07"})
    site.write_text(SITE.replace("branch: 580,", "branch: 590,"))
    res = subprocess.run([sys.executable, str(repo / "inventory/ansible_inventory.py"), "--list"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "nvidia.branch" in res.stderr


def test_closure_follows_a_virtual_dependency_to_its_provider():
    """nvidia-kernel-open-dkms depends on nvidia-kernel-support--v1, a name only
    nvidia-kernel-support provides: the provider is locked (it was missing from the lock
    while the node had it installed)."""
    dkms = lk.Deb("nvidia-kernel-open-dkms", "580.82.07-1", "dkms, nvidia-kernel-support--v1")
    debs = [dkms,
            lk.Deb("nvidia-kernel-support", "580.82.07-1", "", provides="nvidia-kernel-support-any, "
                   "nvidia-kernel-support--v1"),
            lk.Deb("nvidia-kernel-support", "580.76.05-1", "", provides="nvidia-kernel-support--v1")]
    got = lk.closure(lk.AptIndex(debs), {dkms.name: dkms})
    assert got["nvidia-kernel-support"].version == "580.82.07-1"
    assert "dkms" not in got and "nvidia-kernel-support--v1" not in got
    prefer_old = lk.closure(lk.AptIndex(debs), {dkms.name: dkms},
                            prefer=lambda d: d.version.startswith("580.76."))
    assert prefer_old["nvidia-kernel-support"].version == "580.76.05-1"


def test_a_proxmox_host_has_nothing_to_lock_and_its_guests_lock_their_image():
    site = load_site(Path(__file__).resolve().parents[1] / "fixtures" / "proxmox" / "site.yaml")
    host, guest = site.nodes["pve1"], site.nodes["gpuvm1"]
    assert all(lk.group_inputs(host, g) is None for g in lk.GROUPS)
    assert lk.repo_urls(host) == []                      # no mirror read for it
    assert lk.resolve_node(host, lk.Sources()) == {}
    assert lk.group_inputs(guest, "image") == {
        "vm.pve_node": guest.vm.pve_node, "vm.cloud_image": guest.vm.cloud_image,
        "vm.template_vmid": guest.vm.template_vmid}
    with pytest.raises(lk.LockError, match="is not on PVE node"):
        lk.resolve_group(guest, "image", lk.Sources())    # PVE does not list it
