"""Where gpunode's files that are not Python modules are: the one resolver.

The repository's user-facing folders (templates/, checks/, deploy/, inventory/, playbooks/,
roles/, ansible.cfg) stay where users know them; src/gpunode/_data/ holds a symlink to each,
so the package sees them under `gpunode/_data/` in a checkout (editable install or
PYTHONPATH=src). A built wheel or sdist stores the files themselves, except the Ansible
engine's (playbooks/, roles/, ansible.cfg), which runs from a checkout. Everything that needs
one of them asks here; nothing derives the repository from __file__."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: The folders and files shipped as package data, each named as in the repository.
SHIPPED = ("templates", "checks", "deploy", "inventory", "playbooks", "roles", "ansible.cfg")


def data_root() -> Path:
    """The folder that holds gpunode's shipped files, laid out like the repository's top
    level (a real directory: wheels are installed unpacked)."""
    root = files("gpunode") / "_data"
    if not isinstance(root, Path):  # a zipped install cannot be run by pyinfra or Ansible
        raise RuntimeError(f"gpunode's data is not on the file system ({root}); install "
                           "gpunode unpacked (pip install)")
    return root


def data_path(name: str) -> Path:
    """One shipped folder or file by its repository name, e.g. data_path("templates")."""
    if name.split("/", 1)[0] not in SHIPPED:
        raise ValueError(f"{name!r} is not shipped with gpunode (one of {', '.join(SHIPPED)})")
    return data_root() / name


def ansible_root() -> Path:
    """The folder with ansible.cfg, playbooks/ and roles/ (a checkout's top level, through
    the links), or FileNotFoundError saying why when gpunode runs from a wheel."""
    root = data_root()
    if not (root / "playbooks").is_dir():
        raise FileNotFoundError("the Ansible engine (playbooks/, roles/) is not in the gpunode "
                                "wheel: run it from a checkout of the repository")
    return root
