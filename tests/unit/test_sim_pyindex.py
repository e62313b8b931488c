"""SIMULATION equipment tests: the lab guests' PEP 503 index (gpunode.lab.sim.pyindex).

No network: wheels are made here; pip itself installs from the served index.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gpunode.lab.sim import pyindex
from gpunode.lab.sim.server import serving


def make_wheel(dest: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal valid pure-Python wheel."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{name.replace('-', '_')}_mod.py": b"VALUE = 42\n",
        f"{dist}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            + "".join(f"Requires-Dist: {r}\n" for r in requires)
        ).encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                   b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = dest / f"{dist}-py3-none-any.whl"
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run([sys.executable, "-m", "pip", *args], env=env, capture_output=True,
                          text=True)


def test_pages_follow_pep503_with_sha256(tmp_path: Path) -> None:
    wheels = [make_wheel(tmp_path / "w", "Some_Project", "1.0"),
              make_wheel(tmp_path / "w", "other", "2.0")]
    projects = pyindex.write_index(tmp_path / "www", wheels)
    assert set(projects) == {"some-project", "other"}
    simple = tmp_path / "www/pypi/simple"
    assert '<a href="some-project/">' in (simple / "index.html").read_text()
    page = (simple / "some-project/index.html").read_text()
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    assert f'href="../../files/{wheels[0].name}#sha256={digest}"' in page
    assert (tmp_path / "www/pypi/files" / wheels[0].name).read_bytes() == wheels[0].read_bytes()


def test_rewrite_drops_wheels_no_longer_wanted(tmp_path: Path) -> None:
    a = make_wheel(tmp_path / "w", "alpha", "1.0")
    b = make_wheel(tmp_path / "w", "beta", "1.0")
    pyindex.write_index(tmp_path / "www", [a, b])
    pyindex.write_index(tmp_path / "www", [a])
    assert not (tmp_path / "www/pypi/files" / b.name).exists()
    assert not (tmp_path / "www/pypi/simple/beta").exists()


def test_pip_installs_from_served_index_and_checks_hash(tmp_path: Path) -> None:
    dep = make_wheel(tmp_path / "w", "simdep", "1.2")
    app = make_wheel(tmp_path / "w", "simapp", "0.1", requires=("simdep>=1",))
    www = tmp_path / "www"
    pyindex.write_index(www, [dep, app])
    with serving(www, 0) as url:
        ok = pip("install", "--no-cache-dir", "--target", str(tmp_path / "t"), "--index-url",
                 f"{url}/pypi/simple/", "simapp")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert (tmp_path / "t/simdep_mod.py").is_file()
        # A wheel whose bytes do not match the page's #sha256 is refused.
        (www / "pypi/files" / dep.name).write_bytes(dep.read_bytes() + b"\0")
        bad = pip("install", "--no-cache-dir", "--target", str(tmp_path / "t2"), "--index-url",
                  f"{url}/pypi/simple/", "simdep")
    assert bad.returncode != 0 and "HASH" in (bad.stdout + bad.stderr).upper()


def test_pip_env_ignores_machine_pip_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_CONSTRAINT", "/etc/xdg/pip/constraints.txt")
    monkeypatch.setenv("PIP_FIND_LINKS", "/opt/wheels")
    monkeypatch.setenv("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")
    env = pyindex._pip_env()
    assert env["PIP_CONFIG_FILE"] == os.devnull
    assert "PIP_CONSTRAINT" not in env and "PIP_FIND_LINKS" not in env
    assert env["PIP_CERT"] == "/etc/ssl/certs/ca-certificates.crt"


def test_cached_wheels_satisfy_requirements(tmp_path: Path) -> None:
    make_wheel(tmp_path, "PyYAML", "6.0.3")
    assert pyindex._have(tmp_path, "PyYAML==6.0.3")
    assert pyindex._have(tmp_path, "pyyaml>=5.4")
    assert not pyindex._have(tmp_path, "PyYAML==6.0.2")
    assert not pyindex._have(tmp_path, "uv==0.13.9")


def test_download_skips_pip_when_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_wheel(tmp_path, "uv", pyindex.UV_VERSION)
    calls: list[list[str]] = []
    monkeypatch.setattr(pyindex, "_run_pip", lambda args, what, env=None: calls.append(args))
    pyindex.download([f"uv=={pyindex.UV_VERSION}"], tmp_path, deps=False)
    assert calls == []
    pyindex.download(["PyYAML==6.0.3"], tmp_path, deps=False)
    assert [a[a.index("--python-version") + 1] for a in calls] == list(pyindex.GUEST_PYTHONS)
    args = calls[0]
    assert args[:2] == ["download", "--only-binary=:all:"]
    assert "manylinux2014_x86_64" in args and "--no-deps" in args and args[-1] == "PyYAML==6.0.3"


def test_a_compiled_wheel_counts_only_for_its_python(tmp_path: Path) -> None:
    """Ubuntu 24.04's guests run CPython 3.12: a cp311 wheel in the cache does not serve
    them (was: one wheel of any tag satisfied every guest, and 3.12 could not install)."""
    compiled = make_wheel(tmp_path, "PyYAML", "6.0.3")
    compiled.rename(tmp_path / "pyyaml-6.0.3-cp311-cp311-manylinux_2_17_x86_64.whl")
    assert pyindex._have(tmp_path, "PyYAML==6.0.3", "3.11")
    assert not pyindex._have(tmp_path, "PyYAML==6.0.3", "3.12")
    abi3 = tmp_path / "cryptography-46.0.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    abi3.write_bytes(b"")
    assert pyindex._fits(abi3, "3.12") and pyindex._fits(abi3, "3.11")


def test_wheel_requirements_skip_extras(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, "standin", "1.0",
                       requires=("PyYAML>=5.4", 'pytest; extra == "test"',
                                 'tomli>=1; python_version < "3.11"'))
    assert pyindex.wheel_requirements(wheel) == ["PyYAML>=5.4", "tomli>=1"]


def test_standin_absent_gives_none(tmp_path: Path) -> None:
    assert pyindex.build_standin(tmp_path / "out", source=tmp_path / "missing") is None


def test_source_hash_ignores_build_artefacts(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg/a.py").write_text("x = 1\n")
    before = pyindex.source_hash(tmp_path)
    (tmp_path / "build").mkdir()
    (tmp_path / "build/junk").write_text("junk")
    (tmp_path / "x.egg-info").mkdir()
    assert pyindex.source_hash(tmp_path) == before
    (tmp_path / "pkg/a.py").write_text("x = 2\n")
    assert pyindex.source_hash(tmp_path) != before


@pytest.mark.slow
@pytest.mark.skipif(not (pyindex.STANDIN_DIR / "pyproject.toml").is_file(),
                    reason="vLLM stand-in not written yet")
def test_build_indexes_standin_and_cached_wheels(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """pyindex.build with a pre-filled wheel cache: no downloads, the real stand-in wheel."""
    cache = tmp_path / "cache/wheels"
    make_wheel(cache, "uv", pyindex.UV_VERSION)
    make_wheel(cache, "PyYAML", pyindex.PYYAML_VERSION)
    make_wheel(cache, "PyYAML", "5.0")  # not the pinned one: left out of the index
    real_run_pip = pyindex._run_pip

    def no_downloads(args: list[str], what: str, env: dict[str, str] | None = None) -> None:
        assert args[0] != "download", f"unexpected download: {args}"
        real_run_pip(args, what, env)

    monkeypatch.setattr(pyindex, "_run_pip", no_downloads)
    facts = pyindex.build(tmp_path / "www", cache)
    assert set(facts["projects"]) == {"uv", "pyyaml", "vllm"}
    assert facts["projects"]["pyyaml"] == [f"PyYAML-{pyindex.PYYAML_VERSION}-py3-none-any.whl"]
    standin = tmp_path / "www/pypi/files" / facts["standin_wheel"]
    with zipfile.ZipFile(standin) as zf:
        names = zf.namelist()
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        assert "vllm = " in zf.read(entry).decode()
    # Second build reuses the stand-in wheel (same sources, same file).
    again = pyindex.build(tmp_path / "www", cache)
    assert again["standin_wheel"] == facts["standin_wheel"]
