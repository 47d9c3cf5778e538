"""Generate the Grafana dashboards (checked in under dashboards/; a test fails when they are stale).

    python deploy/grafana/build_dashboards.py

Every ratio divides by `(x > 0)`, so empty traffic shows "no data" instead of NaN or +Inf.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "specwire-prometheus"}


def rate(metric: str, by: str = "", window: str = "5m") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}[{window}]))"


def ratio(numerator: str, denominator: str) -> str:
    return f"{numerator} / ({denominator} > 0)"


def quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, {rate(histogram + '_bucket', by='le')})"


def panel(title: str, targets: list[tuple[str, str]], unit: str = "short", stack: bool = False) -> dict:
    return {
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {"stacking": {"mode": "normal" if stack else "none", "group": "A"}},
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "datasource": DATASOURCE}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard(uid: str, title: str, panels: list[dict]) -> dict:
    for i, item in enumerate(panels):
        item["id"] = i + 1
        item["gridPos"] = {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)}
    return {
        "uid": uid,
        "title": title,
        "tags": ["specwire"],
        "editable": True,
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "timezone": "browser",
        "panels": panels,
    }


def overview() -> dict:
    errors = 'specwire_grpc_server_handled_total{code!="OK"}'
    return dashboard(
        "specwire-overview",
        "specwire / overview",
        [
            panel(
                "Output tokens per second",
                [(rate("specwire_draft_generated_tokens_total", window="1m"), "tokens/s")],
            ),
            panel(
                "Requests by status",
                [(rate("specwire_draft_requests_total", by="status", window="1m"), "{{status}}")],
                "reqps",
            ),
            panel(
                "Time to first token",
                [
                    (quantile(0.5, "specwire_draft_time_to_first_token_seconds"), "p50"),
                    (quantile(0.99, "specwire_draft_time_to_first_token_seconds"), "p99"),
                ],
                "s",
            ),
            panel(
                "Time per output token",
                [
                    (quantile(0.5, "specwire_draft_time_per_output_token_seconds"), "p50"),
                    (quantile(0.99, "specwire_draft_time_per_output_token_seconds"), "p99"),
                ],
                "s",
            ),
            panel(
                "gRPC errors by method and code",
                [(rate(errors, by="job, method, code"), "{{job}} {{method}} {{code}}")],
                "reqps",
            ),
            panel(
                "Target sessions and KV cache",
                [
                    ("sum(specwire_target_active_sessions)", "sessions"),
                    ("sum(specwire_target_kv_cache_bytes)", "KV bytes"),
                ],
            ),
            panel(
                "Prompt tokens prefilled",
                [(rate("specwire_target_prefill_tokens_total", by="source"), "{{source}}")],
                "short",
                stack=True,
            ),
        ],
    )


def speculative() -> dict:
    accepted, drafted = "specwire_draft_accepted_tokens_total", "specwire_draft_drafted_tokens_total"
    phase = "specwire_draft_round_phase_seconds"
    return dashboard(
        "specwire-speculative",
        "specwire / speculative decoding",
        [
            panel(
                "Acceptance rate",
                [(ratio(rate(accepted), rate(drafted)), "accepted / drafted")],
                "percentunit",
            ),
            panel(
                "Mean acceptance length",
                [(f"1 + {ratio(rate(accepted), rate('specwire_draft_rounds_total'))}", "tokens per round")],
            ),
            panel(
                "Acceptance by position",
                [
                    (
                        ratio(
                            rate("specwire_draft_accepted_tokens_by_position_total", by="position"),
                            rate("specwire_draft_drafted_tokens_by_position_total", by="position"),
                        ),
                        "position {{position}}",
                    )
                ],
                "percentunit",
            ),
            panel(
                "K and N",
                [
                    ("max(specwire_draft_num_speculative_tokens)", "K"),
                    ("max(specwire_draft_num_candidates)", "N"),
                ],
            ),
            panel(
                "Round time breakdown (mean)",
                [(ratio(rate(phase + "_sum", by="phase"), rate(phase + "_count", by="phase")), "{{phase}}")],
                "s",
                stack=True,
            ),
            panel(
                "Tokens from drafts",
                [
                    (
                        ratio(rate(accepted), rate("specwire_draft_generated_tokens_total")),
                        "accepted draft tokens / output tokens",
                    )
                ],
                "percentunit",
            ),
            panel(
                "Target forward time and batch size",
                [
                    (
                        ratio(
                            rate("specwire_target_forward_seconds_sum"),
                            rate("specwire_target_forward_seconds_count"),
                        ),
                        "forward s",
                    ),
                    (
                        ratio(
                            rate("specwire_target_batch_size_sum"), rate("specwire_target_batch_size_count")
                        ),
                        "batch size",
                    ),
                ],
            ),
        ],
    )


def render() -> dict[str, str]:
    return {f"{d['uid']}.json": json.dumps(d, indent=2) + "\n" for d in (overview(), speculative())}


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(OUT / name)
