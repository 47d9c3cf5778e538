"""Build and load the project's C++ CPU kernels with torch's extension builder.

Each extension is named by a hash of its sources and flags, so an edited kernel is rebuilt and an
unchanged one is loaded from torch's extension cache (a minute to build, milliseconds to load).
The flags name the instruction sets explicitly (never `-march=native`), so one name means one
binary on every machine. Runtime images carry no compiler: there an extension an image's build
stage made is imported directly, the best variant this CPU can run.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "cpu"
AVX2_FLAGS = ("-mavx2", "-mfma", "-mf16c")
# /proc/cpuinfo flag -> the compiler flags that let the kernels use it (all or nothing per line)
_OPTIONAL_ISA = (
    (("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"),
     ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni")),
    (("amx_tile", "amx_int8"), ("-mamx-tile", "-mamx-int8")),
)


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def isa_variants() -> list[tuple[str, ...]]:
    """Instruction-set flags to build with, best first: everything this CPU offers that the kernels
    use, then plain AVX2 (the variant every supported machine runs; both give the same bits)."""
    best = list(AVX2_FLAGS)
    for needed, flags in _OPTIONAL_ISA:
        if set(needed) <= cpu_flags() and (flags[0] != "-mamx-tile" or "-mavx512f" in best):
            best.extend(flags)
    return [tuple(best), AVX2_FLAGS] if tuple(best) != AVX2_FLAGS else [AVX2_FLAGS]


def extension_name(stem: str, sources: Sequence[Path], flags: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.read_bytes())
    digest.update(" ".join(flags).encode())
    return f"specwire_{stem}_{digest.hexdigest()[:16]}"


def _build_root() -> Path:
    """torch's extension directory, computed without creating it (a read-only image may not own it)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu"


def _prebuilt(name: str) -> ModuleType | None:
    """An extension built earlier (an image's build stage), imported without the compiler that
    torch's `load` wants even for an up-to-date build."""
    path = _build_root() / name / f"{name}.so"
    spec = importlib.util.spec_from_file_location(name, path) if path.exists() else None
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(stem: str, paths: Sequence[Path], flags: Sequence[str]) -> ModuleType:
    """torch's builder (it loads an up-to-date build without compiling again)."""
    from torch.utils.cpp_extension import load

    name = extension_name(stem, paths, flags)
    return load(name=name, sources=[str(p) for p in paths], extra_cflags=list(flags), extra_ldflags=["-fopenmp"])


def load_extension(stem: str, sources: Sequence[str], flags: Sequence[str], isa: bool = False) -> ModuleType:
    """The extension built from `sources` (file names under services/cpu) with `flags` (plus, with
    `isa`, the best instruction-set flags of `isa_variants`); raises RuntimeError saying why where
    this machine cannot build or run it."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        raise RuntimeError(
            f"the {stem} CPU kernels need AVX2 (this CPU: {torch.backends.cpu.get_cpu_capability()})"
        )
    paths = [SOURCE_DIR / source for source in sources]
    variants = [(*flags, *isa_flags) for isa_flags in isa_variants()] if isa else [tuple(flags)]
    if shutil.which("c++") is None:
        for variant in variants:
            if (prebuilt := _prebuilt(extension_name(stem, paths, variant))) is not None:
                return prebuilt
        raise RuntimeError(f"the {stem} CPU kernels are not built and there is no C++ compiler to build them")
    try:
        return _build(stem, paths, variants[0])
    except Exception as exc:  # a compiler error names the file and line; keep its last lines
        raise RuntimeError(f"building the {stem} CPU kernels failed: {str(exc)[-2000:]}") from exc


def build_all_variants(stem: str, sources: Sequence[str], flags: Sequence[str]) -> list[str]:
    """Build every ISA variant (an image's build stage: its runtime may run on another CPU)."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [SOURCE_DIR / source for source in sources]
    with ThreadPoolExecutor() as pool:  # each build is mostly one long compile: run them side by side
        built = pool.map(lambda isa_flags: _build(stem, paths, (*flags, *isa_flags)), isa_variants())
        return [module.__name__ for module in built]
