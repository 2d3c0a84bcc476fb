"""``benchmarks/bench_decode.py``'s deferred stop check: it takes effect and changes no token."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers.generation import utils as generation_utils

from tiny_models import tiny_llama

_SPEC = importlib.util.spec_from_file_location(
    "bench_decode", Path(__file__).resolve().parent.parent / "benchmarks" / "bench_decode.py")
bench_decode = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_decode)
CUDA = torch.device("cuda")  # a device object only: no GPU needed to ask about it
DeferredStopCheck = getattr(generation_utils, "DeferredStopCheck", None)
pytestmark = pytest.mark.skipif(DeferredStopCheck is None, reason="this transformers has no DeferredStopCheck")


class _StaticLikeCache:
    is_croppable = False  # a static cache cannot be rolled back


def test_deferred_stop_checks_apply_to_cuda_within_transformers_own_conditions():
    assert not DeferredStopCheck.is_supported(CUDA, None, False, is_assistant=False)
    with bench_decode.deferred_stop_checks():
        assert DeferredStopCheck.is_supported(CUDA, None, False, is_assistant=False)
        assert DeferredStopCheck.is_supported(CUDA, _StaticLikeCache(), False, is_assistant=False)
        # transformers' own refusals stand: a returned cache it cannot roll back, assisted decoding
        assert not DeferredStopCheck.is_supported(CUDA, _StaticLikeCache(), True, is_assistant=False)
        assert not DeferredStopCheck.is_supported(CUDA, None, False, is_assistant=True)
        assert not DeferredStopCheck.is_supported(torch.device("cpu"), None, False, is_assistant=False)
    assert not DeferredStopCheck.is_supported(CUDA, None, False, is_assistant=False)


@pytest.mark.cuda
def test_deferred_stop_checks_keep_the_greedy_tokens():
    model = tiny_llama().cuda()
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0)).cuda()

    def greedy() -> torch.Tensor:
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, cache_implementation="static", max_cache_len=16, pad_token_id=0)

    with torch.no_grad():
        expected = greedy()
        with bench_decode.deferred_stop_checks() as used:
            deferred = greedy()
    assert used == [1]
    assert torch.equal(deferred, expected)


def test_table_compares_each_stop_check_with_bf16_under_the_same_check(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "GPU")

    def row(variant: str, check: str, tokens_per_s: float) -> "bench_decode.Row":
        return bench_decode.Row(variant, 1, check, tokens_per_s, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0)

    args = type("Args", (), dict(model="llama3-8b", layers=None, prompt=8, new=4))
    rows = [row("bf16", "sync", 100.0), row("bf16", "deferred", 125.0),
            row("nvfp4-w4a16", "sync", 150.0), row("nvfp4-w4a16", "deferred", 250.0)]
    lines = bench_decode.table(args, rows).splitlines()
    assert "| nvfp4-w4a16 | 1 | sync | 150.0 | 1.50x |" in lines[6]
    assert "| nvfp4-w4a16 | 1 | deferred | 250.0 | 2.00x |" in lines[7]


def test_decode_step_kernels_subtract_the_one_token_generate_and_rank_by_time(monkeypatch):
    profiles = {17: {"gemm": 1700.0, "prefill": 900.0, "norm": 180.0},
                1: {"gemm": 100.0, "prefill": 900.0, "norm": 20.0}}
    monkeypatch.setattr(bench_decode, "kernel_times", lambda model, prompt, new, cache: profiles[new])
    per_step = bench_decode.decode_step_kernels(None, None, 64)
    assert per_step == {"gemm": 100.0, "prefill": 0.0, "norm": 10.0}
    lines = bench_decode.kernel_table(per_step, 2).splitlines()
    assert lines[0].endswith("110.0 us of kernels")
    assert [line.split()[-1] for line in lines[1:]] == ["gemm", "norm"]
    assert "90.9%" in lines[1]
