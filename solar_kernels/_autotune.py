"""Backend ``"auto"``: per kernel and shape class, the implementation measured faster on this GPU.

``backend=None`` becomes ``"auto"`` (``solar_kernels._backend``), and where both Triton and the CUDA
C++ extension run, the ops pass ``"auto"`` down to their launchers, which call ``pick`` before each
launch. How a launch is decided:

1. ``SOLAR_KERNELS_BACKEND=triton|cuda|torch`` (or an explicit ``backend=``) forces one backend for
   every op; this module is then never consulted.
2. The launch falls in a shape class by the width of its rows and their number:
   width ``narrow`` (<= 1024) / ``mid`` (<= 8192) / ``wide``, rows ``few`` (< 512) / ``many``, e.g.
   ``"mid/many"``. Small launches are latency-bound and large ones bandwidth-bound, so they may favour
   different implementations. What a row is depends on the kernel: RMSNorm and SwiGLU rows are
   tokens of width d or I; rotary rows are tokens of width (Hq + Hkv) * head_dim; log-prob rows are
   tokens of a chunk, of width V.
3. The first time a (kernel, shape class) is met on a kind of GPU, both implementations run a
   representative bf16 problem of that class (``representative_shape``; the median of
   ``triton.testing.do_bench``, which flushes L2 between runs) and the faster wins; a tie, or a
   failure of both, goes to Triton, and an implementation that fails loses. Forward and backward are
   separate kernels with separate choices.
4. Choices and their timings are kept per (device name, package version) in a JSON file,
   ``~/.cache/solar_kernels/autotune.json`` (``SOLAR_KERNELS_AUTOTUNE_CACHE`` names another file),
   so each is measured once per kind of GPU and release; delete the file or its entry to re-measure.
   While a CUDA graph is being captured nothing is measured: an unmeasured class runs Triton then.

The measurement is injected (``AutoBackend(measure=...)``), so the logic is tested on the CPU with
fake timings; how each kernel is run for its timing is part of its record in
``solar_kernels.ops._registry`` (``Kernel.make_case``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "SOLAR_KERNELS_AUTOTUNE_CACHE"
CANDIDATES = ("triton", "cuda")  # ties and double failures go to the first
WIDTH_CLASSES = (("narrow", 1024), ("mid", 8192), ("wide", None))  # (name, widest width in it)
ROW_CLASSES = (("few", 511), ("many", None))
_REPRESENTATIVE_WIDTH = {"narrow": 1024, "mid": 4096, "wide": 16384}
_FEW_ROWS = 64
# Many rows: 4096, or fewer for wide rows so that one bf16 operand stays at 64 MB (over L2, within
# memory during training).
_MANY_ELEMENTS = 2**25


def shape_class(rows: int, width: int) -> str:
    """``"<width class>/<rows class>"`` of a launch over ``rows`` rows of ``width`` elements."""
    width_name = next(name for name, limit in WIDTH_CLASSES if limit is None or width <= limit)
    rows_name = next(name for name, limit in ROW_CLASSES if limit is None or rows <= limit)
    return f"{width_name}/{rows_name}"


def representative_shape(cls: str) -> tuple[int, int]:
    """(rows, width) of the problem timed for shape class ``cls``."""
    width_name, rows_name = cls.split("/")
    width = _REPRESENTATIVE_WIDTH[width_name]
    rows = _FEW_ROWS if rows_name == "few" else max(512, min(4096, _MANY_ELEMENTS // width))
    return rows, width


def default_cache_path() -> str:
    return os.environ.get(CACHE_ENV_VAR) or os.path.join(
        os.path.expanduser("~"), ".cache", "solar_kernels", "autotune.json"
    )


def _read_cache(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            return data
        logger.warning("autotune cache %s does not hold a JSON object; ignoring it", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as error:
        logger.warning("autotune cache %s cannot be read (%s); ignoring it", path, error)
    return {}


def _write_cache_atomically(path: str, data: dict) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".autotune-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class AutoBackend:
    """The choices for one kind of GPU and package version: looked up, else measured and stored.

    ``measure(kernel, shape_class, backend)`` returns milliseconds (``math.inf`` when that backend
    fails); it runs only for (kernel, shape class) pairs that are neither in memory nor in the file.
    """

    def __init__(
        self, device_name: str, version: str, measure: Callable[[str, str, str], float], cache_path: str | None = None
    ):
        self.key = f"{device_name} | solar_kernels {version}"
        self.cache_path = cache_path or default_cache_path()
        self._measure = measure
        entry = _read_cache(self.cache_path).get(self.key, {})
        choices = entry.get("choices", {}) if isinstance(entry, dict) else {}
        self.choices: dict[str, dict[str, str]] = {
            kernel: {cls: b for cls, b in by_class.items() if b in CANDIDATES}
            for kernel, by_class in choices.items()
            if isinstance(by_class, dict)
        }

    def choose(self, kernel: str, rows: int, width: int, may_measure: bool = True) -> str:
        cls = shape_class(rows, width)
        known = self.choices.get(kernel, {}).get(cls)
        if known is not None:
            return known
        if not may_measure:
            return CANDIDATES[0]
        timings = {backend: self._timed(kernel, cls, backend) for backend in CANDIDATES}
        choice = min(CANDIDATES, key=lambda b: (timings[b], CANDIDATES.index(b)))
        self.choices.setdefault(kernel, {})[cls] = choice
        logger.info(
            "auto backend on %s: %s %s -> %s (%s)",
            self.key,
            kernel,
            cls,
            choice,
            ", ".join(f"{b} {t:.4g} ms" for b, t in timings.items()),
        )
        self._store(kernel, cls, choice, timings)
        return choice

    def _timed(self, kernel: str, cls: str, backend: str) -> float:
        try:
            ms = float(self._measure(kernel, cls, backend))
        except Exception as error:  # an implementation that cannot run this problem loses
            logger.warning(
                "auto backend: timing %s %s on %s failed (%s: %s)", kernel, cls, backend, type(error).__name__, error
            )
            return math.inf
        return ms if ms >= 0 and not math.isnan(ms) else math.inf

    def _store(self, kernel: str, cls: str, choice: str, timings: dict[str, float]) -> None:
        # Re-read first: another process may have stored other classes since this one loaded.
        try:
            data = _read_cache(self.cache_path)
            entry = data.get(self.key)
            if not isinstance(entry, dict):
                entry = data[self.key] = {}
            entry.setdefault("choices", {}).setdefault(kernel, {})[cls] = choice
            entry.setdefault("ms", {}).setdefault(kernel, {})[cls] = {
                b: (t if math.isfinite(t) else None) for b, t in timings.items()
            }
            entry["measured"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            entry["torch"], entry["triton"] = torch.__version__, _triton_version()
            _write_cache_atomically(self.cache_path, data)
        except OSError as error:  # a read-only home still gets the choice, for this process
            logger.warning("auto backend: cannot write %s (%s)", self.cache_path, error)


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:  # pragma: no cover
        return "none"


def _measure_on(device: torch.device) -> Callable[[str, str, str], float]:
    def measure(kernel: str, cls: str, backend: str) -> float:
        import triton.testing

        from .ops import _registry

        rows, width = representative_shape(cls)
        with torch.cuda.device(device):
            run = _registry.KERNELS[kernel].make_case(backend, rows, width, device)
            ms = triton.testing.do_bench(run, warmup=5, rep=25, return_mode="median")
            del run
        return ms

    return measure


_TUNERS: dict[int, AutoBackend] = {}  # by CUDA device index


def _tuner(device: torch.device) -> AutoBackend:
    index = device.index if device.index is not None else torch.cuda.current_device()
    tuner = _TUNERS.get(index)
    if tuner is None:
        from . import __version__

        tuner = _TUNERS[index] = AutoBackend(
            torch.cuda.get_device_name(index), __version__, _measure_on(torch.device("cuda", index))
        )
    return tuner


def pick(backend: str, kernel: str, rows: int, width: int, device: torch.device) -> str:
    """The implementation a launcher runs: ``backend`` itself, or for ``"auto"`` this GPU's choice
    for ``kernel`` on ``rows`` rows of ``width`` elements."""
    if backend != "auto":
        return backend
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return _tuner(device).choose(kernel, rows, width, may_measure=not capturing)
