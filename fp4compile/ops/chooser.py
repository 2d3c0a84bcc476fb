"""Which implementation of an fp4 op runs a call: forced by the user, or the fastest one measured.

Every op has implementations ``torch`` (the reference), ``triton`` and ``cutlass``, each with a
capability check (``implementations.py``). For a call on a GPU:

1. a forced implementation wins: ``Fp4Config(implementation=...)``, baked into the graph, then the
   ``FP4COMPILE_BACKEND`` environment variable (read per call, so a script can switch without
   recompiling). A forced implementation that cannot run the call raises, naming why;
2. otherwise, if one fast implementation is capable, it runs; if several are, the first call with a
   new *choice key* (op, format, mode, shape bucket, GPU) times each of them (a warm-up call, then
   a few repetitions between CUDA events) and keeps the fastest, in memory and in a JSON file
   keyed by the GPU's name and the library versions, so the next process does not time again.

The reference is never timed: it is the oracle, orders of magnitude slower, and runs only when
forced or when nothing else can (CPU tensors). Timing synchronizes with the host, so it never
happens while a stream is being captured into a CUDA graph or while sync debugging is on
(``torch.cuda.set_sync_debug_mode``, what ``check_capturable`` and careful users turn on): there
the preferred implementation (the first capable one, Triton before CUTLASS) runs, and nothing is
cached, so a later uncaptured call still measures. Under ``mode="reduce-overhead"`` the
cudagraph trees run each graph eagerly before recording it, which is where the timing happens.
"""

import functools
import importlib.metadata
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

logger = logging.getLogger("fp4compile")

IMPLEMENTATIONS = ("torch", "triton", "cutlass")
AUTO = "auto"
ENV_BACKEND = "FP4COMPILE_BACKEND"
ENV_CACHE_DIR = "FP4COMPILE_CACHE_DIR"
TIMED_REPETITIONS = 5
HOST_HEADSTART_CYCLES = 1_000_000
"""GPU clock cycles of sleep per timed call (about 0.5 ms at Hopper's clocks): more than the
host needs to queue one op call."""


class ImplementationError(RuntimeError):
    """A forced implementation cannot run a call (wrong device, format, mode or shape)."""


def check_implementation(name: str, where: str) -> None:
    """Raise unless ``name`` is ``auto`` or one of ``IMPLEMENTATIONS`` (``where``: who set it)."""
    if name != AUTO and name not in IMPLEMENTATIONS:
        raise ValueError(f"{where} must be {AUTO!r} or one of {list(IMPLEMENTATIONS)}, got {name!r}")


def forced_implementation(configured: str) -> tuple[str, str] | None:
    """The implementation the user forced and who forced it: the config's unless it is ``auto``,
    then the environment's; None when the choice is the chooser's."""
    if configured != AUTO:
        check_implementation(configured, "the implementation argument")
        return configured, f"implementation={configured!r}"
    from_env = os.environ.get(ENV_BACKEND, "").strip()
    if not from_env or from_env == AUTO:
        return None
    check_implementation(from_env, f"the {ENV_BACKEND} environment variable")
    return from_env, f"{ENV_BACKEND}={from_env}"


def bucket(size: int) -> int:
    """The power of two at or above ``size``: calls within one bucket share a choice (the kernels'
    own tile choices change at powers of two too)."""
    return 1 << max(size - 1, 0).bit_length()


@functools.cache
def _environment_key(device: torch.device) -> str:
    """What a measured choice depends on besides the call: the GPU and the code that runs (cached:
    it is looked up on every call with more than one candidate)."""
    import triton

    from .. import __version__

    return (f"{torch.cuda.get_device_name(device)} | torch {torch.__version__} | triton {triton.__version__} | "
            f"qutlass {_installed_version('qutlass')} | fp4compile {__version__}")


def _installed_version(distribution: str) -> str:
    """A distribution's installed version, or "none", read from its metadata (no import)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _cache_file() -> Path:
    root = os.environ.get(ENV_CACHE_DIR) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fp4compile"
    return Path(root) / "implementation-choices.json"


class ChoiceCache:
    """Measured winners, in memory and on disk: ``{environment: {choice key: implementation}}``.

    The file is read once, on first use, and rewritten whole (a temporary file renamed over it)
    after each new measurement; a file that cannot be read or written costs only re-measuring, so
    it is logged and otherwise ignored.
    """

    def __init__(self, path: Path | None = None):
        self.path = path
        self._choices: dict[str, dict[str, str]] | None = None

    def _loaded(self) -> dict[str, dict[str, str]]:
        if self._choices is None:
            self.path = self.path or _cache_file()
            try:
                self._choices = json.loads(self.path.read_text())
            except FileNotFoundError:
                self._choices = {}
            except (OSError, ValueError) as error:
                logger.warning("fp4compile: ignoring the implementation cache %s (%s)", self.path, error)
                self._choices = {}
        return self._choices

    def get(self, environment: str, key: str) -> str | None:
        return self._loaded().get(environment, {}).get(key)

    def put(self, environment: str, key: str, name: str) -> None:
        choices = self._loaded()
        choices.setdefault(environment, {})[key] = name
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as tmp:
                json.dump(choices, tmp, indent=1, sort_keys=True)
            os.replace(tmp.name, self.path)
        except OSError as error:
            logger.warning("fp4compile: could not save the implementation cache %s (%s)", self.path, error)

    def choices(self) -> dict[str, dict[str, str]]:
        """Every cached choice (a copy), by environment."""
        return {env: dict(keys) for env, keys in self._loaded().items()}


CACHE = ChoiceCache()

_USED: dict[str, str] = {}
"""The choice key -> implementation of every chosen (cached or measured) call of this process."""


def may_measure(device: torch.device) -> bool:
    """Whether timing (which synchronizes) is allowed now on ``device``."""
    return not torch.cuda.is_current_stream_capturing() and torch.cuda.get_sync_debug_mode() == 0


def measure(candidates: Mapping[str, Callable[[], object]], repetitions: int = TIMED_REPETITIONS) -> dict[str, float]:
    """GPU milliseconds per call of each candidate: one warm-up call (compiles Triton kernels),
    then the best of two rounds of ``repetitions`` calls between CUDA events. A candidate whose
    warm-up raises is left out with a warning (the error is raised if every one fails).

    Each round starts behind a GPU sleep long enough for the host to queue all its calls: without
    it, small calls are timed at the host's launch rate (100-200 us per op call in eager mode),
    and the choice would follow launch overheads, which CUDA graphs remove, instead of the
    kernels (measured on the H100: it picked a 415 us path over a 72 us one)."""
    working, errors = {}, {}
    for name, run in candidates.items():
        try:
            run()
            working[name] = run
        except Exception as error:  # noqa: BLE001  (reported, and raised when nothing else runs)
            logger.warning("fp4compile: the %s implementation failed and is not considered: %s", name, error)
            errors[name] = error
    if not working:
        raise next(iter(errors.values()))
    times = {}
    for name, run in working.items():
        best = float("inf")
        for _ in range(2):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(HOST_HEADSTART_CYCLES * repetitions)
            start.record()
            for _ in range(repetitions):
                run()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / repetitions)
        times[name] = best
    return times


def choose(
    key: str,
    capable: Mapping[str, Callable[[], object]],
    device: torch.device,
    cache: ChoiceCache | None = None,
) -> str:
    """The implementation to run for choice key ``key`` among the ``capable`` fast ones (in order
    of preference; at least one): cached (in ``cache``, default the process-wide one), else
    measured (see the module docstring)."""
    cache = cache or CACHE
    names = list(capable)
    if len(names) == 1:
        return names[0]
    environment = _environment_key(device)
    cached = cache.get(environment, key)
    if cached in capable:
        _USED[key] = cached
        return cached
    if not may_measure(device):
        return names[0]
    times = measure(capable)
    winner = min(times, key=times.get)
    cache.put(environment, key, winner)
    _USED[key] = winner
    logger.info("fp4compile: %s on %s: %s -> %s", key, torch.cuda.get_device_name(device),
                ", ".join(f"{name} {ms * 1000:.1f} us" for name, ms in times.items()), winner)
    return winner


Option = Callable[[], torch.Tensor] | str
"""One implementation for one call: a function running it, or the reason it cannot."""


def run_chosen(op: str, implementation: str, key: str, device: torch.device, options: Mapping[str, Option]) -> torch.Tensor:
    """Run the call with the forced implementation (raising if it cannot), else the reference when
    nothing faster can, else the chosen fast one. ``options``: every name of ``IMPLEMENTATIONS``."""
    forced = forced_implementation(implementation)
    if forced is not None:
        name, source = forced
        option = options[name]
        if isinstance(option, str):
            raise ImplementationError(f"{op}: {source} cannot run {key} on {device}: {option}")
        return option()
    fast = {name: option for name, option in options.items() if name != "torch" and not isinstance(option, str)}
    if not fast:
        return options["torch"]()
    return fast[choose(key, fast, device)]()


def choices() -> dict[str, dict[str, str]]:
    """The measured choices so far (this process's and the cache file's), by GPU and versions."""
    return CACHE.choices()


def used_choices(prefix: str) -> dict[str, str]:
    """What this process ran for the choice keys that start with ``prefix``: {the rest of the key:
    implementation}, for keys where the chooser picked among several candidates."""
    return {key[len(prefix):]: name for key, name in sorted(_USED.items()) if key.startswith(prefix)}
