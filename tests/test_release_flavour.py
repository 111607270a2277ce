"""The released GroveMoE format: a released checkpoint imports to the function its own code
computes (its non-zero bias kept, not selecting), the release-flavour export refuses (one line,
exit 2, every difference named) what that code cannot compute, writes what it loads, and
--drop-expert-bias reports the selections it changes."""

import json
import subprocess

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from megatron_grove.config import load_config
from megatron_grove.hf_conversion import load_hf_checkpoint, save_hf_checkpoint
from megatron_grove.hf_conversion.hf_config import RELEASE_FLAVOUR, release_incompatibilities
from processes import in_world, run_script
from tiny_models import (
    all_tensors,
    hf_perplexity,
    random_model_state,
    random_tokens,
    tiny_qwen3_moe,
)
from tiny_models import our_perplexity as state_perplexity

SEQ = 32
E, G, FA, LAM = 8, 4, 128, 0.05  # the released layout: 2 experts per group, 128, 0.05
# a model the released code computes exactly (reduced width)
RELEASABLE = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
              "model.num_query_groups=2", "model.ffn_hidden_size=96", "model.seq_length=64",
              "model.vocab_size=300", "moe.num_experts=8", "moe.router_topk=2",
              "moe.ffn_hidden_size=32", "moe.num_expert_groups=4",
              "moe.adjugate_ffn_hidden_size=128", "moe.adjugate_scale=0.05"]


@pytest.mark.parametrize("overrides,bias,expected", [
    ([], False, []),
    (["moe.num_expert_groups=2", "moe.adjugate_scale=0.05"], False,
     ["4 experts per group (release: 2)"]),
    (["moe.adjugate_ffn_hidden_size=32"], False, ["adjugate size 32 (release: 128)"]),
    (["moe.adjugate_scale=0.1"], False, ["adjugate scale 0.1 (release: 0.05)"]),
    (["moe.router_score_function=sigmoid"], False, ["sigmoid routing weights (release: softmax)"]),
    (["moe.norm_topk_prob=false"], False, ["norm_topk_prob false (release: always renormalised)"]),
    ([], True, ["a non-zero expert bias used in selection (release: never reads it; "
                "--drop-expert-bias drops it from selection)"]),
    (["moe.num_expert_groups=0"], False, ["not a GroveMoE model (moe.num_expert_groups=0)"]),
], ids=["releasable", "group-size", "adjugate-size", "scale", "sigmoid", "unnormalised", "bias",
        "not-grove"])
def test_release_incompatibilities_name_each_difference(overrides, bias, expected):
    assert release_incompatibilities(load_config(None, RELEASABLE + overrides), bias) == expected


class ReleaseSemanticsMLP(torch.nn.Module):
    """A GroveMoE layer as the released code computes it (docs/design.md, section 2.3), token
    by token: selection = top-k of sigmoid(l) (the bias is never read), weights = softmax over
    all experts gathered at the selection and renormalised, and for every selected expert i,
    rho_i E_i(x) + lam rho_i A_{i // 2}(x): the group's adjugate once per selected expert."""

    def __init__(self, tensors: dict, layer: int) -> None:
        super().__init__()
        self.t, self.p = tensors, f"model.layers.{layer}.mlp"

    def _swiglu(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w = {k: self.t[f"{name}.{k}_proj.weight"] for k in ("gate", "up", "down")}
        return w["down"] @ (F.silu(w["gate"] @ x) * (w["up"] @ x))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = []
        for x in hidden.reshape(-1, hidden.shape[-1]):
            logits = self.t[f"{self.p}.gate.weight"] @ x
            chosen = torch.topk(torch.sigmoid(logits), 2).indices.tolist()
            rho = torch.softmax(logits, dim=0)[chosen]
            rho = rho / rho.sum()
            y = torch.zeros_like(x)
            for i, weight in zip(chosen, rho):
                y = y + weight * self._swiglu(f"{self.p}.experts.{i}", x)
                y = y + LAM * weight * self._swiglu(f"{self.p}.chunk_experts.{i // 2}", x)
            rows.append(y)
        return torch.stack(rows).reshape(hidden.shape)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A checkpoint as released: Qwen3-MoE config fields + GroveMoE's architecture, no Grove
    fields, adjugates of 128, a non-zero expert bias."""
    source = tmp_path_factory.mktemp("qwen3") / "hf"
    hf_model = tiny_qwen3_moe(source)
    folder = tmp_path_factory.mktemp("released") / "hf"
    folder.mkdir()
    tensors = all_tensors(source)
    gen = torch.Generator().manual_seed(5)
    for i in range(2):
        prefix = f"model.layers.{i}.mlp"
        tensors[f"{prefix}.expert_bias"] = torch.randn(E, generator=gen)
        for g in range(G):
            for proj, shape in [("gate_proj", (FA, 64)), ("up_proj", (FA, 64)),
                                ("down_proj", (64, FA))]:
                tensors[f"{prefix}.chunk_experts.{g}.{proj}.weight"] = (
                    torch.randn(*shape, generator=gen) * 0.2)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config.update(RELEASE_FLAVOUR)
    (folder / "config.json").write_text(json.dumps(config))
    return folder, tensors, hf_model


def test_released_checkpoint_imports_to_the_released_function(released):
    folder, tensors, hf_model = released
    cfg, state = load_hf_checkpoint(folder)
    assert (cfg.moe.num_expert_groups, cfg.moe.adjugate_ffn_hidden_size, cfg.moe.adjugate_scale,
            cfg.moe.expert_bias_in_selection, cfg.moe.norm_topk_prob) == (G, FA, LAM, False, True)
    assert torch.equal(state["decoder.layers.0.mlp.router.expert_bias"],
                       tensors["model.layers.0.mlp.expert_bias"])  # kept, not selecting
    for i, layer in enumerate(hf_model.model.layers):  # attention etc. stay transformers'
        layer.mlp = ReleaseSemanticsMLP(tensors, i)
    tokens = random_tokens(300, seed=9)
    expected = hf_perplexity(hf_model, tokens, SEQ)
    assert state_perplexity(cfg, state, tokens, SEQ) == pytest.approx(expected, rel=1e-5)
    cfg.moe.expert_bias_in_selection = True  # the user turns it on: another function
    assert state_perplexity(cfg, state, tokens, SEQ) != pytest.approx(expected, rel=1e-3)


def test_release_flavour_writes_what_the_release_loads(tmp_path):
    cfg = load_config(None, RELEASABLE)
    state = random_model_state(cfg, seed=2, bias_std=0.0)
    save_hf_checkpoint(tmp_path / "rel", cfg, state, flavour="release")
    config = json.loads((tmp_path / "rel" / "config.json").read_text())
    assert {k: config[k] for k in RELEASE_FLAVOUR} == RELEASE_FLAVOUR
    assert config["norm_topk_prob"] is True and config["num_experts"] == E
    assert not {"auto_map", "num_expert_groups", "adjugate_intermediate_size", "adjugate_scale",
                "scoring_func", "expert_bias_in_selection"} & config.keys()
    assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == ["config.json",
                                                                     "model.safetensors"]
    back_cfg, back_state = load_hf_checkpoint(tmp_path / "rel")
    assert all(torch.equal(back_state[n], state[n]) for n in state)
    assert not back_cfg.moe.expert_bias_in_selection  # read back as the release computes it


def _save_megatron(path, cfg, state):
    from megatron_grove.checkpointing.model_io import save_megatron_checkpoint

    save_megatron_checkpoint(path, cfg, state)


def convert(*args: str) -> subprocess.CompletedProcess:
    return run_script("tools/convert_checkpoint.py", *args, "--no-progress")


@pytest.mark.e2e
def test_release_flavour_refuses_in_one_line_and_drops_the_bias_on_request(tmp_path):
    """A Megatron checkpoint with adjugates of 32 and a selecting non-zero bias: refused (exit
    2, both differences named); with adjugates of 128 and --drop-expert-bias: written after
    reporting the selections that change, the bias values kept, and --verify agrees with the
    source computed without the bias in selection."""
    for name, overrides in (("small", ["moe.adjugate_ffn_hidden_size=32"]), ("ok", [])):
        cfg = load_config(None, RELEASABLE + overrides)
        in_world(_save_megatron, str(tmp_path / name), cfg, random_model_state(cfg, seed=4))
    proc = convert("--source-format", "megatron", "--target-format", "hf", "--input",
                   str(tmp_path / "small"), "--output", str(tmp_path / "out"),
                   "--hf-flavour", "release")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "convert_checkpoint.py: error: --hf-flavour release: the released GroveMoE code cannot "
        "compute this model exactly: adjugate size 32 (release: 128); a non-zero expert bias "
        "used in selection (release: never reads it; --drop-expert-bias drops it from "
        "selection)")
    assert not (tmp_path / "out").exists()

    proc = convert("--source-format", "megatron", "--target-format", "hf", "--input",
                   str(tmp_path / "ok"), "--output", str(tmp_path / "rel"),
                   "--hf-flavour", "release", "--drop-expert-bias", "--verify")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    dropped = next(line for line in lines if line.startswith("--drop-expert-bias: "))
    changed, total = (int(w) for w in dropped.split()[1:4:2])
    assert 0 < changed < total == 256 * 2 * 2  # 256 tokens x 2 MoE layers x top-2
    verify = next(line for line in lines if line.startswith("verify: "))
    assert "moe.expert_bias_in_selection=False" in verify and "top-5 agreement 1.0000" in verify
    config = json.loads((tmp_path / "rel" / "config.json").read_text())
    assert config["architectures"] == ["GroveMoeForCausalLM"]
    assert all_tensors(tmp_path / "rel")["model.layers.0.mlp.expert_bias"].abs().sum() > 0
