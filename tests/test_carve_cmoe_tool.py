"""tools/carve_cmoe.py end to end on a tiny random Hugging Face Llama (d_ffn % N != 0): the
Megatron checkpoint it writes computes the dense model's logits when every expert is active,
differs when not, keeps the router state; the HF-style export; bad input exits with code 2."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import tiny_models
from megatron_grove.data.tokenizer import default_tokenizer_path
from processes import ROOT, run_distributed, run_script

pytestmark = pytest.mark.e2e

SEQ = 32


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_models.tiny_llama(path, tokenizer_file=default_tokenizer_path(), vocab_size=4096,
                       hidden_size=32, intermediate_size=44, rope_theta=10000.0,
                       tie_word_embeddings=False, initializer_range=0.02)
    return path


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    """The CLI in its own process (it starts a private torch.distributed world)."""
    return run_script("tools/carve_cmoe.py", *args, timeout=600)


def _carve(model: Path, out: Path, active: int, router: str = "linear"
           ) -> subprocess.CompletedProcess:
    return _run_tool("--model", str(model), "--shared", "1", "--active", str(active),
                     "--experts", "8", "--output", str(out), "--calibration-tokens", "256",
                     "--window", "64", "--seq-length", str(SEQ), "--router", router,
                     "--no-progress")


def _megatron_logits(rank: int, checkpoint: str, ids: torch.Tensor) -> dict:
    from megatron_grove.checkpointing import load_checkpoint, read_checkpoint_config
    from megatron_grove.config import config_from_dict
    from megatron_grove.megatron_config import to_transformer_config
    from megatron_grove.model import build_gpt_model, causal_attention_mask

    cfg = config_from_dict(read_checkpoint_config(checkpoint))
    model = build_gpt_model(to_transformer_config(cfg), cfg.model.vocab_size, SEQ,
                            cfg.model.rotary_base, cfg.model.tie_embeddings, seed=99).eval()
    load_checkpoint(checkpoint, model, None)
    with torch.no_grad():
        logits = model(ids, torch.arange(SEQ)[None], causal_attention_mask(SEQ, ids.device))
    router = model.decoder.layers[0].mlp.router
    return {"logits": logits[..., :4096], "router": type(router).__name__,
            "scale": router.expert_scale.detach().clone(),
            "bias": router.expert_bias.clone(), "topk": router.topk}


def _evaluate_main(rank: int, argvs: list[list[str]]) -> list[float]:
    """``tools/evaluate.py``'s ``main(argv)`` for each argv in this process -> the perplexities
    its ``--json`` lines report."""
    main = runpy.run_path(str(ROOT / "tools" / "evaluate.py"))["main"]
    ppls = []
    for argv in argvs:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(argv) == 0
        ppls.append(json.loads(printed.getvalue().strip().splitlines()[-1])["ppl"])
    return ppls


def test_all_experts_active_reproduces_the_dense_model(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
    done = _carve(tiny_llama, tmp_path / "all", active=7)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "carved S1A7E8 (linear router) in" in done.stdout
    got = run_distributed(_megatron_logits, world_size=1,
                          args=(str(tmp_path / "all" / "megatron"), ids))[0]
    torch.testing.assert_close(got["logits"], expected, rtol=1e-5, atol=1e-5)
    assert got["topk"] == 7 and torch.equal(got["scale"], torch.zeros(7))
    assert got["router"] == "CMoELinearRouter"  # the default router

    assert _carve(tiny_llama, tmp_path / "sparse", active=2).returncode == 0
    sparse = run_distributed(_megatron_logits, world_size=1,
                             args=(str(tmp_path / "sparse" / "megatron"), ids))[0]
    assert (sparse["logits"] - expected).abs().max() > 1e-3

    # tools/evaluate.py: the carved checkpoint with every expert active has the dense PPL
    np.save(tmp_path / "tokens.npy", torch.randint(0, 4096, (4 * SEQ + 1,)).numpy())
    assert _carve(tiny_llama, tmp_path / "paper_all", active=7, router="paper").returncode == 0
    assert _carve(tiny_llama, tmp_path / "paper", active=2, router="paper").returncode == 0
    checkpoints = {"dense": tiny_llama, "all": tmp_path / "all" / "megatron",
                   "sparse": tmp_path / "sparse" / "megatron",
                   "paper_all": tmp_path / "paper_all" / "megatron",
                   "paper": tmp_path / "paper" / "megatron"}
    argv = {name: ["--checkpoint", str(path), "--tokens", str(tmp_path / "tokens.npy"),
                   "--seq-length", str(SEQ), "--json"] for name, path in checkpoints.items()}
    done = run_script("tools/evaluate.py", *argv["all"], timeout=600)  # the CLI itself once
    assert done.returncode == 0, done.stderr[-2000:]
    ppl = {"all": json.loads(done.stdout.strip().splitlines()[-1])["ppl"]}
    others = [name for name in checkpoints if name != "all"]  # its main() in one process
    ppl.update(zip(others, run_distributed(_evaluate_main, world_size=1,
                                           args=([argv[name] for name in others],))[0]))
    error = {k: abs(ppl[k] / ppl["dense"] - 1) for k in ppl}
    assert error["all"] < 1e-4 and error["sparse"] > 10 * error["all"], ppl
    assert error["paper_all"] < 1e-4 and error["paper"] > 10 * error["paper_all"], ppl
    assert ppl["paper"] != ppl["sparse"]  # the two routers select differently

    record = json.loads((tmp_path / "sparse" / "carve.json").read_text())
    assert record["spec"] == "S1A2E8" and record["neurons_per_expert"] == 6  # ceil(44 / 8)
    assert record["router"] == "linear" and record["calibration_tokens"] == 256
    phases = ("read", "calibration", "clustering", "writing")
    assert all(record[f"{p}_s"] >= 0 and record[f"{p}_cpu_s"] >= 0 for p in phases)
    assert record["construction_s"] == pytest.approx(
        sum(record[f"{p}_s"] for p in phases[:3]), abs=0.02)
    export = json.loads((tmp_path / "sparse" / "hf" / "config.json").read_text())
    assert export["cmoe"]["num_routed_experts"] == 7 and export["cmoe"]["router"] == "linear"
    paper_export = json.loads((tmp_path / "paper" / "hf" / "config.json").read_text())
    assert paper_export["cmoe"]["router"] == "paper"
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "sparse" / "hf" / "model.safetensors"))
    assert tensors["model.layers.1.mlp.router.weight"].shape == (7, 32)
    assert tensors["model.layers.1.mlp.router.score_bias"].shape == (7,)
    paper_tensors = load_file(str(tmp_path / "paper" / "hf" / "model.safetensors"))
    assert paper_tensors["model.layers.1.mlp.router.up_rows"].shape == (7, 32)
    assert "model.layers.1.mlp.router.score_bias" not in paper_tensors
    assert tensors["model.layers.1.mlp.experts.6.gate_proj.weight"].shape == (6, 32)
    assert tensors["model.layers.1.mlp.shared_expert.down_proj.weight"].shape == (32, 6)
    assert (tmp_path / "sparse" / "hf" / "tokenizer.json").is_file()
    config = yaml.safe_load((tmp_path / "sparse" / "megatron" / "config.yaml").read_text())
    assert config["moe"]["router_type"] == "cmoe_linear"

    # the converter has no HF class for a (fine-tuned) CMoE checkpoint: one line, exit 2
    done = run_script("tools/convert_checkpoint.py", "--source-format", "megatron",
                      "--target-format", "hf", "--input", str(tmp_path / "sparse" / "megatron"),
                      "--output", str(tmp_path / "sparse_hf"))
    assert done.returncode == 2
    assert "tools/carve_cmoe.py writes its HF-style export at carving time" in done.stderr
    assert not (tmp_path / "sparse_hf").exists()


def test_bad_input_exits_with_code_2(tiny_llama, tmp_path):
    done = _carve(tiny_llama, tmp_path / "x", active=8)  # only 7 routed experts
    assert done.returncode == 2 and "--active 8: allowed 1..7" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    (tmp_path / "exists").mkdir()
    assert _carve(tiny_llama, tmp_path / "exists", active=2).returncode == 2
    done = _run_tool("--model", str(tmp_path), "--shared", "1", "--active", "1",
                     "--experts", "2", "--output", str(tmp_path / "y"))
    assert done.returncode == 2 and "neither a .gguf file" in done.stderr
