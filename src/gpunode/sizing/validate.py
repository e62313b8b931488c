"""The sizing planner applied to a whole site, for `gpunode validate` (and every command
that loads a site): a service that cannot start is an input error, reported with numbers."""

from __future__ import annotations

from typing import Any

from gpunode.inventory import Site
from gpunode.model import NodeProfile, VllmService
from gpunode.sizing import check_model_service
from gpunode.sizing.shape import SizingError


def check_service(p: NodeProfile, svc: VllmService) -> Any:
    """The planner's findings for one service of a node (None: not applicable); raises
    SizingError when the model's config cannot be read here."""
    return check_model_service(
        svc.model, p.gpus.model, svc.tensor_parallel_size, svc.max_model_len,
        svc.gpu_memory_utilization, svc.kv_cache_dtype, svc.quantization, len(svc.gpus),
        svc.max_num_seqs, revision=svc.revision, ecc=p.nvidia.settings.ecc)


def check_site(site: Site) -> tuple[list[str], list[str]]:
    """(errors, warnings), one line each, for every service whose model config is local."""
    errors: list[str] = []
    warnings: list[str] = []
    for p in site.nodes.values():
        for i, svc in enumerate(p.vllm.services):
            where = f"{site.path}: nodes.{p.name}.vllm.services[{i}] ({svc.name})"
            try:
                findings = check_service(p, svc)
            except SizingError as exc:
                warnings.append(f"{where}: sizing skipped: {exc}")
                continue
            for finding in findings or []:
                line = f"{where}: {finding.message}"
                (errors if finding.level == "error" else warnings).append(line)
    return errors, warnings
