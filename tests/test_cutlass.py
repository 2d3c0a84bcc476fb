"""The CUTLASS lowerings (``kernels/cutlass``) against the reference.

On CPU the library GEMMs are replaced by stand-ins that check the call contract every argument
must meet (dtype, shape, layout, padding, scale swizzle) and compute the product with the
reference math; the project's own kernels around them run in Triton's interpreter. That is as far
as the Blackwell lowerings are verified: no Blackwell GPU was available. On the GPU (Hopper) the
real ``torch._scaled_mm`` / ``torch._scaled_grouped_mm`` run, against an fp64 reference.
"""

import sys
import types

import pytest
import torch

from fp4compile.formats import dequantize, get_format, quantize
from fp4compile.formats.blocks import dequantize_blocks
from fp4compile.formats.linear import linear_reference
from fp4compile.formats.moe import moe_reference
from fp4compile.formats.swizzle import swizzled_size, unswizzle_scales

cutlass = pytest.importorskip("fp4compile.kernels.cutlass")
from fp4compile.kernels.cutlass import blackwell, hopper  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E4M3 = torch.float8_e4m3fn
TOLERANCE = 1e-2  # relative L2 against fp64: bf16 outputs


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def scaled_mm_stand_in(calls: list):
    """``torch._scaled_mm`` with row-wise fp8 scales, as CUTLASS takes it on sm_90."""
    def scaled_mm(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        m, k = a.shape
        n = b.shape[1]
        assert a.dtype == E4M3 and b.dtype == E4M3 and b.shape[0] == k
        assert a.stride() == (k, 1), "a must be row-major"
        assert b.stride() == (1, k), "b must be column-major: the (N, K) weight, transposed"
        assert scale_a.dtype == torch.float32 and scale_a.shape == (m, 1)
        assert scale_b.dtype == torch.float32 and scale_b.shape == (1, n)
        assert out_dtype == torch.bfloat16 and bias is None and not use_fast_accum
        assert k % 16 == 0 and n % 16 == 0
        calls.append((m, n, k))
        return (a.float() @ b.float() * scale_a * scale_b).to(torch.bfloat16)

    return scaled_mm


def scaled_grouped_mm_stand_in(calls: list):
    """``torch._scaled_grouped_mm`` with row-wise fp8 scales (sm_90): 2-D tokens, 3-D weights."""
    def scaled_grouped_mm(a, b, scale_a, scale_b, offs=None, bias=None, scale_result=None, out_dtype=None,
                          use_fast_accum=False):
        rows, k = a.shape
        groups, _, n = b.shape
        assert a.dtype == E4M3 and b.dtype == E4M3 and b.shape[1] == k and a.is_contiguous()
        assert b.stride() == (n * k, 1, k), "b must be the (E, N, K) weights, transposed"
        assert scale_a.dtype == torch.float32 and scale_a.shape == (rows,)
        assert scale_b.dtype == torch.float32 and scale_b.shape == (groups, n)
        assert offs.dtype == torch.int32 and offs.shape == (groups,) and bool((offs.diff() >= 0).all())
        assert out_dtype == torch.bfloat16 and bias is None and not use_fast_accum
        calls.append(offs.tolist())
        out = torch.zeros(rows, n)  # rows past the last offset: the real kernel leaves them unwritten
        start = 0
        for g, end in enumerate(offs.tolist()):
            out[start:end] = a[start:end].float() @ b[g].float() * scale_a[start:end, None] * scale_b[g]
            start = end
        return out.to(torch.bfloat16)

    return scaled_grouped_mm


def mxfp4_w4a4_reference(x: torch.Tensor, w) -> torch.Tensor:
    return dequantize(quantize(x.float(), "mxfp4"), torch.float64) @ dequantize(w, torch.float64).T


# --- Hopper --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cached_weight", [False, True])
def test_hopper_linear_meets_the_scaled_mm_contract(monkeypatch, rng, cached_weight):
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm_stand_in(calls))
    w = quantize(torch.randn(48, 160, generator=rng), "mxfp4")
    global_scale = torch.tensor(0.5)
    x = torch.randn(2, 3, 160, generator=rng).to(torch.bfloat16)
    bias = torch.randn(48, generator=rng).to(torch.bfloat16)
    e4m3 = hopper.weight_to_e4m3(w.packed, w.scales) if cached_weight else None
    y = hopper.scaled_mm_linear(x, w.packed, w.scales, global_scale, bias, e4m3)
    assert calls == [(6, 48, 160)] and y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    ref = mxfp4_w4a4_reference(x.reshape(6, 160), w) * 0.5 + bias.double()
    assert relative_error(y.reshape(6, 48), ref) < TOLERANCE


@pytest.mark.parametrize("activation", ["silu", "clamped_swiglu"])
@pytest.mark.parametrize("chunk", [None, 32])  # None: rows converted in one chunk; 32: in two (hidden and intermediate)
def test_hopper_moe_meets_the_scaled_grouped_mm_contract(monkeypatch, rng, activation, chunk):
    if chunk:
        from fp4compile.kernels.triton import fp8
        monkeypatch.setattr(fp8, "_row_launch", lambda k: (chunk, 4))
    calls = []
    monkeypatch.setattr(torch, "_scaled_grouped_mm", scaled_grouped_mm_stand_in(calls), raising=False)
    tokens, experts, top_k, hidden, inter = 6, 4, 2, 64, 64
    ids = torch.stack([torch.randperm(experts, generator=rng)[:top_k] for _ in range(tokens)])
    ids[1, 0] = experts  # routed nowhere: contributes nothing
    weights = torch.randn(tokens, top_k, generator=rng).softmax(-1)
    gate_up = quantize(torch.randn(experts, 2 * inter, hidden, generator=rng) / 8, "mxfp4")
    down = quantize(torch.randn(experts, hidden, inter, generator=rng) / 6, "mxfp4")
    bias = activation == "clamped_swiglu"
    biases = (torch.randn(experts, 2 * inter, generator=rng), torch.randn(experts, hidden, generator=rng)) if bias \
        else (None, None)
    x = torch.randn(tokens, hidden, generator=rng).to(torch.bfloat16)
    y = hopper.scaled_grouped_mm_moe(x, ids, weights, gate_up[:3], down[:3], *biases, activation, 1.702, 7.0)
    routed = torch.bincount(ids[ids < experts], minlength=experts).cumsum(0).tolist()
    assert calls == [routed, routed]  # gate/up, then down, over the same groups
    ref = moe_reference(x, ids, weights, gate_up, down, *biases, "fp4", activation, 1.702, 7.0, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and relative_error(y, ref) < TOLERANCE


def test_hopper_checks_name_what_cannot_run():
    x = torch.empty(4, 64, dtype=torch.bfloat16)
    assert "only MXFP4 W4A4 is exact" in hopper.unsupported("nvfp4", "fp4", "linear")
    assert "only MXFP4 W4A4 is exact" in hopper.unsupported("mxfp4", "none", "moe")
    assert hopper.unsupported("mxfp4", "fp4", "moe") is None
    assert hopper.shape_unsupported(x, {"N": 48, "K": 64}) is None
    assert hopper.shape_unsupported(x, {"N": 40, "K": 64}) == "CUTLASS needs sizes that are multiples of 16, got {'N': 40}"
    assert "write bf16, the activations are torch.float16" in hopper.shape_unsupported(x.half(), {"N": 48})


@pytest.mark.parametrize(("capability", "fragment"), [
    ((9, 0), None), ((10, 0), None), ((8, 9), "no CUTLASS fp4/fp8 GEMM for compute capability (8, 9)"),
])
def test_gpu_generation_picks_the_library(monkeypatch, capability, fragment):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setitem(sys.modules, "qutlass", None)  # not installed: PyTorch's fp4 GEMM on Blackwell
    reason = cutlass.unsupported(torch.device("cuda"), "mxfp4", "fp4", "linear")
    assert reason is None if fragment is None else fragment in reason
    assert "the CUTLASS GEMMs run on CUDA tensors" in cutlass.unsupported(torch.device("cpu"), "mxfp4", "fp4", "linear")


# --- Blackwell -----------------------------------------------------------------------------------

def decode_operand(codes: torch.Tensor, swizzled: torch.Tensor, rows: int, k: int, fmt: str) -> torch.Tensor:
    """float64 ``e2m1 * block_scale`` of an operand as the fp4 GEMMs read it (codes (rows, K/2))."""
    group = get_format(fmt).group_size
    scales = unswizzle_scales(swizzled.reshape(-1).view(torch.uint8), rows, k // group)
    return dequantize_blocks(codes.view(torch.uint8), scales, get_format(fmt)).double()


def check_swizzled_scales(scale: torch.Tensor, rows: int, k: int, fmt: str) -> None:
    group = get_format(fmt).group_size
    assert scale.dtype == blackwell.SCALE_DTYPES[fmt] and scale.is_contiguous()
    assert scale.numel() == swizzled_size(rows, k // group), "scales padded to 128 rows x 4 groups, swizzled"


def fake_qutlass(calls: list) -> types.ModuleType:
    """qutlass's ``matmul_{mx,nv}f4_bf16_tn(a, b, a_sf, b_sf, alpha)`` with its argument checks."""
    def matmul(fmt):
        def run(a, b, a_sf, b_sf, alpha, backend="cutlass"):
            (m, half_k), n = a.shape, b.shape[0]
            assert a.dtype == torch.uint8 and b.dtype == torch.uint8 and b.shape[1] == half_k
            assert a.is_contiguous() and b.is_contiguous() and alpha.dtype == torch.float32 and alpha.numel() == 1
            assert (2 * half_k) % (128 if fmt == "mxfp4" else 32) == 0 and n % 8 == 0
            check_swizzled_scales(a_sf, m, 2 * half_k, fmt)
            check_swizzled_scales(b_sf, n, 2 * half_k, fmt)
            calls.append(fmt)
            product = decode_operand(a, a_sf, m, 2 * half_k, fmt) @ decode_operand(b, b_sf, n, 2 * half_k, fmt).T
            return (product * alpha.double()).to(torch.bfloat16)
        return run

    module = types.ModuleType("qutlass")
    module.matmul_mxf4_bf16_tn = matmul("mxfp4")
    module.matmul_nvf4_bf16_tn = matmul("nvfp4")
    return module


def block_scaled_mm_stand_in(calls: list):
    """PyTorch's block-scaled ``torch._scaled_mm`` with ``float4_e2m1fn_x2`` operands."""
    def scaled_mm(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        (m, half_k), n = a.shape, b.shape[1]
        fp4 = torch.float4_e2m1fn_x2
        assert a.dtype == fp4 and b.dtype == fp4 and b.shape[0] == half_k
        assert a.stride() == (half_k, 1) and b.stride() == (1, half_k), "a row-major, b the (N, K/2) weight transposed"
        assert (2 * half_k) % 32 == 0 and n % 16 == 0 and out_dtype == torch.bfloat16 and not use_fast_accum
        fmt = "mxfp4" if scale_a.dtype == torch.float8_e8m0fnu else "nvfp4"
        check_swizzled_scales(scale_a, m, 2 * half_k, fmt)
        check_swizzled_scales(scale_b, n, 2 * half_k, fmt)
        calls.append(fmt)
        product = decode_operand(a, scale_a, m, 2 * half_k, fmt) @ decode_operand(b.t(), scale_b, n, 2 * half_k, fmt).T
        return product.to(torch.bfloat16)

    return scaled_mm


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("library", ["qutlass", "torch"])
@pytest.mark.parametrize("aligned", [True, False])
def test_blackwell_linear_meets_the_library_contracts(monkeypatch, rng, fmt, library, aligned):
    calls = []
    if library == "qutlass":
        monkeypatch.setitem(sys.modules, "qutlass", fake_qutlass(calls))
    else:
        monkeypatch.setitem(sys.modules, "qutlass", None)
        monkeypatch.setattr(torch, "_scaled_mm", block_scaled_mm_stand_in(calls))
    # 130 rows: two 128-row scale tiles, the second padded. Unaligned K (MXFP4 160: qutlass needs
    # K % 128; NVFP4 80: both need K % 32) is padded with zero codes before the call.
    m, n, k = 130, 48, 256 if aligned else {"mxfp4": 160, "nvfp4": 80}[fmt]
    w = quantize(torch.randn(n, k, generator=rng), fmt)
    x = torch.randn(m, k, generator=rng).to(torch.bfloat16)
    bias = torch.randn(n, generator=rng).to(torch.bfloat16)
    assert blackwell.shape_unsupported(x, fmt, n, k) is None
    y = blackwell.linear(x, w.packed, w.scales, w.global_scale, None, bias, fmt)
    assert calls == [fmt]
    ref = linear_reference(x.float(), w, None, bias, "fp4").double()
    assert y.dtype == torch.bfloat16 and relative_error(y, ref) < TOLERANCE


def test_blackwell_checks_name_what_cannot_run(monkeypatch):
    x = torch.empty(4, 96, dtype=torch.bfloat16)
    monkeypatch.setitem(sys.modules, "qutlass", types.ModuleType("qutlass"))
    assert blackwell.shape_unsupported(x, "mxfp4", 48, 96) is None  # K is padded
    assert blackwell.shape_unsupported(x, "mxfp4", 44, 96) == "needs N % 8 == 0, got N=44"
    assert "(W4A4) only" in blackwell.unsupported("nvfp4", "none", "linear")
    assert "no grouped fp4 GEMM is lowered on Blackwell" in blackwell.unsupported("mxfp4", "fp4", "moe")
    monkeypatch.setitem(sys.modules, "qutlass", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    assert "MXFP4 block-scaled GEMMs on compute capability 10.x only" in blackwell.unsupported(
        "mxfp4", "fp4", "linear", torch.device("cuda"))
    assert blackwell.unsupported("nvfp4", "fp4", "linear", torch.device("cuda")) is None


# --- Hopper, on the GPU --------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 5, 300, 4096])
def test_hopper_linear_on_the_gpu(m, rng):
    for n, k in ((4096, 4096), (1024, 14336), (6144, 4160)):
        w = quantize(torch.randn(n, k, generator=rng).to(DEVICE), "mxfp4")
        x = torch.randn(m, k, generator=rng).to(torch.bfloat16).to(DEVICE)
        ref = mxfp4_w4a4_reference(x, w)
        for e4m3 in (None, hopper.weight_to_e4m3(w.packed, w.scales)):
            y = hopper.scaled_mm_linear(x, w.packed, w.scales, w.global_scale, None, e4m3)
            assert relative_error(y, ref) < TOLERANCE
        args = (x, w.packed, w.scales, w.global_scale, None, None, "mxfp4", "fp4")
        forced = {name: torch.ops.fp4.linear(*args, name) for name in ("triton", "cutlass")}
        assert relative_error(forced["cutlass"], ref) < TOLERANCE and relative_error(forced["triton"], ref) < TOLERANCE


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [1, 16, 4096])
def test_hopper_moe_on_the_gpu_and_under_graph_capture(tokens, rng):
    from test_moe_kernels import MOE_SHAPES, experts, routing

    shape = MOE_SHAPES["qwen3-30b-a3b"]
    gate_up, down, (gate_up_bias, down_bias) = experts(shape["E"], shape["H"], shape["I"], "mxfp4", rng, bias=True)
    ids, weights = routing(tokens, shape["E"], shape["top_k"], rng)
    x = torch.randn(tokens, shape["H"], generator=rng).to(torch.bfloat16).to(DEVICE)
    args = (x, ids, weights, *gate_up[:3], *down[:3], gate_up_bias, down_bias, "mxfp4", "fp4", "silu", 1.0, 0.0)
    ref = moe_reference(*args[:3], gate_up, down, gate_up_bias, down_bias, "fp4", "silu", 1.0, 0.0, torch.bfloat16)
    y = torch.ops.fp4.moe(*args, "cutlass")
    assert relative_error(y, ref) < TOLERANCE
    e4m3 = (*hopper.weight_to_e4m3(gate_up.packed, gate_up.scales), *hopper.weight_to_e4m3(down.packed, down.scales))
    assert torch.equal(torch.ops.fp4.moe(*args, "cutlass", *e4m3), y)
    graph, out = torch.cuda.CUDAGraph(), None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.fp4.moe(*args, "cutlass")  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            out = torch.ops.fp4.moe(*args, "cutlass")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    new_ids, new_weights = routing(tokens, shape["E"], shape["top_k"], rng)
    ids.copy_(new_ids), weights.copy_(new_weights)
    graph.replay()
    ref = moe_reference(*args[:3], gate_up, down, gate_up_bias, down_bias, "fp4", "silu", 1.0, 0.0, torch.bfloat16)
    assert relative_error(out, ref) < TOLERANCE


# --- Fp4Config(fp8_weights=True) -----------------------------------------------------------------

def compile_with_fp8_weights(device: str, caplog):
    import logging

    import fp4compile
    from compile_helpers import compile_captured

    model = torch.nn.Sequential(torch.nn.Linear(256, 128)).to(device, torch.bfloat16)
    config = fp4compile.Fp4Config(format="mxfp4", act_mode="fp4", fp8_weights=True)
    compiled, capture = compile_captured(model, config)
    x = torch.randn(300, 256, device=device, dtype=torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="fp4compile"):
        y = compiled(x)
    (node,) = [n for n in capture.graphs[0].nodes if n.target is torch.ops.fp4.linear.default]
    return model, node, x, y


def test_fp8_weights_are_ignored_with_a_reason_where_they_do_not_apply(caplog):
    _, node, _, _ = compile_with_fp8_weights("cpu", caplog)
    assert node.args[9:] == (None, None)
    assert "fp8_weights ignored for 0: e4m3 weights need a GPU with fp8 tensor cores" in caplog.text


@pytest.mark.cuda
def test_fp8_weights_are_made_at_compile_time_and_counted(caplog):
    from fp4compile.quantized_weights import lookup
    from fp4compile.report import layer_records

    model, node, x, y = compile_with_fp8_weights("cuda", caplog)
    assert all(arg is not None and arg.op == "get_attr" for arg in node.args[9:11])
    (record,) = layer_records(model)
    assert record.bytes_after == 128 * 256 // 2 + 128 * 256 // 32 + 4 + 128 * 256 + 128 * 4  # fp4 + e4m3 forms
    ref = mxfp4_w4a4_reference(x, lookup(model[0].weight).quantized) + model[0].bias.double()
    assert relative_error(y, ref) < TOLERANCE
