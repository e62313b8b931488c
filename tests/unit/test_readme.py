"""The README's commands work as written: every fenced block marked `<!-- runnable -->` is
taken from README.md (the only copy of them) and run, in order and in one shell, in a fresh
`git clone` of this repository; each command must exit 0. The marked blocks are the quick
start (`make install`, `. .venv/bin/activate`) and the commands that need no host
(validate, render, inventory, schema, sizing on a bundled model shape)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
MARK = "<!-- runnable -->"
BLOCK = re.compile(r"^" + re.escape(MARK) + r"[ \t]*\n```(?:sh|bash|console)?[ \t]*\n(.*?)^```",
                   re.M | re.S)


def runnable_commands(text: str) -> list[str]:
    """The command lines of the marked blocks, in README order (comments dropped)."""
    commands = []
    for block in BLOCK.findall(text):
        for line in block.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.rstrip())
    return commands


def test_every_runnable_mark_is_followed_by_a_shell_block() -> None:
    text = README.read_text()
    assert text.count(MARK) == len(BLOCK.findall(text)) >= 3
    commands = runnable_commands(text)
    verbs = {shlex.split(c, comments=True)[1] for c in commands if c.startswith("gpunode ")}
    assert {"validate", "render", "inventory", "schema", "sizing"} <= verbs
    assert commands[0].startswith("make install")
    assert any(c.startswith(". .venv/bin/activate") for c in commands)


def test_extraction_takes_only_marked_blocks() -> None:
    text = ("intro\n```sh\nmake demo\n```\n" + MARK + "\n```sh\n# comment\nfalse  # x\n\n"
            "true\n```\nafter\n```sh\nnot this\n```\n")
    assert runnable_commands(text) == ["false  # x", "true"]


@pytest.mark.integration  # a fresh venv in a fresh clone: ~1 minute
def test_readme_commands_run_in_a_fresh_clone(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=300)
    commands = runnable_commands(README.read_text())
    script = ["cd " + shlex.quote(str(clone))]
    for i, command in enumerate(commands):
        script += [f"echo '@@ {i} start'", command,
                   f"rc=$?; echo \"@@ {i} rc=$rc\"; [ $rc -eq 0 ] || exit 90"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "GPUNODE_SITE", "COLUMNS", "PYTHONPATH")}
    # The venv this test runs in must not be the one the README's commands use.
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(REPO / ".venv")))
    proc = subprocess.run(["bash", "-c", "\n".join(script)], env=env, capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    for i, command in enumerate(commands):
        assert f"@@ {i} rc=0" in proc.stdout, (
            f"README command failed or did not run in a fresh clone: {command}\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    # The commands did what they say, with the clone's own venv.
    assert (clone / ".venv/bin/gpunode").is_file()
    assert (clone / "inventory/site.yaml").is_file()
    assert "Recommended service settings" in proc.stdout


def test_the_layout_names_every_package_and_module() -> None:
    """README's layout block lists every package and module of src/gpunode (and each
    top-level folder users know), so a new one is described where newcomers look."""
    text = README.read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    src = REPO / "src" / "gpunode"
    names = {p.name + ("/" if p.is_dir() else "") for p in src.iterdir()
             if not p.name.startswith(("__", ".")) and p.suffix in ("", ".py", ".json")}
    # and each module of the packages that gather the flat modules (the pyinfra engine's
    # deploys are one per concern, named together)
    for sub in ("core", "engines/ansible", "checks", "cli"):
        names |= {p.name for p in (src / sub).glob("*.py") if not p.name.startswith("__")}
    missing = sorted(n for n in names if n not in block)
    assert not missing, f"README ## Layout does not mention: {missing}"
    for folder in ("inventory/", "deploy/", "playbooks/", "roles/", "templates/", "checks/"):
        assert folder in block, folder
