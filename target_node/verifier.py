"""The target's verifier: validates requests, keeps sessions, and runs rounds on a backend."""

from __future__ import annotations

import logging
import secrets
import time

from services.candidate_tree import ROOT, CandidateTree, check_tree_sizes
from services.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from services.limits import MEMORY_BUDGET_FRACTION, mb_to_bytes
from services.rpc.specwire.v1 import target_pb2
from services.sampling import effective_sampling
from services.token_noise import TokenNoise
from target_node.backends.base import RoundResult, VerifyBackend
from target_node.config import TargetConfig
from target_node.draft_advice import DraftAdvisor
from target_node.metrics import TargetMetrics
from target_node.session import ANONYMOUS, Session, SessionStore
from target_node.strategies import STRATEGIES, make_strategy

log = logging.getLogger(__name__)


def candidate_results(tree: CandidateTree, result: RoundResult) -> list[target_pb2.CandidateResult]:
    """Per leaf: how many leading tokens were accepted and their target logprob; best first, by the
    one tie-break (longest accepted prefix, then the lowest index of its end node, then the leaf)."""
    results, ends = [], {}
    for leaf in sorted(set(range(len(tree))) - set(tree.parents)):
        path = tree.path_to(leaf)
        accepted = next((i for i, node in enumerate(path) if not result.decision.acceptable[node]), len(path))
        ends[leaf] = path[accepted - 1] if accepted else ROOT
        results.append(
            target_pb2.CandidateResult(
                leaf_node_id=leaf,
                length=len(path),
                accepted_length=accepted,
                target_logprob=sum(result.node_logprobs[node] for node in path[:accepted]),
            )
        )
    return sorted(results, key=lambda r: (-r.accepted_length, ends[r.leaf_node_id], r.leaf_node_id))


def memory_budget_bytes(budget_mb: float, backend: VerifyBackend) -> int:
    """The configured budget, or (negative: the default) a share of the memory free now."""
    if budget_mb >= 0:
        return mb_to_bytes(budget_mb)
    return int(MEMORY_BUDGET_FRACTION * backend.free_memory_bytes())


class Verifier:
    def __init__(
        self,
        backend: VerifyBackend,
        model_id: str,
        fingerprint: str,
        config: TargetConfig,
        metrics: TargetMetrics,
    ) -> None:
        self.backend = backend
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.vocab_size = backend.vocab_size
        self.config = config
        self.max_context = min(config.max_context_tokens or backend.max_context, backend.max_context)
        self.metrics = metrics
        self.sessions = SessionStore(
            config.max_sessions,
            config.session_ttl_s,
            on_remove=self._on_session_removed,
            budget_bytes=memory_budget_bytes(config.kv_cache_budget_mb, backend),
            size_of=backend.session_bytes,
            shared_bytes=backend.shared_cache_bytes,
            shrink_shared=backend.shrink_shared_caches,
        )
        self.advisor = DraftAdvisor() if config.draft_advice else None
        metrics.backend.info(backend.describe())
        metrics.track_sessions(
            lambda: len(self.sessions),
            lambda: sum(backend.session_bytes(s) for s in self.sessions.snapshot()),
        )

    def _on_session_removed(self, session: Session, reason: str) -> None:
        self.backend.close(session)
        if self.advisor is not None:
            self.advisor.closed(session.session_id)
        self.metrics.sessions_removed.labels(reason).inc()

    def info(self) -> target_pb2.InfoResponse:
        return target_pb2.InfoResponse(
            model_id=self.model_id,
            tokenizer_fingerprint=self.fingerprint,
            vocab_size=self.vocab_size,
            strategies=list(self.backend.strategies),
            lossy_strategies=[name for name in self.backend.strategies if not STRATEGIES[name].lossless],
            limits=target_pb2.Limits(
                max_prompt_tokens=self.config.max_prompt_tokens,
                max_context_tokens=self.max_context,
                max_tree_nodes=self.config.max_tree_nodes,
                max_sessions=self.config.max_sessions,
                session_ttl_s=self.config.session_ttl_s,
            ),
        )

    def open_session(
        self, request: target_pb2.OpenSessionRequest, owner: str = ANONYMOUS, lineage: str = ""
    ) -> target_pb2.OpenSessionResponse:
        if not request.tokenizer_fingerprint:
            raise InvalidArgument("tokenizer_fingerprint is required (see TargetService.Info)")
        if request.tokenizer_fingerprint != self.fingerprint:
            raise FailedPrecondition(
                f"tokenizer mismatch: the draft's tokenizer fingerprint {request.tokenizer_fingerprint[:12]}… "
                f"differs from the target's {self.fingerprint[:12]}… ({self.model_id}); "
                "draft and target must share one vocabulary"
            )
        prompt = list(request.prompt_token_ids)
        if not prompt:
            raise InvalidArgument("prompt_token_ids is empty")
        # a resume (or a serverless rebuild) re-sends the whole committed context: only the context
        # window bounds it, not the limit on what a client may send as a prompt
        resuming = request.HasField("resume_pending_token_id")
        if len(prompt) > self.config.max_prompt_tokens and not resuming:
            raise InvalidArgument(
                f"prompt has {len(prompt)} tokens; the limit is {self.config.max_prompt_tokens}"
            )
        if len(prompt) >= self.max_context:
            raise OutOfRange(f"prompt has {len(prompt)} tokens; the context limit is {self.max_context}")
        if bad := [t for t in prompt if t >= self.vocab_size]:
            raise InvalidArgument(f"prompt token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        if (
            request.strategy
            and request.strategy in STRATEGIES
            and request.strategy not in self.backend.strategies
        ):
            raise InvalidArgument(
                f"strategy {request.strategy!r} is not available on this backend; use one of {self.backend.strategies}"
            )
        strategy = make_strategy(
            request.strategy, effective_sampling(request.sampling), request.strategy_params, self.backend.kernels
        )
        seed = request.sampling.seed if request.sampling.HasField("seed") else secrets.randbits(63)
        session = Session(SessionStore.new_id(), prompt, strategy, TokenNoise(seed), owner=owner, lineage=lineage)
        session.follows_advice = not request.ignores_advice
        if resuming and request.resume_pending_token_id >= self.vocab_size:
            raise InvalidArgument(
                f"resume_pending_token_id {request.resume_pending_token_id} outside the vocabulary"
            )
        with self.sessions.admit(self.backend.prefill_bytes(len(prompt))):  # refused before any prefill
            with self.metrics.prefill_seconds.time():
                session.pending_token = self.backend.prefill(session)
            self.metrics.prefill_tokens.labels("cached").inc(session.cached_prefix)
            self.metrics.prefill_tokens.labels("computed").inc(session.context_length - session.cached_prefix)
            if resuming:
                session.pending_token = request.resume_pending_token_id
            self.sessions.add(session)
        self.sessions.evict_over_budget(keep=session)
        self.metrics.sessions_opened.inc()
        if self.advisor is not None and session.follows_advice:
            self.advisor.opened(session.session_id)
        return target_pb2.OpenSessionResponse(
            session_id=session.session_id,
            first_token_id=session.pending_token,
            context_length=session.context_length,
            advised_draft_tokens=self._advice(session),
        )

    def _advice(self, session: Session) -> int | None:
        """The load advice for the session's next round (None: none, or its draft ignores it)."""
        return self.advisor.advise() if self.advisor is not None and session.follows_advice else None

    def verify(self, request: target_pb2.VerifyRequest, owner: str = ANONYMOUS) -> target_pb2.VerifyResponse:
        session = self.sessions.get(request.session_id, owner)
        with session.lock:
            if session.closed:  # closed, expired or evicted after `get` found it
                raise NotFound(f"unknown or expired session {request.session_id!r}")
            if request.round_id != session.next_round:
                raise FailedPrecondition(
                    f"session {request.session_id}: expected round {session.next_round}, got {request.round_id}"
                )
            check_tree_sizes(request.tree, self.config.max_tree_nodes)  # before any loop over its entries
            tree = CandidateTree.from_proto(request.tree)
            tree.validate(self.vocab_size, self.config.max_tree_nodes)
            needed = session.context_length + 1 + max(tree.depths(), default=0)
            if needed > self.max_context:
                raise OutOfRange(f"round needs {needed} positions; the context limit is {self.max_context}")

            start = time.perf_counter()
            result = self.backend.verify(session, tree)
            decision = result.decision
            accepted_tokens = [tree.token_ids[n] for n in decision.accepted_nodes]
            session.token_ids += [session.pending_token, *accepted_tokens]
            session.pending_token = decision.next_token
            session.next_round += 1
            elapsed = time.perf_counter() - start
            self.metrics.verify_requests.inc()
            self.metrics.nodes_verified.inc(len(tree))
            self.metrics.accepted_tokens.inc(len(accepted_tokens))
            self.metrics.forward_seconds.observe(elapsed)
            self.metrics.batch_size.observe(result.batch_size)
            self.sessions.evict_over_budget(keep=session)
            if self.advisor is not None and session.follows_advice:
                self.advisor.record_round(session.session_id, len(accepted_tokens) + 1)
            advice = self._advice(session)
            if advice is not None:
                self.metrics.advised_draft_tokens.observe(advice)
            return target_pb2.VerifyResponse(
                session_id=session.session_id,
                round_id=request.round_id,
                accepted_node_ids=decision.accepted_nodes,
                accepted_token_ids=accepted_tokens,
                next_token_id=decision.next_token,
                next_is_bonus=decision.next_is_bonus,
                context_length=session.context_length,
                tree_nodes=len(tree),
                verify_seconds=elapsed,
                candidates=candidate_results(tree, result),
                batch_size=result.batch_size,
                accepted_logprobs=[result.node_logprobs[n] for n in decision.accepted_nodes],
                next_token_logprob=result.next_logprob,
                advised_draft_tokens=advice,
            )

    def verify_or_rebuild(
        self,
        request: target_pb2.VerifyRequest,
        resume: target_pb2.OpenSessionRequest,
        owner: str = ANONYMOUS,
        lineage: str = "",
    ) -> target_pb2.VerifyResponse:
        """Verify on the session, or, where this replica does not hold it (a serverless platform
        routed the call elsewhere), rebuild it from `resume` (the committed tokens and pending
        token) first. The response's session_id is then the new session's. `lineage` (the id of
        the generation's first session) names the generation: a rebuild first closes this
        replica's older session of it, so calls that alternate between replicas leave at most one
        session of a generation on each, not one per re-route."""
        try:
            return self.verify(request, owner)
        except NotFound:
            if not resume.prompt_token_ids:
                raise
        lineage = lineage or request.session_id
        self.sessions.remove_lineage(lineage, owner)
        opened = self.open_session(resume, owner, lineage)
        self.metrics.session_rebuilds.inc()
        rebuilt = target_pb2.VerifyRequest(session_id=opened.session_id, round_id=0, tree=request.tree)
        return self.verify(rebuilt, owner)

    def close_session(self, session_id: str, owner: str = ANONYMOUS, lineage: str = "") -> bool:
        """Close the session; with `lineage`, also this replica's other sessions of that generation."""
        closed = self.sessions.remove(session_id, owner)
        if lineage:
            closed = self.sessions.remove_lineage(lineage, owner) > 0 or closed
        return closed

    def stop(self) -> None:
        self.backend.stop()
        self.sessions.stop()
