"""SIMULATED snapshots (what gpunode's snapshot script reads from a host) for unit tests of
both engines' decisions: a fresh Debian 12 host, and nvidia-smi answering for two GPUs."""

from __future__ import annotations


def fresh_snapshot() -> dict:
    return {"os": {"id": "debian", "version_id": "12"}, "kernel": "6.1.0-30-amd64",
            "kernels": ["6.1.0-30-amd64"], "cmdline": "BOOT_IMAGE=/vmlinuz root=/dev/vda1",
            "virt": "kvm", "cpufreq": False, "governors": [], "secure_boot": False,
            "efi": True, "boot": ["grub"], "modules": ["nouveau"], "reboot_required": False,
            "reboot_required_pkgs": [], "nvidia_proc_version": None,
            "packages": {"python3": "3.11.2-1+b1"}, "holds": [], "apt_lists_mtime": 0,
            "files": {}, "units": {}, "sysctl": {"vm.swappiness": "60"},
            "thp": {"enabled": "always", "defrag": "madvise"}, "hugepages": {},
            "memory_kib": 3000000, "nvidia_smi": {"present": False}, "venvs": {},
            "users": ["root"], "globs": {}, "cmds": {},
            # a virtio system disk at the kernel's defaults, and a CD-ROM gpunode leaves alone
            "block": {"vda": {"scheduler": "none", "schedulers": ["mq-deadline", "none"],
                              "read_ahead_kb": 128},
                      "sr0": {"scheduler": "mq-deadline", "schedulers": ["mq-deadline", "none"],
                              "read_ahead_kb": 128}}}


UUIDS = ("GPU-12345678-1234-1234-1234-123456789abc", "GPU-12345678-1234-1234-1234-123456789abd")
UUID = ",".join(UUIDS)  # as the CDI stamp key lists them


def with_gpu(data: dict, driver: str = "580.95.05", **settings: str) -> dict:
    """nvidia-smi answers for two GPUs (the fields the snapshot's query asks for; `settings`
    gives further fields by name, e.g. persistence_mode="Enabled")."""
    from gpunode.core.topology import GPU_FIELDS

    lines = []
    for i, uuid in enumerate(UUIDS):
        values = {"index": str(i), "uuid": uuid, "name": "NVIDIA RTX A6000",
                  "pci.bus_id": f"00000000:0{i + 1}:00.0", "memory.total": "49140",
                  "driver_version": driver, **settings}
        lines.append(", ".join(values.get(f, "0") for f in GPU_FIELDS))
    data["nvidia_smi"] = {"present": True, "rc": 0, "query": "\n".join(lines)}
    return data
