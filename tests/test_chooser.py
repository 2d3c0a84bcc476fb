"""Choosing the implementation of an fp4 op: forcing (config, environment), the measured choice
and its cache, and the errors a user sees. CPU tests use fake candidates and timings; the GPU
tests time real ones."""

import json
import logging

import pytest
import torch

import fp4compile
from fp4compile.formats import quantize
from fp4compile.ops import chooser
from fp4compile.ops.chooser import ChoiceCache, ImplementationError, bucket, forced_implementation, run_chosen


@pytest.fixture
def cache(tmp_path, monkeypatch) -> ChoiceCache:
    """A private choice cache, and a chooser that may measure on this (fake) GPU."""
    fresh = ChoiceCache(tmp_path / "choices.json")
    monkeypatch.setattr(chooser, "CACHE", fresh)
    monkeypatch.setattr(chooser, "_environment_key", lambda device: "fake GPU | versions")
    monkeypatch.setattr(chooser, "may_measure", lambda device: True)
    monkeypatch.delenv(chooser.ENV_BACKEND, raising=False)
    return fresh


def options(calls: list[str], **reasons: str) -> dict:
    """One option per implementation: records its name when run, or the given reason it cannot."""
    def runner(name):
        return lambda: calls.append(name) or torch.tensor(0.0)

    return {name: reasons.get(name) or runner(name) for name in chooser.IMPLEMENTATIONS}


def test_bucket_is_the_power_of_two_at_or_above():
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 5, 128, 129, 4096)] == [1, 1, 2, 4, 4, 8, 128, 256, 4096]


@pytest.mark.parametrize("qutlass", ["0.2.1", None])
def test_cached_choices_are_keyed_by_gpu_and_library_versions(monkeypatch, qutlass):
    import importlib.metadata

    import triton

    def version(distribution: str) -> str:
        if distribution != "qutlass" or qutlass is None:
            raise importlib.metadata.PackageNotFoundError(distribution)
        return qutlass

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA B200")
    monkeypatch.setattr(importlib.metadata, "version", version)
    key = chooser._environment_key.__wrapped__(torch.device("cuda"))
    assert key == (f"NVIDIA B200 | torch {torch.__version__} | triton {triton.__version__} | "
                   f"qutlass {qutlass or 'none'} | fp4compile {fp4compile.__version__}")


def test_config_beats_environment_which_beats_auto(monkeypatch):
    monkeypatch.setenv(chooser.ENV_BACKEND, "cutlass")
    assert forced_implementation("triton") == ("triton", "implementation='triton'")
    assert forced_implementation("auto") == ("cutlass", "FP4COMPILE_BACKEND=cutlass")
    monkeypatch.setenv(chooser.ENV_BACKEND, "auto")
    assert forced_implementation("auto") is None
    monkeypatch.setenv(chooser.ENV_BACKEND, "cublas")
    with pytest.raises(ValueError, match="FP4COMPILE_BACKEND environment variable must be 'auto' or one of"):
        forced_implementation("auto")


def test_forced_implementation_that_cannot_run_raises_with_the_reason(cache):
    calls = []
    with pytest.raises(ImplementationError, match=r"implementation='cutlass' cannot run key on cpu: no GEMM here"):
        run_chosen("fp4::linear", "cutlass", "key", torch.device("cpu"), options(calls, cutlass="no GEMM here"))
    run_chosen("fp4::linear", "torch", "key", torch.device("cpu"), options(calls))
    assert calls == ["torch"]


def test_reference_runs_only_when_nothing_faster_can(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(chooser, "measure", lambda candidates: pytest.fail("a single candidate is never timed"))
    run_chosen("op", "auto", "key", torch.device("cpu"), options(calls, triton="no", cutlass="no"))
    run_chosen("op", "auto", "key", torch.device("cpu"), options(calls, cutlass="no"))
    assert calls == ["torch", "triton"]


def test_fastest_candidate_is_measured_once_and_cached_on_disk(cache, monkeypatch, caplog):
    timings = []
    monkeypatch.setattr(chooser, "measure", lambda candidates: timings.append(list(candidates)) or
                        {"triton": 0.2, "cutlass": 0.1})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    calls = []
    with caplog.at_level(logging.INFO, logger="fp4compile"):
        for _ in range(3):
            run_chosen("op", "auto", "key M<=4", torch.device("cuda"), options(calls))
    assert timings == [["triton", "cutlass"]]  # measured once, the reference never
    assert calls == ["cutlass"] * 3
    assert "key M<=4 on fake GPU: triton 200.0 us, cutlass 100.0 us -> cutlass" in caplog.text
    assert json.loads(cache.path.read_text()) == {"fake GPU | versions": {"key M<=4": "cutlass"}}
    assert ChoiceCache(cache.path).get("fake GPU | versions", "key M<=4") == "cutlass"  # a new process


def test_no_measuring_while_capturing_or_sync_debugging(cache, monkeypatch):
    monkeypatch.setattr(chooser, "may_measure", lambda device: False)
    monkeypatch.setattr(chooser, "measure", lambda candidates: pytest.fail("timing syncs"))
    calls = []
    run_chosen("op", "auto", "key", torch.device("cuda"), options(calls))
    assert calls == ["triton"]  # the preferred one, and nothing is cached for later
    assert cache.choices() == {}


def test_unreadable_cache_file_is_ignored_with_a_warning(tmp_path, caplog):
    path = tmp_path / "choices.json"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="fp4compile"):
        assert ChoiceCache(path).get("env", "key") is None
    assert "ignoring the implementation cache" in caplog.text


def small_linear_args(fmt: str = "mxfp4"):
    w = quantize(torch.randn(48, 64), fmt)
    return torch.randn(3, 64), w


def test_op_on_cpu_runs_the_reference_and_refuses_forced_gpu_implementations(monkeypatch):
    monkeypatch.delenv(chooser.ENV_BACKEND, raising=False)
    x, w = small_linear_args()
    args = (x, w.packed, w.scales, w.global_scale, None, None, "mxfp4", "fp4")
    expected = torch.ops.fp4.linear(*args, "torch")
    assert torch.equal(torch.ops.fp4.linear(*args), expected)
    with pytest.raises(ImplementationError, match="implementation='cutlass' cannot run fp4::linear mxfp4 W4A4 N=48 "
                                                  "K=64 M<=4 torch.float32 on cpu: the CUTLASS GEMMs run on CUDA"):
        torch.ops.fp4.linear(*args, "cutlass")
    monkeypatch.setenv(chooser.ENV_BACKEND, "triton")
    with pytest.raises(ImplementationError, match="FP4COMPILE_BACKEND=triton cannot run .* Triton kernels run on CUDA"):
        torch.ops.fp4.linear(*args)
    with pytest.raises(ValueError, match="fp4::linear's implementation must be 'auto' or one of"):
        torch.ops.fp4.linear(*args, "fastest")


def test_config_implementation_reaches_the_op_and_the_report():
    from compile_helpers import compile_captured

    model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    compiled, capture = compile_captured(model, fp4compile.Fp4Config(format="mxfp4", act_mode="fp4",
                                                                     implementation="torch"))
    compiled(torch.randn(2, 64))
    (node,) = [n for n in capture.graphs[0].nodes if n.target is torch.ops.fp4.linear.default]
    assert node.args[8] == "torch" and node.args[9:] == (None, None)
    assert " torch " in fp4compile.report(model).splitlines()[1]


@pytest.mark.parametrize(("capability", "expected"), [
    ((9, 0), "auto: triton (M<=128 fp4-gemm, else fp8) or cutlass, timed per shape"),
    ((8, 0), "triton (M<=128 fp4-gemm, else dequantize+cublas)"),
])
def test_report_names_the_candidates(monkeypatch, capability, expected):
    from fp4compile.kernels.triton import target
    from fp4compile.ops.implementations import implementation_for

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(target, "_gpu", lambda device: target.KernelTarget(True, capability, 132))
    cuda = torch.device("cuda")
    assert implementation_for(cuda, "mxfp4", "fp4") == expected
    for fmt, act_mode in (("mxfp4", "none"), ("nvfp4", "fp4"), ("nvfp4", "none")):  # not exact in fp8
        assert implementation_for(cuda, fmt, act_mode) == "triton (M<=128 fp4-gemm, else dequantize+cublas)"
    assert implementation_for(cuda, "nvfp4", "fp4", op="moe") == "triton"  # no exact fp8 form of NVFP4
    assert implementation_for(cuda, "mxfp4", "fp4", "cutlass") == "cutlass"
    assert implementation_for(torch.device("cpu"), "mxfp4", "fp4") == "torch (reference)"


@pytest.mark.cuda
def test_measuring_on_the_gpu_keeps_the_faster_and_skips_a_failing_candidate(caplog):
    x = torch.randn(256, 4096, device="cuda")

    def fail():
        raise RuntimeError("broken kernel")

    with caplog.at_level(logging.WARNING, logger="fp4compile"):
        times = chooser.measure({"slow": lambda: x @ x.T @ x, "fast": lambda: x + 1, "broken": fail})
    assert set(times) == {"slow", "fast"} and times["fast"] < times["slow"]
    assert "the broken implementation failed and is not considered: broken kernel" in caplog.text


def test_report_shows_what_the_chooser_picked_per_size(cache, monkeypatch):
    """Once calls have run, a layer that the chooser serves shows its picks per size bucket (by
    the op's key prefix; other layers' keys and forced layers unaffected) instead of the candidates."""
    from fp4compile.ops.linear import choice_prefix
    from fp4compile.report import LayerRecord, record_layer, report

    monkeypatch.setattr(chooser, "_USED", {})
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 48))
    prefix = choice_prefix("mxfp4", "fp4", 48, 64)
    candidates = "auto: triton (M<=128 fp4-gemm, else fp8) or cutlass, timed per shape"
    for layer, implementation in zip(model, (candidates, "triton")):
        record_layer(layer.weight, LayerRecord("layer", tuple(layer.weight.shape), 1, 1, "mxfp4", "fp4", implementation,
                                               choice_prefix=prefix if implementation == candidates else ""))
    assert candidates in report(model)  # no call yet
    monkeypatch.setattr(chooser, "measure", lambda capable: {"triton": 1.0, "cutlass": 2.0})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    capable = {"triton": lambda: None, "cutlass": lambda: None}
    cuda = torch.device("cuda")
    for rows in (16, 4096):
        for dtype in ("torch.bfloat16", "torch.float16"):  # one pick per bucket shown
            cache.put("fake GPU | versions", f"{prefix}{rows} {dtype}", "cutlass" if rows > 16 else "triton")
            assert chooser.choose(f"{prefix}{rows} {dtype}", capable, cuda) == ("cutlass" if rows > 16 else "triton")
    chooser.choose(f"{choice_prefix('mxfp4', 'fp4', 96, 64)}16 torch.bfloat16", capable, cuda)  # another layer
    lines = report(model).splitlines()
    assert "auto chose triton at M<=16, cutlass at M<=4096" in lines[1] and candidates not in lines[1]
    assert " triton " in lines[2] and "chose" not in lines[2]
