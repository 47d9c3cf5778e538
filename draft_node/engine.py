"""The draft node's generation engine: tokenize, open a target session, run rounds, stream chunks."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing

import grpc

from draft_node.config import DraftConfig
from draft_node.controller import AdaptiveController, FixedController
from draft_node.detokenizer import IncrementalDetokenizer
from draft_node.metrics import DraftMetrics
from draft_node.pipeline_switch import FixedPipeline, PipelineSwitch
from draft_node.proposers import Drafter
from draft_node.proposers.base import DraftNoise, draft_sampling
from draft_node.resumable_session import ResumableSession, RetryPolicy
from draft_node.speculative import RoundOutcome, speculative_rounds
from draft_node.target_transport import TargetTransport
from services.errors import FailedPrecondition, InvalidArgument, SpecwireError, rpc_status
from services.limits import MAX_CANDIDATES, MAX_SPECULATIVE_TOKENS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from services.rpc.specwire.v1 import draft_pb2, target_pb2
from services.sampling import effective_sampling
from services.tokenizer_fingerprint import tokenizer_fingerprint

log = logging.getLogger(__name__)


def check_stop_strings(stop: Sequence[str]) -> None:
    """OpenAI's bounds on stop strings (each is scanned once per streamed token)."""
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"stop has {len(stop)} strings; the limit is {MAX_STOP_STRINGS}")
    for i, text in enumerate(stop):
        if len(text) > MAX_STOP_STRING_CHARS:
            raise InvalidArgument(f"stop string {i} has {len(text)} characters; the limit is {MAX_STOP_STRING_CHARS}")


class DraftEngine:
    """Shared by all concurrent generations: one draft model, one target connection."""

    def __init__(
        self, drafter: Drafter, target: TargetTransport, config: DraftConfig, metrics: DraftMetrics
    ) -> None:
        self.drafter = drafter
        self.metrics = metrics
        self.tokenizer = drafter.tokenizer
        self.target = target
        self.config = config
        self.fingerprint = tokenizer_fingerprint(drafter.tokenizer)
        self.eos_ids = drafter.eos_ids
        self._target_info: target_pb2.InfoResponse | None = None
        self._adaptive: AdaptiveController | None = None
        self._controller_lock = threading.Lock()
        self.pipelining = PipelineSwitch() if config.pipeline == "auto" else FixedPipeline(config.pipeline == "on")

    def target_info(self, wait_s: float | None = None) -> target_pb2.InfoResponse:
        """The target's info, fetched once; refuses a target with another tokenizer. With `wait_s`,
        waits that long for a target that is (re)connecting, e.g. one that started after this node."""
        if self._target_info is None:
            info = self.target.info(wait_s)
            if info.tokenizer_fingerprint != self.fingerprint:
                raise FailedPrecondition(
                    f"draft model {self.drafter.model_id} and target model {info.model_id} use different "
                    "tokenizers; speculative decoding needs one shared vocabulary"
                )
            self._target_info = info
        return self._target_info

    def encode_prompt(self, request: draft_pb2.GenerateRequest) -> list[int]:
        if not request.prompt:
            raise InvalidArgument("prompt is empty")
        if len(request.prompt) > self.config.max_prompt_chars:
            raise InvalidArgument(
                f"prompt has {len(request.prompt)} characters; the limit is {self.config.max_prompt_chars}"
            )
        if request.apply_chat_template:
            return self.encode_chat([{"role": "user", "content": request.prompt}])
        return [int(i) for i in self.tokenizer.encode(request.prompt)]

    def token_prompt(self, token_ids: Sequence[int]) -> list[int]:
        """A prompt given as token ids (OpenAI's completions accept them), checked against the
        vocabulary."""
        if not token_ids:
            raise InvalidArgument("prompt is empty")
        if len(token_ids) > self.config.max_prompt_chars:  # no prompt text could make more tokens
            raise InvalidArgument(f"prompt has {len(token_ids)} token ids; the limit is {self.config.max_prompt_chars}")
        vocab = len(self.tokenizer)
        if (bad := next((t for t in token_ids if not 0 <= t < vocab), None)) is not None:
            raise InvalidArgument(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        return [int(t) for t in token_ids]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation through the model's chat template, ready for the reply."""
        if not self.tokenizer.chat_template:
            raise InvalidArgument(f"model {self.drafter.model_id} has no chat template")
        if not messages:
            raise InvalidArgument("messages is empty")
        if sum(len(m.get("content") or "") for m in messages) > self.config.max_prompt_chars:
            raise InvalidArgument(f"messages exceed {self.config.max_prompt_chars} characters")
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return [int(i) for i in ids]

    def generate(
        self, request: draft_pb2.GenerateRequest, prompt_ids: list[int] | None = None
    ) -> Iterator[draft_pb2.GenerateChunk]:
        """Stream one chunk for the target's first token, then one per speculative round.

        `prompt_ids` replaces the request's prompt text when the caller tokenized already (chat)."""
        status = "ok"
        try:
            yield from self._generate(request, prompt_ids, time.perf_counter())
        except GeneratorExit:
            status = "cancelled"
            raise
        except SpecwireError as exc:
            status = exc.code.name.lower()
            raise
        except grpc.RpcError as exc:
            status = f"target_{rpc_status(exc)[0].name.lower()}"
            raise
        except Exception:
            status = "internal"
            raise
        finally:
            self.metrics.requests.labels(status).inc()

    def _generate(
        self, request: draft_pb2.GenerateRequest, prompt_ids: list[int] | None, start: float
    ) -> Iterator[draft_pb2.GenerateChunk]:
        check_stop_strings(request.stop)
        prompt_ids = self.encode_prompt(request) if prompt_ids is None else prompt_ids
        max_tokens = request.max_tokens or self.config.max_tokens
        if max_tokens > self.config.max_tokens_limit:
            raise InvalidArgument(f"max_tokens {max_tokens} above the limit {self.config.max_tokens_limit}")
        if request.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise InvalidArgument(
                f"num_speculative_tokens {request.num_speculative_tokens} above the limit {MAX_SPECULATIVE_TOKENS}"
            )
        if request.num_candidates > MAX_CANDIDATES:
            raise InvalidArgument(f"num_candidates {request.num_candidates} above the limit {MAX_CANDIDATES}")
        info = self.target_info(wait_s=min(10.0, self.config.target_timeout_s))
        if len(prompt_ids) > info.limits.max_prompt_tokens:
            raise InvalidArgument(
                f"prompt has {len(prompt_ids)} tokens; the target's limit is {info.limits.max_prompt_tokens}"
            )
        sampling = effective_sampling(
            target_pb2.SamplingParams(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k)
        )
        strategy = request.strategy or ("gumbel" if sampling.temperature > 0 else "deterministic")
        # the text of a seeded request depends on the trie shapes (K, N) except under `gumbel`: such
        # a request keeps its K, whatever the load (the target's advice) or the controller say
        fixed = request.HasField("seed") and strategy != "gumbel"
        follows_advice = not (fixed or request.target_only)  # (target_only drafts nothing anyway)
        controller = self._controller(request, info.limits.max_tree_nodes, fixed=fixed)
        seed = request.seed if request.HasField("seed") else secrets.randbits(63)
        sampling.seed = seed

        session = ResumableSession(
            self.target,
            prompt_ids,
            self.fingerprint,
            strategy,
            sampling,
            RetryPolicy(deadline_s=self.config.retry_deadline_s),
            ignores_advice=not follows_advice,  # told to the target, which then leaves it out of its measurements
        )
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.stop)
        produced = 0
        try:
            chunk = self._chunk([session.first_token_id], None, detokenizer, produced + 1 >= max_tokens)
            produced += 1
            first_token_at = time.perf_counter()
            self.metrics.ttft_seconds.observe(first_token_at - start)
            self.metrics.generated_tokens.inc(len(chunk.token_ids))
            yield chunk
            if chunk.finish_reason:
                return
            proposer = self.drafter.new_proposer(
                draft_sampling(sampling, self.config.draft_top_k), DraftNoise.for_strategy(seed, strategy)
            )
            rounds = speculative_rounds(
                proposer,
                session,
                [*prompt_ids, session.first_token_id],
                controller,
                max_tokens - produced,
                info.limits.max_context_tokens,
                pipeline=self.pipelining,
                follow_advice=follows_advice,
                first_advice=session.advised_draft_tokens,
            )
            with closing(rounds):  # stopping early (EOS, stop string, cancel) also ends the loop's worker
                for outcome in rounds:
                    produced += len(outcome.token_ids)
                    chunk = self._chunk(outcome.token_ids, outcome, detokenizer, produced >= max_tokens)
                    self._record_round(outcome, len(chunk.token_ids))
                    yield chunk
                    if chunk.finish_reason:
                        return
            yield draft_pb2.GenerateChunk(text=detokenizer.add([], final=True), finish_reason="length")
        finally:
            session.close()
            self.metrics.target_resumes.inc(session.resumes)
            if produced > 1:
                self.metrics.tpot_seconds.observe((time.perf_counter() - first_token_at) / (produced - 1))

    def _controller(
        self, request: draft_pb2.GenerateRequest, max_tree_nodes: int, fixed: bool
    ) -> FixedController | AdaptiveController:
        """Nothing drafted for `target_only`; fixed K/N when the request names K or N, when `fixed`,
        or when adaptation is off; else the shared adaptive one."""
        if request.target_only:
            return FixedController(0, 1)
        requested_k = request.num_speculative_tokens
        n = min(request.num_candidates or self.config.num_candidates, self.drafter.max_candidates)
        if requested_k or request.num_candidates or fixed or not self.config.adaptive:
            k = requested_k or self.config.num_speculative_tokens
            return FixedController(max(1, min(k, max_tree_nodes // n)), n)
        with self._controller_lock:
            if self._adaptive is None:
                k_max = max(1, min(self.config.k_max, max_tree_nodes // n))
                self._adaptive = AdaptiveController(
                    (1, k_max),
                    (1, n),
                    (self.config.num_speculative_tokens, n),
                    on_change=lambda old, new, why: self.metrics.controller_changes.inc(),
                )
            return self._adaptive

    def _record_round(self, outcome: RoundOutcome, streamed: int) -> None:
        m = self.metrics
        m.rounds.inc()
        m.drafted_tokens.inc(outcome.drafted)
        m.accepted_tokens.inc(outcome.accepted)
        for position in range(1, outcome.drafted + 1):
            m.drafted_by_position.labels(str(position)).inc()
            if position <= outcome.accepted:
                m.accepted_by_position.labels(str(position)).inc()
        m.acceptance_length.observe(outcome.accepted + 1)
        m.round_seconds.observe(outcome.round_seconds)
        m.round_phase_seconds.labels("draft").observe(outcome.draft_seconds)
        m.round_phase_seconds.labels("verify").observe(outcome.verify_seconds)
        network = outcome.round_seconds - outcome.draft_seconds - outcome.verify_seconds
        m.round_phase_seconds.labels("network").observe(max(0.0, network))
        m.generated_tokens.inc(streamed)
        m.num_speculative_tokens.set(outcome.drafted)
        m.num_candidates.set(outcome.num_candidates)
        if outcome.pipeline:
            m.pipeline_rounds.labels(outcome.pipeline).inc()

    def _chunk(
        self,
        token_ids: list[int],
        outcome: RoundOutcome | None,
        detokenizer: IncrementalDetokenizer,
        at_limit: bool,
    ) -> draft_pb2.GenerateChunk:
        finish = ""
        eos_at = next((i for i, t in enumerate(token_ids) if t in self.eos_ids), None)
        if eos_at is not None:
            token_ids, finish = token_ids[:eos_at], "stop"
        elif at_limit:
            finish = "length"
        # text token by token, so each token carries its share (a split character or a held-back
        # stop-string prefix lands on the token that completes it)
        pieces = [detokenizer.add([t], final=bool(finish) and i == len(token_ids) - 1) for i, t in enumerate(token_ids)]
        if not token_ids:
            pieces = [detokenizer.add([], final=bool(finish))]
        if detokenizer.stopped:
            finish = "stop"
        stats = None
        sources: list[int] = [draft_pb2.TOKEN_SOURCE_TARGET] * len(token_ids)
        logprobs: list[float | None] = [None] * len(token_ids)
        if outcome is not None:
            stats = draft_pb2.RoundStats(
                round=outcome.round_id,
                drafted_tokens=outcome.drafted,
                accepted_tokens=outcome.accepted,
                draft_seconds=outcome.draft_seconds,
                verify_seconds=outcome.verify_seconds,
                round_seconds=outcome.round_seconds,
                pipeline=outcome.pipeline,
                candidates=[
                    draft_pb2.CandidateInfo(token_ids=tokens, accepted_length=accepted)
                    for tokens, accepted in outcome.candidates
                ],
            )
            sources, logprobs = outcome.sources[: len(token_ids)], outcome.logprobs[: len(token_ids)]
        tokens = [
            draft_pb2.TokenInfo(source=source, text=piece, target_logprob=logprob)
            for source, piece, logprob in zip(sources, pieces, logprobs, strict=False)
        ]
        return draft_pb2.GenerateChunk(
            text="".join(pieces), token_ids=token_ids, stats=stats, finish_reason=finish, tokens=tokens
        )
