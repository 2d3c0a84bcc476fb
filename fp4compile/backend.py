"""The ``fp4`` torch.compile backend: fp4compile's passes on the Dynamo graph, then Inductor.

    torch.compile(model, backend="fp4")                                  # defaults
    torch.compile(model, backend="fp4", options={"format": "mxfp4"})    # Fp4Config fields
    torch.compile(model, backend=fp4compile.backend(Fp4Config(...)))    # a configured backend
    torch.compile(model, backend="fp4", mode="reduce-overhead")          # CUDA graphs (cudagraph trees)

``mode`` is Inductor's: the same names and Inductor settings as with the default backend
(``torch._inductor.list_mode_options``). Not copied: the CUPTI environment variables that
``torch.compile``'s Inductor wrapper sets with CUDA graphs on CUDA < 12.6 (for profiling).
``torch.compile`` refuses ``mode`` together with ``options``; to combine a mode with fp4
settings, pass a configured backend.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import fx

from . import ops  # noqa: F401  (registers torch.ops.fp4)
from .config import Fp4Config
from .passes import DynamoGraph, LinearPass, MoePass, PassManager, ProjectionFusionPass
from .report import logger, records_of, summary

GraphCompiler = Callable[[fx.GraphModule, list[Any], dict[str, Any]], Callable]
"""Compiles a rewritten graph: (graph, example inputs, Inductor settings of the mode) -> callable."""


def compile_with_inductor(gm: fx.GraphModule, example_inputs: list[Any], inductor_options: dict[str, Any]) -> Callable:
    """Inductor, as ``torch.compile``'s default backend runs it with the same mode."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=inductor_options)


def inductor_mode_options(mode: str | None) -> dict[str, Any]:
    """Inductor's settings for a ``torch.compile`` mode (``{}`` for the default); unknown modes raise
    before anything is quantized."""
    from torch._inductor import list_mode_options

    if mode in (None, "default"):
        return {}
    modes = list_mode_options()
    if mode not in modes:
        raise ValueError(f"unknown torch.compile mode {mode!r} for the fp4 backend; valid modes are {sorted(modes)}")
    return dict(modes[mode])


class Fp4Backend:
    """A torch.compile backend object: quantizes what the config selects, then compiles the graph.

    ``compile_graph`` compiles the rewritten graph: Inductor by default; tests and debugging may
    pass another (e.g. ``lambda gm, inputs, options: gm.forward`` runs the rewritten graph eagerly).
    """

    def __init__(self, config: Fp4Config | None = None, compile_graph: GraphCompiler = compile_with_inductor):
        if config is not None and not isinstance(config, Fp4Config):
            raise TypeError(f"fp4compile.backend takes an Fp4Config, got {type(config).__name__}")
        self.config = config or Fp4Config()
        self.compile_graph = compile_graph
        self.passes = PassManager([MoePass(), LinearPass(), ProjectionFusionPass()])

    def __call__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        *,
        options: Mapping[str, Any] | None = None,
        mode: str | None = None,
    ) -> Callable:
        inductor_options = inductor_mode_options(mode)
        config = self.config.with_options(options)
        graph = DynamoGraph(gm, list(example_inputs))
        self.passes.run(graph, config)
        if records := records_of(graph.values.values()):
            logger.info(summary(records))
        return self.compile_graph(gm, list(example_inputs), inductor_options)


def backend(config: Fp4Config | None = None) -> Fp4Backend:
    """A configured ``fp4`` backend: ``torch.compile(model, backend=fp4compile.backend(cfg))``."""
    return Fp4Backend(config)


def fp4_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
    """The function registered as the ``fp4`` entry point of ``torch_dynamo_backends``."""
    return Fp4Backend()(gm, example_inputs, **kwargs)
