"""Benchmark client: GSM8K + HumanEval through specwire, against the target alone, HF assisted
generation on the same pair, and llama.cpp (plain and speculative) on the same GGUF files, in one
run on one machine.

    python -m benchmarks.bench --gsm8k 10 --humaneval 10 --max-tokens 128     # `make bench`
    python -m benchmarks.bench --draft 127.0.0.1:50052 ...                      # a running draft node
    python -m benchmarks.bench --openai http://127.0.0.1:8000 ...               # its OpenAI API

Without --draft/--openai, a `specwire target` and a `specwire draft` process are started on
loopback as users run them (specwire.local_pair) and driven over gRPC. For a GGUF target (the
packaged models) the rows are: the target alone on the nodes' GGUF decoder and kernels (in this
process; the exactness reference), the target alone on fp32 weights (HF generate; the quality
reference, `--no-fp32` skips it), HF assisted generation on fp32 weights, llama.cpp's llama-server
on the same GGUF files, plain and with the draft (its speculative mode; `make llamacpp` builds it,
`--no-llamacpp` skips them), and specwire. For a transformers model the target alone is HF generate
with the nodes' linear kernels (`--small-row-linear`). Runs
never overlap each other. With one request at a time (`--concurrency 1`, the default) they take
turns sample by sample: every run generates sample 1, then every run sample 2, and so on, so a
machine whose speed drifts over minutes (a shared VM) slows every run alike instead of the one
that happened to be running (`--no-interleave`: each run's samples in one block). A specwire row
drafts the K it is labelled with also with `--concurrency` above 1: its target runs without the load
advice (`--no-draft-advice`, which caps K under load; `benchmarks/load.py --capacity` measures
that). Writes report.json, report.md, speedup.png and acceptance_by_position.png to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.bench_data import Sample, load_samples
from benchmarks.bench_quality import is_correct
from benchmarks.bench_report import compare_with, markdown_table, plot, summarize
from benchmarks.bench_runners import (
    Generation,
    GGUFTargetRunner,
    HFRunner,
    Settings,
    SpecwireGrpcRunner,
    SpecwireOpenAIRunner,
)
from benchmarks.llamacpp import LlamaServerRunner, llama_server, llama_server_binary
from draft_node.config import DraftConfig
from draft_node.proposers import eos_token_ids
from services.config import DEFAULT_CACHE_DIR
from services.gguf_decoder import GGUFDecoder
from services.gguf_file import GGUFFile
from services.limits import mb_to_bytes
from services.model_loading import gguf_source, load_model, resolve_weights
from services.prefix_cache import KVBufferCopies, PrefixCache
from services.small_row_linear import small_row_setting, use_small_row_linears
from specwire.local_pair import local_pair


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gsm8k", type=int, default=10, help="GSM8K test problems (from the first)")
    parser.add_argument("--humaneval", type=int, default=10, help="HumanEval problems (from the first)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None, help="per-request seed when sampling")
    parser.add_argument("--strategy", default="", help="verification strategy (default: lossless for T)")
    parser.add_argument("-k", "--k", type=int, action="append", help="K to run (repeatable; default the draft node's)")
    parser.add_argument("--adaptive", action="store_true", help="also run specwire with adaptive K/N")
    parser.add_argument("--proposer", default="hf", choices=["hf", "vllm", "ngram"])
    parser.add_argument("--num-candidates", type=int, default=1, help="N (vllm, ngram proposers)")
    parser.add_argument("--concurrency", type=int, default=1, help="concurrent specwire requests")
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests per run first")
    parser.add_argument("--target-model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--draft-model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--draft", help="drive this running draft node (gRPC host:port)")
    parser.add_argument("--openai", help="drive this running draft node's OpenAI API (base URL)")
    parser.add_argument("--device", default="auto", help="where both nodes and the baselines run (auto, cpu, cuda[:N])")
    parser.add_argument("--target-dtype", default=DraftConfig.model_fields["dtype"].default)
    parser.add_argument("--draft-dtype", default=DraftConfig.model_fields["dtype"].default)
    parser.add_argument("--draft-weights", default=DraftConfig.model_fields["weights"].default)
    parser.add_argument("--small-row-linear", default="auto", help="linear kernels of nodes and baselines")
    parser.add_argument(
        "--confidence-threshold", type=float, default=DraftConfig.model_fields["confidence_threshold"].default,
        help="the draft node's (hf proposer)",
    )  # fmt: skip
    parser.add_argument(
        "--min-chain-probability", type=float,
        default=DraftConfig.model_fields["min_chain_probability"].default, help="the draft node's (hf proposer)",
    )  # fmt: skip
    parser.add_argument(
        "--assisted-confidence-threshold", type=float, default=0.4,
        help="HF assisted generation's assistant_confidence_threshold (0.4: transformers' default; 0: off)",
    )  # fmt: skip
    parser.add_argument(
        "--prefix-cache-mb", type=float, default=DraftConfig.model_fields["prefix_cache_mb"].default,
        help="prefix cache of both nodes and of each baseline run (0: off everywhere)",
    )  # fmt: skip
    parser.add_argument(
        "--pipeline", choices=["auto", "on", "off"], help="draft node pipelining (default: the node's)"
    )
    parser.add_argument(
        "--interleave", action=argparse.BooleanOptionalAction, default=True,
        help="runs take turns sample by sample (needs --concurrency 1)",
    )  # fmt: skip
    parser.add_argument("--no-baseline", action="store_true", help="skip the target-alone run")
    parser.add_argument("--no-fp32", action="store_true", help="GGUF target: skip the fp32 target alone and HF assisted")
    parser.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp's runs")
    parser.add_argument(
        "--llamacpp-spec-args", default="",
        help="extra llama-server flags of its speculative run (default: its own defaults, e.g. --spec-draft-n-max 3)",
    )  # fmt: skip
    parser.add_argument("--no-assisted", action="store_true", help="skip HF assisted generation")
    parser.add_argument(
        "--out-dir", type=Path, default=Path("benchmarks/results") / time.strftime("bench-%Y%m%d-%H%M%S")
    )
    args = parser.parse_args(argv)
    args.k = args.k or [DraftConfig.default_k(args.proposer)]
    return args


WARMUP = "warm-up"  # key of the warm-up prompt in `prompts`
WARMUP_MESSAGES = [{"role": "user", "content": "Write a haiku about compilers."}]


def warm_up(runner: object, prompts: dict[str, str], warmup: int) -> None:
    """Untimed short requests (model pages, allocator, threads) on a prompt of no sample, so no
    timed prompt is in a prefix cache before its run reaches it."""
    timed_settings = runner.settings
    runner.settings = replace(timed_settings, max_tokens=min(8, timed_settings.max_tokens))
    for _ in range(warmup):
        runner.generate(WARMUP, prompts[WARMUP])
    runner.settings = timed_settings


def run(
    name: str, runner: object, workers: int, samples: list[Sample], prompts: dict[str, str], warmup: int
) -> list[Generation]:
    """Warm up, then generate every sample, `workers` at a time."""
    warm_up(runner, prompts, warmup)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(samples), desc=name, file=sys.stderr) as bar:
        futures = [pool.submit(runner.generate, s.sample_id, prompts[s.sample_id]) for s in samples]
        generations = []
        for future in futures:
            generations.append(future.result())
            bar.update()
    return generations


def run_interleaved(
    runs: list[tuple[str, object]], samples: list[Sample], prompts: dict[str, str], warmup: int
) -> dict[str, list[Generation]]:
    """Warm up every runner, then each sample through every runner in turn, one request at a time."""
    for _, runner in runs:
        warm_up(runner, prompts, warmup)
    results: dict[str, list[Generation]] = {name: [] for name, _ in runs}
    for sample in tqdm(samples, desc=" / ".join(results), file=sys.stderr):
        for name, runner in runs:
            results[name].append(runner.generate(sample.sample_id, prompts[sample.sample_id]))
    return results


def machine() -> dict:
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "commit": commit,
    }


def gguf_target(args: argparse.Namespace) -> tuple[object, object, list[int]] | None:
    """The GGUF decoder, tokenizer and EOS ids the target node uses, for a GGUF target on a CPU."""
    if resolve_weights("auto", args.target_model, args.device) != "gguf":
        return None
    file = GGUFFile(gguf_source(args.target_model))
    tokenizer = file.tokenizer(DEFAULT_CACHE_DIR)
    return GGUFDecoder(file), tokenizer, sorted(eos_token_ids(tokenizer, None) | file.eos_token_ids())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started_on = machine()  # the commit the run started from (its processes import that code)
    samples = load_samples(args.gsm8k, args.humaneval)
    by_id = {s.sample_id: s for s in samples}
    small_rows = small_row_setting(args.small_row_linear)
    gguf = gguf_target(args)
    fp32 = gguf is None or not args.no_fp32  # the transformers target: the reference, or beside the GGUF one
    target = load_model(args.target_model, args.target_dtype, device=args.device) if fp32 else None
    if target is not None:
        use_small_row_linears(target.model, small_rows)  # the target alone runs the node's kernels
    tokenizer = gguf[1] if gguf else target.tokenizer
    prompts = {
        s.sample_id: tokenizer.apply_chat_template(s.messages, add_generation_prompt=True, tokenize=False)
        for s in [*samples, Sample("", WARMUP, WARMUP_MESSAGES, "")]
    }
    local = not (args.draft or args.openai)
    draft = None
    if not args.no_assisted and target is not None:
        draft = load_model(args.draft_model, args.draft_dtype, device=args.device)
        use_small_row_linears(draft.model, small_rows, int8=args.draft_weights == "int8")
    stack = ExitStack()
    if local:
        draft_args = [
            "--model", args.draft_model, "--proposer", args.proposer, "--num-candidates", str(args.num_candidates),
            "--dtype", args.draft_dtype, "--weights", args.draft_weights, "--small-row-linear", args.small_row_linear,
            "--device", args.device,
            "--confidence-threshold", str(args.confidence_threshold),
            "--min-chain-probability", str(args.min_chain_probability),
            "--prefix-cache-mb", str(args.prefix_cache_mb),
            "--adaptive" if args.adaptive else "--no-adaptive",
            *([] if args.pipeline is None else ["--pipeline", args.pipeline]),
        ]  # fmt: skip
        target_args = [
            "--model", args.target_model, "--dtype", args.target_dtype, "--device", args.device,
            "--small-row-linear", args.small_row_linear, "--prefix-cache-mb", str(args.prefix_cache_mb),
            "--no-draft-advice",
        ]  # fmt: skip
        pair = stack.enter_context(local_pair(target_args, draft_args, logs=args.out_dir / "logs"))
        args.draft = pair.draft

    def settings(k: int = 0) -> Settings:
        return Settings(
            args.max_tokens, args.temperature, args.strategy, k, args.seed, args.assisted_confidence_threshold
        )

    runs: list[tuple[str, object, int]] = []  # (name, runner, concurrent requests); in-process: one at a time

    def prefix_cache() -> PrefixCache:  # one per run, as each target node has its own
        return PrefixCache(mb_to_bytes(args.prefix_cache_mb))

    if not args.no_baseline:
        if gguf:
            decoder, _, gguf_eos = gguf
            cache = PrefixCache(mb_to_bytes(args.prefix_cache_mb), KVBufferCopies(decoder.new_cache))
            runs.append(("target-alone", GGUFTargetRunner(decoder, tokenizer, settings(), gguf_eos, cache), 1))
        if target is not None:
            eos = sorted(eos_token_ids(target.tokenizer, target.model.generation_config))
            name = "target-alone fp32" if gguf else "target-alone"
            runs.append((name, HFRunner(target, settings(), eos, prefix_cache=prefix_cache()), 1))
    if draft is not None:  # whole prompts: transformers 5.19's assisted loop goes wrong on a pre-filled cache
        eos = sorted(eos_token_ids(target.tokenizer, target.model.generation_config))
        runs += [(f"hf-assisted K={k}", HFRunner(target, settings(k), eos, assistant=draft), 1) for k in args.k]
    if gguf and not args.no_llamacpp:
        binary = llama_server_binary()
        if binary is None:
            raise SystemExit("llama.cpp is not built: run `make llamacpp` (or pass --no-llamacpp)")
        files = {name: gguf_source(name) for name in (args.target_model, args.draft_model)}
        logs = args.out_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        plain = stack.enter_context(llama_server(binary, files[args.target_model], log=logs / "llama-plain.log"))
        runs.append(("llama.cpp", LlamaServerRunner(plain, settings(), tokenizer, "llama.cpp"), 1))
        speculative = stack.enter_context(
            llama_server(
                binary, files[args.target_model], draft=files[args.draft_model], extra=args.llamacpp_spec_args.split(),
                log=logs / "llama-spec.log",
            )
        )  # fmt: skip
        runs.append(("llama.cpp speculative", LlamaServerRunner(speculative, settings(), tokenizer, "llama.cpp speculative"), 1))
    for k in [*args.k, *([0] if args.adaptive else [])]:
        name = f"specwire K={k}" if k else "specwire adaptive"
        if args.openai:
            runs.append((name, SpecwireOpenAIRunner(args.openai, settings(k), tokenizer), args.concurrency))
        else:
            runs.append((name, SpecwireGrpcRunner(args.draft, settings(k)), args.concurrency))
    results: dict[str, list[Generation]] = {}
    with stack:  # the node processes (if started here) stop when the runs are done
        if args.interleave and args.concurrency == 1:
            results = run_interleaved([(name, runner) for name, runner, _ in runs], samples, prompts, args.warmup)
        else:
            for name, runner, workers in runs:
                results[name] = run(name, runner, workers, samples, prompts, args.warmup)
    correct = {
        name: {g.sample_id: is_correct(by_id[g.sample_id], g.text) for g in gens}
        for name, gens in results.items()
    }
    baseline = results.get("target-alone")
    summaries = [
        summarize(name, gens, by_id, correct[name], None if name == "target-alone" else baseline)
        for name, gens in results.items()
    ]
    compare_with(summaries, "llama.cpp", "vs_llamacpp")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python -m benchmarks.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": started_on,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summaries": summaries,
        "generations": {
            name: [
                {"sample_id": g.sample_id, "tokens": len(g.token_ids), "seconds": round(g.seconds, 3),
                 "ttft_s": round(g.ttft_s, 3), "correct": correct[name][g.sample_id], "text": g.text}
                for g in gens
            ]
            for name, gens in results.items()
        },
    }  # fmt: skip
    (args.out_dir / "report.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(summaries)
    (args.out_dir / "report.md").write_text(
        f"`{report['command']}`\n\n{json.dumps(report['machine'])}\n\n{table}"
    )
    plot(summaries, args.out_dir)
    print(table)
    print(f"report: {args.out_dir}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
