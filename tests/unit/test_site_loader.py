"""Loading a site file: per-problem error lines, the merge rule, site path resolution."""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from site_docs import GUEST, NODE

from gpunode.inventory import SiteError, load_site, merge, resolve_site_path
from gpunode.inventory.loader import DEFAULT_SITE
from gpunode.model import NodeProfile
from gpunode.model.parts import PVE_OS

Errors = Callable[[str], list[str]]


def one(lines: list[str], needle: str) -> str:
    """The one line containing needle."""
    found = [line for line in lines if needle in line]
    assert len(found) == 1, (needle, lines)
    return found[0]


def test_examples_load(example: Path) -> None:
    site = load_site(example)
    assert site.nodes
    for name, p in site.nodes.items():
        assert p.name == name
        for g in p.groups:
            assert name in site.groups[g]


def test_unknown_key_names_allowed_keys_nearest_match_and_line(site_errors: Errors) -> None:
    lines = site_errors(NODE + "    tunning: {}\n")
    line = one(lines, "tunning")
    assert line.split(": ")[0].endswith("site.yaml:6")
    assert "nodes.gpu01.tunning" in line
    assert "did you mean 'tuning'" in line
    assert "allowed: " in line and "connection" in line and "vllm" in line


def test_unknown_key_deep_in_a_list(site_errors: Errors) -> None:
    text = NODE + ("    vllm:\n      services:\n        - name: a\n          model: /m\n"
                   "          gpus: [0]\n          tensor_paralel_size: 1\n")
    line = one(site_errors(text), "tensor_paralel_size")
    assert ":11: nodes.gpu01.vllm.services[0].tensor_paralel_size" in line
    assert "did you mean 'tensor_parallel_size'" in line


def test_unknown_top_level_key(site_errors: Errors) -> None:
    line = one(site_errors("node:\n  a: {}\n" + NODE), "node:")
    assert "site.yaml:1" in line and "did you mean 'nodes'" in line


def test_tab_indentation_gives_line_and_column(site_errors: Errors) -> None:
    line = one(site_errors("nodes:\n  gpu01:\n\tconnection: {address: h}\n"), "tab")
    assert "site.yaml:3:1:" in line and "YAML" in line


def test_yaml_syntax_error_line_and_column(site_errors: Errors) -> None:
    line = one(site_errors("nodes:\n  gpu01: {connection: [\n"), "YAML")
    assert "site.yaml:3:" in line


def test_tp_size_not_dividing(site_errors: Errors) -> None:
    text = NODE + ("    vllm:\n      services:\n"
                   "        - {name: a, model: /m, gpus: [0, 1], tensor_parallel_size: 3}\n")
    line = one(site_errors(text), "tensor_parallel_size")
    assert "nodes.gpu01.vllm.services[0].tensor_parallel_size: " in line
    assert "= 3 GPU(s), but gpus lists 2" in line
    assert "site.yaml:8:" in line


def test_gpu_that_does_not_exist(site_errors: Errors) -> None:
    text = NODE + "    vllm:\n      services:\n        - {name: a, model: /m, gpus: [0, 2]}\n"
    line = one(site_errors(text), "nodes.gpu01.vllm.services[0].gpus")
    assert "[2]" in line and "do not exist" in line


def test_duplicate_ports(site_errors: Errors) -> None:
    text = NODE + ("    vllm:\n      services:\n"
                   "        - {name: a, model: /m, gpus: [0], port: 9000}\n"
                   "        - {name: b, model: /m, gpus: [1], port: 9000}\n")
    line = one(site_errors(text), "nodes.gpu01.vllm.services[1].port")
    assert "9000" in line and "unique" in line


def test_summed_gpu_memory_utilization(site_errors: Errors) -> None:
    text = NODE + ("    vllm:\n      services:\n"
                   "        - {name: a, model: /m, gpus: [0], port: 8001, "
                   "gpu_memory_utilization: 0.7}\n"
                   "        - {name: b, model: /m, gpus: [0], port: 8002, "
                   "gpu_memory_utilization: 0.4}\n")
    line = one(site_errors(text), "gpu_memory_utilization")
    assert "nodes.gpu01.vllm.services: GPU 0" in line and "1.10" in line and "<= 1.0" in line


def test_pcie_with_machine_pc(site_errors: Errors) -> None:
    line = one(site_errors(GUEST + "      machine: pc\n      hostpci: [{mapping: a6000}]\n"),
               "pcie")
    assert "nodes.vm1.vm.hostpci[0].pcie: " in line and "q35" in line


def test_upper_case_hostpci_address(site_errors: Errors) -> None:
    line = one(site_errors(GUEST + "      hostpci: [{address: '0000:4A:00.0'}]\n"),
               "hostpci")
    assert "site.yaml:15: nodes.vm1.vm.hostpci[0].address: " in line


def test_upper_case_hostpci_address_message_says_lower_case(site_errors: Errors) -> None:
    line = one(site_errors(GUEST + "      hostpci: [{address: '0000:4A:00.0'}]\n"),
               "hostpci")
    assert "lower-case" in line


def test_vm_memory_not_multiple_of_1024_with_1g_hugepages(site_errors: Errors) -> None:
    line = one(site_errors(GUEST + "      memory_mib: 99000\n      hugepages: '1024'\n"),
               "memory_mib")
    assert "nodes.vm1.vm.memory_mib: 99000" in line and "1024" in line


def test_hugepages_leave_too_little_ram(site_errors: Errors) -> None:
    text = NODE + "    memory_mib: 16384\n    tuning: {hugepages: {size: 1G, count: 12}}\n"
    line = one(site_errors(text), "hugepages")
    assert "nodes.gpu01.tuning.hugepages.count: " in line and "12288 MiB of 16384" in line


def test_unknown_group(site_errors: Errors) -> None:
    text = "groups:\n  gpu_nodes: {}\n" + NODE + "    groups: [gpu_nodez]\n"
    line = one(site_errors(text), "gpu_nodez")
    assert "nodes.gpu01.groups" in line and "did you mean 'gpu_nodes'" in line
    assert "defined groups: gpu_nodes" in line


@pytest.mark.parametrize("text", ["site: {name: x}\n", "nodes: {}\n", "nodes:\n"])
def test_missing_nodes(site_errors: Errors, text: str) -> None:
    assert "at least one node" in one(site_errors(text), "nodes")


@pytest.mark.parametrize("text", ["", "42\n", "- a\n- b\n"])
def test_not_a_mapping(site_errors: Errors, text: str) -> None:
    assert "mapping" in one(site_errors(text), "site")


def test_site_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SiteError) as info:
        load_site(path)
    (line,) = info.value.lines
    assert line.startswith(f"{path}: ") and "not found" in line and "--site" in line


def test_duplicate_yaml_key(site_errors: Errors) -> None:
    text = NODE + "  gpu01:\n    connection: {address: h}\n"
    line = one(site_errors(text), "duplicate")
    assert "site.yaml:6:" in line and "'gpu01'" in line


def test_hf_model_without_revision(site_errors: Errors) -> None:
    text = NODE + "    vllm:\n      services:\n        - {name: a, model: org/m, gpus: [0]}\n"
    line = one(site_errors(text), "revision")
    assert "nodes.gpu01.vllm.services[0].revision: " in line


def test_missing_required_field(site_errors: Errors) -> None:
    line = one(site_errors("nodes:\n  gpu01:\n    os: debian-12\n"), "connection")
    assert "nodes.gpu01.connection: required field is missing" in line


def test_wrong_type_names_field(site_errors: Errors) -> None:
    line = one(site_errors(NODE + "    nvidia: {branch: latest}\n"), "branch")
    assert "site.yaml:6: nodes.gpu01.nvidia.branch: " in line and "integer" in line


def test_every_problem_is_reported(site_errors: Errors) -> None:
    text = NODE + ("    tunning: {}\n    vllm:\n      services:\n"
                   "        - {name: a, model: /m, gpus: [0, 1], tensor_parallel_size: 3}\n"
                   "  gpu02:\n    connection: {address: h}\n    nvidia: {brnch: 580}\n")
    lines = site_errors(text)
    one(lines, "tunning")
    one(lines, "brnch")


def test_bad_group_name(site_errors: Errors) -> None:
    text = "groups:\n  GPU-nodes: {}\n" + NODE + "    groups: [GPU-nodes]\n"
    assert "lower-case" in one(site_errors(text), "groups.GPU-nodes")


def test_node_that_is_not_a_mapping(site_errors: Errors) -> None:
    assert "must be a mapping" in site_errors("nodes:\n  a: [1, 2]\n")[0]


def test_unhashable_yaml_key(site_errors: Errors) -> None:
    one(site_errors(NODE + "    ? [a, b]\n    : 1\n"), "site.yaml")


@pytest.mark.parametrize("entry", ["[x]", "{x: 1}"])
def test_group_entry_that_is_not_a_string(site_errors: Errors, entry: str) -> None:
    text = "groups:\n  g: {}\n" + NODE + f"    groups: [{entry}]\n"
    one(site_errors(text), "nodes.gpu01.groups")


# --- merge rule -------------------------------------------------------------------------

def test_merge_function() -> None:
    base = {"a": {"x": 1, "y": [1, 2]}, "s": "base", "keep": True}
    over = {"a": {"y": [3], "z": {"k": 1}}, "s": "over"}
    out = merge(base, over)
    assert out == {"a": {"x": 1, "y": [3], "z": {"k": 1}}, "s": "over", "keep": True}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "s": "base", "keep": True}  # untouched
    out["a"]["z"]["k"] = 2
    assert over["a"]["z"]["k"] == 1  # copies, not shared
    assert merge({"a": {"x": 1}}, {"a": None}) == {"a": None}
    assert merge({"a": 1}, {"a": {"x": 1}}) == {"a": {"x": 1}}


MERGE_SITE = """
defaults:
  os: debian-12
  reboot_timeout_s: 300
  connection: {address: default.example, user: ubuntu}
  tuning:
    swappiness: 5
    sysctl: {vm.max_map_count: 1, net.core.somaxconn: 1}
groups:
  first:
    gpus: {count: 2}
    reboot_timeout_s: 400
    tuning:
      sysctl: {net.core.somaxconn: 2, kernel.pid_max: 2}
    vllm:
      python: "3.11"
      services:
        - {name: a, model: /m, gpus: [0], port: 8001, gpu_memory_utilization: 0.4}
        - {name: b, model: /m, gpus: [1], port: 8002, gpu_memory_utilization: 0.4}
  second:
    reboot_timeout_s: 500
    tuning:
      sysctl: {kernel.pid_max: 3}
nodes:
  n1:
    groups: [first, second]
    connection: {address: n1.example}
    tuning:
      sysctl: {vm.max_map_count: 9}
    vllm:
      services:
        - {name: c, model: /m, gpus: [0, 1], tensor_parallel_size: 2}
  n2:
    groups: [second, first]
    connection: {address: n2.example}
  n3:
    os: ubuntu-22.04
    connection: {address: n3.example}
"""


def test_merge_order_defaults_groups_node(write_site: Callable[..., Path]) -> None:
    site = load_site(write_site(MERGE_SITE))
    n1, n2, n3 = site.nodes["n1"], site.nodes["n2"], site.nodes["n3"]
    # scalars: the last layer wins; groups in the order the node lists them
    assert n1.reboot_timeout_s == 500 and n2.reboot_timeout_s == 400
    assert n3.reboot_timeout_s == 300 and n3.os == "ubuntu-22.04" and n1.os == "debian-12"
    # maps merge key by key
    assert n1.connection.address == "n1.example" and n1.connection.user == "ubuntu"
    assert n1.tuning.swappiness == 5
    assert n1.tuning.sysctl == {"vm.max_map_count": 9, "net.core.somaxconn": 2,
                                "kernel.pid_max": 3}
    assert n2.tuning.sysctl == {"vm.max_map_count": 1, "net.core.somaxconn": 2,
                                "kernel.pid_max": 2}
    assert n3.tuning.sysctl == {"vm.max_map_count": 1, "net.core.somaxconn": 1}
    # lists replace whole: the node's services replace the group's list
    assert [s.name for s in n1.vllm.services] == ["c"]
    assert n1.vllm.services[0].port == 8000  # not spliced with the group's item 0
    assert n1.vllm.python == "3.11"  # the rest of the group's vllm map still applies
    assert [s.name for s in n2.vllm.services] == ["a", "b"]
    assert n3.vllm.services == []
    assert n1.groups == ["first", "second"] and n2.groups == ["second", "first"]
    assert site.groups == {"first": ["n1", "n2"], "second": ["n1", "n2"]}


def test_list_replacement_can_empty(write_site: Callable[..., Path]) -> None:
    text = MERGE_SITE.replace("    vllm:\n      services:\n        - {name: c, model: /m, "
                              "gpus: [0, 1], tensor_parallel_size: 2}\n",
                              "    vllm:\n      services: []\n")
    assert load_site(write_site(text)).nodes["n1"].vllm.services == []


def test_error_in_defaults_is_reported_once_at_defaults(site_errors: Errors) -> None:
    text = ("defaults:\n  nvidia:\n    branch: latest\n  tuning: {swapines: 1}\n"
            "nodes:\n  a: {connection: {address: a}}\n  b: {connection: {address: b}}\n"
            "  c: {connection: {address: c}}\n")
    lines = site_errors(text)
    assert one(lines, "branch").split(": ")[:2] == [lines[0].split(":")[0] + ":3",
                                                     "defaults.nvidia.branch"]
    assert "defaults.tuning.swapines" in one(lines, "swapines")
    assert not [line for line in lines if "nodes." in line]


def test_cross_field_error_in_defaults_is_reported_once(site_errors: Errors) -> None:
    text = ("defaults:\n  gpus: {count: 1}\n  vllm:\n    services:\n"
            "      - {name: a, model: org/m, gpus: [0]}\n"
            "nodes:\n  a: {connection: {address: a}}\n  b: {connection: {address: b}}\n")
    line = one(site_errors(text), "revision")
    assert "site.yaml:5: defaults.vllm.services[0].revision: " in line


def test_error_in_group_is_reported_at_the_group(site_errors: Errors) -> None:
    text = ("groups:\n  g:\n    gpus: {count: many}\n"
            "nodes:\n  a: {groups: [g], connection: {address: a}}\n"
            "  b: {groups: [g], connection: {address: b}}\n")
    line = one(site_errors(text), "count")
    assert "site.yaml:3: groups.g.gpus.count: " in line


def test_error_overridden_by_node_is_reported_at_the_node(site_errors: Errors) -> None:
    text = ("defaults:\n  nvidia: {branch: 580}\n"
            "nodes:\n  a:\n    connection: {address: a}\n    nvidia: {branch: x}\n"
            "  b: {connection: {address: b}}\n")
    line = one(site_errors(text), "branch")
    assert "site.yaml:6: nodes.a.nvidia.branch" in line


@pytest.mark.parametrize("layer", ["defaults", "groups.g"])
def test_node_only_keys_rejected_in_shared_layers(site_errors: Errors, layer: str) -> None:
    body = "    groups: [g]\n" if layer == "defaults" else "      groups: [g]\n"
    if layer == "defaults":
        text = "defaults:\n" + body.replace("    ", "  ", 1) + "groups:\n  g: {}\n"
    else:
        text = "groups:\n  g:\n" + body
    text += "nodes:\n  a: {groups: [g], connection: {address: a}}\n"
    assert f"{layer}.groups: unknown key" in one(site_errors(text), ".groups: unknown")


# --- site path resolution -------------------------------------------------------------------

def test_site_path_option_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUNODE_SITE", "from-env.yaml")
    assert resolve_site_path("from-option.yaml") == Path("from-option.yaml")


def test_site_path_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUNODE_SITE", "from-env.yaml")
    assert resolve_site_path(None) == Path("from-env.yaml")


def test_site_path_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUNODE_SITE", raising=False)
    assert resolve_site_path(None) == DEFAULT_SITE == Path("inventory/site.yaml")
    monkeypatch.setenv("GPUNODE_SITE", "")
    assert resolve_site_path(None) == DEFAULT_SITE


def test_load_site_follows_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      write_site: Callable[..., Path]) -> None:
    env_site = write_site(NODE, "env.yaml")
    opt_site = write_site(NODE.replace("gpu01", "gpu02"), "opt.yaml")
    (tmp_path / "inventory").mkdir()
    (tmp_path / "inventory" / "site.yaml").write_text(NODE.replace("gpu01", "gpu03"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPUNODE_SITE", raising=False)
    assert list(load_site().nodes) == ["gpu03"]
    monkeypatch.setenv("GPUNODE_SITE", str(env_site))
    assert list(load_site().nodes) == ["gpu01"]
    assert list(load_site(opt_site).nodes) == ["gpu02"]


def test_select_by_node_and_group(example: Path) -> None:
    site = load_site(example)
    assert site.select([]) == list(site.nodes.values())
    for group, members in site.groups.items():
        assert [p.name for p in site.select([group])] == members
    with pytest.raises(SiteError, match="unknown node or group 'nope'"):
        site.select(["nope"])


def test_unknown_group_with_non_string_group_names(site_errors: Errors) -> None:
    text = "groups:\n  0: {}\n" + NODE + "    groups: [gpu]\n"
    one(site_errors(text), "unknown group 'gpu'")


def test_unknown_key_in_site_section(site_errors: Errors) -> None:
    line = one(site_errors("site: {nam: x}\n" + NODE), "site.nam")
    assert "did you mean 'name'" in line and "allowed: name, description" in line


def test_one_line_for_a_bad_union_value(site_errors: Errors) -> None:
    text = NODE + ("    vllm:\n      services:\n        - name: a\n          model: /m\n"
                   "          gpus: [0]\n          extra_args: {x: {y: 1}}\n")
    lines = site_errors(text)
    assert len(lines) == 1, lines
    assert "nodes.gpu01.vllm.services[0].extra_args.x: " in lines[0]


CROSS_FIELD = NODE + ("    vllm:\n      services:\n"
                      "        - {name: a, model: /m, gpus: [0, 1], tensor_parallel_size: 3}\n"
                      "        - {name: b, model: /m, gpus: [0], gpu_memory_utilization: 0.5}\n")


def _action_plugin_node(node: dict) -> Any:
    """The Ansible action plugin's load_node, fed the hostvar `node` as Ansible would."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "playbooks/action_plugins/gpunode_desired.py"
    spec = importlib.util.spec_from_file_location("gpunode_desired_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    action = types.SimpleNamespace(_templar=types.SimpleNamespace(template=lambda v: v))
    return module.load_node(action, {"node": node})


@pytest.mark.parametrize("build", ["model", "action-plugin", "checks"])
def test_a_profile_built_outside_the_loader_gets_the_cross_field_rules(
        site_errors: Errors, build: str) -> None:
    """The action plugin, deploy entry files and checks validate hostvars `node` directly:
    the model raises what the loader reports, every problem with its field path (the
    action plugin as one message, `node.<path>: what` per problem)."""
    from gpunode.checks.expect import resolve_profile

    lines = site_errors(CROSS_FIELD)
    assert len(lines) == 3  # every problem of the node (tp, port, utilization), as before
    node = yaml.safe_load(CROSS_FIELD)["nodes"]["gpu01"] | {"name": "gpu01"}
    with pytest.raises(ValidationError if build != "action-plugin" else ValueError) as info:
        if build == "model":
            NodeProfile.model_validate(node)
        elif build == "action-plugin":
            _action_plugin_node(node)
        else:
            resolve_profile(None, "gpu01", hostvars={"node": node})
    for line in lines:
        assert line.split(": nodes.gpu01.", 1)[1] in str(info.value)


def test_a_node_failing_cross_field_rules_still_counts_for_the_fleet(site_errors: Errors) -> None:
    """pve1's own problem is reported, and vm1 still finds pve1 as its Proxmox host."""
    lines = site_errors(GUEST.replace("    os: debian-12\n", "    os: ubuntu-24.04\n"))
    assert [line.split(": ", 1)[1] for line in lines] == [
        f"nodes.pve1.os: a pve-host runs Proxmox VE on Debian ({' or '.join(PVE_OS)}), "
        "not ubuntu-24.04"]
