"""Deployment files without a Docker engine: compose validated by the Compose binary, Prometheus
config and rules by promtool, dashboards type-checked against @grafana/schema, and a real
Prometheus scraping both nodes on loopback during a generation."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import collect

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMA_CHECK = DEPLOY / "grafana" / "schema-check"
sys.path.insert(0, str(DEPLOY / "grafana"))
import build_dashboards  # noqa: E402


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: run `make install-tools`"
    return path


def compose_binary() -> str:
    import compose

    return str(Path(compose.__file__).parent / "docker-compose")


def compose_config(**env: str) -> subprocess.CompletedProcess:
    """`docker compose config` of the shipped file with these variables (and no others of ours)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SPECWIRE_", "GF_"))}
    return subprocess.run(
        [compose_binary(), "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**base, **env},
    )


def test_compose_file_is_valid():
    result = compose_config(GF_SECURITY_ADMIN_PASSWORD="a-password")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert set(config["services"]) == {"target", "draft", "prometheus", "grafana"}
    for node in ("target", "draft"):
        assert "specwire" in config["services"][node]["healthcheck"]["test"]
        assert any(v["target"] == "/models" for v in config["services"][node]["volumes"])
    assert config["services"]["grafana"]["profiles"] == ["grafana"]  # on by default through .env
    published = {p["published"] for p in config["services"]["draft"]["ports"]}
    assert "8000" in published, "the OpenAI API and playground must reach the host"


def test_compose_exposes_nothing_beyond_loopback_by_default():
    """Every published port binds 127.0.0.1 unless SPECWIRE_BIND says otherwise; Grafana has no
    anonymous viewers and takes its admin password from the environment (required)."""
    config = json.loads(compose_config(GF_SECURITY_ADMIN_PASSWORD="a-password").stdout)
    ports = [(name, p) for name, service in config["services"].items() for p in service.get("ports", [])]
    assert len(ports) == 7
    assert all(p.get("host_ip") == "127.0.0.1" for _, p in ports), ports
    grafana = config["services"]["grafana"]["environment"]
    assert grafana.get("GF_AUTH_ANONYMOUS_ENABLED", "false") == "false"
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == "a-password"
    opened = json.loads(compose_config(GF_SECURITY_ADMIN_PASSWORD="x", SPECWIRE_BIND="0.0.0.0").stdout)
    assert {p["host_ip"] for s in opened["services"].values() for p in s.get("ports", [])} == {"0.0.0.0"}
    refused = compose_config()
    assert refused.returncode != 0 and "GF_SECURITY_ADMIN_PASSWORD" in refused.stderr


def test_compose_validation_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  target:\n    image: x\n    healthcheck: nope\n")
    assert (
        subprocess.run([compose_binary(), "-f", str(broken), "config", "-q"], capture_output=True).returncode
        != 0
    )


def test_prometheus_config_and_rules_pass_promtool():
    promtool = tool("promtool")
    for args in (
        ["check", "config", str(DEPLOY / "prometheus.yml")],
        ["check", "rules", str(DEPLOY / "alerts.yml")],
    ):
        result = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {
        "SpecwireTargetDown",
        "SpecwireAcceptanceCollapse",
        "SpecwireRoundTimeP99High",
    }


def test_dashboards_are_fresh_and_guard_empty_traffic():
    for name, text in build_dashboards.render().items():
        assert (DEPLOY / "grafana" / "dashboards" / name).read_text() == text, (
            "run deploy/grafana/build_dashboards.py"
        )
        for panel in json.loads(text)["panels"]:
            for target in panel["targets"]:
                if " / " in target["expr"]:
                    assert "> 0)" in target["expr"], target["expr"]


def test_dashboards_type_check_against_grafana_schema():
    tsc = SCHEMA_CHECK / "node_modules" / ".bin" / "tsc"
    assert tsc.exists(), "run `make install-tools` (npm install in deploy/grafana/schema-check)"
    generated = SCHEMA_CHECK / "generated"
    generated.mkdir(exist_ok=True)
    lines = ["import type { Dashboard } from '@grafana/schema';"]
    for i, path in enumerate(sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))):
        lines.append(f"export const dashboard{i}: Dashboard = {path.read_text()};")
    (generated / "dashboards.ts").write_text("\n".join(lines))
    result = subprocess.run([str(tsc), "-p", str(SCHEMA_CHECK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prom_query(port: int, expr: str) -> float | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        result = json.load(response)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.mark.slow
def test_prometheus_scrapes_both_nodes_during_generation(tmp_path, tiny, pair_factory):
    prometheus = tool("prometheus")
    pair = pair_factory(tiny.draft_noisy)
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "specwire-target",
                "static_configs": [{"targets": [f"127.0.0.1:{pair.target.metrics_port}"]}],
            },
            {
                "job_name": "specwire-draft",
                "static_configs": [{"targets": [f"127.0.0.1:{pair.draft.metrics_port}"]}],
            },
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for prompt in ("def add(a, b):", "The quick brown fox", "for i in range(10):"):
            collect(pair.draft_stub, prompt=prompt, max_tokens=40, num_speculative_tokens=3)
        metrics = pair.draft.node.metrics
        drafted = metrics.drafted_tokens._value.get()
        accepted = metrics.accepted_tokens._value.get()
        rounds = metrics.rounds._value.get()
        deadline = time.monotonic() + 30
        value = None
        while time.monotonic() < deadline:
            try:
                value = prom_query(port, "sum(specwire_draft_drafted_tokens_total)")
            except OSError:
                value = None
            if value == drafted and prom_query(port, "sum(specwire_target_verify_requests_total)") == rounds:
                break
            time.sleep(0.5)
        assert value == drafted, "Prometheus never saw the final counters"
        rate = prom_query(
            port, "sum(specwire_draft_accepted_tokens_total) / (sum(specwire_draft_drafted_tokens_total) > 0)"
        )
        assert rate == pytest.approx(accepted / drafted)
        assert 0 < rate <= 1
        # invariants: accepted <= drafted; rounds agree between nodes and with tokens per round
        assert (
            prom_query(
                port,
                "sum(specwire_draft_accepted_tokens_total) <= bool sum(specwire_draft_drafted_tokens_total)",
            )
            == 1
        )
        assert prom_query(port, "sum(specwire_draft_acceptance_length_count)") == rounds
        assert prom_query(port, "sum(specwire_draft_acceptance_length_sum)") == accepted + rounds
        assert prom_query(port, "sum(specwire_target_accepted_tokens_total)") == accepted
        assert prom_query(port, 'sum(specwire_draft_requests_total{status="ok"})') == 3
        assert prom_query(port, 'up{job="specwire-target"}') == 1
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_every_image_copies_every_package_of_the_project(dockerfile):
    """The images install the project from the packages they copy: one left out (the `specwire`
    command's, once) installs fine and fails at start with ModuleNotFoundError."""
    import tomllib

    included = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in included}
    text = (DEPLOY / dockerfile).read_text()
    assert {p for p in packages if f"COPY {p} {p}" not in text} == set()
