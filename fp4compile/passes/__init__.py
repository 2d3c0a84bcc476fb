"""Graph passes on the Dynamo FX graph; they rewrite graphs and never compute numbers themselves."""

from .fusion import ProjectionFusionPass
from .graph import DynamoGraph, module_path
from .linear import LinearPass
from .manager import GraphPass, PassManager, PassResult
from .moe import MoePass

__all__ = ["DynamoGraph", "GraphPass", "LinearPass", "MoePass", "PassManager", "PassResult", "ProjectionFusionPass",
           "module_path"]
