"""Parsers and placement, on real captures."""

from pathlib import Path

import pytest

from gpunode.core.topology import (
    GPU_FIELDS,
    Gpu,
    attach_topology,
    format_cpulist,
    parse_cpulist,
    parse_query_gpu,
    parse_topo,
    place,
)

H100 = Path(__file__).resolve().parent.parent / "fixtures" / "nvidia" / "h100_580.159.04"

# research/captures.md §4.1: 2x RTX 3090 with NVLink, 560.35.05 (tabs preserved)
TOPO_2GPU = ("\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
             "GPU0\t X \tNV4\t0-23\t0\t\tN/A\n"
             "GPU1\tNV4\t X \t0-23\t0\t\tN/A\n\nLegend:\n\n  X    = Self\n")


def test_cpulist_round_trip():
    assert parse_cpulist("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert format_cpulist([11, 10, 8, 3, 2, 1, 0]) == "0-3,8,10-11"
    assert parse_cpulist("N/A") == []


def test_topo_real_h100_capture_with_escape_codes():
    rows = parse_topo((H100 / "topo_m.txt").read_text())
    assert list(rows) == ["GPU0"]
    assert rows["GPU0"].cpus == list(range(16))
    assert rows["GPU0"].numa_nodes == [0]


def test_topo_two_gpus_nvlink():
    rows = parse_topo(TOPO_2GPU)
    assert rows["GPU0"].links == {"GPU0": "X", "GPU1": "NV4"}
    assert rows["GPU1"].cpus == list(range(24))


def test_query_real_h100_fields():
    # The real capture used more fields; re-project it onto GPU_FIELDS by header name.
    text = (H100 / "query_csv_nounits.txt").read_text().split("__rc")[0].strip().splitlines()
    header = [h.split(" [")[0].strip() for h in text[0].split(", ")]
    alias = {"clocks.current.sm": "clocks.sm"}
    header = [alias.get(h, h) for h in header]
    values = dict(zip(header, text[1].split(", "), strict=True))
    line = ", ".join(values[f] for f in GPU_FIELDS)
    (gpu,) = parse_query_gpu(line)
    assert gpu.uuid == "GPU-3f7d6e7f-bafc-d33b-65bd-affad9270b29"
    assert gpu.memory_mib == 81559
    assert gpu.pci_address == "0000:00:06.0"
    assert gpu.values["persistence_mode"] == "Enabled"


def test_query_rejects_wrong_field_count():
    with pytest.raises(ValueError):
        parse_query_gpu("0, GPU-x")


def _gpus() -> list[Gpu]:
    gpus = [Gpu(0, "GPU-a", "NVIDIA RTX A6000", "00000000:01:00.0", 49140, "580.95.05"),
            Gpu(1, "GPU-b", "NVIDIA RTX A6000", "00000000:02:00.0", 49140, "580.95.05")]
    topo = ("\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
            "GPU0\t X \tSYS\t0-3\t0\t\tN/A\nGPU1\tSYS\t X \t4-7\t1\t\tN/A\n")
    return attach_topology(gpus, parse_topo(topo))


def test_place_single_gpu_binds_its_node():
    where = place([1], _gpus())
    assert where.uuids == ("GPU-b",)
    assert where.unit_lines() == ["Environment=CUDA_VISIBLE_DEVICES=GPU-b",
                                  "DeviceAllow=/dev/nvidia1 rw", "CPUAffinity=4-7",
                                  "NUMAPolicy=bind", "NUMAMask=1"]


def test_place_across_nodes_interleaves():
    where = place([0, 1], _gpus())
    assert where.cpu_list == "0-7"
    assert where.numa_policy == "interleave"
    assert "NUMAMask=0-1" in where.unit_lines()


def test_place_unpinned_and_missing_gpu():
    assert place([0], _gpus(), pin=False).unit_lines() == [
        "Environment=CUDA_VISIBLE_DEVICES=GPU-a", "DeviceAllow=/dev/nvidia0 rw"]
    with pytest.raises(ValueError, match="not present"):
        place([2], _gpus())
