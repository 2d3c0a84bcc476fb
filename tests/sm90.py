"""Compile the Triton kernels a call launches for sm_90 (Hopper), on a machine without a GPU.

The interpreter that runs the kernels in CPU CI executes them as Python over arrays, not through
the GPU compiler, so it cannot tell whether that compiler accepts them, and it says nothing of
the registers or spills, which decide these kernels' speed (see ``benchmarks/RESULTS.md``).
Triton's wheel carries ``ptxas``, ``cuobjdump`` and ``nvdisasm``, so the real compile needs no GPU. Two steps, each in a process of
its own because ``TRITON_INTERPRET`` is read when the kernels are defined:

1. ``record``: run a Python snippet on CPU tensors under the interpreter, with the wrappers told
   to choose what an H100 would get (``target.simulated``: its compute capability and SM
   count, bf16 and fp8 tiles, the inline-asm decode) and every kernel launch recorded (argument
   types, alignment, constexprs, launch options), not executed: the wrappers' launch sequences do
   not depend on tensor values (they never sync with the host);
2. ``compile``: bind the recorded arguments with Triton's CUDA backend as a launch on the GPU
   would, compile for sm_90 and read the resource usage and SASS of each distinct kernel.

Command line, for developers:

    python tests/sm90.py 'from fp4compile.kernels.triton.linear import fp4_linear; ...'

prints one line per distinct kernel: registers per thread, bytes spilled (stack frame and local
memory), shared memory, SASS instruction counts.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
H100 = dict(compiled=True, capability=(9, 0), multiprocessors=132)
_TL_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8e4nv": "float8e4nv"}


@dataclass(frozen=True)
class KernelStats:
    """One compiled kernel: its name, launch options, constexprs, and what ptxas made of it
    (``spill_bytes``: its stack frame plus local memory, where ptxas puts spilled registers;
    Triton kernels have no other use for either)."""

    name: str
    options: dict
    constexprs: dict
    registers: int
    spill_bytes: int
    shared_bytes: int
    sass: Counter

    def line(self) -> str:
        ops = self.sass
        return (f"{self.name} {self.options} regs={self.registers} spills={self.spill_bytes} "
                f"shared={self.shared_bytes} sass={sum(ops.values())} HMMA={ops['HMMA']} HGMMA={ops['HGMMA']} "
                f"LDG={ops['LDG']} PRMT={ops['PRMT']} LOP3={ops['LOP3']}\n    {self.constexprs}")


def _record(code: str, out: str) -> None:
    """Step 1 (under the interpreter): run ``code``, writing its kernel launches to ``out``."""
    import torch
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from fp4compile.kernels.triton.target import KernelTarget, simulated

    launches = []

    def record_launch(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        described = {}
        for name, value in [*zip(names, args), *((k, v) for k, v in kwargs.items() if k in names)]:
            if isinstance(value, torch.Tensor):
                described[name] = {"tensor": str(value.dtype).removeprefix("torch."), "offset": value.data_ptr() % 16}
            elif isinstance(value, tl.dtype):
                described[name] = {"tl_dtype": value.name}
            else:
                described[name] = {"value": value}
        launches.append({"module": self.fn.__module__, "name": self.fn.__name__, "args": described,
                         "options": {k: v for k, v in kwargs.items() if k not in names}})

    InterpretedFunction.run = record_launch
    with simulated(KernelTarget(**H100)):
        exec(compile(code, "<sm90 snippet>", "exec"), {})
    Path(out).write_text(json.dumps(launches))


class _PointerStub:
    """What Triton's binder reads of a tensor argument: its dtype and its address's alignment."""

    def __init__(self, dtype: Any, offset: int):
        self.dtype, self._offset = dtype, offset

    def data_ptr(self) -> int:
        return 4096 + self._offset


def _gpu_arguments(entry: dict) -> dict:
    import torch
    import triton.language as tl

    arguments = {}
    for name, described in entry["args"].items():
        if "tensor" in described:
            arguments[name] = _PointerStub(getattr(torch, described["tensor"]), described["offset"])
        elif "tl_dtype" in described:
            arguments[name] = getattr(tl, _TL_DTYPES[described["tl_dtype"]])
        else:
            arguments[name] = described["value"]
    return arguments


def _tools_dir() -> Path:
    """Where Triton's wheel keeps ptxas, cuobjdump and nvdisasm."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _compile(path: str) -> list[KernelStats]:
    """Step 2 (no interpreter): compile each distinct recorded launch for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    tools = _tools_dir()
    seen, results = set(), []
    for entry in json.loads(Path(path).read_text()):
        kernel = getattr(importlib.import_module(entry["module"]), entry["name"])
        arguments = _gpu_arguments(entry)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(**arguments, **entry["options"])
        options, signature, constexprs, attrs = kernel._pack_args(backend, entry["options"], bound, specialization,
                                                                  options)
        key = repr((entry["module"], entry["name"], signature, constexprs, attrs, options))  # what the binary depends on
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        with tempfile.TemporaryDirectory() as scratch:
            cubin = Path(scratch) / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([tools / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True,
                                   check=True).stdout
            sass = subprocess.run([tools / "nvdisasm", "-c", cubin], capture_output=True, text=True, check=True).stdout
        resources = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
        opcodes = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M)
        shown = {p.name: arguments[p.name] for p in kernel.params if p.is_constexpr and p.name in arguments}
        registers, stack, shared, local = map(int, resources.groups())
        # ptxas puts spilled registers on the stack frame (heavy spills) or in local memory.
        results.append(KernelStats(entry["name"], entry["options"], shown, registers, stack + local, shared,
                                   Counter(opcodes)))
    return results


def tools_missing() -> str | None:
    """Why this machine cannot compile for sm_90 (Triton's wheel without its CUDA tools), or None."""
    tools = _tools_dir()
    missing = [name for name in ("ptxas", "cuobjdump", "nvdisasm") if not (tools / name).exists()]
    return f"Triton's wheel has no {', '.join(missing)} in {tools}" if missing else None


def compile_launches(code: str) -> list[KernelStats]:
    """Record the kernel launches of ``code`` (run on CPU tensors) and compile each for sm_90."""
    with tempfile.TemporaryDirectory() as scratch:
        launches = str(Path(scratch) / "launches.json")
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run([sys.executable, __file__, "--record", code, launches], env=env, check=True)
        env.pop("TRITON_INTERPRET")
        stats = Path(scratch) / "stats.json"
        subprocess.run([sys.executable, __file__, "--compile", launches, str(stats)], env=env, check=True)
        return [KernelStats(**{**row, "sass": Counter(row["sass"])}) for row in json.loads(stats.read_text())]


def main(argv: list[str]) -> None:
    if argv[:1] == ["--record"]:
        _record(argv[1], argv[2])
    elif argv[:1] == ["--compile"]:
        rows = [{**vars(s), "constexprs": {k: str(v) for k, v in s.constexprs.items()}} for s in _compile(argv[1])]
        Path(argv[2]).write_text(json.dumps(rows))
    elif len(argv) == 1:
        for stats in compile_launches(argv[0]):
            print(stats.line())
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
