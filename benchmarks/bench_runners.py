"""Ways to produce one completion, all timed the same way: a specwire draft node (gRPC or its
OpenAI API), the target alone (on the GGUF decoder, or HF generate on fp32 weights), and HF
assisted generation with the same pair (llama.cpp's runner: benchmarks/llamacpp.py)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import grpc
import httpx
import torch
from transformers.generation.streamers import BaseStreamer

from services.model_loading import LoadedModel
from services.prefix_cache import PrefixCache
from services.rpc.specwire.v1 import draft_pb2, draft_pb2_grpc
from services.sampling import top1 as greedy_token


@dataclass
class Settings:
    max_tokens: int = 128
    temperature: float = 0.0
    strategy: str = ""  # empty: the node's default for the temperature
    num_speculative_tokens: int = 0  # 0: the node's default (or its adaptive controller)
    seed: int | None = None
    assistant_confidence_threshold: float = 0.4  # HF assisted only (transformers' default; 0: off)
    target_only: bool = False  # specwire: draft nothing, the target decodes alone (plain decoding)


@dataclass
class Generation:
    sample_id: str
    token_ids: list[int]
    text: str
    seconds: float  # request start to last token
    ttft_s: float  # request start to first generated token
    rounds: list[dict] = field(default_factory=list)  # specwire over gRPC: one RoundStats dict per round

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first."""
        return (self.seconds - self.ttft_s) / max(1, len(self.token_ids) - 1)


class SpecwireGrpcRunner:
    name = "specwire"

    def __init__(self, address: str, settings: Settings) -> None:
        self.stub = draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel(address))
        self.settings = settings

    def generate(self, sample_id: str, prompt_text: str) -> Generation:
        s = self.settings
        request = draft_pb2.GenerateRequest(
            prompt=prompt_text,
            max_tokens=s.max_tokens,
            num_speculative_tokens=s.num_speculative_tokens,
            temperature=s.temperature,
            strategy=s.strategy,
            seed=s.seed,
        )
        start = time.perf_counter()
        first = None
        tokens, text, rounds = [], [], []
        for chunk in self.stub.Generate(request):
            if chunk.token_ids and first is None:
                first = time.perf_counter() - start
            tokens += chunk.token_ids
            text.append(chunk.text)
            if chunk.HasField("stats"):
                st = chunk.stats
                rounds.append(
                    dict(
                        drafted=st.drafted_tokens,
                        accepted=st.accepted_tokens,
                        draft_s=st.draft_seconds,
                        verify_s=st.verify_seconds,
                        round_s=st.round_seconds,
                    )
                )
        seconds = time.perf_counter() - start
        return Generation(sample_id, tokens, "".join(text), seconds, first or seconds, rounds)


class SpecwireOpenAIRunner:
    """The draft node's /v1/completions with stream=true (no per-round stats over this API)."""

    name = "specwire-openai"

    def __init__(self, base_url: str, settings: Settings, tokenizer: object) -> None:
        self.client = httpx.Client(base_url=base_url.rstrip("/"), timeout=600)
        models = self.client.get("/v1/models")
        models.raise_for_status()
        if "data" not in models.json():
            raise RuntimeError(f"{base_url}/v1/models answered {models.text[:300]!r}")
        self.model = models.json()["data"][0]["id"]
        self.settings, self.tokenizer = settings, tokenizer

    def generate(self, sample_id: str, prompt_text: str) -> Generation:
        s = self.settings
        body = {"model": self.model, "prompt": prompt_text, "max_tokens": s.max_tokens, "stream": True}
        body |= {"temperature": s.temperature} | ({"seed": s.seed} if s.seed is not None else {})
        body |= {"target_only": True} if s.target_only else {}
        start = time.perf_counter()
        first, text = None, []
        with self.client.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                piece = json.loads(line[6:])["choices"][0]["text"]
                if piece and first is None:
                    first = time.perf_counter() - start
                text.append(piece)
        seconds = time.perf_counter() - start
        joined = "".join(text)
        return Generation(sample_id, self.tokenizer.encode(joined), joined, seconds, first or seconds)


class _TokenTimes(BaseStreamer):
    """Records when generate() emits tokens (its first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


class HFRunner:
    """The target alone (`assistant` None) or HF assisted generation with `assistant` as the draft.
    Its `prefix_cache` (its own, as a target node has its own) gives `generate` the KV entries of
    the longest prefix a prompt shares with earlier ones, as the target node's prefill takes them
    (the target alone only: with a pre-filled cache, transformers 5.19's assisted generation
    produced other tokens than without it)."""

    def __init__(
        self,
        target: LoadedModel,
        settings: Settings,
        eos: list[int],
        assistant: LoadedModel | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.target, self.settings, self.eos, self.assistant = target, settings, eos, assistant
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache(0)
        if assistant is not None and self.prefix_cache.budget_bytes:
            raise ValueError("HF assisted generation runs without a prefix cache")
        self.name = "hf-assisted" if assistant else "target-alone"

    @torch.inference_mode()
    def generate(self, sample_id: str, prompt_text: str) -> Generation:
        s = self.settings
        prompt_ids = self.target.tokenizer.encode(prompt_text)
        ids = torch.tensor([prompt_ids], device=self.target.model.device)
        kwargs: dict = dict(
            max_new_tokens=s.max_tokens,
            eos_token_id=self.eos,
            pad_token_id=self.eos[0],
            repetition_penalty=1.0,
        )
        if s.temperature > 0:
            kwargs |= dict(do_sample=True, temperature=s.temperature, top_k=0, top_p=1.0)
            torch.manual_seed(s.seed or 0)
        else:
            kwargs |= dict(do_sample=False)
        if self.assistant is not None:
            # transformers reads these from the assistant's own generation config, not from
            # generate()'s kwargs (which it ignores here: left alone, K is 20 with a 0.4 threshold)
            assistant_config = self.assistant.model.generation_config
            assistant_config.num_assistant_tokens = s.num_speculative_tokens or 3
            assistant_config.num_assistant_tokens_schedule = "constant"
            assistant_config.assistant_confidence_threshold = s.assistant_confidence_threshold
            kwargs |= dict(assistant_model=self.assistant.model)
        streamer = _TokenTimes()
        start = time.perf_counter()
        _, cache = self.prefix_cache.lookup(prompt_ids)
        out = self.target.model.generate(
            ids, attention_mask=torch.ones_like(ids), streamer=streamer, past_key_values=cache, **kwargs
        )
        seconds = time.perf_counter() - start
        self.prefix_cache.store(prompt_ids, cache)
        tokens = out[0, ids.shape[1] :].tolist()
        cut = next((i for i, t in enumerate(tokens) if t in self.eos), len(tokens))
        tokens = tokens[:cut]
        first = streamer.times[0] - start if streamer.times else seconds
        return Generation(sample_id, tokens, self.target.tokenizer.decode(tokens), seconds, first)


class GGUFTargetRunner:
    """The target alone on the GGUF decoder and kernels the target node runs: the exactness
    reference for specwire's greedy output. Its prefix cache (its own, as a target node has its
    own) gives a prompt the entries of the longest prefix it shares with earlier ones."""

    name = "target-alone"

    def __init__(self, decoder: object, tokenizer: object, settings: Settings, eos: list[int], prefix_cache: object) -> None:
        self.decoder, self.tokenizer, self.settings, self.eos = decoder, tokenizer, settings, eos
        self.prefix_cache = prefix_cache

    def generate(self, sample_id: str, prompt_text: str) -> Generation:
        from services.gguf_decoder import Rows

        prompt_ids = self.tokenizer.encode(prompt_text)
        start = time.perf_counter()
        _, cache = self.prefix_cache.lookup(prompt_ids)
        logits = self.decoder.forward([Rows(cache, prompt_ids[cache.length :], all_logits=False)])[0]
        self.prefix_cache.store(prompt_ids, cache)
        tokens: list[int] = []
        first = None
        while len(tokens) < self.settings.max_tokens:
            token = int(greedy_token(logits[-1]))
            first = first or time.perf_counter() - start
            if token in self.eos:
                break
            tokens.append(token)
            if len(tokens) < self.settings.max_tokens:
                logits = self.decoder.forward([Rows(cache, [token])])[0]
        seconds = time.perf_counter() - start
        return Generation(sample_id, tokens, self.tokenizer.decode(tokens), seconds, first or seconds)
