"""Package selection and computed settings per OS and source (Ubuntu's archive is not
reachable here, so its choices are proven by these tests)."""

import pytest

from gpunode.core import desired, paths, plan
from gpunode.core.files import tuning_files
from gpunode.core.topology import Gpu
from gpunode.facts import Snapshot, reboot_reasons
from gpunode.model import NodeProfile


def profile(**over) -> NodeProfile:
    data = {"name": "n", "connection": {"address": "h"}, "gpus": {"count": 2}}
    for key, value in over.items():
        data[key] = value
    return NodeProfile.model_validate(data)


@pytest.mark.parametrize("os_, source, open_, compute, expected", [
    ("debian-12", "cuda-repo", True, True,
     ["nvidia-driver-cuda", "nvidia-kernel-open-dkms", "nvidia-persistenced", "nvidia-modprobe"]),
    ("debian-12", "cuda-repo", False, True,
     ["nvidia-driver-cuda", "nvidia-kernel-dkms", "nvidia-persistenced", "nvidia-modprobe"]),
    ("debian-12", "cuda-repo", True, False, ["nvidia-open", "nvidia-modprobe"]),
    ("ubuntu-24.04", "cuda-repo", True, True,
     ["libnvidia-compute-580", "nvidia-dkms-580-open", "nvidia-utils-580",
      "nvidia-persistenced", "nvidia-modprobe"]),
    ("ubuntu-22.04", "cuda-repo", False, False, ["cuda-drivers-580", "nvidia-modprobe"]),
    ("ubuntu-24.04", "ubuntu-archive", True, True,
     ["nvidia-headless-no-dkms-580-server-open", "nvidia-utils-580-server",
      "linux-modules-nvidia-580-server-open-generic", "nvidia-modprobe"]),
    ("ubuntu-22.04", "ubuntu-archive", False, True,
     ["nvidia-headless-no-dkms-580-server", "nvidia-utils-580-server",
      "linux-modules-nvidia-580-server-generic", "nvidia-modprobe"]),
])
def test_driver_packages(os_, source, open_, compute, expected):
    p = profile(os=os_, nvidia={"source": source, "open_kernel_modules": open_,
                                "compute_only": compute})
    assert desired.driver_packages(p) == expected


@pytest.mark.parametrize("os_, source", [("debian-12", "cuda-repo"), ("ubuntu-22.04", "cuda-repo"),
                                         ("ubuntu-24.04", "cuda-repo"),
                                         ("ubuntu-24.04", "ubuntu-archive")])
@pytest.mark.parametrize("compute", [True, False])
def test_driver_packages_install_nvidia_modprobe(os_, source, compute):
    """The GPU settings unit runs /usr/bin/nvidia-modprobe to create /dev/nvidia-uvm; no
    driver set may leave it to a dependency that the set does not have."""
    p = profile(os=os_, nvidia={"source": source, "compute_only": compute})
    assert "nvidia-modprobe" in desired.driver_packages(p)


def test_branch_590_drops_suffix_on_ubuntu():
    p = profile(os="ubuntu-24.04", nvidia={"branch": 590})
    assert desired.driver_packages(p)[0] == "libnvidia-compute"


@pytest.mark.parametrize("os_, version, expected", [
    ("debian-12", "580.95.05", "580.95.05-1"),
    ("ubuntu-24.04", "580.95.05", "580.95.05-0ubuntu1"),
    ("ubuntu-22.04", "580.126.20", "580.126.20-1ubuntu1"),
])
def test_driver_deb_versions(os_, version, expected):
    assert desired.driver_deb_version(profile(os=os_, nvidia={"version": version})) == expected


def test_repo_and_keyring():
    p = profile(os="debian-12")
    assert desired.cuda_repo_line(p) == (
        "deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] "
        "https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/ /")
    assert desired.keyring_url(p).endswith("/debian12/x86_64/cuda-keyring_1.1-1_all.deb")
    assert desired.keyring_sha256(p) == desired.UPSTREAM_KEYRING_SHA256["debian12"]
    mirror = profile(os="debian-12", nvidia={"repo_url": "http://m/r", "keyring_sha256": "a" * 64})
    assert desired.keyring_sha256(mirror) == "a" * 64
    assert desired.pinning_package(p) == "nvidia-driver-pinning-580"
    assert desired.pinning_package(profile(os="ubuntu-24.04",
                                           nvidia={"source": "ubuntu-archive"})) is None


def test_every_os_a_gpu_node_may_run_has_a_published_keyring_checksum():
    from typing import get_args

    from gpunode.model.parts import OsName
    gpu_node_os = [o for o in get_args(OsName) if o != "debian-13"]  # debian-13: pve-host only
    for os in gpu_node_os:
        assert desired.keyring_sha256(profile(os=os)), os


def test_the_secure_boot_hint_names_the_key_dkms_signs_with_on_each_os():
    ubuntu, debian = profile(os="ubuntu-24.04"), profile(os="debian-12")
    assert "mokutil --import /var/lib/shim-signed/mok/MOK.der" in desired.secure_boot_stop(ubuntu)
    assert "enrol /var/lib/shim-signed/mok/MOK.der" in desired.secure_boot_notice(ubuntu)
    assert "mokutil --import /var/lib/dkms/mok.pub" in desired.secure_boot_stop(debian)
    assert "enrol /var/lib/dkms/mok.pub" in desired.secure_boot_notice(debian)


def test_matched_sets_follow_cuda():
    p = profile(cuda={"enabled": True, "version": "13.0"}, nccl={"enabled": True},
                cudnn={"enabled": True})
    assert [x.spec for x in desired.nccl_packages(p)] == [
        "libnccl2=2.28.3-1+cuda13.0", "libnccl-dev=2.28.3-1+cuda13.0"]
    # -dev needs the headers at its own version: pinned too, or apt takes the newest headers
    assert [x.spec for x in desired.cudnn_packages(p)] == [
        "libcudnn9-cuda-13=9.15.0.58-1", "libcudnn9-headers-cuda-13=9.15.0.58-1",
        "libcudnn9-dev-cuda-13=9.15.0.58-1"]
    assert desired.cuda_packages(p)[0].name == "cuda-toolkit-13-0"


def test_hold_set_is_the_branch_driver_packages():
    installed = {"nvidia-driver-cuda": "580.95.05-1", "libcuda1": "580.95.05-1",
                 "nvidia-driver-pinning-580": "580-5", "nvidia-container-toolkit": "1.18.0-1",
                 "curl": "7.88"}
    assert desired.driver_hold_set(profile(), installed) == ["libcuda1", "nvidia-driver-cuda"]


def test_sysctls_merge_profile_over_defaults_and_numa_follows_pinning():
    p = profile(tuning={"sysctl": {"vm.dirty_ratio": 20, "net.core.somaxconn": 4096},
                        "swappiness": 1},
                vllm={"services": [{"name": "a", "model": "/m", "gpus": [0]}]})
    values = desired.sysctls(p)
    assert values["vm.swappiness"] == "1"
    assert values["vm.dirty_ratio"] == "20"  # the site's map over gpunode's defaults
    assert values["kernel.numa_balancing"] == "0"
    assert desired.sysctls(profile())["kernel.numa_balancing"] == "1"


def test_serving_sysctls_reserve_the_vllm_ports_and_yield_to_the_site():
    svc = {"model": "/m", "gpu_memory_utilization": 0.3}
    p = profile(tuning={"sysctl": {"net.core.somaxconn": 8192}},
                vllm={"services": [{"name": "a", "port": 8001, "gpus": [0], **svc},
                                   {"name": "b", "port": 8000, "gpus": [1], **svc},
                                   {"name": "c", "port": 9000, "gpus": [0], **svc}]})
    values = desired.sysctls(p)
    # the kernel's own spelling, so the read-back compares equal: sorted, runs as a-b
    assert values["net.ipv4.ip_local_reserved_ports"] == "8000-8001,9000"
    assert values["net.ipv4.tcp_slow_start_after_idle"] == "0"
    assert values["net.core.somaxconn"] == "8192"  # the site's value wins ...
    reasons = desired.sysctl_reasons(p)
    assert "net.core.somaxconn" not in reasons  # ... and gpunode's reason is not printed
    assert set(reasons) == set(desired.SERVING_SYSCTLS) - {"net.core.somaxconn"} | {
        "net.ipv4.ip_local_reserved_ports"}
    # no services: nothing to reserve; switched off: none of them
    assert "net.ipv4.ip_local_reserved_ports" not in desired.sysctls(profile())
    off = desired.sysctls(profile(tuning={"serving_sysctls": False}))
    assert not set(off) & set(desired.SERVING_SYSCTLS)
    assert desired.sysctl_reasons(profile(tuning={"serving_sysctls": False})) == {}
    assert desired.port_ranges([]) == ""
    assert desired.port_ranges([5, 3, 4, 4, 9]) == "3-5,9"


def test_kernel_args_and_pending():
    p = profile(tuning={"thp": "madvise", "hugepages": {"size": "1G", "count": 4}},
                memory_mib=65536)
    assert desired.kernel_args(p) == ["transparent_hugepage=madvise", "default_hugepagesz=1G",
                                      "hugepagesz=1G", "hugepages=4"]
    assert desired.missing_kernel_args(p, "root=/dev/vda transparent_hugepage=madvise") == [
        "default_hugepagesz=1G", "hugepagesz=1G", "hugepages=4"]


@pytest.mark.parametrize("thp, kernel_default, asks", [
    ("madvise", "madvise", False),  # Ubuntu's kernels: no GRUB change, no reboot
    ("madvise", "always", True),  # Debian's kernels
    ("never", "madvise", True),
    ("madvise", None, True),  # no kernel config: unknown, so it is asked for
])
def test_thp_argument_only_where_it_differs_from_the_kernel_default(thp, kernel_default, asks):
    p = profile(tuning={"thp": thp})
    token = f"transparent_hugepage={thp}"
    assert desired.kernel_args(p, kernel_default) == ([token] if asks else [])
    assert desired.missing_kernel_args(p, "root=/dev/vda", kernel_default) == (
        [token] if asks else [])
    grub = next(f for f in tuning_files(p, thp_default=kernel_default)
                if f.path == paths.GRUB_CFG)
    assert (token in grub.content) is asks
    assert ("GRUB_CMDLINE_LINUX_DEFAULT=" in grub.content) is asks


def test_cpu_governor_is_set_by_a_late_oneshot_unit_not_tmpfiles():
    """Was: a tmpfiles `w` line early in boot, which cpufreq services started later
    (ondemand, tuned, power-profiles-daemon) overrode."""
    files = {f.path: f.content for f in tuning_files(profile(tuning={"governor": "schedutil"}))}
    assert "scaling_governor" not in files["/etc/tmpfiles.d/gpunode-tuning.conf"]
    unit = files[paths.CPU_GOVERNOR_UNIT_PATH]
    lines = unit.splitlines()
    after = next(ln for ln in lines if ln.startswith("After=")).split("=", 1)[1].split()
    assert {"ondemand.service", "tuned.service", "power-profiles-daemon.service"} <= set(after)
    assert "multi-user.target" not in after and "WantedBy=multi-user.target" in lines
    assert {"Type=oneshot", "RemainAfterExit=yes", "ProtectSystem=strict", "NoNewPrivileges=yes",
            "CapabilityBoundingSet=", "PrivateNetwork=yes"} <= set(lines)
    assert "ProtectKernelTunables=yes" not in lines  # it would make /sys read-only
    start = next(ln for ln in lines if ln.startswith("ExecStart="))
    assert "/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor" in start
    assert 'echo "schedutil" > "$$f"' in start  # $$: systemd passes a literal $ to sh
    assert "%" not in start  # no systemd specifiers
    no_governor = tuning_files(profile(tuning={"governor": None}))
    assert paths.CPU_GOVERNOR_UNIT_PATH not in {f.path for f in no_governor}


def test_reboot_reasons_use_the_kernel_thp_default():
    p = profile(tuning={"thp": "madvise"})
    files = {paths.GRUB_CFG: {"sha256": "x"}}
    assert reboot_reasons(p, snap(cmdline="root=/dev/vda", files=files,
                                  thp_default="madvise")) == []
    assert reboot_reasons(p, snap(cmdline="root=/dev/vda", files=files,
                                  thp_default="always")) == [
        "kernel command line lacks transparent_hugepage=madvise (set in GRUB, applies at "
        "the next boot)"]


def snap(**over) -> Snapshot:
    data = {"modules": [], "nvidia_smi": {"present": False}, "reboot_required": False,
            "reboot_required_pkgs": [], "cmdline": "transparent_hugepage=madvise",
            "files": {}, "packages": {}, "nvidia_proc_version": None}
    data.update(over)
    return Snapshot(data)


def test_reboot_reasons():
    p = profile(os="debian-12")
    installed = {n: "580.95.05-1" for n in desired.driver_packages(p)}
    assert reboot_reasons(p, snap(modules=["nouveau"])) == []  # no driver yet: no reboot
    assert "nouveau" in reboot_reasons(p, snap(modules=["nouveau"], packages=installed))[0]
    mismatch = {"present": True, "rc": 18, "error": "Failed to initialize NVML: "
                "Driver/library version mismatch"}
    assert "mismatch" in reboot_reasons(p, snap(nvidia_smi=mismatch, packages=installed))[0]
    pending = snap(cmdline="quiet", files={"/etc/default/grub.d/60-gpunode.cfg": {"sha256": "x"}})
    assert "transparent_hugepage=madvise" in reboot_reasons(p, pending)[0]
    assert reboot_reasons(p, snap(reboot_required=True, reboot_required_pkgs=["linux-image"]))


OLD_K, NEW_K = "6.1.0-30-amd64", "6.1.0-31-amd64"


def module_snap(p: NodeProfile, kernels: dict[str, dict] | None = None) -> Snapshot:
    """A host with the driver installed, nouveau loaded (a reboot is due) and `kernels`."""
    return snap(modules=["nouveau"], packages={n: "1" for n in desired.driver_packages(p)},
                kernel_modules=kernels)


def kmods(old: dict, new: dict) -> dict:
    return {OLD_K: old, NEW_K: new}


BUILT = {"headers": True, "nvidia": "/lib/modules/k/updates/dkms/nvidia.ko"}


def test_no_reboot_into_a_kernel_without_the_nvidia_module():
    """Was: the deploy rebooted into the newest kernel whatever DKMS had built for it, and
    a kernel without the module boots without GPUs."""
    p = profile(os="debian-12")
    s = module_snap(p, kmods(BUILT, {"headers": False, "nvidia": None}))
    reasons = reboot_reasons(p, s)
    assert reasons and plan.kernels_without_module(p, s) == [NEW_K]
    refusal = plan.reboot_refusal(p, s, reasons)
    assert refusal == (
        f"{p.name} needs a reboot ({reasons[0]}) but the NVIDIA kernel module is missing for "
        f"kernel {NEW_K} (it boots {NEW_K} next), so its GPUs would be gone after the reboot; "
        f"not rebooting. Put the module in place (apt-get install linux-headers-{NEW_K} && "
        f"dkms autoinstall -k {NEW_K}), then run the deploy again")
    assert plan.reboot_refusal(p, s, []) is None  # no reboot due: nothing to refuse


def test_every_kernel_with_headers_needs_the_module_one_without_only_when_booted():
    p = profile(os="debian-12")
    no_headers = {"headers": False, "nvidia": None}
    assert plan.kernels_without_module(p, module_snap(p, kmods(no_headers, BUILT))) == []
    s = module_snap(p, kmods({"headers": True, "nvidia": None}, BUILT))
    assert plan.kernels_without_module(p, s) == [OLD_K]
    assert plan.reboot_refusal(p, s, reboot_reasons(p, s))
    # no driver yet (nothing to lose) or an older snapshot without the field: no refusal
    assert plan.kernels_without_module(p, snap(kernel_modules=s.kernel_modules)) == []
    assert plan.kernels_without_module(p, module_snap(p)) == []


def test_ubuntu_archive_refusal_names_the_prebuilt_module_package():
    p = profile(os="ubuntu-24.04", nvidia={"source": "ubuntu-archive", "branch": 580,
                                           "version": None})
    k, running = "6.8.0-90-generic", "6.8.0-40-generic"
    s = module_snap(p, {k: {"headers": False, "nvidia": None},
                        running: {"headers": True, "nvidia": None}})
    flavour = "-open" if p.nvidia.open_kernel_modules else ""
    assert (f"for kernel {k} (it boots {k} next)" in plan.reboot_refusal(
        p, s, reboot_reasons(p, s)))
    assert (f"(apt-get install linux-modules-nvidia-580-server{flavour}-{k})"
            in plan.reboot_refusal(p, s, reboot_reasons(p, s)))
    # prebuilt modules come for the newest kernel's ABI, not with headers: an older kernel
    # with headers (the running one, gpunode installs them) does not hold the reboot back
    s.kernel_modules[k] = {"headers": False, "nvidia": f"/lib/modules/{k}/kernel/nvidia-580srv/nvidia.ko"}
    assert plan.kernels_without_module(p, s) == []


def test_module_fix_quotes_the_host_kernel_name():
    p = profile(os="debian-12")
    assert desired.module_fix(p, "6.1.0-9-amd64; reboot") == (
        "apt-get install 'linux-headers-6.1.0-9-amd64; reboot' && dkms autoinstall -k "
        "'6.1.0-9-amd64; reboot'")


def test_gpu_settings_drift_names_the_difference():
    p = profile(nvidia={"settings": {"power_limit_w": 280, "ecc": True}})
    gpu = Gpu(0, "GPU-a", "NVIDIA RTX A6000", "00000000:01:00.0", 49140, "580.95.05",
              values={"persistence_mode": "Enabled", "power.limit": "300.00",
                      "compute_mode": "Default", "ecc.mode.pending": "Disabled"})
    drift = desired.gpu_settings_drift(p, [gpu])
    assert drift == ["GPU 0: power limit 300.00 W, want 280 W",
                     "GPU 0: ECC pending Disabled, want Enabled"]


@pytest.mark.parametrize(("os", "release", "meta"), [
    ("debian-12", "6.1.0-30-amd64", "linux-headers-amd64"),
    ("debian-12", "6.1.0-30-cloud-amd64", "linux-headers-cloud-amd64"),
    ("debian-12", "6.1.0-30-rt-amd64", "linux-headers-rt-amd64"),
    ("ubuntu-24.04", "6.8.0-45-generic", "linux-headers-generic"),
    ("ubuntu-24.04", "6.14.0-29-generic", "linux-headers-generic-hwe-24.04"),
    ("ubuntu-22.04", "6.8.0-60-generic", "linux-headers-generic-hwe-22.04"),
    # the HWE kernels of the lab's `--kernel hwe` guests (noble-updates' and jammy-updates'
    # linux-image-virtual-hwe-24.04 and -22.04 when they were added): a new major too
    ("ubuntu-24.04", "7.0.0-44-generic", "linux-headers-generic-hwe-24.04"),
    ("ubuntu-22.04", "6.8.0-149-generic", "linux-headers-generic-hwe-22.04"),
    ("ubuntu-22.04", "5.15.0-140-lowlatency", "linux-headers-lowlatency"),
    ("ubuntu-24.04", "6.8.0-1020-nvidia", "linux-headers-nvidia"),
    ("ubuntu-24.04", "6.8.0-1030-aws", "linux-headers-aws"),
])
def test_headers_follow_the_running_kernels_flavour(os, release, meta):
    """Was: linux-headers-generic on every Ubuntu host, so an HWE or cloud kernel's next
    update came without headers, DKMS built nothing and the GPUs vanished at the reboot."""
    assert desired.header_packages(profile(os=os), release, [release]) == [
        meta, f"linux-headers-{release}"]


def test_headers_for_a_newer_kernel_of_another_flavour_come_with_its_meta_package():
    p = profile(os="ubuntu-24.04")
    assert desired.header_packages(p, "6.8.0-45-generic", ["6.8.0-45-generic",
                                                           "6.14.0-29-generic"]) == [
        "linux-headers-generic", "linux-headers-generic-hwe-24.04",
        "linux-headers-6.14.0-29-generic", "linux-headers-6.8.0-45-generic"]


def test_services_sharing_a_gpu_start_one_after_the_other():
    """Was: both started at once, and vLLM's memory profiling on the shared GPU raced."""
    from gpunode.core.files import vllm_files

    gpus = [Gpu(index=i, uuid=f"GPU-{i}", name="NVIDIA RTX A6000", bus_id=f"00000000:0{i}:00.0",
                memory_mib=49140, driver_version="580.95.05", cpus=[0, 1], numa_node=0)
            for i in range(2)]
    svc = lambda name, gpus, port: {"name": name, "model": "/m", "gpus": gpus,  # noqa: E731
                                    "tensor_parallel_size": len(gpus), "port": port,
                                    "gpu_memory_utilization": 0.3}
    p = profile(vllm={"services": [svc("a", [0], 8001), svc("b", [1], 8002),
                                   svc("c", [0, 1], 8003)]})
    drop_ins = {f.path.split("@")[1].split(".")[0]: f.content for f in vllm_files(p, gpus)
                if f.path.endswith(".service.d/gpunode.conf")}
    assert "[Unit]" not in drop_ins["a"] and "[Unit]" not in drop_ins["b"]
    assert "\n[Unit]\n" in drop_ins["c"]
    assert "\nAfter=vllm@a.service vllm@b.service\n" in drop_ins["c"]
    assert drop_ins["c"].index("[Unit]") < drop_ins["c"].index("[Service]")


@pytest.mark.parametrize("os_, python, mirror, expected", [
    # the venv runs the OS's python3: that Python's headers (Python.h) from the archive
    ("debian-12", "3.11", None, ["gcc", "libc6-dev", "python3.11-dev"]),
    ("ubuntu-24.04", "3.12", None, ["gcc", "libc6-dev", "python3.12-dev"]),
    ("debian-12", "3.11", "http://mirror.example/python", ["gcc", "libc6-dev", "python3.11-dev"]),
    # a python-build-standalone build (uv download or the site's mirror) has its own headers
    ("debian-12", "3.12", "http://mirror.example/python", ["gcc", "libc6-dev"]),
    ("ubuntu-22.04", "3.12", None, ["gcc", "libc6-dev"]),
    ("ubuntu-24.04", "3.11", None, ["gcc", "libc6-dev"]),
])
def test_triton_toolchain_follows_the_venv_python(os_, python, mirror, expected):
    """Was: nothing installed a C compiler or Python.h, so Triton's first launcher build
    (at the first request) failed on hosts without them."""
    svc = {"name": "a", "model": "/m", "gpus": [0]}
    p = profile(os=os_, vllm={"python": python, "python_mirror": mirror, "services": [svc]})
    assert desired.vllm_build_packages(p) == expected


def test_no_triton_toolchain_without_vllm_services():
    assert desired.vllm_build_packages(profile()) == []


def test_dcgm_is_what_nvidias_install_leaves_pinned_with_the_exporter_built_for_it():
    """NVIDIA installs -cuda<major> with Recommends (so -proprietary and -proprietary-cuda<major>
    come too); gpunode installs without, so it names them, at DCGM's version. The exporter
    is the release tagged for this DCGM (NVIDIA/dcgm-exporter 4.4.2-4.7.1), not the newest."""
    p = profile(dcgm={"enabled": True, "exporter": True})
    v = "1:4.4.2-1"
    assert {x.name: x.version for x in desired.dcgm_packages(p)} == {
        "datacenter-gpu-manager-4-core": v, "datacenter-gpu-manager-4-cuda13": v,
        "datacenter-gpu-manager-4-proprietary": v,
        "datacenter-gpu-manager-4-proprietary-cuda13": v,
        "datacenter-gpu-manager-exporter": "4.7.1-1"}
    held = desired.held_packages(profile(dcgm={"enabled": True, "exporter": True},
                                         nvidia={"hold": True}))
    assert {"datacenter-gpu-manager-exporter", "datacenter-gpu-manager-4-proprietary"} <= set(held)
    newer = profile(dcgm={"enabled": True, "version": "4.5.3", "exporter": True})
    assert ("datacenter-gpu-manager-exporter", "4.8.2-1") in [
        (x.name, x.version) for x in desired.dcgm_packages(newer)]


@pytest.mark.parametrize("ctk, expected", [
    ({"enabled": True, "version": "1.18.0"}, "/var/run/cdi/nvidia.yaml"),
    ({"enabled": True, "version": "1.18.0~rc.1"}, "/var/run/cdi/nvidia.yaml"),
    ({"enabled": True, "version": "1.19.1"}, "/var/run/cdi/nvidia.yaml"),
    ({"enabled": True, "version": "1.17.8"}, "/etc/cdi/nvidia.yaml"),
])
def test_cdi_spec_is_the_refresh_units_one_from_toolkit_118(ctk, expected):
    p = profile(container_toolkit=ctk)
    assert desired.cdi_spec(p) == expected
    assert bool(desired.cdi_refresh_units(p)) == expected.startswith("/var/run")
    assert desired.cdi_refresh_units(profile(container_toolkit={**ctk, "cdi": False})) == []
