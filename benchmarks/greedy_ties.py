"""How often greedy speculation differs from the target alone on real prompts ("up to numerics").

    python -m benchmarks.greedy_ties --prompts 100 --max-tokens 32 --out benchmarks/results/greedy_ties_cpu.json

For each prompt (GSM8K and HumanEval, half each) the target node's verifier, in this process with
the node's defaults (small-row linears, unpadded verify rows), first decodes greedily alone: one
1-row verify forward per token (the target alone). Then, in a fresh session, it verifies that same
text as a perfect draft would propose it, K tokens a round: every round is a (K + 1)-row forward
over a trie. Where a multi-row forward's argmax differs from the 1-row one, speculation would
have written another token: a near-tie flip. Counted per prompt and per position; the prompt
stops at its first flip (the texts diverge after it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.bench_data import load_samples
from benchmarks.bench_report import save_json
from services.model_loading import load_model
from services.rpc.specwire.v1 import target_pb2
from target_node.config import TargetConfig
from target_node.server import start_target
from target_node.verifier import Verifier


def target_alone(verifier: Verifier, opened: target_pb2.OpenSessionResponse, count: int) -> list[int]:
    tokens = [opened.first_token_id]
    for round_id in range(count - 1):
        request = target_pb2.VerifyRequest(session_id=opened.session_id, round_id=round_id)
        tokens.append(verifier.verify(request).next_token_id)
    return tokens


def first_flip(verifier: Verifier, opened: target_pb2.OpenSessionResponse, reference: list[int], k: int) -> int | None:
    """Position (index into `reference`) of the first token a K-chain verify chose differently."""
    if opened.first_token_id != reference[0]:
        return 0
    done, round_id = 1, 0
    while done < len(reference):
        chain = reference[done : done + k]
        tree = target_pb2.CandidateTree(parents=[i - 1 for i in range(len(chain))], token_ids=chain)
        response = verifier.verify(
            target_pb2.VerifyRequest(session_id=opened.session_id, round_id=round_id, tree=tree)
        )
        got = [*response.accepted_token_ids, response.next_token_id]
        want = reference[done : done + len(got)]
        if got[: len(want)] != want:
            return done + next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
        done, round_id = done + len(got), round_id + 1
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("-k", type=int, default=3, help="draft tokens a round (the trie is a chain)")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    loaded = load_model(args.model)
    server = start_target(TargetConfig(model=args.model, port=0, metrics_port=-1), loaded)
    verifier: Verifier = server.node
    info = verifier.info()
    samples = load_samples(args.prompts - args.prompts // 2, args.prompts // 2)
    results = []
    start = time.perf_counter()
    try:
        for sample in samples:
            prompt = loaded.tokenizer.apply_chat_template(
                sample.messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            open_request = target_pb2.OpenSessionRequest(
                prompt_token_ids=list(prompt), tokenizer_fingerprint=info.tokenizer_fingerprint
            )
            alone = verifier.open_session(open_request)
            reference = target_alone(verifier, alone, args.max_tokens)
            verifier.close_session(alone.session_id)
            speculated = verifier.open_session(open_request)
            flip = first_flip(verifier, speculated, reference, args.k)
            verifier.close_session(speculated.session_id)
            results.append({"sample_id": sample.sample_id, "prompt_tokens": len(prompt), "first_flip": flip})
            print(json.dumps(results[-1]), flush=True)
    finally:
        server.stop(0)
    flipped = [r for r in results if r["first_flip"] is not None]
    report = {
        "command": "python -m benchmarks.greedy_ties " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "target": verifier.backend.describe(),
        "k": args.k,
        "max_tokens": args.max_tokens,
        "prompts": len(results),
        "prompts_with_a_flip": len(flipped),
        "tokens_compared": sum(r["first_flip"] if r["first_flip"] is not None else args.max_tokens for r in results),
        "seconds": round(time.perf_counter() - start, 1),
        "results": results,
    }
    print(json.dumps({key: value for key, value in report.items() if key != "results"}, indent=2))
    save_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
