"""Simulated GPU descriptions (SIMULATION): the lab's default box and pvesim's builder."""

from __future__ import annotations

import json
import re

import pytest

from gpunode.lab.sim import gpus


def test_default_is_two_a6000_on_two_numa_nodes() -> None:
    specs = gpus.default_a6000x2()
    assert [s.index for s in specs] == [0, 1]
    assert [s.pci_bus_id for s in specs] == ["00000000:01:00.0", "00000000:02:00.0"]
    assert [s.numa_node for s in specs] == [0, 1]
    for s in specs:
        m = s.model
        assert m.name == "NVIDIA RTX A6000"
        assert (m.pci_device_id, m.pci_sub_device_id) == ("0x223010DE", "0x145910DE")
        assert (m.memory_total_mib, m.memory_total_ecc_mib) == (49140, 46068)
        assert (m.power_default_w, m.power_min_w, m.power_max_w) == (300.0, 100.0, 300.0)
        assert (m.pcie_gen_max, m.pcie_width_max, m.ecc_default, m.mig_capable) == (4, 16, False, False)
        assert re.fullmatch(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", s.uuid)
        assert re.fullmatch(r"\d{13}", s.serial)
    assert specs[0].uuid != specs[1].uuid
    assert gpus.default_a6000x2()[0].uuid == specs[0].uuid  # stable
    assert gpus.default_a6000x2(seed="vm-101")[0].uuid != specs[0].uuid  # distinct per VM


def test_from_pci_devices_orders_by_bus_and_normalizes() -> None:
    specs = gpus.from_pci_devices(
        [gpus.PciDevice("0000:82:00.0", "10DE:2230", 1), gpus.PciDevice("41:00.0", "10de:2230", 0)],
        seed="vm-7",
    )
    assert [(s.index, s.pci_bus_id, s.numa_node) for s in specs] == [
        (0, "00000000:41:00.0", 0),
        (1, "00000000:82:00.0", 1),
    ]


def test_unknown_device_and_bad_address_are_explained() -> None:
    with pytest.raises(ValueError, match=r"no simulated GPU model for PCI id '10de:1234'.*known ids"):
        gpus.from_pci_devices([gpus.PciDevice("01:00.0", "10de:1234")])
    with pytest.raises(ValueError, match=r"not of the form \[DDDD:\]BB:DD.F"):
        gpus.normalize_bus_id("01:00")


def test_json_round_trip() -> None:
    specs = gpus.default_a6000x2()
    doc = json.loads(gpus.to_json(specs))
    assert doc["schema"] == gpus.SCHEMA_VERSION
    assert gpus.from_document(doc) == specs
