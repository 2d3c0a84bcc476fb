"""The implementation comparison shared by ``bench_linear.py --implementations`` and
``bench_moe.py --implementations`` (issue 7): the MXFP4 W4A4 ops forced to each implementation,
and left to the chooser, timed in one run (protocol: ../shared/BENCHMARKS.md).

Columns: ``triton``; ``cutlass`` (conversions per call); ``cutlass+e4m3`` (the compile-time e4m3
weights of ``Fp4Config(fp8_weights=True)``); ``auto`` (the chooser times triton and cutlass at
its first call, into a fresh cache: ``use_fresh_choice_cache``). A shape's columns are timed
interleaved (``timing.time_interleaved_ms``).

Whether auto loses to the best single implementation is measured two ways:
- **regret**: the time of the implementation the chooser picked over the faster of triton and
  cutlass, both read from the forced columns of the same interleaved timing. ``auto`` runs the
  picked implementation's kernels (``kernel_names`` of one call each are compared), so this is
  auto's loss without the spread between two timings of the same kernels;
- the timed ``auto`` column over the faster forced one, which adds that spread (up to 4-6% per
  shape on the largest ones, RESULTS.md).
"""

import os
import tempfile
from collections.abc import Callable

import torch

from fp4compile.ops import chooser
from timing import geomean

COLUMNS = ["triton", "cutlass", "cutlass+e4m3", "auto"]
CHOSEN = ("triton", "cutlass")
"""What the chooser picks between on Hopper (``cutlass+e4m3`` is a configuration, not a choice)."""


def use_fresh_choice_cache() -> None:
    """Point the chooser at an empty cache directory, so ``auto`` measures at its first call. Call
    before the first op call of the process (the cache file is read at first use)."""
    os.environ[chooser.ENV_CACHE_DIR] = tempfile.mkdtemp(prefix="fp4compile-bench-")


def forced(column: str) -> tuple[str, bool]:
    """(implementation argument, with e4m3 weights) of a column."""
    return ("cutlass", True) if column == "cutlass+e4m3" else (column, False)


def kernel_names(call: Callable[[], object]) -> list[str]:
    """The CUDA kernels one call launches, in order (torch.profiler)."""
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def picked(prefix: str, size: int) -> str:
    """What the chooser picked in this process for the choice keys starting with ``prefix`` at
    ``size`` rows or tokens, or "(one candidate)" where it had nothing to choose from."""
    picks = {name for rest, name in chooser.used_choices(prefix).items()
             if rest.split(" ", 1)[0] == str(chooser.bucket(size))}
    return picks.pop() if len(picks) == 1 else "(one candidate)"


def check_auto_runs(pick: str, timed: dict[str, Callable[[int], object]]) -> None:
    """Raise unless an ``auto`` call launches the same kernels as a call forced to ``pick``."""
    if pick in timed:
        auto, forced_pick = kernel_names(lambda: timed["auto"](0)), kernel_names(lambda: timed[pick](0))
        assert auto == forced_pick, f"auto ran {auto}, forced {pick} runs {forced_pick}"


def cells(row: dict) -> list[str]:
    """The columns' times (us) and ratios to the row's baseline, the pick and its regret."""
    return [*(f"{row[c] * 1e3:.1f} ({row['base'] / row[c]:.2f}x)" for c in COLUMNS), row["pick"],
            f"{regret(row):.3f}"]


def regret(row: dict) -> float:
    """The picked implementation's time over the faster forced one (1.0 where nothing was picked)."""
    return row[row["pick"]] / min(row[c] for c in CHOSEN) if row["pick"] in CHOSEN else 1.0


def report(title: str, rows: list[dict], baseline: str) -> None:
    """Per size: geometric means of the ratio to the baseline, auto's worst regret, and the timed
    auto column over the faster forced one at its worst shape."""
    print(f"\n{title}: geometric mean of the ratio to {baseline} (>1: faster); auto against the best forced one")
    print("| size | " + " | ".join(COLUMNS) + " | regret of the pick (worst shape) | timed auto / best forced (worst "
          "shape) |\n|---" + "|---" * (len(COLUMNS) + 2) + "|")
    for size in sorted({r["size"] for r in rows}):
        group = [r for r in rows if r["size"] == size]
        means = [f"{geomean([r['base'] / r[c] for r in group]):.2f}x" for c in COLUMNS]
        timed_auto = max(r["auto"] / min(r[c] for c in CHOSEN) for r in group)
        print(f"| {size} | " + " | ".join(means) + f" | {max(map(regret, group)):.3f} | {timed_auto:.3f} |")
