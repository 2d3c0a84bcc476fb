"""``fp4::moe`` against an independent per-token computation, its validation and its backward (CPU)."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fp4compile
from fp4compile.formats import QuantizedTensor

E, H, I, TOKENS, K = 4, 64, 32, 7, 2


def make_experts(fmt: str, generator: torch.Generator, bias: bool = False):
    gate_up = fp4compile.quantize(torch.randn(E, 2 * I, H, generator=generator), fmt)
    down = fp4compile.quantize(torch.randn(E, H, I, generator=generator) / 4, fmt)
    biases = (torch.randn(E, 2 * I, generator=generator), torch.randn(E, H, generator=generator)) if bias else (None, None)
    return gate_up, down, biases


def routing(generator: torch.Generator):
    hidden = torch.randn(TOKENS, H, generator=generator)
    ids = torch.stack([torch.randperm(E, generator=generator)[:K] for _ in range(TOKENS)])
    weights = torch.rand(TOKENS, K, generator=generator)
    return hidden, ids, weights


def call_moe(hidden, ids, weights, gate_up: QuantizedTensor, down: QuantizedTensor, biases, fmt="nvfp4", act_mode="none",
             activation="silu", alpha=1.702, limit=7.0):
    return torch.ops.fp4.moe(hidden, ids, weights, gate_up.packed, gate_up.scales, gate_up.global_scale, down.packed,
                             down.scales, down.global_scale, *biases, fmt, act_mode, activation, alpha, limit)


def per_token(hidden, ids, weights, gate_up, down, biases, activation, alpha=1.702, limit=7.0, quantize_acts=None):
    """The textbook loop in float64: every token, every chosen expert, one matrix-vector product."""
    w13, w2 = (fp4compile.dequantize(q, torch.float64) for q in (gate_up, down))
    x = quantize_acts(hidden) if quantize_acts else hidden.double()
    inter = {}
    for t in range(TOKENS):
        for j in range(K):
            e = ids[t, j].item()
            h = w13[e] @ x[t] + (biases[0][e].double() if biases[0] is not None else 0)
            gate, up = h[:I], h[I:]
            if activation == "silu":
                inter[t, j] = F.silu(gate) * up
            else:
                gate = gate.clamp(max=limit)
                inter[t, j] = (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(gate * alpha)
    if quantize_acts:
        stacked = quantize_acts(torch.stack([inter[t, j] for t in range(TOKENS) for j in range(K)]).float())
        inter = {(t, j): stacked[t * K + j] for t in range(TOKENS) for j in range(K)}
    out = torch.zeros(TOKENS, H, dtype=torch.float64)
    for (t, j), v in inter.items():
        e = ids[t, j].item()
        out[t] += weights[t, j].double() * (w2[e] @ v + (biases[1][e].double() if biases[1] is not None else 0))
    return out


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize(("activation", "bias"), [("silu", False), ("clamped_swiglu", True)])
def test_moe_matches_the_per_token_loop(fmt: str, activation: str, bias: bool, rng: torch.Generator):
    gate_up, down, biases = make_experts(fmt, rng, bias)
    hidden, ids, weights = routing(rng)
    y = call_moe(hidden, ids, weights, gate_up, down, biases, fmt, activation=activation)
    assert y.shape == (TOKENS, H) and y.dtype == hidden.dtype
    assert relative(y, per_token(hidden, ids, weights, gate_up, down, biases, activation)) < 1e-6


def test_w4a4_quantizes_hidden_states_and_intermediates_as_tensors(rng: torch.Generator):
    gate_up, down, biases = make_experts("nvfp4", rng)
    hidden, ids, weights = routing(rng)
    y = call_moe(hidden, ids, weights, gate_up, down, biases, act_mode="fp4")
    fake_quant = lambda t: fp4compile.dequantize(fp4compile.quantize(t.float(), "nvfp4"), torch.float64)  # noqa: E731
    expected = per_token(hidden, ids, weights, gate_up, down, biases, "silu", quantize_acts=fake_quant)
    assert relative(y, expected) < 1e-5
    assert relative(y, call_moe(hidden, ids, weights, gate_up, down, biases)) > 1e-3  # W4A4 differs from W4A16


def test_output_dtype_follows_hidden_states(rng: torch.Generator):
    gate_up, down, biases = make_experts("nvfp4", rng)
    hidden, ids, weights = routing(rng)
    y = call_moe(hidden.bfloat16(), ids.int(), weights.bfloat16(), gate_up, down, biases)
    assert y.dtype == torch.bfloat16
    assert relative(y, call_moe(hidden.bfloat16().float(), ids, weights.bfloat16().float(), gate_up, down, biases)) < 1e-2


def test_fake_kernel_gives_the_output_shape(rng: torch.Generator):
    gate_up, down, biases = make_experts("nvfp4", rng)
    hidden, ids, weights = routing(rng)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        y = call_moe(mode.from_tensor(hidden), mode.from_tensor(ids), mode.from_tensor(weights), gate_up, down, biases)
    assert y.shape == (TOKENS, H) and y.dtype == torch.float32


def test_backward_gives_hidden_and_routing_weight_gradients(rng: torch.Generator):
    gate_up, down, biases = make_experts("nvfp4", rng)
    hidden, ids, weights = routing(rng)
    hidden.requires_grad_()
    weights.requires_grad_()
    grad = torch.randn(TOKENS, H, generator=rng)
    call_moe(hidden, ids, weights, gate_up, down, biases).backward(grad)
    h, w = hidden.detach().double().requires_grad_(), weights.detach().double().requires_grad_()
    w13, w2 = (fp4compile.dequantize(q, torch.float64) for q in (gate_up, down))
    gate, up = torch.einsum("tkih,th->tki", w13[ids], h).chunk(2, dim=-1)
    expected = (torch.einsum("tkhi,tki->tkh", w2[ids], F.silu(gate) * up) * w.unsqueeze(-1)).sum(1)
    expected.backward(grad.double())
    assert relative(hidden.grad, h.grad) < 1e-5 and relative(weights.grad, w.grad) < 1e-5


@pytest.mark.parametrize(("change", "message"), [
    (dict(ids=torch.zeros(TOKENS, K)), "topk_ids must be int32/int64"),
    (dict(ids=torch.zeros(TOKENS + 1, K, dtype=torch.long)), "topk_ids must be int32/int64 of shape"),
    (dict(weights=torch.zeros(TOKENS, K + 1)), "topk_weights must be float of shape"),
    (dict(hidden=torch.zeros(TOKENS, 1, H)), "needs float hidden states of shape"),
    (dict(hidden=torch.zeros(TOKENS, 2 * H)), "does not fit hidden size"),
    (dict(activation="gelu"), "unknown MoE activation"),
    (dict(biases=(torch.zeros(E, I), None)), "gate_up_bias must have shape"),
])
def test_bad_input_is_named(change: dict, message: str, rng: torch.Generator):
    gate_up, down, biases = make_experts("nvfp4", rng)
    hidden, ids, weights = routing(rng)
    args = dict(hidden=hidden, ids=ids, weights=weights, biases=biases, activation="silu") | change
    with pytest.raises(ValueError, match=message):
        call_moe(args["hidden"], args["ids"], args["weights"], gate_up, down, args["biases"], activation=args["activation"])
