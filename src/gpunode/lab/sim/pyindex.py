"""SIMULATION support: a PEP 503 "simple" Python index for lab guests, served on loopback.

Layout under the www root:

    pypi/simple/index.html                 project list
    pypi/simple/<project>/index.html       links ../../files/<wheel>#sha256=<hex>
    pypi/files/*.whl

Contents: the vLLM stand-in wheel (built from sim/vllm_standin/ with `pip wheel --no-deps`)
and wheels downloaded once for each guest OS's Python (GUEST_PYTHONS, manylinux x86_64)
into `~/.cache/gpunode/lab/wheels`: uv, PyYAML and the stand-in's own requirements.

Guests have no HTTPS that verifies, so uv reaches them over this index, e.g.

    python3 -m venv /opt/uv && /opt/uv/bin/pip install \
        --index-url http://10.0.2.2:18087/pypi/simple/ uv==UV_VERSION

(needs Debian's python3-venv), or without pip: fetch the uv wheel from
http://10.0.2.2:18087/pypi/files/ over plain HTTP, unpack it with `python3 -m zipfile -e`
and install `uv-UV_VERSION.data/scripts/uv` as /usr/local/bin/uv (mode 0755).
After that `uv pip install --index-url http://10.0.2.2:<port>/pypi/simple/ vllm` installs
the stand-in.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from gpunode.lab.errors import LabError
from gpunode.lab.paths import cache_root
from gpunode.lab.sim.repo import locked

UV_VERSION = "0.13.9"
PYYAML_VERSION = "6.0.3"
#: The python3 of each lab guest OS that runs vLLM (gpunode.model.parts.OS_PYTHON): Debian 12,
#: Ubuntu 24.04 (a 22.04 guest's 3.10 is too old for vLLM; labsite gives it no services).
GUEST_PYTHONS = ("3.11", "3.12")
GUEST_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
BASE_REQUIREMENTS = (f"uv=={UV_VERSION}", f"PyYAML=={PYYAML_VERSION}")
STANDIN_DIR = Path(__file__).resolve().parent / "vllm_standin"
INDEX_DIR = "pypi"


def wheels_cache() -> Path:
    return cache_root() / "wheels"


def normalize(name: str) -> str:
    """PEP 503 project name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _pip_env() -> dict[str, str]:
    """Environment for pip that ignores this machine's pip config (constraints file,
    find-links, extra local indexes) so downloads come from PyPI as a guest would see it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    if "PIP_CERT" in os.environ:  # the machine's CA bundle, needed to reach PyPI here
        env["PIP_CERT"] = os.environ["PIP_CERT"]
    return env


def _run_pip(args: list[str], what: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, env=env or _pip_env(), capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
        raise LabError(f"{what} failed (pip exit {proc.returncode}):\n{tail}\n"
                       "Check that PyPI is reachable, or put the wheels into "
                       f"{wheels_cache()} by hand.")


def _wheel_name(path: Path) -> tuple[str, str]:
    """(normalized project, version) from a wheel file name."""
    parts = path.name[:-4].split("-")
    return normalize(parts[0]), parts[1]


def _fits(wheel: Path, python: str) -> bool:
    """Whether a wheel installs on CPython `python` (its python tag: py3, cpXY, abi3)."""
    tags = wheel.name[:-4].split("-")
    pytags, abi = tags[-3].split("."), tags[-2]
    cp = f"cp{python.replace('.', '')}"
    if abi == "abi3":
        return any(t.startswith("cp3") and int(t[3:]) <= int(cp[3:]) for t in pytags)
    return "py3" in pytags or cp in pytags


def _have(cache: Path, requirement: str, python: str = GUEST_PYTHONS[0]) -> bool:
    """True if the cache already holds a wheel satisfying the requirement on `python`."""
    try:
        req = Requirement(requirement)
    except InvalidRequirement:
        return False
    for wheel in cache.glob("*.whl"):
        project, version = _wheel_name(wheel)
        if (project == normalize(req.name) and req.specifier.contains(version, prereleases=True)
                and _fits(wheel, python)):
            return True
    return False


def download(requirements: list[str], cache: Path | None = None, deps: bool = True) -> None:
    """pip download binary wheels for each guest interpreter/platform into the cache."""
    cache = cache or wheels_cache()
    cache.mkdir(parents=True, exist_ok=True)
    for python in GUEST_PYTHONS:
        missing = [r for r in requirements if not _have(cache, r, python)]
        if not missing:
            continue
        args = ["download", "--only-binary=:all:", "--python-version", python,
                "--implementation", "cp", "--abi", f"cp{python.replace('.', '')}",
                "--dest", str(cache)]
        for plat in GUEST_PLATFORMS:
            args += ["--platform", plat]
        if not deps:
            args.append("--no-deps")
        _run_pip(args + missing,
                 f"downloading {', '.join(missing)} for the lab guests' Python {python}")


def build_standin(dest: Path, source: Path = STANDIN_DIR) -> Path | None:
    """Build the vLLM stand-in wheel into dest; None while the stand-in does not exist yet."""
    if not (source / "pyproject.toml").is_file() and not (source / "setup.py").is_file():
        return None
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpunode-standin-") as tmp:
        # Build from a copy: setuptools writes build/ and *.egg-info into the source tree.
        src = Path(tmp) / "src"
        shutil.copytree(source, src, ignore=shutil.ignore_patterns(
            "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
        out = Path(tmp) / "out"
        # The machine's own pip config is fine here: it only supplies the build backend
        # (an isolated build env with setuptools); the wheel is pure Python.
        _run_pip(["wheel", "--no-deps", "--wheel-dir", str(out), str(src)],
                 "building the vLLM stand-in wheel", env=dict(os.environ))
        wheels = sorted(out.glob("*.whl"))
        if not wheels:
            raise LabError(f"building the vLLM stand-in from {source} produced no wheel.")
        target = dest / wheels[0].name
        shutil.copy2(wheels[0], target)
        return target


_IGNORED = ("build", "dist", "__pycache__", ".pytest_cache")


def source_hash(source: Path) -> str:
    """Hash of a source tree's files (build artefacts ignored)."""
    h = hashlib.sha256()
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_dir() or any(part in _IGNORED or part.endswith(".egg-info")
                                for part in rel.parts) or path.suffix == ".pyc":
            continue
        h.update(str(rel).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def wheel_requirements(wheel: Path) -> list[str]:
    """Unconditional Requires-Dist entries of a wheel (no extras, markers evaluated for
    a Linux CPython 3.11 guest only when trivially true)."""
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = zf.read(meta_name).decode()
    reqs = []
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if ";" in req:
            marker = req.split(";", 1)[1]
            if "extra" in marker:
                continue
            req = req.split(";", 1)[0].strip()
        reqs.append(req)
    return reqs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_index(www: Path, wheels: list[Path]) -> dict[str, list[str]]:
    """(Re)write the PEP 503 pages for the given wheels; returns {project: [files]}."""
    root = www / INDEX_DIR
    files_dir = root / "files"
    simple = root / "simple"
    files_dir.mkdir(parents=True, exist_ok=True)
    projects: dict[str, list[tuple[str, str]]] = {}
    for wheel in sorted(wheels, key=lambda p: p.name):
        target = files_dir / wheel.name
        if not target.is_file() or target.stat().st_size != wheel.stat().st_size:
            shutil.copy2(wheel, target)
        project, _ = _wheel_name(wheel)
        projects.setdefault(project, []).append((wheel.name, _sha256(target)))
    if simple.exists():
        shutil.rmtree(simple)
    simple.mkdir(parents=True)
    head = ('<!DOCTYPE html>\n<html>\n<head><meta name="pypi:repository-version" '
            'content="1.0"><title>{}</title></head>\n<body>\n')
    lines = [head.format("Simple index (gpunode lab SIMULATION)")]
    for project in sorted(projects):
        lines.append(f'<a href="{project}/">{html.escape(project)}</a><br/>\n')
    (simple / "index.html").write_text("".join(lines) + "</body>\n</html>\n")
    for project, files in projects.items():
        page = [head.format(f"Links for {html.escape(project)}")]
        for name, digest in files:
            page.append(f'<a href="../../files/{html.escape(name)}#sha256={digest}">'
                        f"{html.escape(name)}</a><br/>\n")
        (simple / project).mkdir()
        (simple / project / "index.html").write_text("".join(page) + "</body>\n</html>\n")
    # Drop wheels no longer indexed.
    keep = {w.name for w in wheels}
    for stale in files_dir.glob("*.whl"):
        if stale.name not in keep:
            stale.unlink()
    return {p: [n for n, _ in f] for p, f in projects.items()}


def build(www_root: Path, cache: Path | None = None) -> dict:
    """Fill the index: stand-in wheel (if its source exists) + guest wheels. Returns facts."""
    cache = cache or wheels_cache()
    with locked(www_root / ".pyindex-build.lock"):
        return _build(www_root, cache)


def _build(www_root: Path, cache: Path) -> dict:
    standin = None
    if STANDIN_DIR.is_dir():
        # Rebuilt only when the stand-in's sources change.
        standin_dir = cache.parent / "standin-wheel" / source_hash(STANDIN_DIR)
        standin = next(iter(sorted(standin_dir.glob("*.whl"))), None)
        if standin is None:
            shutil.rmtree(standin_dir.parent, ignore_errors=True)
            standin = build_standin(standin_dir)
    requirements = list(BASE_REQUIREMENTS)
    download(requirements, cache, deps=False)
    extra = wheel_requirements(standin) if standin else []
    if extra:
        download(extra, cache, deps=True)
    wheels = [p for p in sorted(cache.glob("*.whl")) if _wanted(p, requirements + extra)]
    if standin:
        wheels.append(standin)
    projects = write_index(www_root, wheels)
    return {
        "projects": projects,
        "standin_wheel": standin.name if standin else None,
        "uv_version": UV_VERSION,
    }


def _wanted(wheel: Path, requirements: list[str]) -> bool:
    """Keep cached wheels of the requested projects (and, for unpinned or dependency
    downloads, any cached project: the cache only holds what this module downloaded)."""
    project, version = _wheel_name(wheel)
    for req in requirements:
        name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]
        if normalize(name) == project and "==" in req:
            return req.split("==", 1)[1].strip() == version
    return True
