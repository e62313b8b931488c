"""Simulated GPU descriptions (SIMULATION, lab equipment).

The lab writes one JSON document to ``/etc/gpunode-sim/gpus.json`` inside a guest; the
guest tools (``guest/gpunode_sim.py``, simulated ``nvidia-smi`` and friends) read it.
Model constants come from real captures (shared/research/captures.md §1, §5.1, §9):
RTX A6000 = PCI ``10de:2230``, sub-system ``0x145910DE``, 49140 MiB (46068 MiB with ECC on),
VBIOS ``94.02.5C.00.02``, 300 W default/max, 100 W min, PCIe gen4 x16, compute 8.6.

Schema (``schema: 1``)::

    {"schema": 1, "gpus": [GpuSpec.to_dict(), ...]}

CPU affinity is not stored: the guest derives it from
``/sys/devices/system/node/node<N>/cpulist`` of the GPU's ``numa_node``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class GpuModel:
    """Constants of one GPU product (what the PCI device id decides)."""

    name: str
    pci_device_id: str  # NVML form: 0xDDDDVVVV
    pci_sub_device_id: str
    brand: str
    architecture: str
    compute_cap: str
    memory_total_mib: int  # ECC off
    memory_total_ecc_mib: int  # ECC on
    memory_reserved_mib: int
    bar1_total_mib: int
    vbios_version: str
    board_part_number: str
    gpu_part_number: str
    inforom_image: str
    power_default_w: float
    power_min_w: float
    power_max_w: float
    pcie_gen_max: int
    pcie_width_max: int
    clock_max_graphics: int
    clock_max_sm: int
    clock_max_memory: int
    clock_max_video: int
    clock_app_graphics: int
    clock_app_memory: int
    ecc_supported: bool
    ecc_default: bool
    mig_capable: bool
    fan: bool  # active cooler (blower) reports a fan speed
    temp_shutdown_c: int
    temp_slowdown_c: int
    temp_max_operating_c: int
    temp_target_c: int


RTX_A6000 = GpuModel(
    name="NVIDIA RTX A6000",
    pci_device_id="0x223010DE",
    pci_sub_device_id="0x145910DE",
    brand="NVIDIA RTX",
    architecture="Ampere",
    compute_cap="8.6",
    memory_total_mib=49140,
    memory_total_ecc_mib=46068,
    memory_reserved_mib=450,
    bar1_total_mib=65536,
    vbios_version="94.02.5C.00.02",
    board_part_number="900-5G133-1700-000",
    gpu_part_number="2230-875-A1",
    inforom_image="G133.0500.00.05",
    power_default_w=300.0,
    power_min_w=100.0,
    power_max_w=300.0,
    pcie_gen_max=4,
    pcie_width_max=16,
    clock_max_graphics=2100,
    clock_max_sm=2100,
    clock_max_memory=8001,
    clock_max_video=1950,
    clock_app_graphics=1800,
    clock_app_memory=8001,
    ecc_supported=True,
    ecc_default=False,
    mig_capable=False,
    fan=True,
    temp_shutdown_c=98,
    temp_slowdown_c=95,
    temp_max_operating_c=93,
    temp_target_c=84,
)

# H100 SXM values from tests/fixtures/nvidia/h100_580.159.04 (a real capture); used by the
# format tests and available to pvesim for device id 10de:2330.
H100_80GB_HBM3 = GpuModel(
    name="NVIDIA H100 80GB HBM3",
    pci_device_id="0x233010DE",
    pci_sub_device_id="0x16C110DE",
    brand="NVIDIA",
    architecture="Hopper",
    compute_cap="9.0",
    memory_total_mib=81559,
    memory_total_ecc_mib=81559,
    memory_reserved_mib=480,
    bar1_total_mib=131072,
    vbios_version="96.00.DA.00.0C",
    board_part_number="692-2G520-0200-000",
    gpu_part_number="2330-885-A1",
    inforom_image="G520.0200.00.05",
    power_default_w=700.0,
    power_min_w=200.0,
    power_max_w=700.0,
    pcie_gen_max=5,
    pcie_width_max=16,
    clock_max_graphics=1980,
    clock_max_sm=1980,
    clock_max_memory=2619,
    clock_max_video=1545,
    clock_app_graphics=1980,
    clock_app_memory=2619,
    ecc_supported=True,
    ecc_default=True,
    mig_capable=True,
    fan=False,
    temp_shutdown_c=-8,
    temp_slowdown_c=-2,
    temp_max_operating_c=0,
    temp_target_c=0,
)

MODELS: dict[str, GpuModel] = {"10de:2230": RTX_A6000, "10de:2330": H100_80GB_HBM3}


@dataclass(frozen=True)
class Readings:
    """Idle sensor readings the simulated tools report (constant; no load simulation)."""

    temperature_c: int = 30
    power_draw_w: float = 21.5
    pstate: str = "P8"
    fan_percent: int = 30
    utilization_percent: int = 0
    memory_used_mib: int = 1
    pcie_gen_current: int = 1  # an idle A6000 drops to gen 1 (captures.md §9)
    clock_graphics: int = 0
    clock_sm: int = 0
    clock_memory: int = 405
    clock_video: int = 555


@dataclass(frozen=True)
class GpuSpec:
    """One simulated GPU as the guest sees it."""

    index: int
    uuid: str
    serial: str
    pci_bus_id: str  # 00000000:BB:DD.F
    numa_node: int
    model: GpuModel
    readings: Readings = field(default_factory=Readings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_BUS_RE = re.compile(
    r"^(?:(?P<dom>[0-9a-fA-F]{4,8}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<dev>[0-9a-fA-F]{2})\.(?P<fn>[0-7])$"
)


def normalize_bus_id(bus_id: str) -> str:
    """``01:00.0`` / ``0000:01:00.0`` / ``00000000:01:00.0`` -> ``00000000:01:00.0``."""
    m = _BUS_RE.match(bus_id.strip())
    if not m:
        raise ValueError(
            f"PCI address {bus_id!r} is not of the form [DDDD:]BB:DD.F (e.g. 0000:01:00.0)"
        )
    dom = int(m.group("dom") or "0", 16)
    return f"{dom:08X}:{m.group('bus').upper()}:{m.group('dev').upper()}.{m.group('fn')}"


def stable_uuid(seed: str) -> str:
    """A stable ``GPU-8-4-4-4-12`` UUID derived from ``seed``."""
    h = hashlib.sha256(("gpunode-sim-uuid:" + seed).encode()).hexdigest()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def stable_serial(seed: str) -> str:
    """A stable 13-digit board serial from ``seed`` (real A6000 ones look like 1562521008218)."""
    n = int(hashlib.sha256(("gpunode-sim-serial:" + seed).encode()).hexdigest(), 16)
    return "13" + f"{n % 10**11:011d}"


@dataclass(frozen=True)
class PciDevice:
    """A passed-through PCI function as seen inside the guest."""

    bus_id: str  # guest address, e.g. 0000:01:00.0
    vendor_device: str = "10de:2230"
    numa_node: int = 0


def from_pci_devices(devices: Iterable[PciDevice], seed: str = "gpunode-lab") -> list[GpuSpec]:
    """Build GPU specs from a list of PCI devices (pvesim: from a VM's ``hostpci`` entries).

    GPUs are indexed in PCI bus order, as nvidia-smi does by default. ``seed`` (e.g. the VM
    id) makes the UUIDs and serials stable per VM and distinct between VMs.
    """
    specs: list[GpuSpec] = []
    devs = sorted(devices, key=lambda d: normalize_bus_id(d.bus_id))
    for i, dev in enumerate(devs):
        key = dev.vendor_device.lower()
        model = MODELS.get(key)
        if model is None:
            raise ValueError(
                f"no simulated GPU model for PCI id {dev.vendor_device!r} at {dev.bus_id}; "
                f"known ids: {', '.join(sorted(MODELS))}"
            )
        bus = normalize_bus_id(dev.bus_id)
        specs.append(
            GpuSpec(
                index=i,
                uuid=stable_uuid(f"{seed}:{bus}:{key}"),
                serial=stable_serial(f"{seed}:{bus}:{key}"),
                pci_bus_id=bus,
                numa_node=dev.numa_node,
                model=model,
            )
        )
    return specs


def default_a6000x2(seed: str = "gpunode-lab") -> list[GpuSpec]:
    """2x RTX A6000 for a 2-NUMA-node lab VM: GPU0 on node 0, GPU1 on node 1."""
    return from_pci_devices(
        [PciDevice("0000:01:00.0", "10de:2230", 0), PciDevice("0000:02:00.0", "10de:2230", 1)],
        seed=seed,
    )


def to_document(specs: Iterable[GpuSpec]) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, "gpus": [s.to_dict() for s in specs]}


def to_json(specs: Iterable[GpuSpec]) -> str:
    """The text of ``/etc/gpunode-sim/gpus.json``."""
    return json.dumps(to_document(specs), indent=2, sort_keys=True) + "\n"


def from_document(doc: dict[str, Any]) -> list[GpuSpec]:
    """Inverse of :func:`to_document` (for tests and tools that edit a guest's file)."""
    if doc.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"gpus.json schema {doc.get('schema')!r} is not {SCHEMA_VERSION}")
    out = []
    for g in doc["gpus"]:
        out.append(
            GpuSpec(
                index=g["index"],
                uuid=g["uuid"],
                serial=g["serial"],
                pci_bus_id=g["pci_bus_id"],
                numa_node=g["numa_node"],
                model=GpuModel(**g["model"]),
                readings=Readings(**g.get("readings", {})),
            )
        )
    return out


__all__ = [
    "GpuModel",
    "GpuSpec",
    "H100_80GB_HBM3",
    "MODELS",
    "PciDevice",
    "RTX_A6000",
    "Readings",
    "default_a6000x2",
    "from_document",
    "from_pci_devices",
    "normalize_bus_id",
    "to_document",
    "to_json",
]
