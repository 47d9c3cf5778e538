"""llama.cpp, the CPU users' choice, as a benchmark baseline: `llama-server` on the same GGUF files,
plain or with the draft model (its speculative mode), driven through its OpenAI API like the
draft node's. Built once by `make llamacpp` (benchmarks/build_llamacpp.sh) into ~/.cache/specwire."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from benchmarks.bench_runners import Generation, Settings
from specwire.local_pair import free_port

BUILD_SCRIPT = Path(__file__).parent / "build_llamacpp.sh"
DEFAULT_BIN = Path.home() / ".cache" / "specwire" / "llama.cpp-11434.0.0" / "build" / "bin"


def llama_server_binary(bin_dir: Path | None = None) -> Path | None:
    """The built llama-server (None: not built; `make llamacpp` builds it)."""
    path = (bin_dir or Path(os.environ.get("SPECWIRE_LLAMACPP_BIN", DEFAULT_BIN))) / "llama-server"
    return path if path.exists() else None


@contextmanager
def llama_server(
    binary: Path,
    model: Path,
    draft: Path | None = None,
    threads: int = 2,
    context: int = 4096,
    extra: Sequence[str] = (),
    log: Path | None = None,
    start_timeout_s: float = 300.0,
) -> Iterator[str]:
    """A llama-server on a free loopback port (one slot, `threads` threads, its default sampler
    settings overridden per request), stopped on exit. Yields its base URL."""
    port = free_port()
    command = [str(binary), "-m", str(model), "-t", str(threads), "-c", str(context), "-np", "1", "--port", str(port)]
    if draft is not None:
        command += ["-md", str(draft), "--spec-type", "draft-simple", "-td", str(threads)]
    command += list(extra)
    out = log.open("w") if log else subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {process.returncode}: {' '.join(command)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama-server not ready after {start_timeout_s:.0f}s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        if log:
            out.close()


class LlamaServerRunner:
    """llama-server's /v1/completions, streamed; token counts from its usage report. A new
    connection per request: llama-server closes a kept-alive one after a long streamed answer."""

    def __init__(self, base_url: str, settings: Settings, tokenizer: object, name: str) -> None:
        self.base_url, self.settings, self.tokenizer, self.name = base_url, settings, tokenizer, name

    def generate(self, sample_id: str, prompt_text: str) -> Generation:
        s = self.settings
        body = {
            "prompt": prompt_text,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            **({"seed": s.seed} if s.seed is not None else {}),
        }
        start = time.perf_counter()
        first, pieces, usage = None, [], None
        with (
            httpx.Client(base_url=self.base_url, timeout=600, headers={"Connection": "close"}) as client,
            client.stream("POST", "/v1/completions", json=body) as response,
        ):
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    if choice.get("text") and first is None:
                        first = time.perf_counter() - start
                    pieces.append(choice.get("text", ""))
        seconds = time.perf_counter() - start
        text = "".join(pieces)
        tokens = self.tokenizer.encode(text)
        count = (usage or {}).get("completion_tokens") or len(tokens)
        # the count is what it generated; re-encoding its text may merge tokens (-1: not known)
        tokens = tokens[:count] + [-1] * (count - len(tokens))
        return Generation(sample_id, tokens, text, seconds, first or seconds)
