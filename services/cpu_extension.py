"""Build and load the project's C++ CPU kernels with torch's extension builder.

Each extension is named by a hash of its sources and flags, so an edited kernel is rebuilt and an
unchanged one is loaded from torch's extension cache (a minute to build, milliseconds to load).
Runtime images carry no compiler: there an extension an image's build stage made is imported
directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "cpu"


def extension_name(stem: str, sources: Sequence[Path], flags: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.read_bytes())
    digest.update(" ".join(flags).encode())
    return f"specwire_{stem}_{digest.hexdigest()[:16]}"


def _prebuilt(name: str) -> ModuleType | None:
    """An extension built earlier (an image's build stage), imported without the compiler that
    torch's `load` wants even for an up-to-date build."""
    from torch.utils.cpp_extension import _get_build_directory

    path = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
    spec = importlib.util.spec_from_file_location(name, path) if path.exists() else None
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_extension(stem: str, sources: Sequence[str], flags: Sequence[str]) -> ModuleType:
    """The extension built from `sources` (file names under services/cpu) with `flags`; raises
    RuntimeError saying why where this machine cannot build or run it."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        raise RuntimeError(
            f"the {stem} CPU kernels need AVX2 (this CPU: {torch.backends.cpu.get_cpu_capability()})"
        )
    paths = [SOURCE_DIR / source for source in sources]
    name = extension_name(stem, paths, flags)
    if shutil.which("c++") is None:
        prebuilt = _prebuilt(name)
        if prebuilt is None:
            raise RuntimeError(f"the {stem} CPU kernels are not built and there is no C++ compiler to build them")
        return prebuilt
    from torch.utils.cpp_extension import load

    try:
        return load(name=name, sources=[str(p) for p in paths], extra_cflags=list(flags), extra_ldflags=["-fopenmp"])
    except Exception as exc:  # a compiler error names the file and line; keep its last lines
        raise RuntimeError(f"building the {stem} CPU kernels failed: {str(exc)[-2000:]}") from exc
