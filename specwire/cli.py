"""`specwire` command line: run a target or draft node, generate against a draft node, or a demo."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from draft_node.config import DraftConfig
from services.channels import is_serving, open_channel
from services.node_process import run_node, serve_until_signal
from services.rpc.specwire.v1 import draft_pb2, draft_pb2_grpc
from services.security import auth_metadata
from specwire.local_pair import local_pair
from target_node.config import TargetConfig

DEMO_PROMPT = "Write a Python function that returns the n-th Fibonacci number."


def stream_generate(
    stub: draft_pb2_grpc.DraftServiceStub,
    request: draft_pb2.GenerateRequest,
    metadata: Sequence[tuple[str, str]] = (),
    show: bool = True,
) -> dict:
    """Print the completion as it streams (with `show`); return a summary of the rounds."""
    start = time.perf_counter()
    tokens = rounds = drafted = accepted = 0
    pipeline: dict[str, int] = {}
    first_token_s = None
    finish = ""
    text: list[str] = []
    for chunk in stub.Generate(request, metadata=metadata):
        first_token_s = first_token_s or time.perf_counter() - start
        if show:
            print(chunk.text, end="", flush=True)
        text.append(chunk.text)
        tokens += len(chunk.token_ids)
        if chunk.HasField("stats"):
            rounds += 1
            drafted += chunk.stats.drafted_tokens
            accepted += chunk.stats.accepted_tokens
            pipeline[chunk.stats.pipeline] = pipeline.get(chunk.stats.pipeline, 0) + 1
        finish = chunk.finish_reason or finish
    if show:
        print()
    elapsed = time.perf_counter() - start
    return {
        "text": "".join(text),
        "tokens": tokens,
        "rounds": rounds,
        "finish_reason": finish,
        "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
        "mean_acceptance_length": round(1 + accepted / rounds, 3) if rounds else None,
        "ttft_s": round(first_token_s or 0.0, 3),
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 3) if elapsed else None,
        **(
            {
                "pipeline_hit_rate": round(
                    pipeline.get("hit", 0) / (pipeline.get("hit", 0) + pipeline.get("miss", 0)), 3
                )
            }
            if pipeline.get("hit", 0) + pipeline.get("miss", 0)
            else {}
        ),
    }


def _print_summary(summary: dict) -> None:
    print(" ".join(f"{key}={value}" for key, value in summary.items() if key != "text"), file=sys.stderr)


def compare_with_target_alone(stub: draft_pb2_grpc.DraftServiceStub, request: draft_pb2.GenerateRequest) -> None:
    """The demo's verdict: the pair against the same target node decoding alone (one token a round,
    the same kernels), both after a warm-up generation, on the same prompt and length."""
    alone_request = draft_pb2.GenerateRequest()
    alone_request.CopyFrom(request)
    alone_request.target_only = True
    warm = draft_pb2.GenerateRequest()
    warm.CopyFrom(request)
    warm.max_tokens = min(request.max_tokens, 16)
    stream_generate(stub, warm, show=False)
    print("speculative (draft + target):", file=sys.stderr)
    pair = stream_generate(stub, request)
    _print_summary(pair)
    print("the target alone on the same prompt...", file=sys.stderr)
    alone = stream_generate(stub, alone_request, show=False)
    same = "identical" if alone["text"] == pair["text"] else "DIFFERENT"
    print(
        f"pair {pair['tokens_per_s']} tok/s, target alone {alone['tokens_per_s']} tok/s: "
        f"{pair['tokens_per_s'] / alone['tokens_per_s']:.2f}x, outputs {same} "
        f"({pair['tokens']} tokens each, after a warm-up)",
        file=sys.stderr,
    )


def _generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=0, help="0: the node's default")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is (no chat template)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _request(prompt: str, args: argparse.Namespace) -> draft_pb2.GenerateRequest:
    return draft_pb2.GenerateRequest(
        prompt=prompt,
        max_tokens=args.max_tokens,
        apply_chat_template=not args.raw,
        num_speculative_tokens=args.num_speculative_tokens,
        stop=args.stop,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="specwire", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("target", help="run a target node (flags: specwire target --help)", add_help=False)
    sub.add_parser("draft", help="run a draft node (flags: specwire draft --help)", add_help=False)
    generate = sub.add_parser("generate", help="stream a completion from a running draft node")
    generate.add_argument("prompt")
    generate.add_argument("--draft", default="127.0.0.1:50052", help="draft node address")
    generate.add_argument("--tls-ca", type=Path, help="the draft node serves TLS: trust this CA (PEM)")
    generate.add_argument("--api-key", default=os.environ.get("SPECWIRE_API_KEY"), help="or SPECWIRE_API_KEY")
    _generate_args(generate)
    check = sub.add_parser(
        "health", help="exit 0 when a node answers SERVING on gRPC health (for healthchecks)"
    )
    check.add_argument("address", help="host:port")
    check.add_argument("--timeout", type=float, default=3.0)
    check.add_argument("--tls-ca", type=Path, help="the node serves TLS: trust this CA (PEM)")
    demo = sub.add_parser(
        "demo", help="start a target and a draft node (two processes) on loopback and generate"
    )
    demo.add_argument("prompt", nargs="?", default=DEMO_PROMPT)
    demo.add_argument("--target-model", default=TargetConfig.model_fields["model"].default)
    demo.add_argument("--draft-model", default=DraftConfig.model_fields["model"].default)
    demo.add_argument(
        "--pipeline",
        choices=["auto", "on", "off"],
        help="draft the next round during each verify (default: the draft node's, auto)",
    )
    demo.add_argument("--adaptive", action="store_true", help="choose K/N from measured goodput")
    demo.add_argument("--http-port", type=int, default=8000, help="the playground page and OpenAI API")
    demo.add_argument("--serve", action="store_true", help="keep both nodes serving after the demo (Ctrl-C stops)")
    _generate_args(demo)

    args, rest = parser.parse_known_args(argv)
    if args.command == "target":
        from target_node.server import start_target

        return run_node("specwire target", TargetConfig, start_target, rest)
    elif args.command == "draft":
        from draft_node.server import start_draft

        return run_node("specwire draft", DraftConfig, start_draft, rest)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    elif args.command == "health":
        return 0 if is_serving(args.address, args.timeout, args.tls_ca) else 1
    elif args.command == "generate":
        with open_channel(args.draft, args.tls_ca) as channel:
            stub = draft_pb2_grpc.DraftServiceStub(channel)
            _print_summary(stream_generate(stub, _request(args.prompt, args), auth_metadata(args.api_key)))
    else:
        draft_args = ["--model", args.draft_model]
        if args.pipeline is not None:
            draft_args += ["--pipeline", args.pipeline]
        print("starting a target and a draft node (the first start assembles the weights)...", file=sys.stderr)
        draft_args += ["--adaptive"] if args.adaptive else []
        with local_pair(["--model", args.target_model], draft_args, http=True, http_port=args.http_port) as pair:
            print(f"target {pair.target}, draft {pair.draft}; node logs in {pair.logs}", file=sys.stderr)
            print(f"playground: http://127.0.0.1:{pair.http_port}/", file=sys.stderr)
            with grpc.insecure_channel(pair.draft) as channel:
                compare_with_target_alone(draft_pb2_grpc.DraftServiceStub(channel), _request(args.prompt, args))
            if args.serve:
                print(f"serving; open http://127.0.0.1:{pair.http_port}/ (Ctrl-C stops both nodes)", file=sys.stderr)
                serve_until_signal(lambda: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
