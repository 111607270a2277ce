"""Trained tiny checkpoints (real torchrun, softmax and sigmoid routers, a balancing bias that
moved off zero) exported to Hugging Face: stock transformers with the export's modelling code
gives tools/evaluate.py's perplexity (fp32, 1e-5), and tools/generate.py prints the same greedy
text from the Megatron checkpoint and from the export."""

import json

import numpy as np
import pytest
import torch

from megatron_grove.data.datasets import heldout_text_path
from megatron_grove.data.tokenizer import load_tokenizer
from megatron_grove.evaluation import window_perplexity
from processes import run_script, torchrun
from tiny_models import all_tensors

pytestmark = pytest.mark.e2e
SEQ = 32


@pytest.fixture(scope="module", params=("softmax", "sigmoid"))
def trained(request, tmp_path_factory):
    """8 steps of the tiny config (FAST) at EP=2, then its HF export (converter, --verify)."""
    root = tmp_path_factory.mktemp(f"trained_{request.param}")
    torchrun("parallel.expert_model_parallel_size=2", "model.vocab_size=4096",
             f"moe.router_score_function={request.param}", f"checkpoint.save={root / 'mg'}",
             f"logging.dir={root / 'log'}")
    proc = run_script("tools/convert_checkpoint.py", "--source-format", "megatron",
                      "--target-format", "hf", "--input", str(root / "mg"), "--output",
                      str(root / "hf"), "--verify", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "top-5 agreement 1.0000" in proc.stdout
    return root


def test_export_of_trained_checkpoint_has_the_evaluate_tool_perplexity(trained):
    from transformers import AutoModelForCausalLM

    bias = all_tensors(trained / "hf")["model.layers.0.mlp.expert_bias"]
    assert bias.abs().max() > 0  # balancing moved it: it takes part in selection
    text = open(heldout_text_path(), encoding="utf-8").read()[:20000]
    tokens = np.asarray(load_tokenizer(str(trained / "hf")).encode(text)[:16 * SEQ + 1])
    np.save(trained / "tokens.npy", tokens)
    proc = run_script("tools/evaluate.py", "--checkpoint", str(trained / "mg"), "--tokens",
                      str(trained / "tokens.npy"), "--seq-length", str(SEQ), "--json",
                      "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = json.loads(proc.stdout.strip().splitlines()[-1])["ppl"]
    model = AutoModelForCausalLM.from_pretrained(trained / "hf", trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    ppl = window_perplexity(lambda ids: model(ids, use_cache=False).logits, tokens, SEQ).ppl
    assert ppl == pytest.approx(expected, rel=1e-5)


def test_generate_tool_prints_the_same_greedy_text_from_both_formats(trained):
    outputs, eod = {}, load_tokenizer(str(trained / "hf")).eod
    for fmt in ("mg", "hf"):
        proc = run_script("tools/generate.py", "--checkpoint", str(trained / fmt), "--prompt",
                          "HAMLET. To be, or not", "--max-new-tokens", "12", "--json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        printed, _, last = proc.stdout.rstrip("\n").rpartition("\n")
        outputs[fmt] = json.loads(last)
        assert printed == "HAMLET. To be, or not" + outputs[fmt]["completion"]
        ids = outputs[fmt]["completion_ids"]
        assert outputs[fmt]["completion"] and (len(ids) == 12 or ids[-1] == eod)
    assert outputs["mg"]["backend"].startswith("our model code (megatron checkpoint")
    assert outputs["hf"]["backend"].endswith("generate() with KV cache")
    assert outputs["mg"]["completion_ids"] == outputs["hf"]["completion_ids"]
