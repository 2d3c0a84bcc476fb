"""Runs fp4compile's graph passes in a fixed order and counts what each matched and skipped."""

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from ..config import Fp4Config
from .graph import DynamoGraph

logger = logging.getLogger("fp4compile")


@dataclass
class PassResult:
    """What one pass did to one graph: how many sites it rewrote, and why it left others."""

    name: str
    matched: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1


class GraphPass(Protocol):
    name: str

    def __call__(self, graph: DynamoGraph, config: Fp4Config) -> PassResult: ...


class PassManager:
    """Applies ``passes`` in order to a Dynamo graph, then re-validates and regenerates its code.

    The passes run on the Dynamo-level graph (where parameters and module paths are known), before
    Inductor: Inductor's FX cache keys on the rewritten graph, so no pass needs a cache uuid.
    """

    def __init__(self, passes: list[GraphPass]):
        self.passes = passes

    def run(self, graph: DynamoGraph, config: Fp4Config) -> list[PassResult]:
        results = [graph_pass(graph, config) for graph_pass in self.passes]
        graph.gm.graph.lint()
        graph.gm.recompile()
        for r in results:
            if r.matched or r.skipped:
                logger.info("fp4compile pass %s: %d rewritten, skipped %s", r.name, r.matched, dict(r.skipped))
        return results
