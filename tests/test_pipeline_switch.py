"""`--pipeline auto`: both modes measured in blocks, the better one used, the other re-probed."""

from __future__ import annotations

from draft_node.config import DraftConfig
from draft_node.pipeline_switch import PipelineSwitch


def run(switch: PipelineSwitch, seconds: dict[bool, float], rounds: int) -> list[bool]:
    used = []
    for _ in range(rounds):
        mode = switch.use()
        used.append(mode)
        switch.observe(mode, 3, seconds[mode])
    return used


def test_auto_measures_both_then_uses_the_faster_and_keeps_probing():
    switch = PipelineSwitch(block=4, probe_every=4, min_rounds=8)
    used = run(switch, {True: 0.2, False: 0.3}, 200)  # drafting ahead pays (a slow link, own cores)
    assert used[:16].count(True) >= 8 and used[:16].count(False) >= 8
    assert used[-64:].count(True) == 48  # 3 blocks of 4 in every 4 use it, 1 probes the other
    switch = PipelineSwitch(block=4, probe_every=4, min_rounds=8)
    used = run(switch, {True: 0.4, False: 0.3}, 200)  # it does not (one machine: it slows the target)
    assert used[-64:].count(False) == 48


def test_auto_follows_a_change():
    switch = PipelineSwitch(block=4, probe_every=2, min_rounds=8)
    run(switch, {True: 0.4, False: 0.3}, 100)
    assert switch.best is False
    run(switch, {True: 0.1, False: 0.3}, 200)  # the link got slow: drafting ahead now hides it
    assert switch.best is True


def test_the_old_boolean_setting_still_reads_as_on_or_off(monkeypatch):
    monkeypatch.setenv("SPECWIRE_DRAFT_PIPELINE", "true")
    assert DraftConfig(target="x:1").pipeline == "on"
    assert DraftConfig(target="x:1", pipeline=False).pipeline == "off"
    assert DraftConfig(target="x:1", pipeline="auto").pipeline == "auto"
