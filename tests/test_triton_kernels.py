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

from fp4compile.formats import MXFP4, NVFP4, decode_e2m1, encode_e2m1  # noqa: E402
from fp4compile.kernels.triton import codecs  # noqa: E402
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = ("mxfp4", "nvfp4")
SHAPES = json.loads((Path(__file__).parents[1] / "benchmarks" / "shapes.json").read_text())["linear"]
GEMM_TOLERANCE = 1e-5 if DEVICE == "cpu" else 1e-2
"""Relative L2 error of GEMMs against fp64: float32 tiles in the interpreter; on the GPU bf16
operands (W4A16 rounds float32 activations to bf16) and, on the fp8 path, a bf16 output."""


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
        x[4, 16] = -0.0  # a signed zero in a block of non-zeros: code 8
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
    if fmt == "mxfp4":
        assert gs is None  # MXFP4 has no global scale (and the fake-quantize path makes none: a launch)
    else:
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


def random_fp4_weight(n: int, k: int, fmt: str, generator: torch.Generator):
    """Random codes (every byte value) and scales over a wide range: NVFP4 every finite e4m3 byte,
    subnormals included; MXFP4 a window of 100 binades per row, placed anywhere in e8m0's range
    where the values stay finite in float32 (byte 252 at most: 6 * 2**125; within a row the
    kernel is exact over 125 binades, see ``kernels/triton/gemm.py``)."""
    spec = get_format(fmt)
    packed = torch.randint(0, 256, (n, k // 2), generator=generator, dtype=torch.int32).to(torch.uint8)
    groups = k // spec.group_size
    if fmt == "nvfp4":
        scales = torch.randint(0, 0x7F, (n, groups), generator=generator, dtype=torch.int32)
        global_scale = torch.rand((), generator=generator) + 0.5
    else:
        low = torch.randint(1, 253 - 100, (n, 1), generator=generator, dtype=torch.int32)
        scales = low + torch.randint(0, 101, (n, groups), generator=generator, dtype=torch.int32)
        global_scale = torch.tensor(1.0)
    return quantized_tensor(packed, scales.to(torch.uint8), global_scale, fmt)


def quantized_tensor(packed, scales, global_scale, fmt):
    from fp4compile.formats import QuantizedTensor
    return QuantizedTensor(packed.to(DEVICE), scales.to(DEVICE), global_scale.to(DEVICE), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("m", "k"), [(16, 64), (64, 64), (128, 128)])
def test_linear_kernel_decodes_every_code_and_scale_exactly(fmt: str, m: int, k: int, rng: torch.Generator):
    """x = rows of the identity: each output is one weight value times alpha, which the kernel
    must produce bit for bit (one nonzero product, float32 output), NaN blocks included."""
    n = 48
    w = random_fp4_weight(n, k, fmt, rng)
    nan_scale = 0xFF if fmt == "mxfp4" else 0x7F
    w.scales[5, 1] = nan_scale  # row 5 holds a NaN block: its outputs are NaN in every row of x
    x = torch.eye(k, device=DEVICE)[:m]
    y = triton_kernels.fp4_linear(x, w.packed, w.scales, w.global_scale, None, None, fmt, "none")
    weight = dequantize_blocks(w.packed, w.scales, get_format(fmt)).double() * w.global_scale.double()
    expected = (x.double() @ weight.T).float()  # 0 * NaN = NaN: a NaN block poisons its whole column
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
    assert y[:, 5].isnan().all() and not y[:, 6:].isnan().any()
    y_again = triton_kernels.fp4_linear(x, w.packed, w.scales, w.global_scale, None, None, fmt, "none")
    assert torch.equal(y.nan_to_num(), y_again.nan_to_num())  # split-K counters were left reset


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("k", [64, 96, 160])
def test_quantize_kernel_is_bit_exact_at_small_odd_sizes(fmt: str, m: int, k: int, rng: torch.Generator):
    check_quantize(activations(m, k, rng), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("offset", [1, 2])  # elements: 1 misaligns the rows' 32-bit words, 2 does not
def test_quantize_kernel_on_bf16_row_views(fmt: str, offset: int, rng: torch.Generator):
    """bf16 rows are read as 32-bit words where they are 4-byte aligned (here with a row stride
    longer than K), and element by element where they are not: the same bits either way."""
    wide = activations(5, 96 + 2, rng)
    check_quantize(wide[:, offset:offset + 96], fmt)


def test_quantize_kernel_static_global_scale_and_input_dtypes(rng: torch.Generator):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = activations(7, 96, rng, dtype)
        check_quantize(x, "mxfp4")
        check_quantize(x, "nvfp4", torch.tensor(0.01, device=DEVICE))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act_mode", ["none", "fp4"])
@pytest.mark.parametrize(("m", "k"), [(1, 64), (3, 160), (5, 96), (33, 160), (2, 512), (20, 256)])
def test_linear_kernel_at_small_odd_sizes(fmt: str, act_mode: str, m: int, k: int, rng: torch.Generator):
    check_linear(m, 48, k, fmt, act_mode, rng, bias=m != 5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("m", "n", "k", "programs_per_sm"), [(1, 300, 640, 2), (5, 100, 384, 3), (20, 64, 96, 7), (3, 96, 2048, 1)])
def test_stream_k_partitions_sum_every_unit_once(fmt: str, m: int, n: int, k: int, programs_per_sm: int, rng: torch.Generator):
    """Small tiles make programs own parts of several output tiles (segments), and tiles gather
    partial sums from several programs; results must match fp64 and repeat exactly (the arrival
    counters are reset by each tile's last program)."""
    from fp4compile.kernels.triton.gemm import GemmConfig, fp4_gemm

    config = GemmConfig(16 if m <= 16 else 32, 32, 32, 4, 2, programs_per_sm)
    w = quantize(torch.randn(n, k, generator=rng).to(DEVICE), fmt)
    x = torch.randn(m, k, generator=rng).to(DEVICE)
    bias = torch.randn(n, generator=rng).to(DEVICE)
    y = fp4_gemm(x, w.packed, w.scales, w.global_scale, bias, fmt, torch.float32, config)
    ref = x.double() @ dequantize(w, torch.float64).T + bias.double()
    assert relative_error(y, ref) < GEMM_TOLERANCE  # a unit summed twice or missed is ~10x that
    assert torch.equal(y, fp4_gemm(x, w.packed, w.scales, w.global_scale, bias, fmt, torch.float32, config))


@pytest.mark.parametrize("tiles,k_tiles", [(448, 16), (64, 16), (7, 3), (12, 5), (100, 1), (3, 40)])
@pytest.mark.parametrize("programs", [1, 4, 7, 64, 528])
def test_only_partitions_that_share_a_tile_use_the_arrival_counters(tiles: int, k_tiles: int, programs: int):
    """``splits_a_tile`` against the kernel's own partition (``_first_unit``): a tile is shared
    when some program starts inside it (every run of units is contiguous). It must never miss
    one, and must see that whole tiles per program (decode's one program per tile) share none."""
    from fp4compile.kernels.triton.gemm import _programs, splits_a_tile

    for p in {programs, _programs(tiles, k_tiles, programs)}:
        units = tiles * k_tiles
        starts = [(q * units + p - 1) // p for q in range(p)]  # _first_unit, in integers
        shared = any(start % k_tiles for start in starts if start < units)
        assert splits_a_tile(units, p, k_tiles) >= shared, (tiles, k_tiles, p)
        if tiles % p == 0 or k_tiles == 1:
            assert not splits_a_tile(units, p, k_tiles), (tiles, k_tiles, p)


@pytest.mark.parametrize("n,k,splits", [
    (2048, 2048, 4),  # 8 splits of 1 K tile each -> 4 of 2
    (4096, 4096, 4),  # 8 of 2 -> 4 of 4
    (2880, 2816, 4),  # 11 of 1 -> 4 of 3 (the last one 2)
    (6144, 4096, 4),  # runs of 4 already: unchanged
    (4096, 14336, 8),  # runs of 7: unchanged
    (4096, 1536, 6),  # 6 K tiles cannot give 4 programs 2 each: uncapped, 6 runs of 1
    (28672, 4096, 1),  # 448 tiles for 528 programs: no split
])
def test_decode_split_is_capped_only_where_runs_of_k_tiles_are_short(n: int, k: int, splits: int):
    """``choose_config``'s decode tile caps K splitting at 4 where 528 programs (H100) would give
    each one fewer than 4 K tiles, and only if every program keeps 2 or more."""
    from fp4compile.kernels.triton.gemm import _programs, choose_config

    config = choose_config(1, n, k)
    tiles, k_tiles = n // config.block_n, k // config.block_k
    programs = _programs(tiles, k_tiles, config.programs_per_sm * 132, config.short_run_splits)
    assert programs == (tiles * splits if tiles < config.programs_per_sm * 132 else config.programs_per_sm * 132)


@pytest.mark.parametrize("m", [5, 130])  # 130: on the GPU the dequantize + cuBLAS path
@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_w4a4_linear_with_a_static_activation_scale(m: int, scale_shape: tuple, rng: torch.Generator):
    """A static NVFP4 activation scale reaches the GEMM's alpha as given (0-dim or one element),
    uncopied and unwritten; the result matches fp64 on the reference quantization."""
    x = torch.randn(m, 96, generator=rng).to(torch.bfloat16).to(DEVICE)
    w = quantize(torch.randn(48, 96, generator=rng).to(DEVICE), "nvfp4")
    scale = torch.full(scale_shape, 0.05, device=DEVICE)
    y = triton_kernels.fp4_linear(x, w.packed, w.scales, w.global_scale, scale, None, "nvfp4", "fp4")
    a = dequantize(quantize(x, "nvfp4", global_scale=scale.reshape(1)), torch.float64)
    assert relative_error(y, a @ dequantize(w, torch.float64).T) < 1e-2
    assert torch.equal(scale, torch.full(scale_shape, 0.05, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # bf16: integer maxima of 32-bit words
@pytest.mark.parametrize(("m", "k", "block_m", "block_k", "programs"), [(1, 64, 16, 32, 256), (5, 160, 1, 32, 4),
                                                                       (40, 96, 16, 32, 3)])
def test_finite_amax_partials_hold_the_finite_amax(m: int, k: int, block_m: int, block_k: int, programs: int,
                                                     dtype: torch.dtype, rng: torch.Generator):
    """One partial per tile, or per program when tiles outnumber them (each program then takes
    every P-th tile); their maximum is the finite amax wherever it lies, NaN and inf left out
    (rows of 5 and more hold them)."""
    from fp4compile.kernels.triton.quantize import finite_amax_partials

    x = activations(m, k, rng, dtype)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(k, block_k)
    for row, col in ((0, 0), (m - 1, k - 1), (m // 2, k // 2)):
        x[row, col] = -2 * x.float().abs().nan_to_num(0.0, 0.0, 0.0).max()  # the finite amax moves here
        partials = finite_amax_partials(x, block_m, block_k, programs)
        assert partials.numel() == min(tiles, programs)
        assert partials.max() == -x[row, col].float()


@pytest.mark.parametrize("in_program", [True, False])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_dynamic_nvfp4_scale_from_either_amax_source(in_program: bool, m: int, monkeypatch, rng: torch.Generator):
    """Small bf16 activations get their dynamic global scale inside the quantize kernel (every
    program reads all of x; no amax launch), larger ones from the amax kernel's partials: the same
    bits either way, NaN and inf left out of the amax."""
    from fp4compile.kernels.triton import quantize as quantize_module

    amax_launches = []
    partials = quantize_module.finite_amax_partials
    monkeypatch.setattr(quantize_module, "finite_amax_partials", lambda x: amax_launches.append(x) or partials(x))
    monkeypatch.setattr(quantize_module, "IN_PROGRAM_AMAX_ELEMENTS", 2**20 if in_program else 0)
    x = activations(m, 160, rng)
    x[m - 1, 159] = -2 * x.float().abs().nan_to_num(0.0, 0.0, 0.0).max()  # the amax in x's last element
    check_quantize(x, "nvfp4")
    assert len(amax_launches) == (0 if in_program else 2)  # check_quantize quantizes twice


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 5, 16, 127, 128, 129, 4096])
def test_quantize_kernel_on_gpu_at_real_sizes(fmt: str, m: int, rng: torch.Generator):
    for k in (4096, 14336, 4160):  # 4160: not a multiple of 128
        check_quantize(activations(m, k, rng), fmt)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act_mode", ["none", "fp4"])
@pytest.mark.parametrize("m", [1, 5, 16, 127, 128, 129, 4096])
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


@pytest.mark.cuda
def test_captured_split_k_gemms_use_their_layers_counters(monkeypatch):
    """In a CUDA graph, a layer called before the capture runs on its own counters, made and zeroed
    then (no zeroing inside the graph); a layer first called during the capture zeroes fresh ones
    in the graph. Replayed with new activations, both give the eager results, and leave every
    counter reset."""
    from fp4compile.kernels.triton import gemm

    monkeypatch.setattr(gemm, "_LAYER_COUNTERS", {})  # no counters left from other tests' weights
    warmed, fresh = (quantize(torch.randn(4096, 4096, device="cuda"), "nvfp4") for _ in range(2))
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)

    def call(w):
        return gemm.fp4_gemm(x, w.packed, w.scales, w.global_scale, None, "nvfp4", torch.bfloat16)

    call(warmed)  # 64 output tiles, K split over several programs each: counters are used
    counters = gemm._LAYER_COUNTERS[(x.device, warmed.packed.data_ptr())]
    given = []
    split_counters = gemm.arrival_counters
    monkeypatch.setattr(gemm, "arrival_counters", lambda *args: given.append(split_counters(*args)) or given[-1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = (call(warmed), call(fresh))
    monkeypatch.setattr(gemm, "arrival_counters", split_counters)
    assert given[0] is counters and (x.device, fresh.packed.data_ptr()) not in gemm._LAYER_COUNTERS
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert all(torch.equal(y, call(w)) for y, w in zip(captured, (warmed, fresh)))
    assert gemm._LAYER_COUNTERS[(x.device, warmed.packed.data_ptr())] is counters
    assert not counters.any()


@triton.jit
def _decode_everything(e2m1_out, e8m0_out, e4m3_out):
    codes = tl.arange(0, 16)
    tl.store(e2m1_out + codes, codecs.decode_e2m1(codes))
    scale_bytes = tl.arange(0, 256)
    tl.store(e8m0_out + scale_bytes, codecs.e8m0_value(scale_bytes))
    tl.store(e4m3_out + tl.arange(0, 128), codecs.e4m3_value(tl.arange(0, 128)))


@triton.jit
def _e2m1_codecs(x_ptr, codes_ptr, rounded_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(codes_ptr + offsets, codecs.encode_e2m1(x), mask=offsets < n)
    tl.store(rounded_ptr + offsets, codecs.round_to_e2m1(x), mask=offsets < n)


def test_device_e2m1_encoders_match_the_reference_on_every_bf16_value():
    """Every bf16 bit pattern (all magnitudes, both zeros, subnormals, infinities, NaNs), the
    float32 neighbours of each rounding threshold and binade edge, and random float32 bit
    patterns (mantissa bits below bf16's)."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    thresholds = torch.tensor([0.25, 0.5, 0.75, 1.0, 1.25, 1.75, 2.0, 2.5, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 16.0])
    near = torch.cat([torch.nextafter(thresholds, torch.tensor(0.0)), thresholds, torch.nextafter(thresholds, torch.tensor(99.0))])
    rng = torch.Generator().manual_seed(0)
    patterns = torch.randint(-(2**31), 2**31, (2**16,), generator=rng, dtype=torch.int64).to(torch.int32).view(torch.float32)
    in_range = torch.rand(2**16, generator=rng) * 20 - 10
    x = torch.cat([x, near, -near, patterns, in_range]).to(DEVICE)
    codes = torch.empty(x.shape, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(x)
    _e2m1_codecs[(triton.cdiv(x.numel(), 1024),)](x, codes, out, x.numel(), BLOCK=1024)
    assert torch.equal(codes.cpu(), encode_e2m1(x.cpu()).to(torch.int32))
    expected = decode_e2m1(encode_e2m1(x.cpu()))
    finite = ~x.cpu().isnan()
    torch.testing.assert_close(out.cpu()[finite], expected[finite], rtol=0, atol=0)
    assert torch.equal(torch.signbit(out.cpu()[finite]), torch.signbit(expected[finite]))
    assert out.cpu()[~finite].isnan().all()


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


@pytest.mark.parametrize("m", [1, 5, 130])  # 130: on the GPU the dequantize + cuBLAS path
@pytest.mark.parametrize("act_mode", ["none", "fp4"])
def test_linear_kernels_with_one_weight_global_scale_per_row(m: int, act_mode: str, rng: torch.Generator):
    """NVFP4 projections fused into one weight keep their own global scales, one per row: each
    output column gets its row's scale (in the split-K epilogue and in the dequantized weight)."""
    x = torch.randn(m, 96, generator=rng).to(torch.bfloat16).to(DEVICE)
    w = random_fp4_weight(300, 96, "nvfp4", rng)
    row_scale = (torch.rand(300, generator=rng) * 4 + 0.25).to(DEVICE)
    bias = torch.randn(300, generator=rng).to(torch.bfloat16).to(DEVICE)
    y = triton_kernels.fp4_linear(x, w.packed, w.scales, row_scale, None, bias, "nvfp4", act_mode)
    a = dequantize(quantize(x, "nvfp4"), torch.float64) if act_mode == "fp4" else x.double()
    per_row = quantized_tensor(w.packed, w.scales, torch.tensor(1.0), "nvfp4")
    ref = (a @ dequantize(per_row, torch.float64).T) * row_scale.double() + bias.double()
    assert relative_error(y, ref) < 1e-2  # a scale applied to the wrong column is ~1


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_kernel_matches_the_reference_bit_for_bit(fmt: str, rng: torch.Generator):
    from fp4compile.kernels.triton.dequantize import fp4_dequantize

    w = random_fp4_weight(37, 160, fmt, rng)
    w.scales[3, 2] = 0xFF if fmt == "mxfp4" else 0x7F
    # The interpreter does not round float32 -> bf16 to nearest-even: bf16 is checked on the GPU.
    for dtype in (torch.float32,) + ((torch.bfloat16,) if DEVICE == "cuda" else ()):
        got = fp4_dequantize(w.packed, w.scales, w.global_scale, fmt, dtype)
        torch.testing.assert_close(got, dequantize(w, dtype), rtol=0, atol=0, equal_nan=True)


def test_dequantize_linear_writes_each_chunk_into_its_columns(monkeypatch, rng: torch.Generator):
    from fp4compile.kernels.triton import dequantize as dequantize_module

    monkeypatch.setattr(dequantize_module, "CHUNK_ELEMENTS", 200 * 64)  # 128 rows per chunk: 3 chunks
    w = quantize(torch.randn(300, 64, generator=rng).to(DEVICE), "nvfp4")
    x = torch.randn(7, 64, generator=rng).to(DEVICE)
    bias = torch.randn(300, generator=rng).to(DEVICE)
    y = dequantize_module.dequantize_linear(x, w.packed, w.scales, w.global_scale, bias, "nvfp4")
    ref = x.double() @ dequantize(w, torch.float64).T + bias.double()
    assert relative_error(y, ref) < 1e-6  # float32 here: only the weight x global scale is rounded


def mxfp4_rows(m: int, k: int, generator: torch.Generator, spread: float) -> torch.Tensor:
    """Rows whose 32-groups span ``spread`` binades (a random magnitude per group)."""
    magnitudes = 2.0 ** (torch.rand(m, k // 32, 1, generator=generator) * spread - spread / 2)
    return (torch.randn(m, k // 32, 32, generator=generator) * magnitudes).reshape(m, k)


def decode_e4m3_bytes(q: torch.Tensor) -> torch.Tensor:
    return q.cpu().view(torch.float8_e4m3fn).float()


@pytest.mark.parametrize("spread", [10.0, 40.0])
@pytest.mark.parametrize("chunk", [None, 64])  # None: the row in one chunk; 64: three, the last one masked
def test_fp8_activation_conversion_is_exact_within_2_pow_14_of_the_row_maximum(
    spread: float, chunk: int | None, rng: torch.Generator, monkeypatch: pytest.MonkeyPatch
):
    from fp4compile.kernels.triton import fp8
    from fp4compile.kernels.triton.fp8 import mxfp4_activation_to_fp8

    if chunk:
        monkeypatch.setattr(fp8, "_row_launch", lambda k: (chunk, 4))
    x = mxfp4_rows(5, 160, rng, spread).to(DEVICE)
    x[2, 7] = float("nan")
    q, row_scale = mxfp4_activation_to_fp8(x)
    got = decode_e4m3_bytes(q) * row_scale.cpu()[:, None]
    reference = quantize(x, "mxfp4")
    expected = dequantize(reference).cpu()
    exponents = reference.scales.cpu().to(torch.int32)
    exact = (exponents >= exponents.amax(dim=1, keepdim=True) - 14).repeat_interleave(32, dim=1)
    exact &= ~expected.isnan().any(dim=1, keepdim=True)
    torch.testing.assert_close(got[exact], expected[exact], rtol=0, atol=0)
    assert got[2, :32].isnan().all()
    if spread == 10.0:
        assert exact[[0, 1, 3, 4]].all()  # nothing outside the exact range at this spread
    else:  # groups far below the row's largest round in e4m3: small against that row's values
        # (not in the row holding a NaN block: its base is the NaN scale, and any product with
        # that row is NaN anyway)
        finite_rows = ~expected.isnan().any(dim=1)
        row_max = expected[finite_rows].abs().amax(dim=1, keepdim=True)
        error = (got[finite_rows] - expected[finite_rows]).abs()
        assert (error <= row_max * 2.0**-9).all()


@pytest.mark.parametrize("tile", [None, (8, 64)])  # (rows, K tile) per program; 64: three K tiles, the last masked
def test_fp8_weight_conversion_and_linear(tile: tuple[int, int] | None, rng: torch.Generator,
                                          monkeypatch: pytest.MonkeyPatch):
    from fp4compile.kernels.triton import fp8
    from fp4compile.kernels.triton.fp8 import fp8_linear, mxfp4_weight_to_fp8

    if tile:
        monkeypatch.setattr(fp8, "_weight_launch", lambda k: (*tile, 4))
    w = quantize(mxfp4_rows(50, 160, rng, 10.0).to(DEVICE), "mxfp4", scale_rule="optimal")  # 50: rows past N
    q, row_scale = mxfp4_weight_to_fp8(w.packed, w.scales)
    torch.testing.assert_close(decode_e4m3_bytes(q) * row_scale.cpu()[:, None], dequantize(w).cpu(), rtol=0, atol=0)
    x = torch.randn(5, 160, generator=rng).to(DEVICE)
    bias = torch.randn(50, generator=rng).to(DEVICE)
    global_scale = torch.tensor(0.75, device=DEVICE)  # the op takes any weight global scale
    y = fp8_linear(x, w.packed, w.scales, global_scale, bias, torch.float32)
    ref = dequantize(quantize(x, "mxfp4"), torch.float64) @ (dequantize(w, torch.float64).T * 0.75) + bias.double()
    assert relative_error(y, ref) < GEMM_TOLERANCE


@pytest.mark.parametrize("m", [5, 300])  # 300: the prefill paths on the GPU (fp8 for MXFP4 W4A4)
def test_linear_with_odd_n_noncontiguous_weights_and_empty_outputs(m: int, rng: torch.Generator):
    """N = 100 (not a multiple of 16: torch._scaled_mm refuses it, the Triton fp8 GEMM takes it),
    weights and scales as strided views, a zero-width weight."""
    for fmt in FORMATS:
        wide = quantize(torch.randn(100, 320, generator=rng).to(DEVICE), fmt)
        packed, scales = wide.packed[:, :80], wide.scales[:, : 160 // get_format(fmt).group_size]  # K = 160, strided
        from fp4compile.formats import QuantizedTensor
        w = QuantizedTensor(packed, scales, wide.global_scale, fmt)
        x = torch.randn(m, 160, generator=rng).to(torch.bfloat16).to(DEVICE)
        for act_mode in ("none", "fp4"):
            y = triton_kernels.fp4_linear(x, w.packed, w.scales, w.global_scale, None, None, fmt, act_mode)
            a = dequantize(quantize(x, fmt), torch.float64) if act_mode == "fp4" else x.double()
            assert relative_error(y, a @ dequantize(w, torch.float64).T) < 1e-2
        empty = triton_kernels.fp4_linear(x, w.packed[:0], w.scales[:0], w.global_scale, None, None, fmt, "none")
        assert empty.shape == (m, 0)


def test_mxfp4_row_of_smallest_scales_is_not_flushed(rng: torch.Generator):
    """A weight row whose e8m0 scales are all byte 0 (2**-127): its values are tiny but nonzero."""
    w = quantize(torch.randn(48, 64, generator=rng).to(DEVICE), "mxfp4")
    w.scales[3] = 0
    x = torch.full((1, 64), 2.0**100, device=DEVICE)
    y = triton_kernels.fp4_linear(x, w.packed, w.scales, w.global_scale, None, None, "mxfp4", "none")
    ref = x.double() @ dequantize(w, torch.float64).T
    assert ref[0, 3] != 0 and relative_error(y[:, 3:4], ref[:, 3:4]) < GEMM_TOLERANCE
