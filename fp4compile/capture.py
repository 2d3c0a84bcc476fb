"""Whether a model's step can be captured in a CUDA graph, and if not, which layer prevents it.

A host sync inside a captured region aborts the capture with CUDA's "operation not permitted when
stream is capturing", which names neither the layer nor the operation. fp4compile's ops never
sync (``DESIGN.md``), but a model can still hold code that does: HF's ``eager`` experts loop over
``nonzero``, a layer left to a custom kernel, a ``.item()`` in user code. ``check_capturable``
runs one step with PyTorch's sync debugging set to raise, and turns the first sync into an error
that names the innermost layer of the model whose code made it, with the file and line.

The layer is found from the Python frames of the traceback, so it is known for code that runs
as Python: an uncompiled model, and the code between a compiled model's graphs (graph breaks,
where syncing code usually ends up). A sync inside a compiled graph has no layer frames: the
message then names the model and the generated code's line.
"""

import contextlib
import os
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_SYNC_MESSAGE = "called a synchronizing CUDA operation"
"""The text of PyTorch's error for a sync under ``set_sync_debug_mode("error")``."""

_TORCH_DIR = os.path.join(os.path.dirname(torch.__file__), "")  # not torchvision, torchao


class CaptureError(RuntimeError):
    """A model's step cannot be captured in a CUDA graph (the message names the layer)."""


def check_capturable(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Run ``model(*args, **kwargs)`` once with host syncs turned into errors; return its output.

    Call it on the step you will capture, after your warm-up calls (e.g. one decode step of a
    compiled model, once it has compiled), with inputs on the GPU. Raises ``CaptureError``
    naming the layer whose code synchronized with the host; other errors pass through unchanged.
    """
    try:
        with _syncs_raise():
            return model(*args, **kwargs)
    except RuntimeError as error:
        if _SYNC_MESSAGE not in str(error):
            raise
        raise CaptureError(_describe_sync(error.__traceback__, model)) from error


@contextlib.contextmanager
def _syncs_raise() -> Iterator[None]:
    """PyTorch's sync debugging set to raise, restored afterwards."""
    if not torch.cuda.is_available():
        raise CaptureError("check_capturable needs a CUDA GPU: CUDA graphs and host syncs exist only there")
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _describe_sync(traceback: types.TracebackType | None, model: nn.Module) -> str:
    """The error message: the innermost layer of ``model`` on the traceback, and the last line of
    code outside torch (where the sync was asked for)."""
    names = {id(module): name for name, module in model.named_modules()}
    layer, site = None, None
    while traceback is not None:
        frame = traceback.tb_frame
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            layer = owner
        if not frame.f_code.co_filename.startswith(_TORCH_DIR):
            site = f"{frame.f_code.co_filename}:{traceback.tb_lineno} in {frame.f_code.co_name}"
        traceback = traceback.tb_next
    where = "the model's own forward" if layer is None or layer is model else f"layer {names[id(layer)]!r}"
    kind = "" if layer is None else f" ({type(layer).__name__})"
    return (
        f"this step cannot be captured in a CUDA graph: {where}{kind} synchronizes with the host"
        + (f" at {site}" if site else "")
        + ". Under capture that is CUDA's 'operation not permitted when stream is capturing'. Keep that code "
        "out of the captured step, or replace the operation (for HF MoE models with experts_implementation="
        "'eager': model.set_experts_implementation('grouped_mm') before torch.compile)."
    )
