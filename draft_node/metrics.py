"""Draft-node Prometheus metrics (one registry per node)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.metrics import LATENCY_BUCKETS

PHASES = ("draft", "network", "verify")


class DraftMetrics:
    def __init__(self, registry: CollectorRegistry, positions: int = 0) -> None:
        """`positions`: draft positions (1..K) whose counters exist at 0 from the start, so that
        Prometheus' rate() sees their first increments (a series born at 1 shows no increase)."""
        self.registry = registry
        self.rounds = Counter("specwire_draft_rounds_total", "Speculative rounds", registry=registry)
        self.drafted_tokens = Counter(
            "specwire_draft_drafted_tokens_total", "Draft tokens sent", registry=registry
        )
        self.accepted_tokens = Counter(
            "specwire_draft_accepted_tokens_total", "Draft tokens accepted", registry=registry
        )
        self.drafted_by_position = Counter(
            "specwire_draft_drafted_tokens_by_position_total",
            "Draft tokens sent, by position in the candidate (1 = first)",
            ["position"],
            registry=registry,
        )
        self.accepted_by_position = Counter(
            "specwire_draft_accepted_tokens_by_position_total",
            "Draft tokens accepted, by position in the candidate",
            ["position"],
            registry=registry,
        )
        self.acceptance_length = Histogram(
            "specwire_draft_acceptance_length",
            "Tokens committed per round (accepted + the target's own)",
            buckets=tuple(range(1, 18)),
            registry=registry,
        )
        self.round_seconds = Histogram(
            "specwire_draft_round_seconds",
            "Wall time of one round",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.round_phase_seconds = Histogram(
            "specwire_draft_round_phase_seconds",
            "Round time split into draft / network / verify",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft_seconds = Histogram(
            "specwire_draft_time_to_first_token_seconds",
            "Request received to first token streamed",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot_seconds = Histogram(
            "specwire_draft_time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.generated_tokens = Counter(
            "specwire_draft_generated_tokens_total", "Tokens streamed to users", registry=registry
        )
        self.requests = Counter(
            "specwire_draft_requests_total",
            "Generate requests by final status",
            ["status"],
            registry=registry,
        )
        self.num_speculative_tokens = Gauge(
            "specwire_draft_num_speculative_tokens", "K of the latest round", registry=registry
        )
        self.num_candidates = Gauge(
            "specwire_draft_num_candidates", "N of the latest round", registry=registry
        )
        self.pipeline_rounds = Counter(
            "specwire_draft_pipeline_rounds_total",
            "Rounds that had a trie drafted ahead, by result (hit, miss)",
            ["result"],
            registry=registry,
        )
        self.target_resumes = Counter(
            "specwire_draft_target_resumes_total",
            "Target sessions reopened after the target failed or lost them",
            registry=registry,
        )
        self.controller_changes = Counter(
            "specwire_draft_controller_changes_total",
            "K/N changes made by the adaptive controller",
            registry=registry,
        )
        for phase in PHASES:
            self.round_phase_seconds.labels(phase)
        self.requests.labels("ok")
        for position in range(1, positions + 1):
            self.drafted_by_position.labels(str(position))
            self.accepted_by_position.labels(str(position))
