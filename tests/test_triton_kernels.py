"""Triton kernels against the reference: on CPU in Triton's interpreter (small odd sizes), on the
GPU at real sizes. Quantization must match bit for bit; GEMMs within 1e-2 relative L2 of fp64."""

import json
from pathlib import Path

import pytest
import torch

from fp4compile.formats import dequantize, get_format, quantize
from fp4compile.formats.blocks import dequantize_blocks

triton_kernels = pytest.importorskip("fp4compile.kernels.triton")
import triton  # noqa: E402  (present whenever the kernels import)
import triton.language as tl  # noqa: E402

from fp4compile.formats import MXFP4, NVFP4, decode_e2m1  # noqa: E402
from fp4compile.kernels.triton import codecs  # noqa: E402
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = ("mxfp4", "nvfp4")
SHAPES = json.loads((Path(__file__).parents[1] / "benchmarks" / "shapes.json").read_text())["linear"]


@pytest.fixture(autouse=True)
def poisoned_allocations():
    """``torch.empty`` returns NaN-filled memory: an output element a kernel never writes shows."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def activations(m: int, k: int, generator: torch.Generator, dtype=torch.bfloat16) -> torch.Tensor:
    """Fresh random rows spanning many magnitudes, with the special values of the formats."""
    x = torch.randn(m, k, generator=generator) * torch.logspace(-8, 8, m).unsqueeze(-1)
    if m >= 5:
        x[1, 3], x[2, min(40, k - 1)] = float("nan"), float("-inf")
        x[3, :32], x[4, :16] = 0.0, -0.0
    return x.to(dtype).to(DEVICE)


def check_quantize(x: torch.Tensor, fmt: str, global_scale=None) -> None:
    """Codes, scales and global scale bit for bit; the fused quantize+decode variant exactly."""
    packed, scales, gs = triton_kernels.fp4_quantize(x, fmt, global_scale)
    q = quantize(x, fmt, global_scale=global_scale)
    assert torch.equal(packed, q.packed)
    assert torch.equal(scales, q.scales)
    assert torch.equal(gs, q.global_scale)
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16  # bf16 holds the products exactly
    values, gs = triton_kernels.fp4_fake_quantize(x.reshape(-1, x.shape[-1]), fmt, global_scale, dtype)
    expected = dequantize_blocks(q.packed, q.scales, get_format(fmt)).reshape(values.shape)
    torch.testing.assert_close(values.float(), expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(gs, q.global_scale)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def check_linear(m: int, n: int, k: int, fmt: str, act_mode: str, generator: torch.Generator, bias: bool = True):
    x = (torch.randn(m, k, generator=generator)).to(torch.bfloat16).to(DEVICE)
    w = quantize(torch.randn(n, k, generator=generator).to(DEVICE), fmt, scale_rule="optimal")
    b = torch.randn(n, generator=generator).to(torch.bfloat16).to(DEVICE) if bias else None
    y = triton_kernels.fp4_linear(x, w.packed, w.scales, w.global_scale, None, b, fmt, act_mode)
    assert y.shape == (m, n) and y.dtype == x.dtype and not y.isnan().any()
    a = dequantize(quantize(x, fmt), torch.float64) if act_mode == "fp4" else x.double()
    ref = a @ dequantize(w, torch.float64).T + (b.double() if bias else 0)
    assert relative_error(y, ref) < 1e-2


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("k", [64, 96, 160])
def test_quantize_kernel_is_bit_exact_at_small_odd_sizes(fmt: str, m: int, k: int, rng: torch.Generator):
    check_quantize(activations(m, k, rng), fmt)


def test_quantize_kernel_static_global_scale_and_input_dtypes(rng: torch.Generator):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = activations(7, 96, rng, dtype)
        check_quantize(x, "mxfp4")
        check_quantize(x, "nvfp4", torch.tensor(0.01, device=DEVICE))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act_mode", ["none", "fp4"])
@pytest.mark.parametrize(("m", "k"), [(1, 64), (3, 160), (5, 96), (33, 160)])
def test_linear_kernel_at_small_odd_sizes(fmt: str, act_mode: str, m: int, k: int, rng: torch.Generator):
    check_linear(m, 48, k, fmt, act_mode, rng, bias=m != 5)


def test_ops_dispatch_to_the_kernels_on_cuda_only():
    from fp4compile.ops.implementations import implementation_for

    assert implementation_for(torch.device("cpu")) == "torch (reference)"
    assert implementation_for(torch.device("cuda")) == "triton"


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 5, 16, 127, 128, 129, 4096])
def test_quantize_kernel_on_gpu_at_real_sizes(fmt: str, m: int, rng: torch.Generator):
    for k in (4096, 14336, 4160):  # 4160: not a multiple of 128
        check_quantize(activations(m, k, rng), fmt)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act_mode", ["none", "fp4"])
@pytest.mark.parametrize("m", [1, 5, 16, 127, 129, 4096])
def test_linear_kernel_on_gpu_at_real_sizes(fmt: str, act_mode: str, m: int, rng: torch.Generator):
    for model, layers in SHAPES.items():
        n, k = layers["o"] if m == 4096 else layers["qkv"]  # keep the large-M cases affordable
        check_linear(m, n, k, fmt, act_mode, rng)
    check_linear(m, 4096, 4160, fmt, act_mode, rng)  # K not a multiple of 128


@pytest.mark.cuda
@pytest.mark.parametrize("act_mode", ["none", "fp4"])
def test_cuda_ops_run_the_kernels_without_host_syncs(act_mode: str):
    w = quantize(torch.randn(256, 512, device="cuda"), "nvfp4")
    x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
    expected = triton_kernels.fp4_linear(x, w.packed, w.scales, w.global_scale, None, None, "nvfp4", act_mode)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = torch.ops.fp4.linear(x, w.packed, w.scales, w.global_scale, None, None, "nvfp4", act_mode)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(y, expected)


@triton.jit
def _decode_everything(e2m1_out, e8m0_out, e4m3_out):
    codes = tl.arange(0, 16)
    tl.store(e2m1_out + codes, codecs.decode_e2m1(codes))
    scale_bytes = tl.arange(0, 256)
    tl.store(e8m0_out + scale_bytes, codecs.e8m0_value(scale_bytes))
    tl.store(e4m3_out + tl.arange(0, 128), codecs.e4m3_value(tl.arange(0, 128)))


def test_device_codecs_decode_every_code_and_scale_byte():
    outputs = [torch.empty(n, device=DEVICE) for n in (16, 256, 128)]
    _decode_everything[(1,)](*outputs)
    all_bytes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    expected_e8m0 = MXFP4.decode_scales(all_bytes)
    expected_e8m0[255] = float("inf")  # the divisor of a NaN block (see codecs.e8m0_value)
    expected = (decode_e2m1(all_bytes[:16]), expected_e8m0, NVFP4.decode_scales(all_bytes[:128]))
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)
    assert torch.signbit(outputs[0][8])  # code 8 is -0


def test_kernels_accept_an_empty_batch_and_refuse_32_bit_offset_overflow():
    w = quantize(torch.randn(48, 64).to(DEVICE), "nvfp4")
    empty = torch.empty(0, 64, device=DEVICE)
    assert triton_kernels.fp4_linear(empty, w.packed, w.scales, w.global_scale, None, None, "nvfp4", "fp4").shape == (0, 48)
    packed, scales, gs = triton_kernels.fp4_quantize(empty, "nvfp4")
    assert packed.shape == (0, 32) and scales.shape == (0, 4) and gs.item() == 1.0
    with pytest.raises(ValueError, match="exceed the Triton kernels' 32-bit offsets"):
        codecs.check_offsets(75_000, 28_672)
    codecs.check_offsets(65_536, 28_672)  # 1.9e9 elements: fits
