"""Property tests of the planner over generated model shapes and GPUs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gpunode.sizing import GpuSpec, ModelShape, QuantConfig, plan, valid_tp_sizes, weight_bytes


@st.composite
def shapes(draw) -> ModelShape:
    kv = draw(st.sampled_from([1, 2, 4, 8, 16]))
    heads = kv * draw(st.sampled_from([1, 2, 4, 5, 8]))
    head_dim = draw(st.sampled_from([64, 128, 256]))
    experts = draw(st.sampled_from([1, 1, 8]))
    return ModelShape(
        name="generated",
        model_type="llama",
        num_hidden_layers=draw(st.integers(1, 96)),
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        intermediate_size=128 * draw(st.integers(8, 256)),
        vocab_size=draw(st.integers(1000, 260_000)),
        max_position_embeddings=131072,
        max_model_len_default=131072,
        num_experts=experts,
        num_experts_per_tok=2 if experts > 1 else 1,
    )


gpus = st.builds(
    lambda mib: GpuSpec("generated GPU", mib),
    st.integers(min_value=8 * 1024, max_value=192 * 1024),
)
utils = st.floats(min_value=0.5, max_value=0.95)
kv_dtypes = st.sampled_from(["auto", "fp8"])
ctxs = st.sampled_from([2048, 8192, 32768, 131072])


@settings(max_examples=150, deadline=None)
@given(shapes(), gpus, utils, kv_dtypes, ctxs)
def test_more_gpus_never_reduce_capacity(shape, gpu, util, kv, ctx):
    """Holds while KV heads are split (TP ≤ KV heads) or both sizes pay the TP>1 overhead.

    The exception (see the next test): going from TP=1 to a TP that only replicates KV heads
    adds the NCCL overhead without shrinking the per-GPU KV bytes per token.
    """
    valid = valid_tp_sizes(shape, 8)
    plans = {tp: plan(shape, gpu, tp, tp, ctx, util, kv) for tp in valid}
    for t1 in valid:
        for t2 in valid:
            if t1 >= t2 or (t1 == 1 and t2 > shape.num_key_value_heads):
                continue
            smaller, larger = plans[t1], plans[t2]
            assert larger.capacity_tokens >= smaller.capacity_tokens
            assert larger.weight_bytes_per_gpu <= smaller.weight_bytes_per_gpu
            if smaller.verdict != "fails":
                assert larger.verdict != "fails"


def test_replicated_kv_heads_can_lose_capacity():
    tiny = ModelShape("tiny", "llama", 1, 128, 2, 1, 64, 1024, 1000, max_model_len_default=2048)
    gpu = GpuSpec("generated GPU", 8192)
    one, two = (plan(tiny, gpu, tp, tp, 2048, 0.5) for tp in (1, 2))
    assert two.kv_bytes_per_token_per_gpu == one.kv_bytes_per_token_per_gpu
    assert two.capacity_tokens < one.capacity_tokens
    assert "kv-replicated" in [f.code for f in two.warnings]


@settings(max_examples=150, deadline=None)
@given(shapes(), gpus, utils, st.sampled_from([1, 2, 4, 8]), ctxs)
def test_fp8_kv_at_least_doubles_capacity(shape, gpu, util, tp, ctx):
    auto = plan(shape, gpu, tp, tp, ctx, util, "auto")
    fp8 = plan(shape, gpu, tp, tp, ctx, util, "fp8")
    assert fp8.kv_bytes_per_token_per_gpu * 2 == auto.kv_bytes_per_token_per_gpu
    assert fp8.capacity_tokens >= 2 * auto.capacity_tokens


@settings(max_examples=150, deadline=None)
@given(shapes(), gpus, utils, utils, ctxs)
def test_higher_utilization_never_reduces_capacity(shape, gpu, u1, u2, ctx):
    lo, hi = sorted((u1, u2))
    assert plan(shape, gpu, 1, 1, ctx, hi).capacity_tokens >= plan(shape, gpu, 1, 1, ctx, lo).capacity_tokens


@settings(max_examples=150, deadline=None)
@given(shapes(), gpus, utils, st.sampled_from([1, 2, 4]), ctxs, ctxs)
def test_longer_context_never_improves_the_verdict(shape, gpu, util, tp, c1, c2):
    order = {"fits": 0, "tight": 1, "fails": 2}
    short, long = sorted((c1, c2))
    a = plan(shape, gpu, tp, tp, short, util)
    b = plan(shape, gpu, tp, tp, long, util)
    assert order[b.verdict] >= order[a.verdict]
    if a.verdict != "fails":
        assert b.concurrency <= a.concurrency


@settings(max_examples=100, deadline=None)
@given(shapes(), st.sampled_from([32, 64, 128]))
def test_int4_weights_are_smaller_than_fp8_and_bf16(shape, group):
    bf16 = weight_bytes(shape)
    fp8 = weight_bytes(shape, QuantConfig("fp8", 8))
    awq = weight_bytes(shape, QuantConfig("awq", 4, group, True))
    assert awq < fp8 < bf16
