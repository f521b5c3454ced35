"""featcal._C, the compiled solves (csrc/), built on first use against the installed torch.

`load()` compiles the sources once with torch.utils.cpp_extension (ninja and the system C++
compiler) into `extensions/` under featcal's user cache (`$FEATCAL_CACHE_DIR`, else e.g.
`~/.cache/featcal`), one folder per torch, Python and source location;
later processes reuse the build while the sources, the flags and torch are unchanged. The
same build serves CUDA tensors when torch has CUDA: that path calls ATen's Cholesky, which
runs on cuSOLVER, so no nvcc is needed. When the build or the import fails, `load()` returns
None once and for all, a one-line warning says that PyTorch serves the solves, and `error()`
holds the reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from types import ModuleType

import torch

from .io.user_cache import user_cache_dir

log = logging.getLogger("featcal")

NAME = "featcal_C"

_module: ModuleType | None = None
_error: str | None = None


def build_dir() -> Path:
    """The extension's build directory, one per torch version, Python version and source folder
    (two installs of featcal would otherwise rebuild each other's)."""
    where = hashlib.sha1(str(sources()[0].parent).encode()).hexdigest()[:10]
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{where}"
    return user_cache_dir() / "extensions" / tag.replace("+", "_")


def sources() -> list[Path]:
    spec = find_spec("featcal.csrc")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the C++ sources (featcal.csrc) are not installed")
    return sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.cpp"))


def load() -> ModuleType | None:
    """featcal._C, compiled if needed; None (and a warning, once) if it cannot be built or loaded."""
    global _module, _error
    if _module is None and _error is None:
        try:
            _module = _build()
        except Exception as exc:  # no compiler, a failed build, a missing LAPACK symbol: fall back
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            _error = f"{type(exc).__name__}: {lines[0]}"
            log.warning("C++ extension unavailable (%s); PyTorch serves ridge_solve", _error)
    return _module


def error() -> str | None:
    """Why featcal._C could not load, or None."""
    return _error


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load as load_extension

    target = build_dir()
    target.mkdir(parents=True, exist_ok=True)
    built = [p for p in target.glob(f"{NAME}.*") if p.suffix in (".so", ".pyd")]
    compiles = not built or any(p.stat().st_mtime > built[0].stat().st_mtime for p in sources())
    if compiles:
        log.info("compiling the C++ extension featcal._C (once, about a minute) into %s", target)
    started = time.perf_counter()
    module = load_extension(
        name=NAME,
        sources=[str(p) for p in sources()],
        extra_cflags=["-O3"],
        build_directory=str(target),
        verbose=os.environ.get("FEATCAL_VERBOSE_BUILD") == "1",
    )
    sys.modules["featcal._C"] = module
    if compiles:
        log.info("compiled featcal._C in %.0f s", time.perf_counter() - started)
    return module
