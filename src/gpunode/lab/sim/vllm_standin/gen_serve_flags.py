"""Regenerate vllm/serve_flags.py from shared/vllm/serve_flags-<version>.txt (SIMULATION tool).

    python gen_serve_flags.py ../../../../../../shared/vllm/serve_flags-0.33.0.txt

The flag list is vLLM 0.33.0's `vllm serve` option list; it carries no types, so the
argument kind of each flag comes from KINDS below (vLLM's own definitions, from memory of
vllm/engine/arg_utils.py and entrypoints/openai/cli_args.py; those marked "inferred" were
not checked against the source). Everything not listed takes one value.
"""

from __future__ import annotations

import sys
from pathlib import Path

BOOL = """
aggregate-engine-logging allow-credentials allow-deprecated-quantization async-scheduling
cudagraph-metrics data-parallel-external-lb data-parallel-hybrid-lb
data-parallel-multi-port-external-lb disable-cascade-attn disable-chunked-mm-input
disable-custom-all-reduce disable-fastapi-docs disable-hybrid-kv-cache-manager
disable-log-stats disable-nccl-for-dp-synchronization disable-sliding-window
disable-uvicorn-access-log enable-auto-tool-choice enable-batch-sharded-sampling
enable-chunked-prefill enable-cumem-allocator enable-dbo enable-elastic-ep
enable-ep-weight-filter enable-eplb enable-expert-parallel enable-fault-tolerance
enable-flash-late-interaction enable-flashinfer-autotune enable-force-include-usage
enable-layerwise-nvtx-tracing enable-log-deltas enable-log-outputs enable-log-requests
enable-logging-iteration-details enable-lora enable-mamba-cache-stochastic-rounding
enable-mamba-shared-prefix-checkpoint enable-mfu-metrics enable-mixed-moe-lora-format
enable-mm-embeds enable-moe-shared-loras enable-nccl-comm-suspend enable-offline-docs
enable-per-request-metrics enable-prefix-caching enable-prompt-embeds
enable-prompt-tokens-details enable-request-id-headers enable-return-routed-experts
enable-scale-out enable-server-load-tracking enable-shm-tensor-arena enable-sleep-mode
enable-ssl-refresh enable-tokenizer-info-endpoint enable-tower-connector-lora
enable-trace-replay enforce-eager exclude-tools-when-tool-choice-none
fail-on-environ-validation fully-sharded-loras interleave-mm-strings kv-cache-metrics
kv-sharing-fast-prefill language-model-only log-error-stack mm-encoder-only numa-bind
per-request-spec-decode-metrics ray-workers-use-nsight return-tokens-as-token-ids
skip-mm-profiling skip-tokenizer-init specialize-active-lora tokens-only trust-remote-code
trust-request-chat-template trust-request-mm-kwargs use-tqdm-on-load
"""
# inferred: names read like switches
BOOL_INFERRED = """
cohere-is-reasoning-model dcp-q-replicate enable-hc-sp jit-monitor-verbose
long-prefill-token-threshold-adaptive mm-device-do-normalize monokernel return-sampling-mask
scheduler-reserve-full-isl sleep-mode-offload-cudagraph swa-bounded-replay use-fp64-gumbel
use-replayssm https watermark
"""
LIST = """
api-key served-model-name lora-modules middleware cudagraph-capture-sizes
custom-histogram-buckets device-ids ignore-patterns logits-processors lora-target-modules
numa-bind-nodes numa-bind-cpus collect-detailed-traces kv-cache-dtype-skip-layers
sleep-preserve-parameter-names allowed-origins allowed-methods allowed-headers
allowed-media-domains
"""
# JSON-valued configs; also accept dotted sub-keys (--compilation-config.mode 3)
JSON = """
additional-config attention-config aux-output-config compilation-config
default-chat-template-kwargs default-mm-loras diffusion-config ec-transfer-config
engram-config eplb-config fault-tolerance-config hf-overrides kernel-config
kv-events-config kv-transfer-config limit-mm-per-prompt logging-config media-io-kwargs
mm-processor-kwargs model-class-overrides model-loader-extra-config
override-generation-config pooler-config profiler-config quantization-config
reasoning-config reasoning-effort-map speculative-config structured-outputs-config
watchdog-config watermark-config weight-transfer-config
"""
INT = """
port tensor-parallel-size pipeline-parallel-size data-parallel-size data-parallel-size-local
data-parallel-rank data-parallel-start-rank data-parallel-rpc-port max-num-seqs
max-num-batched-tokens max-logprobs seed block-size max-loras max-lora-rank max-cpu-loras
shutdown-timeout grpc-port master-port nnodes node-rank
"""
FLOAT = "gpu-memory-utilization cpu-offload-gb"
HELP = "help"


def kinds() -> dict[str, str]:
    out: dict[str, str] = {}
    for kind, text in (
        ("bool", BOOL + BOOL_INFERRED),
        ("list", LIST),
        ("json", JSON),
        ("int", INT),
        ("float", FLOAT),
        ("help", HELP),
    ):
        for name in text.split():
            out[name] = kind
    return out


def render(flags: list[str], source: str) -> str:
    k = kinds()
    unknown = sorted(set(k) - {f.removeprefix("--") for f in flags})
    if unknown:
        raise SystemExit(f"KINDS name flags that are not in {source}: {unknown}")
    lines = [
        f'"""vLLM `serve` flags, generated from {source} by gen_serve_flags.py. Do not edit."""',
        "",
        "# flag -> kind: bool (also --no-FLAG), list (one or more values), json (dict; also",
        "# --FLAG.key value), int, float, help, value (one string)",
        "SERVE_FLAGS: dict[str, str] = {",
    ]
    for f in flags:
        lines.append(f'    "{f}": "{k.get(f.removeprefix("--"), "value")}",')
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    src = Path(argv[0])
    flags = [ln.strip() for ln in src.read_text().splitlines() if ln.strip()]
    out = Path(__file__).parent / "vllm" / "serve_flags.py"
    out.write_text(render(flags, src.name))
    print(f"wrote {out} ({len(flags)} flags)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
