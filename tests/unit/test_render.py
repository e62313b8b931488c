"""The one Jinja environment and the shared filters."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gpunode.core import filters
from gpunode.core.render import JINJA_OPTIONS, MANAGED_HEADER, context, environment
from gpunode.model import NodeProfile


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    root = tmp_path / "templates"
    (root / "demo").mkdir(parents=True)
    return root


def write(root: Path, name: str, text: str) -> str:
    (root / "demo" / name).write_text(text)
    return f"demo/{name}"


def test_environment_options(templates: Path) -> None:
    env = environment(str(templates))
    assert env.undefined is jinja2.StrictUndefined
    assert env.trim_blocks and env.lstrip_blocks and env.keep_trailing_newline
    assert env.autoescape is False
    assert JINJA_OPTIONS == {"trim_blocks": True, "lstrip_blocks": True,
                             "keep_trailing_newline": True}
    assert set(filters.FILTERS) <= set(env.filters)
    for name, fn in filters.FILTERS.items():
        assert env.filters[name] is fn


def test_undefined_is_an_error(templates: Path) -> None:
    name = write(templates, "x.conf.j2", "{{ node.nope }}\n")
    with pytest.raises(jinja2.UndefinedError):
        environment(str(templates)).get_template(name).render(node={})


def test_blocks_trimmed_and_trailing_newline_kept(templates: Path) -> None:
    name = write(templates, "y.conf.j2",
                 "# {{ managed_header }}\n"
                 "    {% for k, v in node.tuning.sysctl | dictsort %}\n"
                 "{{ k }} = {{ v | sysctl_value }}\n"
                 "    {% endfor %}\n")
    node = NodeProfile.model_validate({
        "name": "n", "connection": {"address": "h"},
        "tuning": {"sysctl": {"vm.max_map_count": 1048576, "net.core.somaxconn": 4096}}})
    out = environment(str(templates)).get_template(name).render(context(node))
    assert out == (f"# {MANAGED_HEADER}\n"
                   "net.core.somaxconn = 4096\nvm.max_map_count = 1048576\n")


def test_context() -> None:
    node = NodeProfile.model_validate({"name": "n", "connection": {"address": "h"}})
    ctx = context(node, service={"name": "a"})
    assert ctx["node"] == node.model_dump(mode="json")
    assert ctx["managed_header"] == MANAGED_HEADER
    assert ctx["service"] == {"name": "a"}
    assert context({"name": "raw"})["node"] == {"name": "raw"}


@pytest.mark.parametrize("value,expected", [
    (["4096", 87380, 6291456], "4096 87380 6291456"), ((1, 2), "1 2"),
    (True, "1"), (False, "0"), (10, "10"), ("madvise", "madvise"), (0.5, "0.5")])
def test_sysctl_value(value: object, expected: str) -> None:
    assert filters.to_sysctl_value(value) == expected


@pytest.mark.parametrize("value,expected", [(True, "yes"), (False, "no"), (1, "yes"),
                                            (None, "no"), ("", "no")])
def test_systemd_bool(value: object, expected: str) -> None:
    assert filters.to_systemd_bool(value) == expected


def test_yaml_block() -> None:
    out = filters.to_yaml_block({"b": 1, "a": [1, 2], "c": {"y": 1, "x": 2}})
    assert out == "a:\n- 1\n- 2\nb: 1\nc:\n  x: 2\n  y: 1"
    assert yaml.safe_load(out) == {"b": 1, "a": [1, 2], "c": {"y": 1, "x": 2}}


def test_json_compact() -> None:
    assert filters.to_json_compact({"b": [1, 2], "a": "x"}) == '{"a":"x","b":[1,2]}'


@pytest.mark.parametrize("value,expected", [
    ("abc", "abc"), ("/var/lib/vllm/hf", "/var/lib/vllm/hf"), ("a=b,c:d@e+f", "a=b,c:d@e+f"),
    (1, "1"), ("", '""'), ("two words", '"two words"'), ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'), ("$HOME", '"$HOME"')])
def test_env_quote(value: object, expected: str) -> None:
    assert filters.env_quote(value) == expected


def unquote(text: str) -> str:
    """How systemd reads a double-quoted EnvironmentFile value (backslash escapes)."""
    if not text.startswith('"'):
        return text
    assert text.endswith('"') and len(text) >= 2
    out, i, body = [], 0, text[1:-1]
    while i < len(body):
        if body[i] == "\\":
            i += 1
        else:
            assert body[i] != '"', f"unescaped quote in {text!r}"
        out.append(body[i])
        i += 1
    return "".join(out)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs"))))
def test_env_quote_round_trips(value: str) -> None:
    quoted = filters.env_quote(value)
    assert unquote(quoted) == value
    assert " " not in quoted or quoted.startswith('"')


def test_the_sysctl_file_gives_each_serving_sysctl_its_reason() -> None:
    from gpunode.core import desired, paths
    from gpunode.core.files import tuning_files

    p = NodeProfile.model_validate({
        "name": "n", "connection": {"address": "127.0.0.1"}, "gpus": {"count": 1},
        "tuning": {"sysctl": {"net.core.somaxconn": 8192}},
        "vllm": {"services": [{"name": "a", "model": "/m", "gpus": [0], "port": 8000}]}})
    (conf,) = [f for f in tuning_files(p) if f.path == paths.SYSCTL_CONF]
    lines = conf.content.splitlines()
    at = lines.index("net.ipv4.tcp_slow_start_after_idle = 0")
    assert lines[at - 1] == "# " + desired.SERVING_SYSCTLS[
        "net.ipv4.tcp_slow_start_after_idle"][1]
    assert "net.ipv4.ip_local_reserved_ports = 8000" in lines
    at = lines.index("net.core.somaxconn = 8192")  # the site's own value: no reason of ours
    assert not lines[at - 1].startswith("#")
