"""The MoE pass on tiny Hugging Face MoE models of every listed family (CPU, reference op)."""

import logging

import pytest
import torch
from compile_helpers import GraphCapture, fake_quant_experts, fresh_dynamo, relative  # noqa: F401
from tiny_models import MOE_FAMILIES, tiny_moe

import fp4compile
from fp4compile import Fp4Config
from fp4compile.backend import Fp4Backend
from fp4compile.report import layer_records

transformers = pytest.importorskip("transformers")

FP4_MOE = torch.ops.fp4.moe.default
EXPERTS_ONLY = Fp4Config(include=("*.experts",), release_weights=False)


def expert_bytes_quantized(model) -> float:
    records = [r for r in layer_records(model) if len(r.shape) == 3]  # the (E, N, K) expert weights
    done = sum(r.bytes_before for r in records if r.skipped is None)
    return done / sum(r.bytes_before for r in records)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_every_family_runs_its_experts_as_one_fp4_moe_op(family: str, implementation: str):
    model = tiny_moe(family, implementation)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    reference = fake_quant_experts(model, EXPERTS_ONLY)
    capture = GraphCapture()
    with torch.no_grad():
        bf16_logits = model(ids).logits
        logits = torch.compile(model, backend=Fp4Backend(EXPERTS_ONLY, capture))(ids).logits
        expected = reference(ids).logits
    assert len(capture.graphs) == 1  # no graph break inside (or around) the MoE blocks
    assert capture.count(FP4_MOE) == MOE_FAMILIES[family][1]
    leftover = [n.target for g in capture.graphs for n in g.nodes
                if n.op == "call_function" and (n.target in (torch._grouped_mm, torch.bmm) or "grouped_mm" in str(n.target))]
    assert leftover == []
    assert expert_bytes_quantized(model) == 1.0
    assert relative(logits, expected) < 1e-5  # the same quantization, computed by HF's own experts
    assert relative(logits, bf16_logits) < 0.2


def test_bf16_grouped_mm_model_matches_fake_quant():
    model = tiny_moe("qwen3_moe", "grouped_mm", torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    reference = fake_quant_experts(model, EXPERTS_ONLY)
    capture = GraphCapture()
    with torch.no_grad():
        logits = torch.compile(model, backend=Fp4Backend(EXPERTS_ONLY, capture))(ids).logits
        expected = reference(ids).logits
    assert capture.count(FP4_MOE) == 2
    assert relative(logits, expected) < 2e-2  # HF rounds each step to bf16; the op once, at the end


def test_default_config_keeps_routers_and_quantizes_shared_experts_as_linears():
    model = tiny_moe("qwen2_moe", "grouped_mm")
    capture = GraphCapture()
    with torch.no_grad():
        torch.compile(model, backend=Fp4Backend(Fp4Config(release_weights=False), capture))(torch.zeros(1, 4, dtype=torch.long))
    records = {r.name: r for r in layer_records(model)}
    assert records["model.layers.0.mlp.gate"].skipped.startswith("kept by default")
    assert records["model.layers.0.mlp.shared_expert_gate"].skipped.startswith("kept by default")
    assert records["model.layers.0.mlp.shared_expert.gate_proj"].skipped is None
    assert records["model.layers.0.mlp.experts.gate_up_proj"].skipped is None
    # Per layer: q/k/v as one GEMM (with their biases), o; the shared expert's gate/up as one, down.
    assert capture.count(FP4_MOE) == 2 and capture.count(torch.ops.fp4.linear.default) == 2 * (2 + 2)


def test_routers_are_quantized_when_include_names_them():
    model = tiny_moe("qwen3_moe", "grouped_mm")
    ids = torch.zeros(1, 4, dtype=torch.long)
    capture = GraphCapture()
    config = Fp4Config(include=("*.mlp.gate", "*.experts"), release_weights=False)
    with torch.no_grad():
        expected = model(ids).logits
        logits = torch.compile(model, backend=Fp4Backend(config, capture))(ids).logits
    records = {r.name: r for r in layer_records(model)}
    assert records["model.layers.0.mlp.gate"].skipped is None
    assert records["model.layers.0.self_attn.o_proj"].skipped == "not matched by any include pattern"
    # Per layer: the router as an fp4 linear, the experts as one fp4 MoE.
    assert capture.count(FP4_MOE) == 2 and capture.count(torch.ops.fp4.linear.default) == 2
    assert relative(logits, expected) < 0.3


def test_excluded_experts_stay_in_their_dtype_with_the_reason():
    model = tiny_moe("mixtral", "grouped_mm")
    capture = GraphCapture()
    config = Fp4Config(exclude=("model.layers.1.*",), release_weights=False)
    with torch.no_grad():
        torch.compile(model, backend=Fp4Backend(config, capture))(torch.zeros(1, 4, dtype=torch.long))
    records = {r.name: r for r in layer_records(model)}
    assert capture.count(FP4_MOE) == 1
    assert records["model.layers.1.mlp.experts.down_proj"].skipped == "excluded by pattern 'model.layers.1.*'"
    assert records["model.layers.0.mlp.experts.down_proj"].skipped is None


def test_expert_weights_memory_after_compile():
    model = tiny_moe("qwen3_moe", "grouped_mm")
    with torch.no_grad():
        torch.compile(model, backend=Fp4Backend(Fp4Config(include=("*.experts",)), GraphCapture()))(torch.zeros(1, 4, dtype=torch.long))
    experts = [r for r in layer_records(model) if r.skipped is None]
    before, after = sum(r.bytes_before for r in experts), sum(r.bytes_after for r in experts)
    assert after / before < 0.30 * 0.5  # fp32 model: fp4 is ~0.14x of fp32, ~0.28x of bf16
    assert all(model.get_parameter(r.name).untyped_storage().nbytes() == 0 for r in experts)  # released


def test_eager_experts_are_reported_with_the_fix(caplog, monkeypatch):
    monkeypatch.setattr(fp4compile.passes.moe, "_WARNED_EAGER", set())
    model = tiny_moe("qwen3_moe", "eager")
    ids = torch.zeros(1, 4, dtype=torch.long)
    capture = GraphCapture()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="fp4compile"):
        expected = model(ids).logits
        logits = torch.compile(model, backend=Fp4Backend(EXPERTS_ONLY, capture))(ids).logits
    warnings = [r.getMessage() for r in caplog.records if "experts_implementation='eager'" in r.getMessage()]
    assert capture.count(FP4_MOE) == 0
    assert len(warnings) == 1  # once, though both layers run the same traced fragment
    assert "Qwen3MoeExperts (" in warnings[0] and "qwen3_moe/modeling_qwen3_moe.py:" in warnings[0]
    assert "set_experts_implementation('grouped_mm')" in warnings[0]
    assert torch.allclose(logits, expected, atol=1e-5)  # kept as it was


def test_w4a4_and_mxfp4_compile_and_stay_close():
    model = tiny_moe("gpt_oss", "grouped_mm")
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        for config in (Fp4Config(format="mxfp4", include=("*.experts",), release_weights=False),
                       Fp4Config(act_mode="fp4", include=("*.experts",), release_weights=False)):
            torch._dynamo.reset()
            capture = GraphCapture()
            logits = torch.compile(model, backend=Fp4Backend(config, capture))(ids).logits
            assert capture.count(FP4_MOE) == 2
            assert relative(logits, expected) < 0.3


@pytest.mark.cuda
@pytest.mark.parametrize("family,implementation", [("qwen3_moe", "grouped_mm"), ("gpt_oss", "batched_mm")])
def test_compiled_model_runs_the_triton_moe_kernels_on_gpu(family: str, implementation: str):
    """On CUDA, fp4::moe runs the Triton kernels (named in the report), close to the eager
    fake-quant reference (bf16 tiles and intermediate, so bf16-level agreement, not 1e-5)."""
    model = tiny_moe(family, implementation, torch.bfloat16).cuda()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1)).cuda()
    reference = fake_quant_experts(model, EXPERTS_ONLY)
    capture = GraphCapture()
    with torch.no_grad():
        logits = torch.compile(model, backend=Fp4Backend(EXPERTS_ONLY, capture))(ids).logits
        expected = reference(ids).logits
    assert capture.count(FP4_MOE) == MOE_FAMILIES[family][1]
    assert {r.implementation for r in layer_records(model) if len(r.shape) == 3} == {"triton"}
    assert relative(logits, expected) < 3e-2


def test_every_quantized_layer_knows_the_choice_keys_its_calls_use(monkeypatch):
    """Where the chooser picks per shape (faked here: CPU has the reference only), each layer record
    carries the start of the choice keys its op calls build (the fused GEMM's for fused projections,
    the block's for experts), which is how the report shows what ran."""
    import sys

    from fp4compile.passes import linear as linear_pass, moe as moe_pass

    linear_op, moe_op = (sys.modules[f"fp4compile.ops.{name}"] for name in ("linear", "moe"))  # not the op objects

    for module in (linear_pass, moe_pass):
        monkeypatch.setattr(module, "implementation_for", lambda *args: "auto: candidates")
    keys = []
    for module in (linear_op, moe_op):
        monkeypatch.setattr(module, "run_chosen", lambda op, impl, key, device, options: keys.append(key)
                            or options["torch"]())
    model = tiny_moe("qwen3_moe", "grouped_mm")
    with torch.no_grad():
        torch.compile(model, backend="fp4")(torch.randint(0, 256, (2, 8)))
    records = [r for r in layer_records(model) if r.skipped is None]
    assert {len(r.shape) for r in records} == {2, 3} and any(r.fused_with for r in records)
    for record in records:
        assert record.choice_prefix and any(key.startswith(record.choice_prefix) for key in keys), record
