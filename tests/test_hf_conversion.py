"""Hugging Face <-> Megatron conversion against real ``transformers`` models (tiny, random,
fp32): the same perplexity through our model code, bit-identical round trips, clear errors."""

import json

import numpy as np
import pytest
import torch

from config_builders import grove_family_config
from megatron_grove.checkpointing.model_io import save_megatron_checkpoint
from megatron_grove.hf_conversion import (
    HFFormatError,
    load_hf_checkpoint,
    load_megatron_state,
    save_hf_checkpoint,
)
from processes import in_world, run_script
from tiny_models import (
    all_tensors,
    hf_perplexity,
    our_perplexity,
    random_model_state,
    random_tokens,
    tiny_llama,
    tiny_qwen3_moe,
)

SEQ = 32


def run_evaluate(*args: str) -> dict:
    proc = run_script("tools/evaluate.py", *args, "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_moe") / "hf"
    return folder, tiny_qwen3_moe(folder)


@pytest.mark.e2e
def test_qwen3_moe_to_megatron_evaluates_to_transformers_ppl(qwen3_moe, tmp_path):
    folder, hf_model = qwen3_moe
    assert (folder / "model.safetensors.index.json").is_file()  # sharded input
    tokens = random_tokens(2000)
    np.save(tmp_path / "tokens.npy", tokens)
    cfg, state = load_hf_checkpoint(folder)
    in_world(save_megatron_checkpoint, tmp_path / "megatron", cfg, state)
    expected = hf_perplexity(hf_model, tokens, SEQ)
    for ckpt in (tmp_path / "megatron", folder):  # Megatron and HF input, auto-detected
        result = run_evaluate("--checkpoint", str(ckpt), "--tokens", str(tmp_path / "tokens.npy"),
                              "--seq-length", str(SEQ))
        assert result["tokens"] == (len(tokens) - 1) // SEQ * SEQ
        assert result["ppl"] == pytest.approx(expected, rel=1e-4)
        assert result["format"] == ("hf" if ckpt == folder else "megatron")


def test_qwen3_moe_hf_megatron_hf_is_bit_identical(qwen3_moe, tmp_path):
    folder, _ = qwen3_moe
    cfg, state = load_hf_checkpoint(folder)
    in_world(save_megatron_checkpoint, tmp_path / "megatron", cfg, state)
    cfg2, state2 = in_world(load_megatron_state, tmp_path / "megatron")
    save_hf_checkpoint(tmp_path / "back", cfg2, state2, max_shard_bytes=200_000)
    source, back = all_tensors(folder), all_tensors(tmp_path / "back")
    assert source.keys() == back.keys()
    for name in source:
        assert source[name].dtype == back[name].dtype and torch.equal(source[name], back[name]), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["num_experts"] == 8


def test_dense_llama_matches_transformers(tmp_path):
    hf_model = tiny_llama(tmp_path / "llama")
    cfg, state = load_hf_checkpoint(tmp_path / "llama")
    assert cfg.moe.num_experts == 0 and cfg.model.tie_embeddings and not cfg.model.qk_layernorm
    tokens = random_tokens(600, seed=1)
    assert our_perplexity(cfg, state, tokens) == pytest.approx(
        hf_perplexity(hf_model, tokens, SEQ), rel=1e-4)


def test_partial_and_mismatched_checkpoints_fail_clearly(qwen3_moe, tmp_path):
    folder, _ = qwen3_moe
    partial = tmp_path / "partial"
    partial.mkdir()
    for file in folder.iterdir():
        (partial / file.name).write_bytes(file.read_bytes())
    shard = sorted(partial.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(HFFormatError, match=f"{shard.name}.*missing.*partial"):
        load_hf_checkpoint(partial)
    config = json.loads((folder / "config.json").read_text())
    config["moe_intermediate_size"] = 48
    (partial / "config.json").write_text(json.dumps(config))
    shard.write_bytes((folder / shard.name).read_bytes())
    with pytest.raises(HFFormatError, match=r"48 tensor\(s\) of the wrong shape \(model\.layers\.0"
                                            r"\.mlp\.experts\.0\.gate_proj\.weight \(32, 64\) "
                                            r"\(expected \(48, 64\)\)"):
        load_hf_checkpoint(partial)
    (partial / "config.json").write_text((folder / "config.json").read_text())
    truncated = shard.stat().st_size - 100  # a copy cut short: one line naming the file
    shard.write_bytes((folder / shard.name).read_bytes()[:truncated])
    with pytest.raises(HFFormatError, match=f"{shard}: damaged or truncated safetensors file"):
        load_hf_checkpoint(partial)


def _packed(tensors: dict, banks: tuple[str, ...]) -> dict:
    """``tensors`` with every layer's per-expert tensors of each bank (``experts``,
    ``chunk_experts``) packed as transformers 5 holds them: ``gate_up_proj`` [E, 2I, H] (gate
    rows first), ``down_proj`` [E, H, I]."""
    out = {n: t for n, t in tensors.items() if not any(f".mlp.{b}." in n for b in banks)}
    for i in range(2):
        for bank in banks:
            prefix = f"model.layers.{i}.mlp.{bank}"
            count = len({n.split(".")[5] for n in tensors if n.startswith(prefix + ".")})
            gate_up = [torch.cat([tensors[f"{prefix}.{x}.gate_proj.weight"],
                                  tensors[f"{prefix}.{x}.up_proj.weight"]]) for x in range(count)]
            out[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
            out[f"{prefix}.down_proj"] = torch.stack(
                [tensors[f"{prefix}.{x}.down_proj.weight"] for x in range(count)])
    return out


def test_packed_expert_layouts_convert_like_per_expert_ones(qwen3_moe, tmp_path):
    """Qwen3-MoE as transformers 5 holds it in memory (packed experts), and a GroveMoE export
    with packed experts and adjugates: the same global state dict, bit for bit."""
    from safetensors.torch import save_file

    folder, hf_model = qwen3_moe
    grove_cfg = grove_family_config("tiny_cpu", "model.vocab_size=300")
    save_hf_checkpoint(tmp_path / "grove", grove_cfg, random_model_state(grove_cfg, seed=1))
    in_memory = {n: t.contiguous() for n, t in hf_model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in in_memory  # transformers 5 packs them
    for name, per_expert, packed in (
            ("qwen3_moe", folder, in_memory),
            ("grove", tmp_path / "grove",
             _packed(all_tensors(tmp_path / "grove"), ("experts", "chunk_experts")))):
        target = tmp_path / f"{name}_packed"
        target.mkdir()
        save_file(packed, str(target / "model.safetensors"), metadata={"format": "pt"})
        (target / "config.json").write_text((per_expert / "config.json").read_text())
        cfg, state = load_hf_checkpoint(target)
        expected_cfg, expected = load_hf_checkpoint(per_expert)
        assert cfg == expected_cfg and state.keys() == expected.keys()
        assert all(torch.equal(state[n], expected[n]) for n in expected), name
