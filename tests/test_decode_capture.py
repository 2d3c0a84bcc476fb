"""Decoding fp4-compiled HF models step by step and under CUDA graphs (issue 6).

CPU: ``generate`` with a static cache gives the tokens of an eager fake-quant reference, and
compiles a fixed number of graphs however many prompt lengths and steps follow;
``check_capturable`` names the layer that syncs. GPU: ``mode="reduce-overhead"``, HF's own
compile path for static caches, and a user's ``torch.cuda.CUDAGraph`` capture of a decode step
all give the tokens or logits of uncaptured runs, with no host sync, no recompile and no memory
growth over 1,000 steps.
"""

import contextlib

import pytest
import torch
from compile_helpers import GraphCapture, fake_quant_copy, fake_quant_experts, fresh_dynamo  # noqa: F401
from tiny_models import tiny_llama, tiny_moe
from torch import nn

import fp4compile
from fp4compile import CaptureError, Fp4Config, check_capturable
from fp4compile.backend import Fp4Backend
from fp4compile import capture as capture_module
from fp4compile.report import layer_records

transformers = pytest.importorskip("transformers")

MODELS = {"llama": lambda: tiny_llama(), "qwen3_moe": lambda: tiny_moe("qwen3_moe", "grouped_mm")}
CACHE_LENGTH = 64


def eager_reference(model: nn.Module, config: Fp4Config) -> nn.Module:
    """A copy of ``model`` with the fp4 values of every layer ``config`` quantizes, run eagerly."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and config.selects(name)[0]]
    reference = fake_quant_copy(model, config, linears)
    if any(name.endswith(".experts") for name, _ in model.named_modules()):
        reference = fake_quant_experts(reference, config)
    return reference


def greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int, **kwargs) -> list[int]:
    """Greedy continuation of ``prompt`` with a static cache of ``CACHE_LENGTH`` positions.

    ``prefill_chunk_size`` makes HF allocate the cache before the first forward instead of inside
    it: a compiled prefill would otherwise create the cache tensors in its graph (under CUDA graphs,
    in memory the next replay overwrites), and it sends the prefill through the compiled call."""
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         cache_implementation="static", max_cache_len=CACHE_LENGTH, prefill_chunk_size=CACHE_LENGTH,
                         **kwargs)
    return out[0, prompt.shape[1]:].tolist()


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled since the test began (``fresh_dynamo`` clears the counters)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def assert_ran_fp4_under_cuda_graphs(model: nn.Module) -> None:
    """The model's layers were quantized, and cudagraph trees recorded graphs and skipped none
    (no skip alone would also hold if nothing had been captured)."""
    assert any(record.skipped is None for record in layer_records(model))
    inductor = torch._dynamo.utils.counters["inductor"]
    assert inductor["cudagraph_recorded_non_static_inputs"] > 0
    assert inductor["cudagraph_skips"] == 0


@pytest.fixture
def syncs_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """``check_capturable`` without PyTorch's sync debugging (CPU: a test raises the error itself)."""
    monkeypatch.setattr(capture_module, "_syncs_raise", contextlib.nullcontext)


@pytest.mark.parametrize("family", list(MODELS))
def test_generate_with_a_static_cache_matches_fake_quant_and_stops_compiling(family: str):
    """Graphs: the prefill at its first length, the decode step, the prefill again once a second
    length makes its length dynamic; then nothing more, for any prompt length or step."""
    config = Fp4Config()
    model = MODELS[family]()
    reference = eager_reference(model, config)
    model.compile(backend=fp4compile.backend(config))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, length in enumerate((7, 11, 5, 9, 16)):
            prompt = torch.randint(0, 256, (1, length), generator=generator)
            assert greedy(model, prompt, 8) == greedy(reference, prompt, 8), f"prompt length {length}"
            if i == 1:
                graphs = compiled_graphs()
    assert graphs == 3
    assert compiled_graphs() == 3


SYNCING_METHODS = {"item", "tolist", "cpu", "numpy", "nonzero", "__bool__"}
SYNCING_FUNCTIONS = {torch.nonzero, torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default}


@pytest.mark.parametrize("family", list(MODELS))
def test_decode_graphs_have_no_break_and_no_syncing_operation(family: str):
    """What CPU can say about capture: generate's graphs (prefill, decode) are whole, so no eager
    code runs between them, and none of their nodes reads a device value on the host."""
    model = MODELS[family]()
    capture = GraphCapture()
    model.compile(backend=Fp4Backend(Fp4Config(), compile_graph=capture))
    with torch.no_grad():
        greedy(model, torch.randint(0, 256, (1, 7)), 4)
    assert len(capture.graphs) == 2
    assert not torch._dynamo.utils.counters["graph_break"]
    for graph in capture.graphs:
        syncing = [n for n in graph.nodes if (n.op == "call_method" and n.target in SYNCING_METHODS)
                   or (n.op == "call_function" and n.target in SYNCING_FUNCTIONS)]
        assert not syncing
        assert any(n.target in (torch.ops.fp4.linear.default, torch.ops.fp4.moe.default) for n in graph.nodes)


class Router(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA error: called a synchronizing CUDA operation")  # what a sync raises when checked


class Block(nn.Module):
    def __init__(self, syncs: bool):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.router = Router() if syncs else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.router(self.proj(x))


def test_check_capturable_names_the_layer_that_syncs(syncs_not_checked: None):
    model = nn.Sequential(Block(syncs=False), Block(syncs=True))
    with pytest.raises(CaptureError, match=r"layer '1\.router' \(Router\) synchronizes with the host at .*"
                                           r"test_decode_capture\.py:\d+ in forward"):
        check_capturable(model, torch.randn(2, 8))
    assert check_capturable(model[0], torch.ones(2, 8)).shape == (2, 8)


def test_check_capturable_lets_other_errors_through(syncs_not_checked: None):
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        check_capturable(nn.Linear(8, 8), torch.randn(2, 9))


def test_check_capturable_needs_a_gpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CaptureError, match="needs a CUDA GPU"):
        check_capturable(nn.Linear(8, 8), torch.randn(2, 8))


# --- GPU -------------------------------------------------------------------------------------


def gpu_model(family: str) -> nn.Module:
    """The tiny ``family`` model in bf16 on the GPU."""
    return MODELS[family]().to("cuda", torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("family", list(MODELS))
def test_reduce_overhead_generate_gives_the_uncaptured_tokens(family: str):
    captured, uncaptured = gpu_model(family), gpu_model(family)
    captured.compile(backend="fp4", mode="reduce-overhead")
    uncaptured.compile(backend="fp4")
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for length in (12, 5, 9):
            prompt = torch.randint(0, 256, (1, length), generator=generator).cuda()
            assert greedy(captured, prompt, 16, disable_compile=True) == greedy(uncaptured, prompt, 16,
                                                                                disable_compile=True)
    assert_ran_fp4_under_cuda_graphs(captured)


@pytest.mark.cuda
@pytest.mark.parametrize("family", list(MODELS))
def test_transformers_compile_path_for_static_caches(family: str):
    """HF's own path (``compile_config``): with ``prefill_chunk_size`` HF compiles the prefill too
    (the original weights are never run, so they can be released), under CUDA graphs; the default
    mode is the uncaptured twin."""
    from transformers import CompileConfig

    model = gpu_model(family)
    fp4 = fp4compile.backend()
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        captured = greedy(model, prompt, 16, compile_config=CompileConfig(backend=fp4))
        assert_ran_fp4_under_cuda_graphs(model)
        torch._dynamo.reset()
        assert captured == greedy(model, prompt, 16, compile_config=CompileConfig(backend=fp4, mode="default"))


class DecodeStep:
    """One decode step of a compiled HF model on a static cache, reading its token and position
    from fixed buffers (what a CUDA graph replays).

    A step is not idempotent: besides writing its key/value entry, HF's cache layers count the
    tokens they have seen in a device tensor. ``save`` and ``restore`` copy every tensor of the
    cache in place (addresses unchanged, as a captured graph needs), so two runs of the same steps
    can start from the same state."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, cache_length: int = CACHE_LENGTH):
        self.model = model
        self.cache = transformers.StaticCache(config=model.config, max_cache_len=cache_length)
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache.early_initialization(batch_size=1, num_heads=config.num_key_value_heads, head_dim=head_dim,
                                        dtype=model.dtype, device=torch.device("cuda"))  # outside any graph
        self.token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        self.position = torch.zeros(1, dtype=torch.long, device="cuda")
        self.model(input_ids=prompt, past_key_values=self.cache, use_cache=True,
                   cache_position=torch.arange(prompt.shape[1], device="cuda"))

    def _state(self) -> list[torch.Tensor]:
        return [t for layer in self.cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]

    def save(self) -> list[torch.Tensor]:
        return [t.clone() for t in self._state()]

    def restore(self, saved: list[torch.Tensor]) -> None:
        for tensor, value in zip(self._state(), saved, strict=True):
            tensor.copy_(value)

    def set(self, token: int, position: int) -> None:
        self.token.fill_(token)
        self.position.fill_(position)

    def __call__(self) -> torch.Tensor:
        return self.model(input_ids=self.token, past_key_values=self.cache, cache_position=self.position,
                          use_cache=True).logits


@pytest.mark.cuda
@pytest.mark.parametrize("family", list(MODELS))
def test_a_users_cuda_graph_of_a_decode_step_replays_like_the_uncaptured_step(family: str):
    """20 uncaptured steps from the prompt's cache, then 20 replays of a captured step from the
    same cache state and inputs: the logits agree bit for bit, step after step."""
    model = gpu_model(family)
    model.compile(backend="fp4")
    prompt_length = 6
    steps = [((7 * i) % 256, prompt_length + i) for i in range(20)]
    with torch.no_grad():
        step = DecodeStep(model, torch.randint(0, 256, (1, prompt_length), device="cuda"))
        after_prompt = step.save()
        uncaptured = []
        for token, position in steps:
            step.set(token, position)
            uncaptured.append(step().clone())
        step.restore(after_prompt)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        check_capturable(step.model, input_ids=step.token, past_key_values=step.cache, cache_position=step.position,
                         use_cache=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured_logits = step()
        step.restore(after_prompt)
        graphs = compiled_graphs()
        replayed = []
        torch.cuda.set_sync_debug_mode("error")
        try:
            for token, position in steps:
                step.set(token, position)
                graph.replay()
                replayed.append(captured_logits.clone())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert compiled_graphs() == graphs
    for i, (a, b) in enumerate(zip(replayed, uncaptured)):
        assert torch.equal(a, b), f"step {i}"
    assert not torch.equal(replayed[0], replayed[1])


@pytest.mark.cuda
def test_a_thousand_captured_steps_sync_never_recompile_never_and_keep_their_memory():
    model = gpu_model("qwen3_moe")
    model.compile(backend="fp4", mode="reduce-overhead")
    prompt_length = 4
    with torch.no_grad():
        step = DecodeStep(model, torch.randint(0, 256, (1, prompt_length), device="cuda"), cache_length=1024 + 8)
        for i in range(3):  # cudagraph trees: warm-up, then recording
            step.set(i, prompt_length + i)
            step()
        graphs = compiled_graphs()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(3, 1003):
                torch.compiler.cudagraph_mark_step_begin()
                step.set((11 * i) % 256, prompt_length + i)
                logits = step()
                if i == 12:
                    memory = torch.cuda.memory_allocated()  # measured with one step's logits alive, as at the end
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logits).all()
    assert compiled_graphs() == graphs
    assert torch.cuda.memory_allocated() == memory
    assert_ran_fp4_under_cuda_graphs(model)


@pytest.mark.cuda
def test_check_capturable_names_hf_eager_experts_and_passes_grouped_ones():
    prompt = torch.randint(0, 256, (1, 5), device="cuda")
    with torch.no_grad():
        for implementation in ("grouped_mm", "eager"):
            model = tiny_moe("qwen3_moe", implementation).to("cuda", torch.bfloat16)
            model.compile(backend="fp4")
            model(prompt)  # compiles: quantizing may sync, a step may not
            if implementation == "grouped_mm":
                assert check_capturable(model, prompt).logits.shape == (1, 5, 256)
            else:
                with pytest.raises(CaptureError, match=r"layer 'model\.layers\.0\.mlp\.experts' \(Qwen3MoeExperts\)"):
                    check_capturable(model, prompt)
