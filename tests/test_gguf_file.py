"""services/gguf_file.py reads a GGUF header itself (gguf's GGUFReader takes 10-15 s on the packaged
models' vocabularies): the same metadata, tensor table and tensor bytes as GGUFReader, and clear
errors for files it cannot read."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from services.gguf_file import GGUFFile

Q = gguf.GGMLQuantizationType


def assert_reads_like_gguf_reader(path: Path) -> GGUFFile:
    file = GGUFFile(path)
    reader = gguf.GGUFReader(path)
    fields = {key: field for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert file.fields.keys() == fields.keys()
    array = gguf.GGUFValueType.ARRAY
    for key, field in fields.items():
        if field.types.count(array) < 2:  # GGUFReader flattens arrays of arrays
            assert file.fields[key] == field.contents(), key
    assert list(file.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = file.tensors[t.name]
        assert (info.type, info.dims, info.offset) == (t.tensor_type, tuple(map(int, t.shape)), t.data_offset)
        tensor = file.tensor(t.name)
        assert tensor.data.dtype == (np.uint8 if tensor.quantized else np.float32)
        assert np.array_equal(
            tensor.data.reshape(-1), np.asarray(t.data, dtype=tensor.data.dtype).reshape(-1)
        )
    return file


def test_tiny_models_read_like_gguf_reader(tiny_gguf):
    """Vocabularies (string and int arrays), scalars, K-quants, legacy quants and F32 tensors."""
    for path in (tiny_gguf.target, tiny_gguf.draft_small):
        file = assert_reads_like_gguf_reader(Path(path))
        assert len(file.fields["tokenizer.ggml.tokens"]) == file.settings().vocab_size
        assert file.eos_token_ids() == {file.fields["tokenizer.ggml.eos_token_id"]}


def write(path: Path, alignment: int | None = None) -> Path:
    writer = gguf.GGUFWriter(path, "qwen2")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("t.u8", 7)
    writer.add_int16("t.i16", -3)
    writer.add_bool("t.bool", True)
    writer.add_float64("t.f64", 0.125)
    writer.add_int64("t.i64", -(2**40))
    writer.add_array("t.floats", [0.5, 1.5])
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_string("t.utf8", "naïve ☃")
    writer.add_tensor("half", np.arange(12, dtype=np.float16).reshape(3, 4))
    writer.add_tensor("q8", gguf.quants.quantize(np.ones((2, 64), np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_value_types_f16_and_alignment_read_like_gguf_reader(tmp_path, alignment):
    file = assert_reads_like_gguf_reader(write(tmp_path / "types.gguf", alignment))
    assert file.fields["t.nested"] == [[1, 2], [3]] and file.fields["t.utf8"] == "naïve ☃"
    assert np.array_equal(file.tensor("half").data, np.arange(12, dtype=np.float32).reshape(3, 4))


def test_unreadable_files_get_clear_errors(tmp_path):
    path = write(tmp_path / "whole.gguf")
    whole, q8_at = path.read_bytes(), GGUFFile(path).tensors["q8"].offset
    (tmp_path / "text.gguf").write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(tmp_path / "text.gguf")
    (tmp_path / "header.gguf").write_bytes(whole[:100])
    with pytest.raises(ValueError, match="ends early"):
        GGUFFile(tmp_path / "header.gguf")
    (tmp_path / "data.gguf").write_bytes(whole[: q8_at + 100])  # Q8_0 [2, 64]: 136 bytes
    file = GGUFFile(tmp_path / "data.gguf")  # the header is whole: the last tensor is not
    file.tensor("half")
    with pytest.raises(ValueError, match="q8 ends past the end of the file"):
        file.tensor("q8")
    (tmp_path / "v9.gguf").write_bytes(whole[:4] + (9).to_bytes(4, "little") + whole[8:])
    with pytest.raises(ValueError, match="GGUF version 9"):
        GGUFFile(tmp_path / "v9.gguf")
