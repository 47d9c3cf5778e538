from __future__ import annotations

import pytest
import torch

from services import model_loading
from services.model_loading import PackagedModel, load_model, resolve_dtype, resolve_model_dir
from services.tokenizer_fingerprint import tokenizer_fingerprint


def test_hf_dir_loads(tiny):
    loaded = load_model(tiny.target)
    assert loaded.model_id == "target"
    assert not loaded.model.training


def test_unknown_spec_and_dtype_are_clear(tmp_path):
    with pytest.raises(ValueError, match="neither a HF model directory"):
        resolve_model_dir(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3")
    assert resolve_dtype("bfloat16") is torch.bfloat16


def test_missing_part_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(
        model_loading.PACKAGED_MODELS, "fake-model", PackagedModel(("no_such_part_module_1",))
    )
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[models\]'"):
        resolve_model_dir("fake-model", tmp_path)


def test_packaged_parts_are_concatenated_in_order(tmp_path, monkeypatch):
    import sys
    import types

    for i, payload in enumerate([b"GGUF", b"-part2", b"-part3"], start=1):
        path = tmp_path / f"part{i}.bin"
        path.write_bytes(payload)
        module = types.ModuleType(f"fake_part_{i}")
        module.get_part_path = lambda path=path: str(path)
        monkeypatch.setitem(sys.modules, f"fake_part_{i}", module)
    monkeypatch.setitem(
        model_loading.PACKAGED_MODELS, "fake", PackagedModel(("fake_part_1", "fake_part_2", "fake_part_3"))
    )
    out = model_loading.assemble_packaged_gguf("fake", tmp_path / "cache")
    assert out.read_bytes() == b"GGUF-part2-part3"


def test_fingerprint_distinguishes_tokenizers(tiny):
    same = tokenizer_fingerprint(load_model(tiny.draft_noisy).tokenizer)
    assert same == tokenizer_fingerprint(load_model(tiny.target).tokenizer)
    assert same != tokenizer_fingerprint(load_model(tiny.other_tokenizer).tokenizer)
