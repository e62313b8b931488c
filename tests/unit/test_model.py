"""The typed model: field rules (pydantic) and cross-field rules (check_profile)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from gpunode.model import (
    GpuExpect,
    Hostpci,
    NodeProfile,
    Nvidia,
    ProfileProblems,
    VllmService,
    VmSpec,
    check_profile,
)
from gpunode.model.profile import HUGEPAGE_HEADROOM_MIB


def profile(**fields: Any) -> NodeProfile:
    """The profile, also where a cross-field rule fails: the rule tests below read
    check_profile's list (test_model_raises_the_cross_field_problems: the model raises)."""
    data: dict[str, Any] = {"name": "gpu01", "connection": {"address": "h"},
                            "gpus": {"count": 2}}
    data.update(fields)
    try:
        return NodeProfile.model_validate(data)
    except ValidationError as exc:
        cross = [e["ctx"]["error"] for e in exc.errors()
                 if isinstance((e.get("ctx") or {}).get("error"), ProfileProblems)]
        if not cross:
            raise
        return cross[0].profile


def svc(name: str = "a", gpus: list[int] | None = None, **fields: Any) -> dict[str, Any]:
    return {"name": name, "model": "/models/m", "gpus": gpus if gpus is not None else [0],
            **fields}


def problems(p: NodeProfile) -> dict[str, str]:
    return {pr.path: pr.message for pr in check_profile(p)}


def guest(**vm: Any) -> NodeProfile:
    spec = {"pve_node": "pve1", "vmid": 201, "template_vmid": 9000, **vm}
    return profile(kind="pve-guest", vm=spec)


def test_minimal_profile_has_documented_defaults() -> None:
    p = profile()
    assert p.nvidia.branch == 580
    assert p.nvidia.open_kernel_modules is True
    assert p.connection.port == 22
    assert p.os == "ubuntu-24.04" and p.distro == "ubuntu2404"
    assert check_profile(p) == []


def all_models() -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []
    todo: list[type[BaseModel]] = [NodeProfile]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.append(model)
        for f in model.model_fields.values():
            todo.extend(_models_in(f.annotation))
    return seen


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def test_every_model_forbids_extra_keys_and_documents_every_field() -> None:
    models = all_models()
    assert len(models) > 10
    for model in models:
        assert model.model_config.get("extra") == "forbid", model.__name__
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ValidationError, match="extra"):
        profile(tunning={})


@pytest.mark.parametrize("os_name,distro", [("ubuntu-22.04", "ubuntu2204"),
                                            ("ubuntu-24.04", "ubuntu2404"),
                                            ("debian-12", "debian12")])
def test_distro_names(os_name: str, distro: str) -> None:
    assert profile(os=os_name).distro == distro


def test_tp_size_must_match_gpu_count() -> None:
    p = profile(vllm={"services": [svc(gpus=[0, 1], tensor_parallel_size=3)]})
    msg = problems(p)["vllm.services[0].tensor_parallel_size"]
    assert "= 3 GPU(s), but gpus lists 2 [0, 1]" in msg
    # two GPUs with TP=1 would run one GPU while sizing assumed two replicas
    p = profile(vllm={"services": [svc(gpus=[0, 1], tensor_parallel_size=1)]})
    assert "set tensor_parallel_size to 2" in problems(p)["vllm.services[0].tensor_parallel_size"]


def test_model_raises_the_cross_field_problems() -> None:
    """NodeProfile itself runs check_profile: all problems, each with its field path."""
    data = {"name": "gpu01", "connection": {"address": "h"}, "gpus": {"count": 2},
            "vllm": {"services": [svc(gpus=[0, 1], tensor_parallel_size=3),
                                  svc("b", gpus=[2], port=8001)]}}
    with pytest.raises(ValidationError) as info:
        NodeProfile.model_validate(data)
    [error] = info.value.errors()
    found = error["ctx"]["error"].problems
    assert [pr.path for pr in found] == ["vllm.services[0].tensor_parallel_size",
                                         "vllm.services[1].gpus"]
    assert found == check_profile(error["ctx"]["error"].profile)
    for pr in found:
        assert f"{pr.path}: {pr.message}" in str(info.value)


def test_tp_size_that_divides_is_fine() -> None:
    assert check_profile(profile(vllm={"services": [svc(gpus=[0, 1],
                                                        tensor_parallel_size=2)]})) == []


def test_service_gpus_must_exist() -> None:
    p = profile(vllm={"services": [svc(gpus=[1, 2], tensor_parallel_size=2)]})
    msg = problems(p)["vllm.services[0].gpus"]
    assert "[2]" in msg and "gpus.count is 2" in msg


def test_service_gpu_listed_twice() -> None:
    assert "vllm.services[0].gpus" in problems(profile(vllm={"services": [svc(gpus=[0, 0])]}))


def test_ports_unique_per_node() -> None:
    p = profile(vllm={"services": [svc("a", [0], gpu_memory_utilization=0.4),
                                   svc("b", [1], gpu_memory_utilization=0.4)]})
    msg = problems(p)["vllm.services[1].port"]
    assert "8000" in msg and "'a'" in msg


def test_duplicate_service_names() -> None:
    p = profile(vllm={"services": [svc("a", [0], port=8001), svc("a", [1], port=8002)]})
    assert "vllm.services[1].name" in problems(p)


@pytest.mark.parametrize("first,second,bad", [(0.6, 0.4, False), (0.6, 0.5, True),
                                              (0.5, 0.5, False), (0.92, 0.1, True)])
def test_summed_gpu_memory_utilization(first: float, second: float, bad: bool) -> None:
    p = profile(vllm={"services": [svc("a", [0, 1], tensor_parallel_size=2, port=8001,
                                       gpu_memory_utilization=first),
                                   svc("b", [1], port=8002, gpu_memory_utilization=second)]})
    found = problems(p)
    assert ("vllm.services" in found) is bad
    if bad:
        assert "GPU 1" in found["vllm.services"] and "GPU 0" not in found["vllm.services"]


def test_hf_model_needs_revision_local_path_does_not() -> None:
    p = profile(vllm={"services": [svc("a", [0], model="org/name", port=8001),
                                   svc("b", [1], model="/srv/models/x", port=8002)]})
    assert list(problems(p)) == ["vllm.services[0].revision"]


@pytest.mark.parametrize("model", ["org/name", "/abs/path", "Qwen/Qwen2.5-1.5B-Instruct", "gpt2"])
def test_model_reference_accepted(model: str) -> None:
    VllmService(name="a", model=model, gpus=[0])


@pytest.mark.parametrize("model", ["relative/path/too/deep", "org/na me", "", "./x", "org/"])
def test_model_reference_rejected(model: str) -> None:
    with pytest.raises(ValidationError, match="repo id"):
        VllmService(name="a", model=model, gpus=[0])


@pytest.mark.parametrize("key", ["VLLM_API_KEY", "HF_TOKEN"])
def test_secrets_never_in_extra_env(key: str) -> None:
    with pytest.raises(ValidationError, match="api_key_file"):
        VllmService(name="a", model="/m", gpus=[0], extra_env={key: "x"})


def test_dcgm_exporter_needs_a_dcgm_version_it_is_built_for() -> None:
    with pytest.raises(ValidationError, match="no dcgm-exporter release is known for DCGM 4.4.3"):
        profile(dcgm={"enabled": True, "version": "4.4.3", "exporter": True})
    profile(dcgm={"enabled": True, "version": "4.4.3"})  # DCGM alone: any version


def test_pcie_hostpci_needs_q35() -> None:
    p = guest(machine="pc", hostpci=[{"mapping": "a6000-0"}])
    assert "q35" in problems(p)["vm.hostpci[0].pcie"]
    assert "vm.hostpci[0].pcie" not in problems(guest(hostpci=[{"mapping": "a6000-0"}]))
    ok = guest(machine="pc", hostpci=[{"mapping": "a6000-0", "pcie": False}])
    assert "vm.hostpci[0].pcie" not in problems(ok)


@pytest.mark.parametrize("address,valid", [("0000:41:00.0", True), ("0000:c1:00", True),
                                           ("0000:C1:00.0", False), ("41:00.0", False),
                                           ("0000:41:00.8", False)])
def test_hostpci_address_format(address: str, valid: bool) -> None:
    if valid:
        Hostpci(address=address)
    else:
        with pytest.raises(ValidationError):
            Hostpci(address=address)


def test_hostpci_needs_exactly_one_of_mapping_or_address() -> None:
    for fields in ({}, {"mapping": "m", "address": "0000:41:00.0"}):
        with pytest.raises(ValidationError, match="exactly one"):
            Hostpci(**fields)


def test_vm_needs_exactly_one_source() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        VmSpec(pve_node="p", vmid=200)
    with pytest.raises(ValidationError, match="exactly one"):
        VmSpec(pve_node="p", vmid=200, template_vmid=9000, cloud_image="local:img")


@pytest.mark.parametrize("memory,bad", [(98304, False), (99000, True), (65536 + 512, True)])
def test_vm_memory_multiple_of_1024_with_1g_hugepages(memory: int, bad: bool) -> None:
    assert ("vm.memory_mib" in problems(guest(memory_mib=memory, hugepages="1024"))) is bad
    assert "vm.memory_mib" not in problems(guest(memory_mib=memory, hugepages="2"))


def test_passthrough_needs_ovmf() -> None:
    assert "vm.bios" in problems(guest(bios="seabios", hostpci=[{"mapping": "m"}]))


@pytest.mark.parametrize("size,count,memory,bad", [
    ("1G", 8, 16384, False),            # exactly the headroom left
    ("1G", 9, 16384, True),
    ("2M", 4097, 16384, True),          # 8194 MiB reserved, 8190 left
    ("2M", 4096, 16384, False),
])
def test_hugepages_leave_ram(size: str, count: int, memory: int, bad: bool) -> None:
    assert HUGEPAGE_HEADROOM_MIB == 8192
    p = profile(memory_mib=memory, tuning={"hugepages": {"size": size, "count": count}})
    found = problems(p)
    assert ("tuning.hugepages.count" in found) is bad
    if bad:
        assert str(memory) in found["tuning.hugepages.count"]


def test_hugepages_need_known_ram() -> None:
    p = profile(tuning={"hugepages": {"size": "1G", "count": 4}})
    assert "memory_mib" in problems(p)["tuning.hugepages.count"]
    # a guest's RAM is its VM memory
    g = guest(memory_mib=65536)
    g = g.model_copy(update={"tuning": g.tuning.model_copy(
        update={"hugepages": g.tuning.hugepages.model_copy(update={"count": 4})})})
    assert "tuning.hugepages.count" not in problems(g)


@pytest.mark.parametrize("kind,section,path", [("bare-metal", "vm", "vm"),
                                               ("pve-guest", None, "vm"),
                                               ("bare-metal", "pve", "pve")])
def test_kind_sections(kind: str, section: str | None, path: str) -> None:
    fields: dict[str, Any] = {"kind": kind}
    if section == "vm":
        fields["vm"] = {"pve_node": "p", "vmid": 200, "template_vmid": 9000}
    if section == "pve":
        fields["pve"] = {}
    assert path in problems(profile(**fields))


def test_ubuntu_archive_only_on_ubuntu() -> None:
    assert "nvidia.source" in problems(profile(os="debian-12",
                                               nvidia={"source": "ubuntu-archive"}))
    assert "nvidia.source" not in problems(profile(os="ubuntu-22.04",
                                                   nvidia={"source": "ubuntu-archive"}))


def test_vllm_needs_branch_580() -> None:
    p = profile(nvidia={"branch": 570}, vllm={"services": [svc()]})
    assert "nvidia.branch" in problems(p)


def test_driver_version_in_branch() -> None:
    Nvidia(branch=580, version="580.95.05")
    with pytest.raises(ValidationError, match="not in branch"):
        Nvidia(branch=580, version="570.86.15")


def test_vllm_python_at_least_311() -> None:
    with pytest.raises(ValidationError, match="3.11"):
        profile(vllm={"python": "3.10"})


def test_gpu_expectation_lengths() -> None:
    GpuExpect(count=2, pci_addresses=["0000:41:00.0", "0000:c1:00.0"])
    with pytest.raises(ValidationError, match="count is 2"):
        GpuExpect(count=2, pci_addresses=["0000:41:00.0"])


@pytest.mark.parametrize("services,placement,explicit,expected", [
    ([], "gpu-local", None, True),
    ([svc()], "gpu-local", None, False),
    ([svc()], "none", None, True),
    ([svc()], "gpu-local", True, True),
])
def test_numa_balancing_follows_pinning(services: list[dict[str, Any]], placement: str,
                                        explicit: bool | None, expected: bool) -> None:
    p = profile(vllm={"services": services},
                tuning={"cpu_placement": placement, "numa_balancing": explicit})
    assert p.numa_balancing is expected


def test_sysctl_keys_checked() -> None:
    profile(tuning={"sysctl": {"vm.max_map_count": 1048576, "net.core.somaxconn": "4096"}})
    with pytest.raises(ValidationError):
        profile(tuning={"sysctl": {"NotASysctl": 1}})


MIRROR_INDEX = "http://10.0.2.2:18087/pypi/simple/"


@pytest.mark.parametrize(("os", "python"), [("debian-12", "3.12"), ("ubuntu-24.04", "3.11"),
                                            ("ubuntu-22.04", "3.12")])
def test_a_python_the_os_lacks_is_refused_when_uv_cannot_download_one(os: str,
                                                                      python: str) -> None:
    p = profile(os=os, vllm={"python": python, "index_url": MIRROR_INDEX})
    message = problems(p)["vllm.python"]
    assert f"{os} ships Python" in message and "vllm.python_mirror" in message
    if os == "ubuntu-22.04":  # 3.10 is too old for vLLM: a mirror is the only way
        assert "use python" not in message
    else:
        assert 'use python "3.1' in message


def test_the_os_python_or_a_python_mirror_or_downloads_are_accepted() -> None:
    for os, python in (("debian-12", "3.11"), ("ubuntu-24.04", "3.12")):
        assert "vllm.python" not in problems(
            profile(os=os, vllm={"python": python, "index_url": MIRROR_INDEX}))
    mirrored = {"python": "3.12", "index_url": MIRROR_INDEX,
                "python_mirror": "http://10.0.2.2:18087/python-build-standalone"}
    assert "vllm.python" not in problems(profile(os="ubuntu-22.04", vllm=mirrored))
    # no index override: uv downloads the interpreter itself
    assert "vllm.python" not in problems(profile(os="ubuntu-22.04", vllm={"python": "3.12"}))


def test_extra_env_takes_only_the_vllm_variables_the_release_reads() -> None:
    """vLLM warns about an unknown VLLM_* name and goes on without it: a typo, or a name
    such as VLLM_HTTP_PORT (gpunode's units used to set it), would silently do nothing."""
    with pytest.raises(ValidationError, match="VLLM_HTTP_PORT is not a variable vLLM 0.33.0 "
                                              "reads"):
        VllmService(name="a", model="/m", gpus=[0], extra_env={"VLLM_HTTP_PORT": "8000"})
    with pytest.raises(ValidationError, match="did you mean 'VLLM_LOGGING_LEVEL'"):
        VllmService(name="a", model="/m", gpus=[0], extra_env={"VLLM_LOGING_LEVEL": "x"})
    VllmService(name="a", model="/m", gpus=[0], extra_env={"VLLM_LOGGING_LEVEL": "DEBUG"})


def test_the_service_environment_holds_no_variable_vllm_does_not_read() -> None:
    from gpunode.core import desired
    from gpunode.core.vllm_flags import ENV_VARS

    p = profile(vllm={"services": [svc("a", port=8001, host="0.0.0.0")]})
    env = desired.vllm_environment(p.vllm.model_dump(), p.vllm.services[0].model_dump())
    unknown = [k for k in env if k.startswith("VLLM_") and k not in ENV_VARS]
    assert unknown == []



def test_an_nccl_release_the_table_knows_is_refused_for_a_cuda_it_is_not_built_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """libnccl2=<nccl>-1+cuda<cuda> is formed from both fields; a release NVIDIA never built
    for the pinned CUDA used to fail deep in apt."""
    from gpunode.model.parts import NCCL_BUILDS, nccl_cudas

    known = NCCL_BUILDS["13.0"][0]
    cudas = nccl_cudas(known)
    other = next(c for c in ("12.4", "11.8", "13.9") if c not in cudas)
    msg = problems(profile(cuda={"version": other},
                           nccl={"enabled": True, "version": known}))["nccl.version"]
    assert f"NCCL {known} is not built for CUDA {other}" in msg
    assert f"libnccl2={known}-1+cuda{other} does not exist" in msg
    assert f"builds it for CUDA {', '.join(cudas)}" in msg
    assert f"NCCL builds for CUDA {other}: none known" in msg
    # the NCCL versions that exist for the pinned CUDA are listed
    monkeypatch.setitem(NCCL_BUILDS, other, ("2.20.3", "2.21.5"))
    msg = problems(profile(cuda={"version": other},
                           nccl={"enabled": True, "version": known}))["nccl.version"]
    assert f"NCCL builds for CUDA {other}: 2.20.3, 2.21.5. Change" in msg
    # a pair the table has, NCCL off, or a release the table does not know: no problem
    for cuda in cudas:
        assert "nccl.version" not in problems(
            profile(cuda={"version": cuda}, nccl={"enabled": True, "version": known}))
    assert "nccl.version" not in problems(
        profile(cuda={"version": other}, nccl={"enabled": False, "version": known}))
    assert "nccl.version" not in problems(
        profile(cuda={"version": other}, nccl={"enabled": True, "version": "2.99.1"}))
