"""docker-compose.yml for real: build the image, start target, draft and Prometheus with
`docker compose up --wait`, talk to the published port 8000 with the `openai` client, check that
Prometheus scraped both nodes and that every Grafana panel's query evaluates, then stop gracefully
and remove everything.

This machine has no container registry: tests/compose/local_engine.sh starts Debian's dockerd and
makes local stand-ins for python:3.11-slim and prom/prometheus, used through the test-only
override tests/compose/docker-compose.local.yml. Skipped (with the reason) where no Docker engine
can run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.rpc.specwire.v1 import draft_pb2, draft_pb2_grpc
from tests.test_deploy import compose_binary

pytestmark = [pytest.mark.compose, pytest.mark.real, pytest.mark.slow, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "tests" / "compose"
ARTIFACTS = ROOT / "test-artifacts"
PROJECT = "specwire-test"
PROMETHEUS = "http://127.0.0.1:9090"
PROMPT = "Write a Python function that checks whether a number is prime."


def compose(*args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
    """The Compose v2 binary on the shipped file plus the local override; Grafana's profile left out."""
    env = {**os.environ, "COMPOSE_PROFILES": "none", "DOCKER_BUILDKIT": "0", "GF_SECURITY_ADMIN_PASSWORD": "unused"}
    command = [compose_binary(), "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"),
               "-f", str(LOCAL / "docker-compose.local.yml"), *args]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=check)


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True, timeout=300).stdout


def prometheus(path: str, **params: str) -> dict:
    url = f"{PROMETHEUS}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def save_logs() -> None:
    """The nodes' logs to test-artifacts/compose.log (kept when the stack is already gone)."""
    logs = compose("logs", "--no-color", check=False).stdout
    if logs.strip():
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "compose.log").write_text(logs)


@pytest.fixture(scope="module")
def local_images() -> None:
    """A running Docker engine and the local stand-in base images (or a skip saying why not)."""
    engine = subprocess.run(["bash", str(LOCAL / "local_engine.sh")], capture_output=True, text=True, timeout=1800)
    if engine.returncode == 77:
        pytest.skip(engine.stdout.strip())
    assert engine.returncode == 0, engine.stderr[-4000:]


@pytest.fixture(scope="module")
def stack(local_images) -> Iterator[dict]:
    compose("down", "-v", "--remove-orphans", timeout=300)  # leftovers of an interrupted run
    timings = {}
    start = time.monotonic()
    built = compose("build", timeout=3000, check=False)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    timings["build_s"] = round(time.monotonic() - start, 1)
    start = time.monotonic()
    try:
        up = compose("up", "--detach", "--wait", "--wait-timeout", "1800", timeout=2000, check=False)
        timings["first_start_s"] = round(time.monotonic() - start, 1)
        assert up.returncode == 0, up.stderr[-3000:] + compose("logs", "--tail", "40", check=False).stdout
        timings["image_mb"] = round(int(docker("image", "inspect", "specwire:cpu", "--format", "{{.Size}}")) / 1e6)
        yield timings
    finally:
        save_logs()
        compose("down", "-v", "--remove-orphans", timeout=300, check=False)


def test_chat_completion_through_port_8000_equals_the_target_alone(stack):
    from openai import OpenAI

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused", timeout=600)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": PROMPT}]
    speculative = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=48)
    alone = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=48, extra_body={"target_only": True}
    )
    assert speculative.choices[0].message.content == alone.choices[0].message.content
    assert speculative.usage.completion_tokens > 0
    # one malformed gRPC call, so the dashboards' error panel has traffic too
    with grpc.insecure_channel("127.0.0.1:50052") as channel, pytest.raises(grpc.RpcError) as refused:
        list(draft_pb2_grpc.DraftServiceStub(channel).Generate(draft_pb2.GenerateRequest(prompt="", max_tokens=4)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_runtime_image_loads_the_prebuilt_kernels_without_a_compiler(stack):
    probe = (
        "import shutil; from services.small_row_linear import cpu_extension as c; from services.gguf_decoder import kernels;"
        " print(shutil.which('c++'), c(), kernels())"
    )
    out = compose("exec", "-T", "target", "python", "-c", probe, timeout=120).stdout
    assert out.startswith("None <module") and out.count(".so") == 2 and "specwire_decoder_" in out, out


# Run in the target container after the quantizers of tests/tiny_gguf.py (the tests are not in the image).
AVX2_VARIANT_PROBE = """
import shutil

import torch
import torch.utils.cpp_extension

import services.cpu_extension as ext
from services.gguf_decoder import KERNEL_FLAGS, KERNEL_SOURCES, kernels
from services.gguf_file import QUANTIZED_TYPES


def refuse(**_):
    raise AssertionError("torch's extension builder was called")


assert shutil.which("c++") is None, "the runtime image has a C++ compiler"
torch.utils.cpp_extension.load = refuse
paths = [ext.SOURCE_DIR / source for source in KERNEL_SOURCES]
variants = ext.isa_variants()
best = kernels()
assert best.__name__ == ext.extension_name("decoder", paths, (*KERNEL_FLAGS, *variants[0])), best
assert variants[-1] == ext.AVX2_FLAGS and "avx512" not in " ".join(ext.AVX2_FLAGS), variants
# another machine: its best variant is not in the image, so the plain AVX2 one must load
ext.isa_variants = lambda: [("-mavx512f", "-mno-such-build"), ext.AVX2_FLAGS]
plain = ext.load_extension("decoder", KERNEL_SOURCES, KERNEL_FLAGS, isa=True)
assert plain.__name__ == ext.extension_name("decoder", paths, (*KERNEL_FLAGS, *ext.AVX2_FLAGS)), plain
assert plain.__file__.startswith("/opt/torch_extensions/"), plain.__file__
assert (plain is best) == (len(variants) == 1), (variants, best, plain)
x = torch.randn(70, 512, generator=torch.Generator().manual_seed(0))
for kind in sorted(QUANTIZED_TYPES):
    weights = np.random.default_rng(3).standard_normal((48, 512)).astype(np.float32)
    blocks = torch.from_numpy(quantize(weights, kind))
    outs = []
    for module in (best, plain):
        weight = module.gguf_repack(blocks, int(kind), 512)
        outs.append([module.gguf_linear(x[:n], [weight], [int(kind)], [48], [None])[0] for n in (1, 5, 70)])
    assert all(torch.equal(a, b) for a, b in zip(*outs)), f"{kind.name}: the AVX2 variant gives other bits"
print("same bits:", plain.__name__, best.__name__, sorted(kind.name for kind in QUANTIZED_TYPES))
"""


def test_runtime_image_runs_the_plain_avx2_kernels_with_the_same_bits(stack):
    """An image is built on one machine and run on another: where the build machine's best kernel
    variant cannot run, its prebuilt plain-AVX2 one must load (no compiler there) and give the very
    numbers the best one gives, for every block type the kernels compute with (1, 5 and 70 rows)."""
    import inspect

    from tests import tiny_gguf

    quantizers = [tiny_gguf.quantize_q4_k, tiny_gguf.quantize_q6_k, tiny_gguf.quantize]
    prelude = "import gguf\nimport numpy as np\n\nQ = gguf.GGMLQuantizationType\n\n"
    probe = prelude + "\n\n".join(map(inspect.getsource, quantizers)) + AVX2_VARIANT_PROBE
    run = compose("exec", "-T", "target", "python", "-c", probe, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert run.stdout.startswith("same bits: specwire_decoder_"), run.stdout


def scraped(query: str, deadline_s: float = 60) -> list[dict]:
    """Instant query, retried until non-empty (the scrape interval is 5 s)."""
    end = time.monotonic() + deadline_s
    while not (result := prometheus("/api/v1/query", query=query)["result"]) and time.monotonic() < end:
        time.sleep(2)
    return result


def test_prometheus_scraped_both_nodes(stack):
    up = {r["metric"]["job"]: float(r["value"][1]) for r in scraped("up")}
    assert up == {"specwire-target": 1.0, "specwire-draft": 1.0}
    rounds = scraped("sum(specwire_draft_rounds_total) > 0")
    assert rounds and float(rounds[0]["value"][1]) > 0
    verified = scraped("sum(specwire_target_forward_seconds_count) > 0")
    assert verified, "the target's forward counter never moved"


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL) for every target of every checked-in dashboard."""
    queries = []
    for path in sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            queries += [(path.stem, panel["title"], t["expr"]) for t in panel.get("targets", []) if t.get("expr")]
    return queries


def panels_without_data() -> list[str]:
    now = time.time()
    empty = []
    for dashboard, title, expr in panel_queries():
        # Grafana's built-in interval variables, as it would substitute them for a 15-minute view
        promql = re.sub(r"\$__rate_interval|\$__interval|\$__range", "1m", expr)
        data = prometheus("/api/v1/query_range", query=promql, start=str(now - 900), end=str(now), step="5")
        if not any(series["values"] for series in data["result"]):
            empty.append(f"{dashboard} / {title}: {expr}")
    return empty


def test_every_grafana_panel_query_evaluates_with_data(stack):
    # rate() needs two scrapes (5 s apart) after the requests above: asked again until then, 60 s at most
    end = time.monotonic() + 60
    while (empty := panels_without_data()) and time.monotonic() < end:
        time.sleep(2)
    assert not empty, "panels without data after traffic:\n" + "\n".join(empty)


def test_prometheus_targets_page_screenshot(stack):
    """What a person opening Prometheus sees: both nodes UP (a screenshot for the README)."""
    from selenium.webdriver.support.ui import WebDriverWait

    from benchmarks.playground_shot import chromium

    # the official image serves the React UI at /targets; Debian's package (the stand-in) only /classic
    page = "/targets"
    try:
        urllib.request.urlopen(f"{PROMETHEUS}{page}", timeout=10)
    except urllib.error.HTTPError:
        page = "/classic/targets"
    browser = chromium(1300, 560)
    try:
        browser.get(f"{PROMETHEUS}{page}")
        ARTIFACTS.mkdir(exist_ok=True)
        try:
            WebDriverWait(browser, 60).until(lambda b: b.page_source.count("(1/1 up)") == 2)
        finally:
            browser.save_screenshot(str(ARTIFACTS / "compose_prometheus_targets.png"))
        assert "specwire-target" in browser.page_source and "specwire-draft" in browser.page_source
    finally:
        browser.quit()
    (ARTIFACTS / "compose_timings.json").write_text(json.dumps(stack, indent=2))


def test_stop_is_graceful_and_down_leaves_nothing(stack):
    stopped = compose("stop", timeout=300)
    assert stopped.returncode == 0
    save_logs()
    for service in ("target", "draft"):
        container = compose("ps", "--all", "--quiet", service).stdout.strip()
        state = json.loads(docker("inspect", container))[0]["State"]
        assert state["ExitCode"] == 0, f"{service} did not exit cleanly on SIGTERM: {state}"
    compose("down", "-v", "--remove-orphans", timeout=300)
    label = f"label=com.docker.compose.project={PROJECT}"
    assert docker("ps", "--all", "--quiet", "--filter", label).strip() == ""
    assert docker("volume", "ls", "--quiet", "--filter", label).strip() == ""
    assert docker("network", "ls", "--quiet", "--filter", label).strip() == ""


@pytest.mark.release  # gigabytes of CUDA torch and vLLM: `make check-cuda-image`, not `make test`
def test_cuda_image_builds_and_matches_its_cuda_base(local_images):
    """deploy/Dockerfile.cuda builds (no GPU needed) on the Debian stand-in for its nvidia/cuda
    base; the torch it installs must be built for the CUDA version that base's nvcc has, or the
    verify kernels would not compile at first start."""
    dockerfile = ROOT / "deploy" / "Dockerfile.cuda"
    base_cuda = re.search(r"ARG BASE_IMAGE=nvidia/cuda:(\d+\.\d+)\.\d+-devel", dockerfile.read_text()).group(1)
    tag = "specwire-test/cuda:build-check"
    built = subprocess.run(
        ["docker", "build", "-q", "-f", str(dockerfile), "--build-arg", "BASE_IMAGE=specwire-local/debian:bookworm",
         "-t", tag, str(ROOT)],  # fmt: skip
        env={**os.environ, "DOCKER_BUILDKIT": "0"}, capture_output=True, text=True, timeout=3000,
    )
    try:
        assert built.returncode == 0, built.stderr[-3000:]
        probe = "import torch, vllm, target_node.server; print(torch.version.cuda)"
        torch_cuda = docker("run", "--rm", "--entrypoint", "python", tag, "-c", probe).split()[-1]
        assert torch_cuda == base_cuda, f"torch is built for CUDA {torch_cuda}, the base image has {base_cuda}"
        user = docker("image", "inspect", tag, "--format", "{{.Config.User}}").strip()
        assert user == "specwire"
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=300)
