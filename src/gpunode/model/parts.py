"""The parts of a node profile. Every field carries a description: it is the documentation
of the site file (``gpunode schema`` publishes it as JSON Schema)."""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

from gpunode.core.paths import VLLM_HOME
from gpunode.model.types import (
    VOLID,
    ControlPath,
    DataDir,
    HostName,
    HttpsUrl,
    IpAddress,
    PosixName,
    PrefixDir,
    Quoted,
    Revision,
    Size,
    SysctlValue,
    Url,
    abs_path,
)

PCI_ADDRESS = r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}(\.[0-7])?$"
GPU_UUID = r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
SERVICE_NAME = r"^[a-z0-9][a-z0-9-]{0,39}$"
SHA256 = r"^[0-9a-f]{64}$"
#: Option and variable names that carry secrets: refused in extra_args / extra_env.
#: A name ending in token/secret/password/api-key/access-key, or containing secret or
#: password anywhere (vLLM's --hf-token, HF_TOKEN, HUGGING_FACE_HUB_TOKEN, S3_SECRET_ACCESS_KEY,
#: ...); vLLM's thresholds such as *_TOKEN_THRESHOLD or --return-tokens-as-token-ids pass.
SECRET_FLAG = re.compile(r"(^|-)(token|api-key|access-key)$|secret|passw")
SECRET_ENV = re.compile(r"(^|_)(TOKEN|API_KEY|ACCESS_KEY|ACCESS_KEY_ID)$|SECRET|PASSW")
#: Environment gpunode sets itself (desired.vllm_environment and the placement drop-in).
MANAGED_ENV = frozenset({"HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                         "TRANSFORMERS_CACHE", "CUDA_DEVICE_ORDER", "CUDA_VISIBLE_DEVICES",
                         "NVIDIA_VISIBLE_DEVICES", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK",
                         "PYTHONUNBUFFERED", "CREDENTIALS_DIRECTORY", "VLLM_CACHE_ROOT",
                         "XDG_CACHE_HOME", "HOME", "PATH", "PYTHONPATH", "PYTHONHOME",
                         "PYTHONSTARTUP"})
#: Variables that change which code a process loads.
RISKY_ENV = re.compile(r"^(LD_|GLIBC_TUNABLES$|GCONV_PATH$|MALLOC_|PYTHONPATH$|BASH_ENV$|ENV$)",
                       re.IGNORECASE)
#: vLLM options that would undo what the profile guarantees, with the reason.
BYPASS_FLAGS = {
    "download-dir": "models live in vllm.model_cache (HF_HOME), which the units may write",
    "uds": "the service listens on its host and port, where gpunode checks its health",
    "allowed-local-media-path": "it lets API clients read files on the host",
}
#: vLLM options that multiply the GPUs one server uses (with tensor_parallel_size).
PARALLEL_FLAGS = ("pipeline-parallel-size", "data-parallel-size")
MAPPING_NAME = r"^[a-zA-Z][a-zA-Z0-9_-]{0,127}$"
#: Names a service is served under (/v1/models): model-id characters, org/name allowed.
SERVED_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"
SSH_PUBLIC_KEY = (r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh.com|"
                  r"sk-ecdsa-sha2-nistp256@openssh.com) [A-Za-z0-9+/]+={0,3}( [A-Za-z0-9._@+:= -]*)?$")
IPCONFIG = (r"^(ip=(dhcp|[0-9.]+/[0-9]{1,2})(,gw=[0-9.]+)?)?(,?ip6=(dhcp|auto|[0-9a-fA-F:]+/[0-9]{1,3})"
            r"(,gw6=[0-9a-fA-F:]+)?)?$")

OsName = Literal["ubuntu-22.04", "ubuntu-24.04", "debian-12", "debian-13"]
def distro_of(os_name: str) -> str:
    """NVIDIA's repository name for an OS: ubuntu2204, ubuntu2404, debian12."""
    return os_name.replace("-", "").replace(".", "")


#: The Python 3 each OS ships as python3 (its distribution package).
OS_PYTHON: dict[str, str] = {"ubuntu-22.04": "3.10", "ubuntu-24.04": "3.12", "debian-12": "3.11",
                             "debian-13": "3.13"}
#: The Debian releases Proxmox VE 8 and 9 are built on.
PVE_OS = ("debian-12", "debian-13")
NodeKind = Literal["bare-metal", "pve-guest", "pve-host"]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]


class Strict(BaseModel):
    """Base for every model: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True)


class Connection(Strict):
    address: HostName = Field(description="Host name or IP address gpunode connects to over SSH.")
    port: Port = Field(22, description="SSH port.")
    user: PosixName = Field("root", description="SSH user.")
    key: ControlPath | None = Field(None, description="Path to the SSH private key (on the control machine).")
    become: StrictBool = Field(True, description="Use sudo for changes (needed unless user is root).")


class GpuExpect(Strict):
    model: str = Field("NVIDIA RTX A6000", pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._()+-]{0,95}$",
                       description="GPU product name as nvidia-smi prints it.")
    count: StrictInt = Field(0, ge=0, le=16, description="Number of GPUs the node must have.")
    pci_addresses: list[Annotated[str, Field(pattern=PCI_ADDRESS)]] = Field(
        default_factory=list,
        description="Optional explicit PCI addresses, lower-case dddd:bb:ss[.f], in GPU index order.",
    )
    uuids: list[Annotated[str, Field(pattern=GPU_UUID)]] = Field(
        default_factory=list, description="Optional expected GPU UUIDs, in GPU index order."
    )

    @model_validator(mode="after")
    def _lengths(self) -> GpuExpect:
        for field in ("pci_addresses", "uuids"):
            values = getattr(self, field)
            if values and len(values) != self.count:
                raise ValueError(f"{field} lists {len(values)} entries but count is {self.count}")
        return self


class ClockRange(Strict):
    min_mhz: StrictInt = Field(ge=0, description="Lower bound of locked graphics clocks (MHz).")
    max_mhz: StrictInt = Field(ge=0, description="Upper bound of locked graphics clocks (MHz).")

    @model_validator(mode="after")
    def _order(self) -> ClockRange:
        if self.min_mhz > self.max_mhz:
            raise ValueError("min_mhz must not exceed max_mhz")
        return self


class AppClocks(Strict):
    memory_mhz: StrictInt = Field(ge=0, description="Application memory clock (MHz).")
    graphics_mhz: StrictInt = Field(ge=0, description="Application graphics clock (MHz).")


class GpuSettings(Strict):
    persistence: StrictBool = Field(True, description="Persistence mode, kept by nvidia-persistenced.")
    power_limit_w: StrictInt | None = Field(
        None, ge=50, le=1000, description="Power limit in watts (None: leave the default)."
    )
    ecc: StrictBool | None = Field(
        None, description="ECC on/off (None: leave as is). A change needs a reboot to apply."
    )
    locked_clocks: ClockRange | None = Field(None, description="Locked graphics clocks (-lgc).")
    application_clocks: AppClocks | None = Field(None, description="Application clocks (-ac).")
    compute_mode: Literal["DEFAULT", "EXCLUSIVE_PROCESS", "PROHIBITED"] = Field(
        "DEFAULT", description="GPU compute mode."
    )


class Nvidia(Strict):
    source: Literal["cuda-repo", "ubuntu-archive"] = Field(
        "cuda-repo",
        description="Driver source: NVIDIA's CUDA apt repository (all OSes) or the Ubuntu "
        "archive's -server packages with Canonical-signed prebuilt modules (Ubuntu only).",
    )
    branch: StrictInt = Field(580, ge=470, le=999, description="Driver branch (580 = R580 LTSB).")
    version: str | None = Field(
        None,
        pattern=r"^\d{3}\.\d{1,3}(\.\d{1,3})?$",
        description="Exact driver version to pin, e.g. 580.95.05 (None: newest of the branch).",
    )
    open_kernel_modules: StrictBool = Field(True, description="Open GPU kernel modules (NVIDIA's default).")
    compute_only: StrictBool = Field(True, description="Compute-only (headless) install, no desktop parts.")
    hold: StrictBool = Field(True, description="apt-mark hold the driver packages.")
    repo_url: Url = Field(
        "https://developer.download.nvidia.com/compute/cuda/repos",
        description="Base URL of the CUDA repository (override for mirrors and the lab); "
        "<distro>/x86_64/ is appended.",
    )
    debian_mirror: Url = Field(
        "http://deb.debian.org/debian",
        description="Debian archive (mirror) whose contrib component gpunode enables on "
        "debian-12 with source cuda-repo: the driver's DKMS packages depend on contrib "
        "packages (nvidia-kernel-common).",
    )
    keyring_sha256: str | None = Field(
        None,
        pattern=SHA256,
        description="SHA-256 of cuda-keyring_1.1-1_all.deb at repo_url (None: the published "
        "upstream checksum for the node's distro).",
    )
    secure_boot: Literal["stop", "mok"] = Field(
        "stop",
        description="With Secure Boot on and DKMS modules: stop with guidance, or proceed "
        "expecting a MOK enrolment.",
    )
    settings: GpuSettings = Field(default_factory=GpuSettings, description="nvidia-smi settings.")

    @model_validator(mode="after")
    def _version_in_branch(self) -> Nvidia:
        if self.version and not self.version.startswith(f"{self.branch}."):
            raise ValueError(f"version {self.version} is not in branch {self.branch}")
        return self


class Cuda(Strict):
    enabled: StrictBool = Field(False, description="Install the host CUDA toolkit (vLLM does not need it).")
    version: str = Field("13.0", pattern=r"^\d+\.\d+$", description="CUDA major.minor.")


#: libnccl2 builds NVIDIA's CUDA repository publishes, per CUDA major.minor (the Debian
#: version is <nccl>-1+cuda<cuda>). Each NCCL release listed here is listed for every CUDA it
#: is built for; a release not listed at all is not refused (this table cannot be complete),
#: the deploy checks the node's own apt metadata before installing. Sources:
#: research/nvidia-repo.md §4.3 (2.27.7, 2.28.7, 2.28.9 for CUDA 13.0, from pinned
#: installs); 2.28.3-1+cuda13.0 from NVIDIA-repo pins in public Dockerfiles and the H100
#: capture's /usr/include/nccl.h beside libcudart.so.13 (tests/fixtures/nvidia/h100_580.159.04);
#: the CUDA 12.9 builds of the same four releases from public install scripts pinning
#: libnccl2=<v>-1+cuda12.9 from the ubuntu2204 repository (2.28.3: NVIDIA's
#: nccl_2.28.3-1+cuda12.9 archive of the same build). No other CUDA build of these four
#: releases was found; add one here (with its source) when the repository shows it.
NCCL_BUILDS: dict[str, tuple[str, ...]] = {
    "12.9": ("2.27.7", "2.28.3", "2.28.7", "2.28.9"),
    "13.0": ("2.27.7", "2.28.3", "2.28.7", "2.28.9"),
}


def nccl_cudas(nccl: str) -> list[str]:
    """The CUDA versions NCCL_BUILDS knows a build of `nccl` for (empty: unknown release)."""
    return [cuda for cuda, versions in NCCL_BUILDS.items() if nccl in versions]


class Nccl(Strict):
    enabled: StrictBool = Field(False, description="Install host NCCL (libnccl2, libnccl-dev).")
    version: str = Field("2.28.3", pattern=r"^\d+\.\d+\.\d+$", description="NCCL version; "
                         "the package version is <version>-1+cuda<cuda.version>, a build "
                         "NVIDIA publishes for that CUDA.")


class Cudnn(Strict):
    enabled: StrictBool = Field(False, description="Install host cuDNN 9 for the CUDA major.")
    version: str = Field("9.15.0.58", pattern=r"^9\.\d+\.\d+\.\d+$", description="cuDNN version.")


class ContainerToolkit(Strict):
    enabled: StrictBool = Field(False, description="Install the NVIDIA Container Toolkit.")
    version: str = Field("1.18.0", pattern=r"^\d+\.\d+\.\d+(~rc\.\d+)?$",
                         description="Toolkit version (package version <version>-1).")
    runtimes: list[Literal["docker", "containerd", "podman", "crio"]] = Field(
        default_factory=list,
        description="Runtimes to configure (podman uses CDI only; its config is not touched).",
    )
    cdi: StrictBool = Field(True, description="Keep a CDI spec of the GPUs: from toolkit 1.18 "
                            "its nvidia-cdi-refresh units write /var/run/cdi/nvidia.yaml "
                            "(gpunode enables them); before, nvidia-ctk cdi generate writes "
                            "/etc/cdi/nvidia.yaml.")
    repo_url: Url = Field(
        "https://nvidia.github.io/libnvidia-container/stable/deb",
        description="Container toolkit repository (when not served from repo_url's mirror).",
    )


#: The dcgm-exporter release built for each DCGM 4 release: the newest of NVIDIA's
#: dcgm-exporter tags `<dcgm>-<exporter>` (github.com/NVIDIA/dcgm-exporter, e.g.
#: 4.4.2-4.7.1). Its package, datacenter-gpu-manager-exporter <exporter>-1, needs that
#: exact DCGM ("Run DCGM Exporter with the DCGM version paired with that exporter release").
DCGM_EXPORTER = {"4.0.0": "4.0.1", "4.1.1": "4.0.4", "4.2.0": "4.1.0", "4.2.3": "4.2.0",
                 "4.3.1": "4.4.0", "4.4.0": "4.5.0", "4.4.1": "4.6.0", "4.4.2": "4.7.1",
                 "4.5.1": "4.8.0", "4.5.2": "4.8.1", "4.5.3": "4.8.2"}


class Dcgm(Strict):
    enabled: StrictBool = Field(False, description="Install DCGM 4 (datacenter-gpu-manager-4).")
    version: str = Field("4.4.2", pattern=r"^\d+\.\d+\.\d+$", description="DCGM version.")
    exporter: StrictBool = Field(False, description="Also install dcgm-exporter "
                                 "(datacenter-gpu-manager-exporter), at the release built for "
                                 "this DCGM version.")

    @model_validator(mode="after")
    def _exporter_known(self) -> Dcgm:
        if self.exporter and self.version not in DCGM_EXPORTER:
            raise ValueError(f"no dcgm-exporter release is known for DCGM {self.version} "
                             f"(known: {', '.join(DCGM_EXPORTER)})")
        return self


class Hugepages(Strict):
    size: Literal["2M", "1G"] = Field("2M", description="Huge page size.")
    count: StrictInt = Field(0, ge=0, description="Pages to reserve (2M at runtime, 1G on the kernel "
                       "command line). vLLM does not use hugetlbfs: keep 0 on serving nodes.")


class Limits(Strict):
    nofile: StrictInt = Field(1048576, ge=1024, description="LimitNOFILE for vLLM units.")
    memlock: Literal["infinity"] | Size = Field(
        "infinity", description="LimitMEMLOCK for vLLM units: infinity, bytes, or a size with "
        "K, M, G or T (powers of 1024).")


IoScheduler = Literal["none", "mq-deadline", "kyber", "bfq"]


class BlockIo(Strict):
    """Block devices' I/O scheduler and read-ahead (udev rules, applied at once and at
    every boot). Model loads are long sequential reads of safetensors shards."""

    enabled: StrictBool = Field(True, description="Write and apply the udev rules.")
    nvme_scheduler: IoScheduler = Field(
        "none", description="NVMe namespaces: the drive orders its own queues.")
    other_scheduler: IoScheduler = Field(
        "mq-deadline", description="Other disks (SATA/SAS sd*, virtio vd*, xvd*).")
    read_ahead_kb: StrictInt = Field(
        4096, ge=0, le=65536, description="Read-ahead of every such disk in KiB (kernel "
        "default 128): larger sequential reads while a model's weights load.")


SYSCTL_KEY = r"^[a-z0-9_]+(\.[a-zA-Z0-9_/\-]+)+$"
#: sysctls that name a program the kernel runs as root: never from a site.
SYSCTL_PROGRAMS = frozenset({"kernel.modprobe", "kernel.hotplug", "kernel.poweroff_cmd",
                             "kernel.core_pattern", "fs.suid_dumpable"})
#: sysctls with a typed field of their own.
SYSCTL_MANAGED = {"vm.swappiness": "tuning.swappiness",
                  "kernel.numa_balancing": "tuning.numa_balancing",
                  "vm.nr_hugepages": "tuning.hugepages"}


class Tuning(Strict):
    profile: Literal["auto", "accelerator-performance", "throughput-performance",
                     "virtual-guest", "none"] = Field(
        "auto", description="Tuned-style profile; auto = accelerator-performance on bare metal, "
        "virtual-guest in VMs.")
    governor: Literal["performance", "schedutil", "ondemand", "powersave"] | None = Field(
        "performance", description="CPU frequency governor where cpufreq exists (VMs: skipped).")
    numa_balancing: StrictBool | None = Field(
        None, description="kernel.numa_balancing; None = off when services are pinned.")
    thp: Literal["always", "madvise", "never"] = Field("madvise", description="THP mode.")
    thp_defrag: Literal["always", "defer", "defer+madvise", "madvise", "never"] = Field(
        "madvise", description="THP defrag mode.")
    hugepages: Hugepages = Field(default_factory=Hugepages, description="Reserved huge pages.")
    sysctl: dict[Annotated[str, Field(pattern=SYSCTL_KEY, max_length=128)],
                 SysctlValue | StrictInt] = Field(
        default_factory=dict, description="Extra sysctls (merged over gpunode's defaults).")
    swappiness: StrictInt = Field(10, ge=0, le=200, description="vm.swappiness.")
    block_io: BlockIo = Field(default_factory=BlockIo,
                              description="I/O scheduler and read-ahead per disk class.")
    serving_sysctls: StrictBool = Field(
        True, description="Socket sysctls for many concurrent HTTP streams (accept and SYN "
        "backlogs, input queue, ephemeral port range with the vLLM ports reserved out of it, "
        "TCP buffer ceilings, no slow start after idle); each value in `sysctl` wins.")

    @field_validator("sysctl")
    @classmethod
    def _sysctl_keys(cls, value: dict[str, object]) -> dict[str, object]:
        for key in value:
            if key in SYSCTL_PROGRAMS:
                raise ValueError(f"{key} names a program the kernel runs as root (or lets "
                                 "root-owned crashes dump); it is not set from a site")
            if key in SYSCTL_MANAGED:
                raise ValueError(f"{key} has its own field: {SYSCTL_MANAGED[key]}")
        return value
    limits: Limits = Field(default_factory=Limits, description="Resource limits for vLLM units.")
    irqbalance: Literal["default", "ban-service-cpus", "disabled"] = Field(
        "ban-service-cpus", description="irqbalance policy: keep IRQs off pinned service CPUs.")
    cpu_placement: Literal["gpu-local", "none"] = Field(
        "gpu-local", description="Pin vLLM services to their GPUs' local CPUs and NUMA node.")


ScalarArg = Quoted | StrictInt | float | bool


class VllmService(Strict):
    name: str = Field(pattern=SERVICE_NAME, description="Service name (unit vllm@<name>).")
    model: str = Field(description="Hugging Face repo id (org/name) or absolute local path.")
    revision: Revision | None = Field(
        None, description="Pinned model revision: the 40-hex-digit commit hash (required for "
        "repo ids).")
    served_names: list[Annotated[str, Field(pattern=SERVED_NAME)]] = Field(default_factory=list,
                                    description="Names served on /v1/models (default: name).")
    gpus: list[Annotated[StrictInt, Field(ge=0)]] = Field(
        min_length=1, description="GPU indices on the node this service uses.")
    tensor_parallel_size: StrictInt = Field(1, ge=1, description="Tensor-parallel size.")
    host: IpAddress = Field("127.0.0.1", description="Listen address (an IP address; "
                            "0.0.0.0 or :: for every interface).")
    port: Port = Field(8000, description="Listen port.")
    gpu_memory_utilization: StrictFloat = Field(0.92, gt=0, le=1, description="Fraction of each GPU.")
    max_model_len: StrictInt | None = Field(None, ge=16, description="Context length.")
    max_num_seqs: StrictInt | None = Field(None, ge=1, description="Max concurrent sequences.")
    quantization: Literal["awq", "awq_marlin", "gptq", "gptq_marlin", "fp8", "bitsandbytes",
                          "compressed-tensors"] | None = Field(None, description="Quantization.")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(
        "auto", description="KV cache dtype.")
    dtype: Literal["auto", "bfloat16", "float16", "half"] = Field("auto", description="dtype.")
    extra_args: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]*$")],
                     ScalarArg | list[ScalarArg]] = Field(
        default_factory=dict, description="Further vllm serve options (YAML config keys).")
    extra_env: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")],
                    Quoted] = Field(
        default_factory=dict, description="Extra environment variables.")
    api_key_file: ControlPath | None = Field(
        None, description="File on the control machine holding the API key (copied into the "
        "unit's credentials; never on a command line).")

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        if value.startswith("/"):
            return abs_path(value)
        if not re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}",
                            value):
            raise ValueError("must be a Hugging Face repo id like org/name (letters, digits, "
                             ". _ -) or an absolute path")
        return value

    @field_validator("extra_args")
    @classmethod
    def _known_args(cls, value: dict[str, object]) -> dict[str, object]:
        from gpunode.core.vllm_flags import SERVE_FLAGS, VLLM_VERSION

        managed = {"model", "host", "port", "served-model-name", "tensor-parallel-size",
                   "gpu-memory-utilization", "max-model-len", "max-num-seqs", "quantization",
                   "kv-cache-dtype", "dtype", "revision", "config"}
        seen: dict[str, str] = {}
        for key in value:
            flag = key.replace("_", "-")
            if flag in seen:
                raise ValueError(f"{key!r} and {seen[flag]!r} are the same option")
            seen[flag] = key
            if flag in PARALLEL_FLAGS and (not isinstance(value[key], int)
                                           or isinstance(value[key], bool) or value[key] < 1):
                raise ValueError(f"{key!r} must be a positive integer (it decides how many "
                                 "GPUs the service uses)")
            if flag in BYPASS_FLAGS:
                raise ValueError(f"{key!r} is not accepted: {BYPASS_FLAGS[flag]}")
            if flag == "api-key":
                raise ValueError("api-key must not be set here; use api_key_file (the key is "
                                 "passed as a systemd credential, never in files or arguments)")
            if SECRET_FLAG.search(flag):
                raise ValueError(f"{key!r} carries a secret; secrets never go into a "
                                 "service's files or arguments: the API key belongs in "
                                 "api_key_file, a Hugging Face token in vllm.hf_token_file "
                                 "(passed as systemd credentials)")
            if flag in managed:
                raise ValueError(f"{key!r} has its own field; set it there")
            if flag not in SERVE_FLAGS:
                close = difflib.get_close_matches(flag, sorted(SERVE_FLAGS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{key!r} is not a vllm {VLLM_VERSION} serve option{hint}")
        return value

    @field_validator("extra_env")
    @classmethod
    def _no_secret_env(cls, value: dict[str, str]) -> dict[str, str]:
        from gpunode.core.vllm_flags import ENV_VARS, VLLM_VERSION

        for key in value:
            if key in MANAGED_ENV or key.upper() in MANAGED_ENV:
                raise ValueError(f"{key} is set by gpunode (from the service's fields and the "
                                 "GPU placement); set the field instead")
            if RISKY_ENV.search(key):
                raise ValueError(f"{key} changes how programs load or find code; the unit's "
                                 "environment file is also read by a command that runs as "
                                 "root, so it is not accepted here")
            if SECRET_ENV.search(key.upper()):
                raise ValueError(f"{key} carries a secret; secrets never go into unit or "
                                 "environment files: the API key belongs in api_key_file, "
                                 "a Hugging Face token in vllm.hf_token_file (passed as "
                                 "systemd credentials)")
            if key.upper().startswith("VLLM_") and key not in ENV_VARS:
                close = difflib.get_close_matches(key.upper(), sorted(ENV_VARS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{key} is not a variable vLLM {VLLM_VERSION} reads (it would "
                                 f"warn and go on without it){hint}")
        return value

    @property
    def parallel_args(self) -> dict[str, int]:
        """Parallel sizes besides tensor parallelism set through extra_args (pipeline, data)."""
        out = {}
        for key, value in self.extra_args.items():
            flag = key.replace("_", "-")
            if flag in PARALLEL_FLAGS and isinstance(value, int) and not isinstance(value, bool):
                out[flag.replace("-", "_")] = value
        return out

    @property
    def world_size(self) -> int:
        """GPUs one server of this service occupies."""
        size = self.tensor_parallel_size
        for value in self.parallel_args.values():
            size *= value
        return size

    @property
    def names(self) -> list[str]:
        return self.served_names or [self.name]

    @property
    def local_model(self) -> bool:
        return self.model.startswith("/")


#: Accounts a service must never run as (root, and accounts other software owns).
SHARED_ACCOUNTS = frozenset({"root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail",
                             "news", "uucp", "proxy", "www-data", "backup", "list", "irc",
                             "gnats", "nobody", "_apt", "sshd", "messagebus", "syslog",
                             "ubuntu", "debian", "admin", "polkitd", "dnsmasq", "nvidia-persistenced"})


def _service_user(value: str) -> str:
    if value in SHARED_ACCOUNTS or value.startswith("systemd-"):
        raise ValueError(f"{value!r} is root or an account other software uses; give the "
                         "services an account of their own (e.g. vllm)")
    return value


ServiceUser = Annotated[PosixName, AfterValidator(_service_user)]


def _python_version(value: str) -> str:
    if int(value.split(".")[1]) < 11:
        raise ValueError("vLLM 0.33 needs Python 3.11 or newer")
    return value


VllmPython = Annotated[str, Field(pattern=r"^3\.\d{1,2}$"), AfterValidator(_python_version)]


class Vllm(Strict):
    version: str = Field("0.33.0", pattern=r"^\d+\.\d+\.\d+$", description="Pinned vLLM version.")
    python: VllmPython = Field("3.12", description="Python for the vLLM venv (>=3.11).")
    index_url: Url | None = Field(None,
                                  description="Python package index override (air-gapped/lab); "
                                  "turns uv's Python downloads off.")
    python_mirror: Url | None = Field(
        None, description="Mirror of uv's managed Python builds (UV_PYTHON_INSTALL_MIRROR): "
        "lets uv install a vllm.python the OS does not ship while index_url is set.")
    uv_version: str = Field("0.13.9", pattern=r"^\d+\.\d+\.\d+$", description="Pinned uv version.")
    user: ServiceUser = Field("vllm", description="System user running the services (its own "
                              "account: not root, not a shared system account).")
    prefix: PrefixDir = Field("/opt/vllm", description="Install prefix (venv at <prefix>/venv); "
                            "a directory below /opt, /srv, /usr/local, /var/lib, ...")
    model_cache: DataDir = Field(
        f"{VLLM_HOME}/hf", description="Shared HF_HOME for models, owned by the service user: "
        "a directory below /var/lib, /srv, /data, /models, /mnt, ... never a system directory.")
    bind_privileged_ports: StrictBool = Field(
        False, description="Let services listen on ports below 1024 (grants "
        "CAP_NET_BIND_SERVICE to the vLLM units).")
    hf_token_file: ControlPath | None = Field(
        None, description="File on the control machine holding a Hugging Face token for gated "
        "models (copied into the prefetch and server units' credentials; never on a command "
        "line or in an environment file).")
    services: list[VllmService] = Field(default_factory=list, description="vLLM services.")


class Hostpci(Strict):
    mapping: str | None = Field(None, pattern=MAPPING_NAME,
                                description="PVE PCI resource mapping name (preferred).")
    address: str | None = Field(None, pattern=PCI_ADDRESS,
                                description="Raw PCI address dddd:bb:ss[.f] (root@pam only).")
    pcie: StrictBool = Field(True, description="Attach as PCIe (needs machine q35).")
    rombar: StrictBool = Field(True, description="Expose the ROM BAR.")
    x_vga: StrictBool = Field(False, description="Primary VGA (not for compute).")

    @model_validator(mode="after")
    def _one_of(self) -> Hostpci:
        if (self.mapping is None) == (self.address is None):
            raise ValueError("give exactly one of mapping or address")
        return self


class CloudInit(Strict):
    user: PosixName = Field("gpunode", description="Default user.")
    ssh_keys: list[Annotated[str, Field(pattern=SSH_PUBLIC_KEY)]] = Field(
        default_factory=list, description="Public SSH keys (one OpenSSH public key per entry).")
    ipconfig0: str = Field("ip=dhcp", pattern=IPCONFIG, description="PVE ipconfig0 value: "
                           "ip=dhcp|ip=CIDR[,gw=IP][,ip6=...].")
    nameserver: IpAddress | None = Field(None, description="DNS server.")


class VmSpec(Strict):
    pve_node: str = Field(pattern=r"^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$",
                          description="Proxmox node that hosts the VM (a pve-host node's "
                          "pve.node_name, else its inventory name).")
    vmid: StrictInt = Field(ge=100, le=999999999, description="VM id.")
    template_vmid: StrictInt | None = Field(None, ge=100, description="Template to clone.")
    cloud_image: str | None = Field(None, pattern=VOLID,
                                    description="Cloud image volume (storage:path) to import "
                                    "instead.")
    cores: StrictInt = Field(8, ge=1, le=512, description="vCPU cores.")
    sockets: StrictInt = Field(1, ge=1, le=8, description="vCPU sockets.")
    memory_mib: StrictInt = Field(65536, ge=1024, description="Memory in MiB.")
    numa: StrictBool = Field(True, description="Expose NUMA to the guest.")
    hugepages: Literal["none", "2", "1024"] = Field("none", description="Back RAM with huge pages.")
    machine: Literal["q35", "pc"] = Field("q35", description="Machine type.")
    bios: Literal["ovmf", "seabios"] = Field("ovmf", description="Firmware.")
    cpu: str = Field("host", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(,[a-z-]+=[A-Za-z0-9._+;-]+)*$",
                     description="CPU type, optionally with PVE cpu options "
                     "(host,flags=+pdpe1gb).")
    disk_gib: StrictInt = Field(200, ge=8, description="Boot disk size.")
    storage: str = Field("local-lvm", pattern=r"^[a-zA-Z][a-zA-Z0-9._-]{0,63}$",
                         description="Storage for disks.")
    bridge: str = Field("vmbr0", pattern=r"^[a-zA-Z][a-zA-Z0-9_.-]{0,14}$",
                        description="Network bridge.")
    hostpci: list[Hostpci] = Field(default_factory=list, description="Passed-through devices.")
    cloud_init: CloudInit = Field(default_factory=CloudInit, description="Cloud-init settings.")
    full_clone: StrictBool = Field(True, description="Clone the template with independent disks "
                             "(false: a linked clone, which needs storage that supports it).")
    on_start_failure: Literal["destroy", "stop"] = Field(
        "destroy", description="When a VM that provision just created fails to start (GPU "
        "in use, IOMMU, huge pages): destroy it, or leave it stopped for inspection. An "
        "existing VM is never destroyed.")
    agent_timeout_s: StrictInt = Field(600, ge=30, le=7200, description="How long provision waits "
                                 "after a start for the guest agent to report an address.")

    @model_validator(mode="after")
    def _source(self) -> VmSpec:
        if (self.template_vmid is None) == (self.cloud_image is None):
            raise ValueError("give exactly one of template_vmid or cloud_image")
        return self


class PciMapping(Strict):
    name: str = Field(pattern=MAPPING_NAME, description="Mapping name.")
    addresses: list[Annotated[str, Field(pattern=PCI_ADDRESS)]] = Field(
        min_length=1, description="Host PCI addresses in the mapping.")


class PveApi(Strict):
    url: HttpsUrl = Field(description="API base, e.g. https://pve1:8006.")
    token_id: str = Field(pattern=r"^[A-Za-z0-9._-]+@[A-Za-z0-9._-]+![A-Za-z][A-Za-z0-9._-]*$",
                          description="user@realm!tokenid")
    token_secret_file: ControlPath = Field(description="File holding the token secret.")
    verify_tls: StrictBool | ControlPath = Field(True, description="Verify TLS (or a CA bundle path).")


class PveHost(Strict):
    iommu: Literal["auto", "intel", "amd"] = Field(
        "auto", description="IOMMU vendor: intel adds intel_iommu=on, amd needs no argument "
        "(on by default); auto reads the CPU vendor from the host.")
    iommu_pt: StrictBool = Field(True, description="Add iommu=pt (passthrough mode for host "
                                 "devices).")
    bootloader: Literal["auto", "grub", "systemd-boot"] = Field(
        "auto", description="Where the kernel arguments go: GRUB (/etc/default/grub.d) or "
        "systemd-boot (/etc/kernel/cmdline, proxmox-boot-tool refresh); auto detects it from "
        "proxmox-boot-tool status.")
    vfio_ids: list[Annotated[str, Field(pattern=r"^[0-9a-f]{4}:[0-9a-f]{4}$")]] = Field(
        default_factory=lambda: ["10de:2230", "10de:1aef"],
        description="vendor:device ids bound to vfio-pci at boot (GPU and its audio function); "
        "every device with these ids goes to vfio-pci.")
    host_drivers: list[Annotated[str, Field(pattern=r"^[a-z0-9_]{1,64}$")]] = Field(
        default_factory=lambda: ["nouveau", "nvidia", "nvidiafb", "nvidia_drm", "snd_hda_intel"],
        description="Host kernel modules that would claim a passthrough device first; "
        "vfio-pci is loaded before each of them (modprobe softdep).")
    hugepages_1g: StrictInt = Field(0, ge=0, le=4096,
                                    description="1 GiB pages reserved at boot for VMs.")
    api: PveApi | None = Field(None, description="API access for provisioning.")
    pci_mappings: list[PciMapping] = Field(default_factory=list, description="PCI mappings.")
