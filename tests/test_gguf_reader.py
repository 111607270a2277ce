"""Our GGUF reader (hf_conversion/gguf.py) against the ``gguf`` package: dequantisation of
every supported ggml type, and the header (metadata, tensor table) of a file its writer made."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_grove.hf_conversion.gguf import GGUFFile, dequantize

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q8_0]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_the_gguf_package(qtype):
    values = np.random.default_rng(int(qtype)).standard_normal((4, 64)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    expected = gguf.quants.dequantize(raw, qtype).reshape(-1)
    got = dequantize(np.ascontiguousarray(raw).view(np.uint8).reshape(-1), int(qtype))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), expected.astype(np.float32))
    if qtype not in (Q.F32, Q.F16, Q.BF16):
        assert not np.array_equal(got.numpy(), values.reshape(-1))  # really quantised


def test_header_matches_the_gguf_package(tmp_path):
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 3)
    writer.add_float32("llama.rope.freq_base", 5e5)
    writer.add_string("general.name", "tiny")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc", "déf"])
    writer.add_array("tokenizer.ggml.scores", [0.5, 1.5, -2.0])
    weights = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    writer.add_tensor("w.q8", gguf.quants.quantize(weights, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.add_tensor("w.f32", weights[:, :5].copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = GGUFFile(path)
    assert ours.meta["llama.block_count"] == 3 and ours.meta["general.name"] == "tiny"
    assert ours.meta["llama.rope.freq_base"] == pytest.approx(5e5)
    assert ours.meta["tokenizer.ggml.tokens"] == ["a", "bc", "déf"]
    np.testing.assert_array_equal(ours.meta["tokenizer.ggml.scores"], [0.5, 1.5, -2.0])
    reference = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert set(ours.tensors) == set(reference)
    for name, tensor in reference.items():
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        np.testing.assert_array_equal(ours.tensor(name).numpy(), expected)
    torch.testing.assert_close(ours.tensor("w.f32"), torch.from_numpy(weights[:, :5]))
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(tmp_path / "bad.gguf")
