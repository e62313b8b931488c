"""Shared fixtures: the example sites, and writing small site files under tmp_path."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from gpunode.inventory import SiteError, load_site

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "inventory" / "examples").glob("*.yaml"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes `example` runs once per inventory/examples/*.yaml."""
    if "example" in metafunc.fixturenames:
        metafunc.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def write_site(tmp_path: Path) -> Callable[..., Path]:
    """write_site(yaml_text, name="site.yaml") -> path; the text is dedented."""

    def write(text: str, name: str = "site.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@pytest.fixture
def site_errors(write_site: Callable[..., Path]) -> Callable[[str], list[str]]:
    """site_errors(yaml_text) -> SiteError lines; fails the test if the site loads."""

    def errors(text: str) -> list[str]:
        path = write_site(text)
        with pytest.raises(SiteError) as info:
            load_site(path)
        assert info.value.lines, "SiteError without lines"
        for line in info.value.lines:
            assert line.startswith(str(path)), line
        return info.value.lines

    return errors
