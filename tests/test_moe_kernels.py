"""The Triton MoE kernels against the reference ``moe_reference``: on CPU in Triton's interpreter
(tiny sizes, float32 tiles, so W4A16 agrees to float32 rounding and W4A4's quantization is the
reference's bit for bit), on the GPU at real sizes (bf16 tiles), with a CUDA-graph capture."""

import json
from pathlib import Path

import pytest
import torch

from fp4compile.formats import quantize
from fp4compile.formats.moe import moe_reference

moe_kernels = pytest.importorskip("fp4compile.kernels.triton.moe")
from fp4compile.kernels.triton.moe_dispatch import dispatch_tokens, padded_rows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MOE_SHAPES = json.loads((Path(__file__).parents[1] / "benchmarks" / "shapes.json").read_text())["moe"]


def routing(tokens: int, experts: int, top_k: int, generator: torch.Generator, unrouted: bool = True):
    """Distinct experts per token (as top-k gives), with one slot routed nowhere (id E) when
    ``unrouted``; routing weights from a softmax."""
    ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    if unrouted and tokens > 1:
        ids[1, 0] = experts
    weights = torch.randn(tokens, top_k, generator=generator).softmax(-1)
    return ids.to(DEVICE), weights.to(DEVICE)


def experts(count: int, hidden: int, inter: int, fmt: str, generator: torch.Generator, bias: bool):
    """Random fp4 experts, drawn on the device (real sizes are gigabytes of float32)."""
    device_rng = torch.Generator(DEVICE).manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
    gate_up = quantize(torch.randn(count, 2 * inter, hidden, generator=device_rng, device=DEVICE) / hidden**0.5, fmt)
    down = quantize(torch.randn(count, hidden, inter, generator=device_rng, device=DEVICE) / inter**0.5, fmt)
    biases = ((torch.randn(count, 2 * inter, generator=device_rng, device=DEVICE),
               torch.randn(count, hidden, generator=device_rng, device=DEVICE)) if bias else (None, None))
    return gate_up, down, biases


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def run_both(tokens, weights, top_k, fmt, act_mode, activation, generator, hidden_dtype=torch.float32, config=None,
             ids_dtype=torch.int64):
    """``fp4_moe`` and the reference on fresh hidden states and routing over ``weights``."""
    gate_up, down, (gate_up_bias, down_bias) = weights
    count, hidden_size = down.packed.shape[:2]
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(hidden_dtype).to(DEVICE)
    ids, topk_weights = routing(tokens, count, top_k, generator)
    y = moe_kernels.fp4_moe(hidden, ids.to(ids_dtype), topk_weights, gate_up.packed, gate_up.scales,
                            gate_up.global_scale, down.packed, down.scales, down.global_scale, gate_up_bias, down_bias,
                            fmt, act_mode, activation, 1.702, 7.0, config=config)
    ref = moe_reference(hidden, ids, topk_weights, gate_up, down, gate_up_bias, down_bias, act_mode, activation, 1.702,
                        7.0)
    assert y.shape == ref.shape and y.dtype == hidden.dtype and not y.isnan().any()
    return y, ref


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("act_mode", ["none", "fp4"])
@pytest.mark.parametrize("activation,bias", [("silu", False), ("clamped_swiglu", True)])
def test_moe_kernels_match_the_reference_in_the_interpreter(fmt, act_mode, activation, bias, rng):
    if DEVICE != "cpu":
        pytest.skip("interpreter test (the GPU runs the real-size tests)")
    y, ref = run_both(9, experts(6, 64, 96, fmt, rng, bias), 3, fmt, act_mode, activation, rng)
    # float32 tiles: W4A16 differs by accumulation order only. W4A4 quantizes the same values as
    # the reference, bit for bit, but an intermediate a rounding away from an e2m1 boundary may
    # land on the other side (a rare one-step change in one element).
    assert relative_error(y, ref) < (1e-5 if act_mode == "none" else 1e-3)


@pytest.mark.parametrize("block_m,tokens", [(16, 40), (32, 40), (64, 70)])
def test_moe_kernels_with_every_tile_height_and_masked_k(block_m, tokens, rng):
    """Several M tiles per expert, and K tiles with a masked tail (hidden 96 with K tiles of 64)."""
    if DEVICE != "cpu":
        pytest.skip("interpreter test")
    config = moe_kernels.MoeConfig(block_m, moe_kernels.GemmTiles(32, 64, 4), moe_kernels.GemmTiles(32, 32, 4))
    y, ref = run_both(tokens, experts(4, 96, 64, "nvfp4", rng, False), 2, "nvfp4", "none", "silu", rng,
                      config=config, ids_dtype=torch.int32)
    assert relative_error(y, ref) < 1e-5


# The last two numbers: launches of the quantize kernel with direct slots and with rows grouped by
# expert. Direct slots quantize inside the GEMMs: the hidden states (NVFP4: bf16 ones, whose amax
# every program takes itself) and NVFP4's intermediate.
@pytest.mark.parametrize("fmt,act_mode,hidden_dtype,direct_quantizes,grouped_quantizes", [
    ("mxfp4", "none", torch.float32, 0, 0),
    ("mxfp4", "fp4", torch.bfloat16, 0, 1),
    ("mxfp4", "fp4", torch.float32, 0, 1),
    ("nvfp4", "fp4", torch.bfloat16, 0, 2),
    ("nvfp4", "fp4", torch.float32, 1, 2),
])
def test_moe_kernels_at_decode_sizes_with_and_without_dispatch(fmt, act_mode, hidden_dtype, direct_quantizes,
                                                               grouped_quantizes, monkeypatch, rng):
    """Direct slots (each M tile one slot, no dispatch, the combine done by the down GEMM) give the
    bits of rows grouped by expert, slots routed nowhere (ids -1 and E) included; a second call
    gives the same again (the down GEMM's arrival counters are left zero)."""
    if DEVICE != "cpu":
        pytest.skip("interpreter test")
    gate_up, down, _ = experts(6, 64, 32, fmt, rng, bias=False)
    hidden = torch.randn(5, 64, generator=rng).to(hidden_dtype)
    ids, weights = routing(5, 6, 3, rng)  # 15 slots; ids[1, 0] = 6 routes nowhere
    ids[3, 2] = -1
    ids[4] = torch.tensor([-1, 6, -1])  # a token routed nowhere at all: zeros
    outputs = {}
    config = moe_kernels.choose_moe_config(5, 3, 6, 64, 32, fmt)  # the same tiles either way: the same sums
    fake_quantize = moe_kernels.fp4_fake_quantize
    # Partial maxima poisoned: a program that skipped writing its own would show.
    monkeypatch.setattr(moe_kernels, "_partial_maxima", lambda n, device: torch.full((n,), 1e30, device=device))
    combine_slots = moe_kernels.combine_slots
    for direct in (True, False, True):
        dispatches, quantizes, combines = [], [], []
        monkeypatch.setattr(moe_kernels, "combine_slots", lambda *args: combines.append(args) or combine_slots(*args))
        monkeypatch.setattr(moe_kernels, "use_direct_slots", lambda *shape: direct)
        monkeypatch.setattr(moe_kernels, "dispatch_tokens", lambda *args: dispatches.append(args) or
                            dispatch_tokens(*args))
        monkeypatch.setattr(moe_kernels, "fp4_fake_quantize", lambda *args, **kwargs: quantizes.append(args) or
                            fake_quantize(*args, **kwargs))
        y = moe_kernels.fp4_moe(hidden, ids, weights, gate_up.packed, gate_up.scales, gate_up.global_scale,
                                down.packed, down.scales, down.global_scale, None, None, fmt, act_mode, "silu", 1.0, 1.0,
                                config=config)
        assert len(dispatches) == len(combines) == (0 if direct else 1)
        assert len(quantizes) == (direct_quantizes if direct else grouped_quantizes)
        if direct in outputs:
            assert torch.equal(y, outputs[direct])
        outputs[direct] = y
    assert torch.equal(outputs[True], outputs[False])
    ref = moe_reference(hidden, ids, weights, gate_up, down, None, None, act_mode, "silu", 1.0, 1.0)
    tolerance = 1e-2 if hidden_dtype == torch.bfloat16 else 1e-5 if act_mode == "none" else 1e-3  # bf16 outputs
    assert relative_error(outputs[True], ref) < tolerance
    assert torch.equal(outputs[True][4], torch.zeros(64, dtype=hidden_dtype))
    assert not moe_kernels.arrival_counters(torch.device(DEVICE), 5 * 64, down.packed).any()


@pytest.mark.parametrize("tokens", [1, 6])
def test_decode_tiles_with_a_masked_k_tail(tokens, rng):
    """The decode configurations' K tiles (256 at one token, direct slots; 256 and 128 at a few
    tokens per expert) are wider than hidden 96 and intermediate 160: masked tails."""
    if DEVICE != "cpu":
        pytest.skip("interpreter test")
    config = moe_kernels.choose_moe_config(tokens, 2, 4, 96, 160, "mxfp4")
    assert (config.gate_up.block_k, config.down.block_k) == (128, 256 if tokens == 1 else 128)
    y, ref = run_both(tokens, experts(4, 96, 160, "mxfp4", rng, False), 2, "mxfp4", "none", "silu", rng)
    assert relative_error(y, ref) < 1e-5


def test_moe_config_by_rows_per_expert():
    qwen3 = dict(experts=128, hidden=2048, inter=768)
    decode = moe_kernels.choose_moe_config(1, 8, fmt="nvfp4", **qwen3)
    assert decode == moe_kernels.MoeConfig(16, moe_kernels.GemmTiles(32, 256, 4, scale_words=False),
                                           moe_kernels.GemmTiles(32, 256, 2, scale_words=False))
    assert moe_kernels.choose_moe_config(1, 8, fmt="mxfp4", **qwen3).gate_up.scale_words
    few = moe_kernels.choose_moe_config(16, 8, fmt="mxfp4", **qwen3)  # one row per expert: grouped rows
    assert (few.block_m, few.gate_up, few.down) == (16, moe_kernels.GemmTiles(32, 256, 2), moe_kernels.GemmTiles(64, 128, 2))
    gpt_oss = moe_kernels.choose_moe_config(1, 4, 128, 2880, 2880, "mxfp4")
    assert gpt_oss.gate_up.block_k == 256  # masked tail: 2880 = 11 * 256 + 64
    prefill = moe_kernels.choose_moe_config(4096, 4, 128, 2880, 2880, "mxfp4")
    assert prefill.block_m == 128 and prefill.gate_up == moe_kernels.GemmTiles(128, 64, 8)  # 64 divides 2880


@pytest.mark.parametrize("model,fmt,expected", [
    ("qwen3-30b-a3b", "mxfp4", (True, False)),  # MXFP4's intermediate is quantized by the gate/up epilogue
    ("qwen3-30b-a3b", "nvfp4", (True, True)),
    ("deepseek-v3", "mxfp4", (True, False)),
    ("deepseek-v3", "nvfp4", (False, True)),  # hidden 7168: too long for NVFP4
    ("mixtral-8x7b", "mxfp4", (True, False)),
    ("mixtral-8x7b", "nvfp4", (False, False)),  # intermediate 14336
    ("gpt-oss-120b", "mxfp4", (False, False)),  # 2880: K tiles of 256 with a masked tail
    ("gpt-oss-120b", "nvfp4", (False, False)),
])
def test_w4a4_quantizes_inside_the_gemms_where_measured_faster(model, fmt, expected):
    shape = MOE_SHAPES[model]
    config = moe_kernels.choose_moe_config(1, shape["top_k"], shape["E"], shape["H"], shape["I"], fmt)
    decide = moe_kernels.quantize_in_gemms
    assert decide(True, fmt == "mxfp4", True, shape["H"], shape["I"], config) == expected
    assert decide(False, fmt == "mxfp4", True, shape["H"], shape["I"], config) == (False, False)  # not direct, or W4A16
    if fmt == "nvfp4":  # hidden states whose amax each program cannot take itself
        assert decide(True, False, False, shape["H"], shape["I"], config)[0] is False


def test_direct_slots_at_one_token_and_where_experts_rarely_repeat():
    assert moe_kernels.use_direct_slots(1, 8, 128)  # Qwen3-30B-A3B decoding one sequence
    assert moe_kernels.use_direct_slots(2, 8, 128)  # one expected repeat pair in two
    assert not moe_kernels.use_direct_slots(4, 2, 8)  # Mixtral, 4 tokens: experts repeat
    assert not moe_kernels.use_direct_slots(3, 8, 128)  # more slots than DIRECT_SLOTS


@pytest.mark.parametrize("tokens", [37, 100])  # one program (111 slots), or the atomics (300)
def test_dispatch_groups_every_routed_slot_by_expert_with_aligned_padding(tokens, rng):
    if DEVICE != "cpu":
        pytest.skip("interpreter test")
    experts, block_m = 5, 4
    ids = torch.randint(-1, experts + 1, (tokens, 3), generator=rng)  # ids -1 and 5 route nowhere
    dispatch = dispatch_tokens(ids, experts, block_m)
    flat = ids.reshape(-1)
    counts = torch.stack([(flat == e).sum() for e in range(experts)]).int()
    assert torch.equal(dispatch.counts, counts)
    assert dispatch.slot_of_row.numel() == padded_rows(flat.numel(), experts, block_m)
    start = 0
    for e in range(experts):
        rows = dispatch.slot_of_row[start:start + counts[e]]
        assert torch.equal(rows.sort().values, (flat == e).nonzero().squeeze(1).int())
        start += -(-int(counts[e]) // block_m) * block_m
    assert start <= dispatch.slot_of_row.numel()


def test_mxfp4_w4a4_refuses_tiles_that_split_a_group(rng):
    weights = experts(2, 64, 64, "mxfp4", rng, bias=False)
    with pytest.raises(ValueError, match="block_n=16"):
        tiles = moe_kernels.GemmTiles(16, 64, 4)
        run_both(2, weights, 1, "mxfp4", "fp4", "silu", rng, config=moe_kernels.MoeConfig(16, tiles, tiles))


def test_no_routed_slot_gives_zeros(rng):
    if DEVICE != "cpu":
        pytest.skip("interpreter test")
    gate_up, down, _ = experts(3, 64, 32, "mxfp4", rng, bias=False)
    hidden = torch.randn(4, 64, generator=rng)
    ids = torch.full((4, 2), 3)
    y = moe_kernels.fp4_moe(hidden, ids, torch.ones(4, 2), gate_up.packed, gate_up.scales, gate_up.global_scale,
                            down.packed, down.scales, down.global_scale, None, None, "mxfp4", "none", "silu", 1.0, 1.0)
    assert torch.equal(y, torch.zeros_like(hidden))


@pytest.mark.cuda
@pytest.mark.parametrize("model", sorted(MOE_SHAPES))
@pytest.mark.parametrize("fmt,act_mode", [("mxfp4", "none"), ("nvfp4", "none"), ("mxfp4", "fp4"), ("nvfp4", "fp4")])
def test_moe_kernels_on_gpu_at_real_sizes(model, fmt, act_mode, rng):
    """Real hidden and intermediate sizes, 8 experts (memory and time), bf16 hidden states; one
    token (decode), 16, and 300 (several M tiles per expert)."""
    shape = MOE_SHAPES[model]
    clamped = model.startswith("gpt-oss")
    weights = experts(8, shape["H"], shape["I"], fmt, rng, bias=clamped)
    for tokens in (1, 16, 300):
        y, ref = run_both(tokens, weights, min(shape["top_k"], 8), fmt, act_mode,
                          "clamped_swiglu" if clamped else "silu", rng, hidden_dtype=torch.bfloat16)
        assert relative_error(y, ref) < 2e-2, f"{tokens} tokens"


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_w4a4_quantized_in_the_gemms_gives_the_bits_of_separate_launches_on_gpu(fmt, monkeypatch, rng):
    """One token, one of its slots routed nowhere: quantizing inside the GEMMs (bf16 tiles, FMA
    division) gives the output of the separate quantize launches bit for bit."""
    gate_up, down, _ = experts(16, 512, 256, fmt, rng, bias=False)
    hidden = torch.randn(1, 512, generator=rng).to(torch.bfloat16).to(DEVICE)
    ids, weights = routing(1, 16, 4, rng, unrouted=False)
    ids[0, 1] = -1
    decide = moe_kernels.quantize_in_gemms
    outputs = []
    for separate in (False, True):
        if separate:
            monkeypatch.setattr(moe_kernels, "quantize_in_gemms", lambda *args: (False, False))
        else:
            assert decide(True, fmt == "mxfp4", True, 512, 256, moe_kernels.choose_moe_config(1, 4, 16, 512, 256, fmt)) \
                == (True, fmt == "nvfp4")
        outputs.append(moe_kernels.fp4_moe(hidden, ids, weights, gate_up.packed, gate_up.scales, gate_up.global_scale,
                                           down.packed, down.scales, down.global_scale, None, None, fmt, "fp4", "silu",
                                           1.0, 1.0))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.cuda
@pytest.mark.parametrize("act_mode", ["none", "fp4"])
@pytest.mark.parametrize("tokens", [1, 8])  # 1: direct slots, W4A4 quantized inside the GEMMs
def test_moe_kernels_replay_in_a_cuda_graph_without_host_syncs(act_mode, tokens, rng):
    """Captured once, replayed with new hidden states and new routing: the same result as an
    eager call (no shape or launch depends on the routing)."""
    gate_up, down, _ = experts(32, 512, 256, "nvfp4", rng, bias=False)
    hidden = torch.randn(tokens, 512, generator=rng).to(torch.bfloat16).to(DEVICE)
    ids, weights = routing(tokens, 32, 4, rng, unrouted=False)

    def call():
        return moe_kernels.fp4_moe(hidden, ids, weights, gate_up.packed, gate_up.scales, gate_up.global_scale,
                                   down.packed, down.scales, down.global_scale, None, None, "nvfp4", act_mode, "silu",
                                   1.0, 1.0)

    call()  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            captured = call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    new_ids, new_weights = routing(tokens, 32, 4, rng, unrouted=True)
    hidden.copy_(torch.randn(tokens, 512, generator=rng).to(torch.bfloat16))
    ids.copy_(new_ids)
    weights.copy_(new_weights)
    graph.replay()
    torch.testing.assert_close(captured, call(), rtol=0, atol=0)
