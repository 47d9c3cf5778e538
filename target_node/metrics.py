"""Target-node Prometheus metrics (one registry per node)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from services.metrics import LATENCY_BUCKETS


class TargetMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.verify_requests = Counter(
            "specwire_target_verify_requests_total", "Verify rounds served", registry=registry
        )
        self.nodes_verified = Counter(
            "specwire_target_tree_nodes_total", "Candidate trie nodes verified", registry=registry
        )
        self.accepted_tokens = Counter(
            "specwire_target_accepted_tokens_total", "Draft tokens accepted", registry=registry
        )
        self.forward_seconds = Histogram(
            "specwire_target_forward_seconds",
            "Verify forward + decision time",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prefill_seconds = Histogram(
            "specwire_target_prefill_seconds",
            "Prompt prefill time at session open",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prefill_tokens = Counter(
            "specwire_target_prefill_tokens_total",
            "Prompt tokens at session open: computed, or taken from the prefix cache (source=cached)",
            ["source"],
            registry=registry,
        )
        for source in ("computed", "cached"):  # exported at 0, so rate() sees the first increase
            self.prefill_tokens.labels(source)
        self.batch_size = Histogram(
            "specwire_target_batch_size",
            "Verify requests per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        )
        self.advised_draft_tokens = Histogram(
            "specwire_target_advised_draft_tokens",
            "Draft length advised to the drafts with a round's answer (0: plain decoding rounds), under load",
            buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16),
            registry=registry,
        )
        self.session_rebuilds = Counter(
            "specwire_target_session_rebuilds_total",
            "Sessions re-prefilled from the committed tokens a request carried (serverless replicas)",
            registry=registry,
        )
        self.sessions_opened = Counter(
            "specwire_target_sessions_opened_total", "Sessions opened", registry=registry
        )
        self.sessions_removed = Counter(
            "specwire_target_sessions_removed_total",
            "Sessions removed, by reason (closed, ttl, evicted, shutdown)",
            ["reason"],
            registry=registry,
        )
        self.active_sessions = Gauge("specwire_target_active_sessions", "Open sessions", registry=registry)
        self.kv_cache_bytes = Gauge(
            "specwire_target_kv_cache_bytes", "Bytes held by session KV caches", registry=registry
        )
        self.backend = Info(
            "specwire_target_backend", "Verifier backend and kernels in use", registry=registry
        )

    def track_sessions(self, count: Callable[[], int], kv_bytes: Callable[[], int]) -> None:
        """Gauges read at scrape time."""
        self.active_sessions.set_function(count)
        self.kv_cache_bytes.set_function(kv_bytes)
