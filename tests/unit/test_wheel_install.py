"""Installed, not only cloned: the built wheel, pip-installed into a fresh venv, runs
`gpunode validate | render | sizing | schema | deploy --dry-run` from a directory outside
the checkout, with the checkout nowhere on sys.path (templates, the deploy and inventory
entry files come from the package's data, gpunode.core.resources).

Dependencies come as wheels from ~/.cache/gpunode/wheels-<key> (filled once with
`pip download`, pinned to this venv's versions); the build and install run offline."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

REPO = Path(__file__).resolve().parents[2]
#: What the build reads (the rest of the checkout stays out of the copy it builds from).
BUILD_INPUTS = ("pyproject.toml", "README.md", "src", "templates", "checks", "deploy",
                "inventory", "playbooks", "roles", "ansible.cfg")
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]


def wheel_cache() -> Path:
    """Wheels of gpunode's dependencies and build requirements, at this venv's versions."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    pins = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                  if d.metadata["Name"] and d.metadata["Name"].lower() != "gpunode")
    key = hashlib.sha256("\n".join([*wanted, "--", *pins]).encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache = base / "gpunode" / f"wheels-{key}"
    if (cache / ".complete").exists():
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    constraints = cache / "constraints.txt"
    # setuptools>=77 is the build's own requirement, newer than this venv's (pinned out)
    constraints.write_text("\n".join(p for p in pins if not p.lower().startswith(
        ("setuptools==", "wheel==", "pip=="))) + "\n")
    proc = subprocess.run([*PIP, "download", "-q", "-d", str(cache), "-c", str(constraints),
                           *wanted], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot fetch the dependency wheels into {cache} (network?): "
                    f"{proc.stderr.strip()[-600:]}")
    (cache / ".complete").touch()
    return cache


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, the fresh venv it is installed in)."""
    cache = wheel_cache()
    tmp = tmp_path_factory.mktemp("wheel")
    tree = tmp / "tree"
    tree.mkdir()
    for name in BUILD_INPUTS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, tree / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        else:
            shutil.copy2(src, tree / name)
    dist = tmp / "dist"
    offline = ["--no-index", "--find-links", str(cache)]
    subprocess.run([*PIP, "wheel", "-q", "--no-deps", *offline, "-w", str(dist), str(tree)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = dist.glob("gpunode-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    subprocess.run([*PIP, "--python", str(venv / "bin" / "python"), "install", "-q", *offline,
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return wheel, venv


def test_the_wheel_ships_templates_checks_and_entry_files_and_not_the_lab(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("gpunode/_data/") for n in names if n.startswith("gpunode/_data/")}
    for folder in ("templates", "checks", "deploy"):
        mine = {str(p.relative_to(REPO)) for p in (REPO / folder).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".md"}
        assert mine and mine <= shipped, sorted(mine - shipped)
    assert {"inventory/pyinfra_inventory.py", "inventory/ansible_inventory.py"} <= shipped
    assert "gpunode/vllm-0.33.0.json" in names  # the vLLM flag table gpunode.core.vllm_flags loads
    assert not [n for n in names if n.startswith("gpunode/lab/")]
    assert not [n for n in shipped if n.startswith(("playbooks/", "roles/"))]


def run(venv: Path, where: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`gpunode ARGS` from the venv, in WHERE, with a clean environment (no PYTHONPATH)."""
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(where), "LANG": "C.UTF-8",
           "COLUMNS": "120"}
    return subprocess.run([str(venv / "bin" / "gpunode"), *args], cwd=where, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_installed_cli_works_outside_the_checkout(installed, tmp_path: Path):
    _, venv = installed
    where = tmp_path / "elsewhere"
    where.mkdir()
    site = where / "site.yaml"
    shutil.copy(REPO / "inventory" / "examples" / "bare-metal.yaml", site)
    probe = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import gpunode.cli.main, gpunode.core.vllm_flags as f, sys; "
                            "assert len(f.SERVE_FLAGS) > 300 and len(f.ENV_VARS) > 200; "
                            "print(gpunode.cli.main.__file__); print(sys.path)"],
                           cwd=where, env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                           text=True, check=True)
    assert probe.stdout.startswith(str(venv)), probe.stdout
    assert str(REPO) not in probe.stdout

    res = run(venv, where, "validate", "--site", str(site))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid: 1 node(s)" in res.stdout + res.stderr

    res = run(venv, where, "render", "gpu01", "--out", "out", "--site", str(site))
    assert res.returncode == 0, res.stdout + res.stderr
    written = [p for p in (where / "out").rglob("*") if p.is_file()]
    assert len(written) > 10
    assert any("Managed by gpunode" in p.read_text() for p in written)

    res = run(venv, where, "schema", "--out", "site.schema.json")
    assert res.returncode == 0, res.stderr
    assert (where / "site.schema.json").read_text() == (
        REPO / "schema" / "site.schema.json").read_text()

    model = shutil.copytree(REPO / "tests" / "fixtures" / "models" /
                            "llama-3.1-70b-instruct-awq", where / "model")
    res = run(venv, where, "sizing", str(model), "--gpus", "2xA6000", "--ctx", "32768", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert '"max_model_len": 32768' in res.stdout

    # deploy --dry-run: pyinfra (the venv's) runs the wheel's inventory and deploy entry;
    # no SSH host is reachable here, so the cheapest real run is one that connects to a
    # closed loopback port: the node fails to connect, nothing imports from the checkout.
    text = site.read_text().replace("address: gpu01.example.internal", "address: 127.0.0.1\n"
                                    "      port: 9")
    site.write_text(text)
    for key in ("llama70b", "qwen1b5"):  # preflight: the services' API key files exist
        path = where / ".config" / "gpunode" / "keys" / f"{key}.key"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("k\n")
    (where / ".ssh").mkdir()
    (where / ".ssh" / "id_ed25519").write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    res = run(venv, where, "deploy", "gpu01", "--dry-run", "--site", str(site), "-v")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "No module named" not in out and "ImportError" not in out, out
    assert "gpu01" in out and ("Connection refused" in out or "Could not connect" in out), out


def test_no_product_module_imports_the_lab():
    """gpunode.lab is test equipment, not in the wheel: the product never imports it
    (`gpunode lab` is mounted only where it is importable, in a checkout). demo.py is the
    lab's own demo (`make demo`) and the one exception."""
    import ast

    root = REPO / "src" / "gpunode"
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in ("lab", "_data") or rel == Path("demo.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{rel}: {n}" for n in names if n == "gpunode.lab"
                          or n.startswith("gpunode.lab.")]
    assert not offenders
