"""What a launch's kernels are built for: a GPU through Triton's compiler, or Triton's interpreter.

The kernels run on CPU tensors in the interpreter (CPU CI), which has no inline asm, no fp8 or
bf16 dots and no fused multiply-add of its own. The wrappers therefore choose some constexprs and
dtypes by target: bf16 (fp8) tiles, the asm decode and fma-based division on a GPU; float32 tiles
and the pure-Triton twins in the interpreter. They read those choices here, from one place, which
is also what lets ``tests/sm90.py`` record, on a CPU-only machine, the launches a Hopper GPU would
get (``simulated``).
"""

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton.language as tl


@dataclass(frozen=True)
class KernelTarget:
    """``compiled``: True on a GPU, False in the interpreter. ``capability``: the GPU's compute
    capability ((0, 0) in the interpreter). ``multiprocessors``: how many SMs the split-K and
    stream-K partitions fill (a small number in the interpreter, which exercises splitting on tiny
    shapes)."""

    compiled: bool
    capability: tuple[int, int]
    multiprocessors: int

    @property
    def bf16x2_multiply(self) -> bool:
        """Whether the inline-asm decode can run (``mul.rn.bf16x2``: sm_90 and up); older GPUs and
        the interpreter decode with the pure-Triton twin (float32 arithmetic, the same values)."""
        return self.compiled and self.capability >= (9, 0)

    @property
    def fp8_tensor_cores(self) -> bool:
        return self.compiled and self.capability >= (8, 9)

    @property
    def dot_dtype(self) -> torch.dtype:
        """The dtype of the bf16 GEMMs' operands (float32 in the interpreter: no bf16 dot there)."""
        return torch.bfloat16 if self.compiled else torch.float32

    @property
    def tl_dot_dtype(self) -> tl.dtype:
        return tl.bfloat16 if self.compiled else tl.float32


INTERPRETER = KernelTarget(compiled=False, capability=(0, 0), multiprocessors=2)
_simulated: KernelTarget | None = None


@functools.cache
def _gpu(device: torch.device) -> KernelTarget:
    properties = torch.cuda.get_device_properties(device)
    return KernelTarget(True, (properties.major, properties.minor), properties.multi_processor_count)


def kernel_target(device: torch.device) -> KernelTarget:
    """The target of launches on ``device``'s tensors."""
    if device.type == "cuda":
        return _gpu(device)
    return _simulated or INTERPRETER


@contextlib.contextmanager
def simulated(target: KernelTarget) -> Iterator[None]:
    """Make launches on CPU tensors choose what ``target`` would get (for recording launches to
    compile ahead of time, never for running them: the interpreter cannot run GPU choices)."""
    global _simulated
    previous, _simulated = _simulated, target
    try:
        yield
    finally:
        _simulated = previous
