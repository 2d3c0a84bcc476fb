"""NVFP4 reference quantizer: global scale, block scales, underflow, non-finite policy, errors."""

import pytest
import torch

from fp4compile.formats import NVFP4, dequantize, nvfp4_global_scale, quantize, quantize_nvfp4
from fp4compile.formats.blocks import block_squared_error, split_into_blocks


def test_default_global_scale_is_amax_over_6_times_448_as_a_device_tensor(rng: torch.Generator):
    x = torch.randn(33, 160, generator=rng).to(torch.bfloat16)
    gs = nvfp4_global_scale(x)
    assert gs.shape == () and gs.dtype == torch.float32 and gs.device == x.device
    assert gs.item() == pytest.approx(x.float().abs().max().item() / (6 * 448), rel=1e-7)
    q = quantize_nvfp4(x)
    assert torch.equal(q.global_scale, gs)
    # The largest block scale then lands on e4m3's largest value, 448.
    assert NVFP4.decode_scales(q.scales).max().item() == 448


def test_global_scale_ignores_non_finite_and_is_one_for_zeros():
    x = torch.tensor([[1.0, float("nan"), float("inf")] + [0.0] * 13])
    assert nvfp4_global_scale(x).item() == pytest.approx(1 / (6 * 448))
    assert nvfp4_global_scale(torch.zeros(2, 16)).item() == 1.0


def test_spec_block_scale_is_rounded_amax_over_6_gs(rng: torch.Generator):
    x = torch.randn(8, 64, generator=rng)
    q = quantize_nvfp4(x)
    amax = x.abs().reshape(8, 4, 16).amax(-1)
    expected = (amax / (6 * q.global_scale)).to(torch.float8_e4m3fn).float()
    assert torch.equal(NVFP4.decode_scales(q.scales), expected)


def test_round_trip_error_is_bounded_and_optimal_beats_spec_per_block(rng: torch.Generator):
    x = torch.randn(129, 160, generator=rng)
    spec, optimal = quantize_nvfp4(x, scale_rule="spec"), quantize_nvfp4(x, scale_rule="optimal")
    for q, low, high in ((spec, 0.08, 0.11), (optimal, 0.07, 0.09)):
        relative = (dequantize(q) - x).norm() / x.norm()
        assert low < relative < high
    blocks = split_into_blocks(x, NVFP4)

    def errors(q):
        return block_squared_error(blocks, NVFP4.decode_scales(q.scales) * q.global_scale)

    assert (errors(optimal) <= errors(spec)).all()
    assert (errors(optimal) < errors(spec)).float().mean() > 0.3  # the search does find better scales


def test_underflowing_blocks_decode_to_exact_zeros():
    x = torch.zeros(1, 48)
    x[0, :16] = 1e6  # sets the global scale; the next blocks are far below e4m3's range
    x[0, 16:32] = 1e-4
    x[0, 32:] = -1e-3
    q = quantize_nvfp4(x)
    assert (q.scales[0, 1:] == 0).all()
    decoded = dequantize(q)
    assert torch.isfinite(decoded).all()
    assert (decoded[0, 16:] == 0).all()


def test_non_finite_values_poison_only_their_block():
    x = torch.ones(1, 48)
    x[0, 1] = float("nan")
    x[0, 20] = float("-inf")
    q = quantize_nvfp4(x)
    assert q.scales[0, :2].tolist() == [0x7F, 0x7F]  # e4m3 NaN
    decoded = dequantize(q)
    assert torch.isnan(decoded[0, :32]).all()
    assert torch.equal(decoded[0, 32:], torch.ones(16))


def test_static_global_scale_saturates_blocks_beyond_its_range():
    x = torch.tensor([[100.0] + [1.0] * 15])
    gs = torch.tensor(1.0 / (6 * 448) * 10)  # covers magnitudes up to 10
    q = quantize_nvfp4(x, global_scale=gs)
    decoded = dequantize(q)
    assert decoded[0, 0].item() == pytest.approx(10.0)
    assert torch.equal(q.global_scale, gs)


def test_special_values_round_trip():
    bf16_max = torch.finfo(torch.bfloat16).max
    x = torch.tensor([[0.0, -0.0, 2.0**-130, bf16_max] + [1.0] * 12], dtype=torch.float32)
    decoded = dequantize(quantize_nvfp4(x))
    assert decoded[0, 0] == 0 and not torch.signbit(decoded[0, 0])
    assert decoded[0, 1] == 0 and torch.signbit(decoded[0, 1])
    assert decoded[0, 2] == 0  # far below this block's resolution
    assert decoded[0, 3].item() == pytest.approx(bf16_max, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": torch.zeros(3, 40)}, ValueError, "K=40 is not a multiple of the NVFP4 group size 16"),
        ({"x": torch.zeros(3, 16, dtype=torch.int64)}, TypeError, "got torch.int64"),
        ({"global_scale": torch.tensor([1.0, 2.0])}, ValueError, "one-element float32"),
        ({"global_scale": torch.tensor(1.0, dtype=torch.float64)}, ValueError, "one-element float32"),
        ({"global_scale": 0.5}, TypeError, "must be a float32 tensor"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs: dict, error: type, match: str):
    args = {"x": torch.zeros(3, 16), **kwargs}
    with pytest.raises(error, match=match):
        quantize(args.pop("x"), "nvfp4", **args)


@pytest.mark.cuda
def test_global_scale_and_quantize_do_not_sync_on_cuda():
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        q = quantize_nvfp4(x, scale_rule="optimal")
        dequantize(q)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert q.global_scale.device.type == "cuda"
