"""The benchmark client: data sets load, quality scoring is right (and can fail), report maths,
and a whole run on tiny models writes its JSON, table and plots with greedy output identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks.bench import WARMUP, main, run_interleaved
from benchmarks.bench_data import Sample, gsm8k, humaneval
from benchmarks.bench_quality import gsm8k_answer, humaneval_program, is_correct
from benchmarks.bench_report import acceptance_by_position, percentile
from benchmarks.bench_runners import HFRunner, Settings
from draft_node.proposers import eos_token_ids
from services.model_loading import load_model
from tests.parallel import selected_params

ROOT = Path(__file__).resolve().parents[1]


def test_data_sets_come_from_the_packages():
    problems = gsm8k(3)
    assert [s.sample_id for s in problems] == ["gsm8k/0", "gsm8k/1", "gsm8k/2"]
    assert problems[0].reference == "18"  # Janet's ducks
    assert problems[0].messages[-1]["role"] == "user" and len(problems[0].messages) == 6
    tasks = humaneval(164)
    assert len(tasks) == 164 and tasks[0].problem["entry_point"] == "has_close_elements"


@pytest.mark.parametrize(
    "text, answer",
    [
        ("16 - 9 = 7 eggs, 7 * 2 = 14.\nThe answer is 14.", "14"),
        ("The answer is $1,250.", "1250"),
        ("so 3 + 4 = 7", "7"),
        ("The answer is 18.0", "18"),
        ("no digits here", None),
    ],
)
def test_gsm8k_answer_extraction(text, answer):
    assert gsm8k_answer(text) == answer


def test_humaneval_scoring_runs_the_tests():
    task = humaneval(1)[0]
    solution = task.problem["prompt"] + task.problem["canonical_solution"]
    assert humaneval_program(f"Here:\n```python\n{solution}```\nDone.") == solution.rstrip() + "\n"
    assert is_correct(task, f"```python\n{solution}```")
    wrong = solution.replace("return True", "return False")
    assert not is_correct(task, f"```python\n{wrong}```")
    assert not is_correct(task, "```python\ndef has_close_elements(numbers, threshold):\n    while True: pass\n```", 1.0)


def test_gsm8k_scoring():
    sample = gsm8k(1)[0]
    assert is_correct(sample, "... The answer is 18.")
    assert not is_correct(sample, "... The answer is 17.")


def test_report_maths():
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([1, 2, 3, 4], 99) == 4 and percentile([], 50) is None
    rounds = [dict(drafted=3, accepted=3), dict(drafted=3, accepted=1), dict(drafted=2, accepted=0)]
    assert acceptance_by_position(rounds) == [2 / 3, 1 / 3, 1 / 2]


def test_speedup_bound_maths():
    from benchmarks.speedup_bounds import best_speculation, committed_per_round

    assert committed_per_round([0.5, 0.5], 2) == 1.75 and committed_per_round([1.0, 1.0], 0) == 1.0
    # two clients; K=2 commits no more than K=1 (position 2 never accepted) and costs a draft step more
    best = best_speculation([1.0, 0.0], draft_ms=10.0, verify_ms={1: 100.0, 2: 110.0}, sequences=2)
    assert (best["k"], best["tokens_per_round"], best["round_ms"]) == (1, 4.0, 110.0)


def test_interleaved_runs_take_turns_sample_by_sample():
    """A drifting machine must slow every run alike: each sample goes through every run before the next."""
    calls = []

    class Recorder:
        def __init__(self, name):
            self.name, self.settings = name, Settings(max_tokens=64)

        def generate(self, sample_id, prompt):
            calls.append((self.name, sample_id, self.settings.max_tokens))
            return sample_id

    samples = [Sample("gsm8k", f"s{i}", [], "") for i in range(3)]
    prompts = {s.sample_id: "p" for s in samples} | {WARMUP: "w"}
    results = run_interleaved([("a", Recorder("a")), ("b", Recorder("b"))], samples, prompts, warmup=1)
    assert calls[:2] == [("a", WARMUP, 8), ("b", WARMUP, 8)]  # short untimed warm-ups first
    assert calls[2:] == [(run, f"s{i}", 64) for i in range(3) for run in ("a", "b")]
    assert results == {"a": ["s0", "s1", "s2"], "b": ["s0", "s1", "s2"]}


def test_a_whole_run_on_tiny_models(tiny, tmp_path):
    out = tmp_path / "bench"
    report = main(
        ["--gsm8k", "2", "--humaneval", "2", "--max-tokens", "10", "--target-model", tiny.target,
         "--draft-model", tiny.draft_noisy, "--out-dir", str(out), "-k", "2", "-k", "4", "--concurrency", "2",
         "--min-chain-probability", "0"]  # full chains: the tiny draft is unsure of nearly every token
    )  # fmt: skip
    names = [s["name"] for s in report["summaries"]]
    assert names == ["target-alone", "hf-assisted K=2", "hf-assisted K=4", "specwire K=2", "specwire K=4"]
    baseline = report["summaries"][0]
    for summary in report["summaries"][1:]:
        assert summary["identical_to_baseline"] == 4  # greedy: every run reproduces the target alone
        assert summary["speedup"] == pytest.approx(summary["tokens_per_s"] / baseline["tokens_per_s"], rel=1e-2, abs=1e-3)  # rounded to 3 places
    spec = report["summaries"][-1]
    assert 0 < spec["acceptance_rate"] <= 1 and len(spec["acceptance_by_position"]) == 4
    phases = spec["round_breakdown_s"]
    assert set(phases) == {"draft", "network", "verify", "idle"} and min(phases.values()) >= 0
    assert phases["draft"] + phases["network"] + phases["verify"] == pytest.approx(spec["round_s_mean"], abs=2e-3)
    assert (out / "logs" / "target.log").exists()  # the nodes ran as their own processes
    assert json.loads((out / "report.json").read_text())["summaries"] == report["summaries"]
    assert "| specwire K=4 |" in (out / "report.md").read_text()
    for plot in ("speedup.png", "acceptance_by_position.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hf_assisted_drafts_the_k_it_is_labelled_with(tiny):
    """transformers takes K and the confidence threshold from the assistant's generation config and
    ignores generate()'s kwargs for them (left alone: K=20): the runner sets them there."""
    target, draft = load_model(tiny.target), load_model(tiny.draft_same)
    asked: list[int] = []
    assistant_generate = draft.model.generate

    def generate(*args, **kwargs):
        asked.append(kwargs["max_new_tokens"])
        return assistant_generate(*args, **kwargs)

    draft.model.generate = generate
    eos = sorted(eos_token_ids(target.tokenizer, target.model.generation_config))
    settings = Settings(max_tokens=12, num_speculative_tokens=2, assistant_confidence_threshold=0.0)
    HFRunner(target, settings, eos, assistant=draft).generate("s", "def add(a, b):\n    return")
    assert asked and max(asked) == 2
    assert draft.model.generation_config.assistant_confidence_threshold == 0.0


def start_as_documented(script: str) -> subprocess.CompletedProcess:
    path = ROOT / "benchmarks" / script
    documented = f"python benchmarks/{script}" in path.read_text()
    command = [sys.executable, str(path)] if documented else [sys.executable, "-m", f"benchmarks.{path.stem}"]
    return subprocess.run([*command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def started(request: pytest.FixtureRequest) -> dict[str, subprocess.CompletedProcess]:
    """Every selected script's `--help`, one process per core at a time (each spends its seconds
    importing torch and transformers on one core)."""
    cases = selected_params(request, test_benchmark_scripts_start_as_documented)
    scripts = [case["script"] for case in cases]
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        return dict(zip(scripts, pool.map(start_as_documented, scripts), strict=True))


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__"))
def test_benchmark_scripts_start_as_documented(started, script):
    """Run by path (`python benchmarks/x.py`), a script's folder comes first on sys.path, so a
    benchmark named like a package that transformers probes (`kernels`) broke every model load."""
    out = started[script]
    assert out.returncode == 0, out.stderr[-2000:]
