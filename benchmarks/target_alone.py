"""Baseline: the target model alone, greedy, on the demo's prompt, computed as `specwire target`
computes it: the GGUF decoder and kernels for a GGUF model on a CPU (`--weights auto`), else HF
`generate` with the node's linear kernels (`--small-row-linear`).

python benchmarks/target_alone.py --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from services.config import DEFAULT_CACHE_DIR
from services.gguf_decoder import GGUFDecoder, greedy_decode
from services.gguf_file import GGUFFile
from services.model_loading import gguf_source, load_model, resolve_weights
from services.small_row_linear import small_row_setting, use_small_row_linears
from specwire.cli import DEMO_PROMPT


def gguf_target_alone(args: argparse.Namespace) -> dict:
    file = GGUFFile(gguf_source(args.model, DEFAULT_CACHE_DIR))
    tokenizer = file.tokenizer(DEFAULT_CACHE_DIR)
    ids = list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    decoder = GGUFDecoder(file)
    greedy_decode(decoder, ids, 4)  # warm-up
    start = time.perf_counter()
    tokens = len(greedy_decode(decoder, ids, args.max_tokens))
    seconds = time.perf_counter() - start
    return {
        "model": args.model,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 3),
        "weights": "gguf",
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--prompt", default=DEMO_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--small-row-linear", default="auto", help="as on `specwire target` (0: stock)")
    parser.add_argument("--dtype", default="float32", help="as on `specwire target`")
    parser.add_argument("--device", default="auto", help="as on `specwire target`")
    parser.add_argument("--weights", default="auto", help="as on `specwire target`")
    args = parser.parse_args()
    if resolve_weights(args.weights, args.model, args.device) == "gguf":
        print(json.dumps(gguf_target_alone(args)))
        return
    loaded = load_model(args.model, args.dtype, device=args.device)
    small_rows = use_small_row_linears(loaded.model, small_row_setting(args.small_row_linear))
    ids = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    prompt = torch.tensor([list(ids)], device=loaded.model.device)
    with torch.inference_mode():
        loaded.model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = loaded.model.generate(
            prompt, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False
        )
        seconds = time.perf_counter() - start
    tokens = out.shape[1] - prompt.shape[1]
    print(
        json.dumps(
            {
                "model": args.model,
                "tokens": tokens,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 3),
                "device": str(loaded.model.device),
                "dtype": args.dtype,
                "torch_threads": torch.get_num_threads(),
                "small_row_linear": small_rows,
            }
        )
    )


if __name__ == "__main__":
    main()
