"""tools/convert_checkpoint.py: GroveMoE both ways, upcycling (same function as the source),
a Grove checkpoint against an independent plain-torch reference of the Grove formula,
Megatron checkpoints loading at another EP size, refusing bad input."""

import copy
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from grove_reference import GroveWeights, grove_forward
from megatron_grove.checkpointing.model_io import load_megatron_model
from megatron_grove.evaluation import perplexity
from megatron_grove.hf_conversion import load_hf_checkpoint
from processes import FAST, ROOT, in_world, losses, run_distributed, run_script, torchrun
from tiny_models import all_tensors, hf_perplexity, random_tokens, tiny_qwen3_moe
from tiny_models import our_perplexity as state_perplexity

SEQ = 32
E, G, FA, LAM = 8, 4, 16, 0.05


def convert(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = run_script("tools/convert_checkpoint.py", *args, "--no-progress")
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def our_perplexity(folder: Path, tokens) -> float:
    cfg, state = load_hf_checkpoint(folder)
    return state_perplexity(cfg, state, tokens, SEQ)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3") / "hf"
    return folder, tiny_qwen3_moe(folder)


@pytest.fixture(scope="module")
def grove_hf(qwen3_moe, tmp_path_factory):
    """The Qwen3-MoE checkpoint as a GroveMoE one in our format: G=4 groups (not the released 2
    experts per group), adjugate FFN 16, non-zero adjugates and an expert bias that selects."""
    source, _ = qwen3_moe
    folder = tmp_path_factory.mktemp("grove") / "hf"
    folder.mkdir()
    tensors = all_tensors(source)
    gen = torch.Generator().manual_seed(7)
    for i in range(2):
        prefix = f"model.layers.{i}.mlp"
        tensors[f"{prefix}.expert_bias"] = torch.randn(E, generator=gen) * 0.05
        for g in range(G):
            for proj, shape in [("gate_proj", (FA, 64)), ("up_proj", (FA, 64)),
                                ("down_proj", (64, FA))]:
                tensors[f"{prefix}.chunk_experts.{g}.{proj}.weight"] = (
                    torch.randn(*shape, generator=gen) * 0.3)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config.update(num_expert_groups=G, adjugate_intermediate_size=FA, adjugate_scale=LAM,
                  expert_bias_in_selection=True)  # our format: the bias selects
    (folder / "config.json").write_text(json.dumps(config))
    return folder, tensors


class ReferenceGroveMLP(torch.nn.Module):
    """A decoder layer's MLP computed token by token by tests/grove_reference.py."""

    def __init__(self, tensors: dict, layer: int) -> None:
        super().__init__()
        p = f"model.layers.{layer}.mlp"

        def fc1(name):
            return torch.cat([tensors[f"{name}.gate_proj.weight"], tensors[f"{name}.up_proj.weight"]])

        self.weights = GroveWeights(
            router=tensors[f"{p}.gate.weight"],
            expert_fc1=torch.stack([fc1(f"{p}.experts.{e}") for e in range(E)]),
            expert_fc2=torch.stack([tensors[f"{p}.experts.{e}.down_proj.weight"] for e in range(E)]),
            adjugate_fc1=torch.stack([fc1(f"{p}.chunk_experts.{g}") for g in range(G)]),
            adjugate_fc2=torch.stack([tensors[f"{p}.chunk_experts.{g}.down_proj.weight"]
                                      for g in range(G)]))
        self.bias = tensors[f"{p}.expert_bias"]

    def forward(self, x):
        y = grove_forward(x.reshape(-1, x.shape[-1]), self.weights, 2, G, LAM, "softmax",
                          self.bias).y
        return y.reshape(x.shape)


def test_grove_checkpoint_matches_reference_formula(qwen3_moe, grove_hf):
    hf_model = copy.deepcopy(qwen3_moe[1])  # the fixture's model stays Qwen3-MoE
    folder, tensors = grove_hf
    tokens = random_tokens(300, seed=3)
    for i, layer in enumerate(hf_model.model.layers):  # attention etc. stay transformers'
        layer.mlp = ReferenceGroveMLP(tensors, i)
    expected = hf_perplexity(hf_model, tokens, SEQ)
    cfg, _ = load_hf_checkpoint(folder)
    assert (cfg.moe.num_expert_groups, cfg.moe.adjugate_ffn_hidden_size, cfg.moe.adjugate_scale
            ) == (G, FA, LAM)
    assert our_perplexity(folder, tokens) == pytest.approx(expected, rel=1e-4)


@pytest.mark.e2e
def test_grove_hf_megatron_hf_round_trip_any_ep(grove_hf, tmp_path):
    folder, tensors = grove_hf
    convert("--source-format", "hf", "--target-format", "megatron", "--input", str(folder),
            "--output", str(tmp_path / "mg"), "--target-ep", "2")
    convert("--source-format", "megatron", "--target-format", "megatron", "--input",
            str(tmp_path / "mg"), "--output", str(tmp_path / "mg4"), "--target-ep", "4")
    convert("--source-format", "megatron", "--target-format", "hf", "--input",
            str(tmp_path / "mg4"), "--output", str(tmp_path / "back"))
    back = all_tensors(tmp_path / "back")
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[n], tensors[n]) for n in tensors)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["num_expert_groups"], config["adjugate_intermediate_size"],
            config["adjugate_scale"]) == (G, FA, LAM)

    def ppl_at_ep2(rank, path, tokens):
        cfg, model = load_megatron_model(path)
        return perplexity(model, tokens, SEQ, cfg.model.vocab_size, progress=False).ppl

    tokens = random_tokens(300, seed=4)
    at_ep2 = run_distributed(ppl_at_ep2, world_size=2, expert_parallel=2,
                             args=(str(tmp_path / "mg"), tokens))
    assert at_ep2[0] == pytest.approx(our_perplexity(folder, tokens), rel=1e-6)


@pytest.mark.e2e
def test_upcycled_model_has_the_source_perplexity(qwen3_moe, tmp_path):
    folder, hf_model = qwen3_moe
    convert("--source-format", "hf", "--target-format", "hf", "--input", str(folder),
            "--output", str(tmp_path / "grove"), "--upcycle-grove", "--num-expert-groups", "4",
            "--adjugate-ffn-hidden-size", "16", "--adjugate-scale", "0.5", "--seed", "3")
    out = all_tensors(tmp_path / "grove")
    source = all_tensors(folder)
    assert all(torch.equal(out[n], source[n]) for n in source)  # everything copied
    gate_up = torch.cat([out[f"model.layers.{i}.mlp.chunk_experts.{g}.{p}.weight"].flatten()
                         for i in range(2) for g in range(4) for p in ("gate_proj", "up_proj")])
    assert gate_up.std().item() == pytest.approx(0.006, rel=0.1)
    assert all(not out[f"model.layers.{i}.mlp.chunk_experts.{g}.down_proj.weight"].any()
               for i in range(2) for g in range(4))
    tokens = random_tokens(600, seed=5)
    assert our_perplexity(tmp_path / "grove", tokens) == pytest.approx(
        hf_perplexity(hf_model, tokens, SEQ), rel=1e-5)


@pytest.mark.e2e
def test_refuses_non_empty_output_and_bad_arguments(qwen3_moe, tmp_path):
    folder, _ = qwen3_moe
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    proc = convert("--source-format", "hf", "--target-format", "megatron", "--input", str(folder),
                   "--output", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"convert_checkpoint.py: error: --output {tmp_path / 'out'}: "
                                   "exists and is not empty; refusing to overwrite (choose a new "
                                   "folder or empty it)")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    proc = convert("--source-format", "hf", "--target-format", "hf", "--input", str(folder),
                   "--output", str(tmp_path / "g"), "--upcycle-grove", "--num-expert-groups", "3",
                   "--adjugate-ffn-hidden-size", "16", "--adjugate-scale", "0.05", check=False)
    last = proc.stderr.strip().splitlines()[-1]  # torch may log a CUDA notice at import
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last.startswith("convert_checkpoint.py: error: moe.num_expert_groups=3: must divide "
                           "moe.num_experts=8")
    assert not (tmp_path / "g").exists()


def _model_only_checkpoint(path: str, overrides: list) -> None:
    from megatron_grove.config import load_config
    from megatron_grove.checkpointing.model_io import (
        build_model,
        model_state_dict,
        save_megatron_checkpoint,
    )

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", overrides)
    model = build_model(cfg, initialize=True)
    state = model_state_dict(model, cfg)
    state["output_layer.weight"] = torch.zeros_like(state["output_layer.weight"])
    save_megatron_checkpoint(path, cfg, state)


@pytest.mark.e2e
@pytest.mark.parametrize("layout", [
    ("parallel.expert_model_parallel_size=2",),
    ("parallel.expert_model_parallel_size=1", "parallel.tensor_model_parallel_size=2",
     "parallel.sequence_parallel=true"),
], ids=["ep2", "tp2"])
def test_training_starts_from_a_model_only_checkpoint(tmp_path, layout):
    """checkpoint.load of a converted (model-only, TP = EP = 1) checkpoint, at EP=2 or TP=2,
    loads its weights and starts at step 1: with a zero output layer every logit is 0, so the
    first loss is ln(V)."""
    overrides = FAST + ["model.vocab_size=4096", "train.iters=2", "train.lr_warmup_iters=1"]
    in_world(_model_only_checkpoint, str(tmp_path / "ckpt"), overrides)
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").is_file()
    torchrun(*layout, "train.iters=2", "train.lr_warmup_iters=1",
             f"checkpoint.load={tmp_path / 'ckpt'}",
             f"logging.dir={tmp_path / 'log'}")
    assert sorted(losses(tmp_path / "log")) == [1, 2]
    assert losses(tmp_path / "log")[1] == pytest.approx(math.log(4096), rel=1e-6)


def test_vocabulary_padding_does_not_depend_on_tp():
    """Checkpoints hold the padded embedding, so its size must not change with TP (<= 8)."""
    from megatron_grove.model import padded_vocab_size

    assert {padded_vocab_size(300, tp) for tp in (1, 2, 4, 8)} == {1024}
    assert {padded_vocab_size(151936, tp) for tp in (1, 2, 4, 8)} == {152576}
    assert padded_vocab_size(300, 16) == 2048

