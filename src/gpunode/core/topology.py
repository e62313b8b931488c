"""Parsers for what GPUs and CPUs say about themselves (nvidia-smi, sysfs), and the
placement of vLLM services on GPU-local CPUs. Pure functions, tested on real captures."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

#: The query fields gpunode reads, in this order (nvidia-smi --query-gpu=...).
GPU_FIELDS = (
    "index", "uuid", "name", "pci.bus_id", "memory.total", "driver_version",
    "persistence_mode", "compute_mode", "power.limit", "power.default_limit",
    "power.min_limit", "power.max_limit", "ecc.mode.current", "ecc.mode.pending",
    "clocks.applications.graphics", "clocks.applications.memory", "pcie.link.gen.max",
    "pcie.link.width.max",
)
NVIDIA_SMI_QUERY = (f"nvidia-smi --query-gpu={','.join(GPU_FIELDS)} "
                    "--format=csv,noheader,nounits")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Gpu:
    index: int
    uuid: str
    name: str
    bus_id: str
    memory_mib: int | None
    driver_version: str
    values: dict[str, str] = field(default_factory=dict)
    cpus: list[int] = field(default_factory=list)
    numa_node: int | None = None

    @property
    def pci_address(self) -> str:
        """sysfs form: 0000:41:00.0 (nvidia-smi prints an 8-digit domain, upper-case)."""
        domain, rest = self.bus_id.lower().split(":", 1)
        return f"{int(domain, 16):04x}:{rest}"


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]; '' or 'N/A' -> []."""
    cpus: set[int] = set()
    text = text.strip()
    if not text or text.upper() == "N/A":
        return []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.update(range(int(lo), int(hi) + 1))
        elif part:
            cpus.add(int(part))
    return sorted(cpus)


def format_cpulist(cpus: list[int] | set[int]) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8' (the kernel's own list form)."""
    ordered = sorted(set(cpus))
    ranges: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        ranges.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(ranges)


def _num(value: str) -> int | None:
    try:
        return int(float(value))
    except ValueError:
        return None


def parse_query_gpu(text: str, fields: tuple[str, ...] = GPU_FIELDS) -> list[Gpu]:
    """Parse `--format=csv,noheader,nounits` output for `fields`."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(", ")]
        if len(cells) != len(fields):
            raise ValueError(f"expected {len(fields)} fields, got {len(cells)}: {line!r}")
        values = dict(zip(fields, cells, strict=True))
        gpus.append(Gpu(index=int(values["index"]), uuid=values["uuid"], name=values["name"],
                        bus_id=values["pci.bus_id"], memory_mib=_num(values["memory.total"]),
                        driver_version=values["driver_version"], values=values))
    return gpus


@dataclass
class TopoRow:
    gpu: str
    links: dict[str, str]
    cpus: list[int]
    numa_nodes: list[int]


def parse_topo(text: str) -> dict[str, TopoRow]:
    """Parse `nvidia-smi topo -m` (tab-separated, ANSI-underlined header)."""
    lines = [ANSI.sub("", line) for line in text.splitlines()]
    header_idx = next((i for i, line in enumerate(lines) if "CPU Affinity" in line), None)
    if header_idx is None:
        raise ValueError("no 'CPU Affinity' header in topo output")
    header = lines[header_idx].split("\t")
    cols = [h.strip() for h in header]
    cpu_col = cols.index("CPU Affinity")
    numa_col = cols.index("NUMA Affinity") if "NUMA Affinity" in cols else None
    rows: dict[str, TopoRow] = {}
    for line in lines[header_idx + 1:]:
        if not line.strip():
            break
        cells = line.split("\t")
        name = cells[0].strip()
        if not name.startswith("GPU"):
            continue
        links = {cols[i]: cells[i].strip() for i in range(1, cpu_col) if i < len(cells)}
        cpus = parse_cpulist(cells[cpu_col]) if cpu_col < len(cells) else []
        numa = []
        if numa_col is not None and numa_col < len(cells):
            numa = parse_cpulist(cells[numa_col])
        rows[name] = TopoRow(gpu=name, links=links, cpus=cpus, numa_nodes=numa)
    return rows


def attach_topology(gpus: list[Gpu], topo: dict[str, TopoRow]) -> list[Gpu]:
    for gpu in gpus:
        row = topo.get(f"GPU{gpu.index}")
        if row:
            gpu.cpus = row.cpus
            gpu.numa_node = row.numa_nodes[0] if len(row.numa_nodes) == 1 else None
    return gpus


@dataclass(frozen=True)
class Placement:
    """Where one vLLM service runs: its GPUs (by UUID, in index order), the CPUs local to
    them and their NUMA node(s). Empty cpus = no locality known: leave unpinned."""

    uuids: tuple[str, ...]
    cpus: tuple[int, ...]
    numa_nodes: tuple[int, ...]
    indices: tuple[int, ...] = ()

    @property
    def cpu_list(self) -> str:
        return format_cpulist(list(self.cpus))

    @property
    def numa_policy(self) -> str | None:
        if not self.numa_nodes:
            return None
        return "bind" if len(self.numa_nodes) == 1 else "interleave"

    def unit_lines(self) -> list[str]:
        """The [Service] lines of the placement drop-in."""
        lines = [f"Environment=CUDA_VISIBLE_DEVICES={','.join(self.uuids)}"]
        # Device nodes by path: resolved at unit start, whatever the driver registers as.
        lines += [f"DeviceAllow=/dev/nvidia{i} rw" for i in self.indices]
        if self.cpus:
            lines.append(f"CPUAffinity={self.cpu_list}")
        if self.numa_policy:
            lines.append(f"NUMAPolicy={self.numa_policy}")
            lines.append(f"NUMAMask={format_cpulist(list(self.numa_nodes))}")
        return lines


def place(service_gpus: list[int], gpus: list[Gpu], pin: bool = True) -> Placement:
    """Placement of a service on `gpus` (facts from the host)."""
    by_index = {g.index: g for g in gpus}
    chosen = [by_index[i] for i in service_gpus if i in by_index]
    if len(chosen) != len(service_gpus):
        missing = sorted(set(service_gpus) - set(by_index))
        raise ValueError(f"GPU index(es) {missing} not present on the host "
                         f"(it has {sorted(by_index)})")
    uuids = tuple(g.uuid for g in chosen)
    indices = tuple(g.index for g in chosen)
    if not pin:
        return Placement(uuids, (), (), indices)
    cpus: set[int] = set()
    nodes: set[int] = set()
    for g in chosen:
        cpus.update(g.cpus)
        if g.numa_node is not None:
            nodes.add(g.numa_node)
    if any(g.numa_node is None for g in chosen):
        nodes = set()
    return Placement(uuids, tuple(sorted(cpus)), tuple(sorted(nodes)), indices)
