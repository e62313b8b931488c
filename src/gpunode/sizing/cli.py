"""``gpunode sizing MODEL --gpus 2xA6000 [--ctx N] [--kv-cache-dtype fp8] [--json]``.

Mount in the main CLI with ``app.command("sizing")(sizing_command)``; standalone:
``python -m gpunode.sizing.cli MODEL ...``. Exit codes: 0 a configuration fits,
1 nothing fits, 2 invalid input (unknown GPU, no config.json, bad option).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from gpunode.cli import output
from gpunode.sizing.gpus import parse_gpus
from gpunode.sizing.planner import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DEFAULT_TARGET_CTX,
    GIB,
    Overheads,
    options,
    recommend,
)
from gpunode.sizing.shape import SizingError, load_model_config

__all__ = ["app", "sizing_command"]

_VERDICT_STYLE = {"fits": "green", "tight": "yellow", "fails": "red"}


def sizing_command(
    model: Annotated[
        str,
        typer.Argument(help="Model directory, config.json, or HF repo id in the local Hugging Face cache"),
    ],
    gpus: Annotated[str, typer.Option("--gpus", help="GPUs per node, e.g. 2xA6000")] = "1xA6000",
    ctx: Annotated[
        int | None,
        typer.Option("--ctx", help="max_model_len to plan for (default: min(model maximum, 32768))"),
    ] = None,
    kv_cache_dtype: Annotated[
        str, typer.Option("--kv-cache-dtype", help="auto, fp8, fp8_e4m3, fp8_e5m2")
    ] = "auto",
    gpu_memory_utilization: Annotated[
        float, typer.Option("--gpu-memory-utilization", help="fraction of GPU memory vLLM may use")
    ] = DEFAULT_GPU_MEMORY_UTILIZATION,
    quantization: Annotated[
        str | None,
        typer.Option("--quantization", help="vLLM --quantization (default: from config.json)"),
    ] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="revision in the HF cache")] = None,
    hf_home: Annotated[str | None, typer.Option("--hf-home", help="HF_HOME to search")] = None,
    overhead_tp1: Annotated[
        float, typer.Option("--overhead-tp1", help="GiB per GPU besides weights and KV at TP=1")
    ] = 2.0,
    overhead_tp: Annotated[
        float, typer.Option("--overhead-tp", help="GiB per GPU besides weights and KV at TP>1")
    ] = 2.5,
    ecc: Annotated[
        bool | None, typer.Option("--ecc/--no-ecc", help="GPU ECC state (A6000: 46068 MiB with ECC on)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for tools")] = False,
) -> None:
    """Show which tensor-parallel sizes fit a model on a node's GPUs and recommend settings."""
    err = Console(stderr=True)
    try:
        gpu, n_gpus = parse_gpus(gpus, ecc=ecc)
        shape = load_model_config(model, hf_home=hf_home, revision=revision)
        if ctx is not None and ctx < 1:
            raise SizingError(f"--ctx must be a positive token count, got {ctx}")
        overheads = Overheads(overhead_tp1, overhead_tp)
        target = ctx or min(shape.max_model_len_default or DEFAULT_TARGET_CTX, DEFAULT_TARGET_CTX)
        plans = options(
            shape,
            gpu,
            n_gpus,
            target,
            kv_cache_dtype,
            gpu_memory_utilization,
            quantization,
            None,
            overheads,
        )
        rec = recommend(
            shape, gpu, n_gpus, ctx, kv_cache_dtype, gpu_memory_utilization, quantization, overheads
        )
    except SizingError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None

    if as_json:
        doc = {
            "model": shape.name,
            "source": shape.source,
            "gpus": {
                "name": gpu.name,
                "count": n_gpus,
                "memory_mib": gpu.memory_mib,
                "usable_mib": gpu.usable_mib,
            },
            "max_model_len": target,
            "options": [p.to_dict() for p in plans],
            "recommendation": rec.to_dict(),
        }
        typer.echo(json.dumps(doc, indent=2))
        raise typer.Exit(0 if rec.ok else 1)

    out = output.console()
    quant = plans[0].quantization or shape.torch_dtype
    title = (f"{shape.name} ({quant}) on {n_gpus}× {gpu.name}, max_model_len {target:,}, "
             f"kv {kv_cache_dtype}, util {gpu_memory_utilization}")
    columns = [output.Column(name, "right") for name in
               ("TP", "replicas", "weights/GPU", "KV/GPU", "KV tokens", f"conc. @{target:,}")]
    columns += [output.Column("verdict"), output.Column("why", wrap=True)]
    rows = [[
        str(p.tp),
        str(p.replicas),
        f"{p.weight_bytes_per_gpu / GIB:.1f} GiB",
        f"{max(p.kv_bytes_per_gpu, 0) / GIB:.1f} GiB",
        f"{p.capacity_tokens:,}",
        f"{p.concurrency:.1f}×",
        f"[{_VERDICT_STYLE[p.verdict]}]{p.verdict}[/]",
        escape("; ".join(f.message for f in p.findings[:2])),
    ] for p in plans]
    output.print_table(out, title, columns, rows)
    if rec.ok and rec.plan is not None:
        out.print(
            "[bold]Recommended service settings[/bold]"
            + (f" ({rec.replicas} replicas)" if rec.replicas > 1 else "")
        )
        for key, value in rec.settings.items():
            out.print(f"  {key}: {value}", highlight=False)
    else:
        out.print("[red]No configuration fits.[/red]")
    for note in rec.notes + (rec.plan.notes if rec.plan else ()):
        output.echo(out, note, indent="  note: ", subsequent="        ")
    raise typer.Exit(0 if rec.ok else 1)


app = typer.Typer(add_completion=False, help="vLLM sizing planner")
app.command("sizing")(sizing_command)


def main() -> None:
    typer.run(sizing_command)


if __name__ == "__main__":
    main()
