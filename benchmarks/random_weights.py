"""A model directory with another model's architecture and tokenizer but random weights.

    python -m benchmarks.random_weights SOURCE_DIR OUT_DIR [--dtype bfloat16]

For timing where the real weights cannot go (the lent GPU machine is reached only through a 64 MiB
transfer): a forward's cost depends on the shapes, not the values. Acceptance and output text of
such a model mean nothing, so no speedup or quality figure may come from it.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from services.model_loading import resolve_dtype

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def save_random_model(source: Path, out: Path, dtype: str = "bfloat16", seed: int = 0) -> Path:
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising 1.5B weights is slow on a CPU
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "source", type=Path, help="a HF model directory (config.json + tokenizer files; weights unused)"
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    print(save_random_model(args.source, args.out, args.dtype))


if __name__ == "__main__":
    main()
