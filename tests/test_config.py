from __future__ import annotations

import pytest
from pydantic import ValidationError

from draft_node.config import DraftConfig
from target_node.config import TargetConfig


def test_flags_beat_env_beat_defaults(monkeypatch):
    monkeypatch.setenv("SPECWIRE_TARGET_PORT", "6000")
    monkeypatch.setenv("SPECWIRE_TARGET_MAX_SESSIONS", "3")
    config = TargetConfig.from_cli(["--port", "7000", "--model", "/m"], "specwire target")
    assert (config.port, config.max_sessions, config.model) == (7000, 3, "/m")
    assert config.session_ttl_s == 300.0


def test_draft_config_from_env_and_bounds(monkeypatch):
    monkeypatch.setenv("SPECWIRE_DRAFT_TARGET", "10.1.2.3:9")
    assert DraftConfig.from_cli([], "specwire draft").target == "10.1.2.3:9"
    with pytest.raises(ValidationError):
        DraftConfig(num_speculative_tokens=-1)
    with pytest.raises(ValidationError, match="max_tokens_limit"):
        DraftConfig(max_tokens=10, max_tokens_limit=5)
    with pytest.raises(ValidationError):
        TargetConfig(port="not-a-port")
