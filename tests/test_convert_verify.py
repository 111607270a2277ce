"""The converter's --verify: source and target logits compared after writing (cosine, max abs
difference, top-5 agreement); a deliberately perturbed tensor is caught (exit code 1)."""

import pytest

from config_builders import grove_family_config
from processes import ROOT, in_world, run_python
from tiny_models import random_model_state

PERTURBED = "model.layers.1.self_attn.o_proj.weight"


def _megatron_checkpoint(path: str, cfg, state) -> None:
    from megatron_grove.checkpointing.model_io import save_megatron_checkpoint

    save_megatron_checkpoint(path, cfg, state)


@pytest.fixture(scope="module")
def megatron_checkpoint(tmp_path_factory):
    cfg = grove_family_config("tiny_cpu", "model.seq_length=64")
    path = tmp_path_factory.mktemp("verify") / "mg"
    in_world(_megatron_checkpoint, str(path), cfg, random_model_state(cfg, seed=6))
    return path


def _convert(source: str, output: str, perturb: bool):
    import megatron_grove.hf_conversion.hf_checkpoint as hf_checkpoint
    from megatron_grove.hf_conversion.convert import Conversion, convert_checkpoint

    if perturb:  # a converter that writes one tensor wrong
        mapping = hf_checkpoint.megatron_to_hf

        def wrong(*args, **kwargs):
            out = mapping(*args, **kwargs)
            out[PERTURBED] = out[PERTURBED] * 1.05
            return out

        hf_checkpoint.megatron_to_hf = wrong
    result = convert_checkpoint(Conversion("megatron", "hf", source, output, verify=True,
                                           verify_tokens=128), progress=False)
    return result.lines, result.comparison


def test_verify_agrees_on_a_faithful_conversion_and_catches_a_perturbed_tensor(
        megatron_checkpoint, tmp_path):
    lines, good = in_world(_convert, str(megatron_checkpoint), str(tmp_path / "good"), False)
    assert good.problems() == [] and good.positions == 128
    assert good.cosine_min > 0.99999 and good.top5_agreement == 1.0
    assert good.max_abs_diff < 1e-5 * max(1.0, good.scale)
    assert lines[-1].startswith("verify: source (our model code) vs target (transformers ")
    _, bad = in_world(_convert, str(megatron_checkpoint), str(tmp_path / "bad"), True)
    assert bad.problems(), bad.describe()


@pytest.mark.e2e
def test_verify_exits_1_on_disagreement(megatron_checkpoint, tmp_path):
    """The real tool, with the same wrong tensor injected into its process."""
    code = f"""
import runpy, sys
import megatron_grove.hf_conversion.hf_checkpoint as hf_checkpoint
mapping = hf_checkpoint.megatron_to_hf
def wrong(*args, **kwargs):
    out = mapping(*args, **kwargs)
    out[{PERTURBED!r}] = out[{PERTURBED!r}] * 1.05
    return out
hf_checkpoint.megatron_to_hf = wrong
sys.argv = ["convert_checkpoint.py", "--source-format", "megatron", "--target-format", "hf",
            "--input", {str(megatron_checkpoint)!r}, "--output", {str(tmp_path / "bad")!r},
            "--verify", "--no-progress"]
runpy.run_path({str(ROOT / "tools" / "convert_checkpoint.py")!r}, run_name="__main__")
"""
    proc = run_python(code)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "convert_checkpoint.py: verification failed: source and target disagree (" in (
        proc.stderr)
    assert any(line.startswith("verify: ") for line in proc.stdout.splitlines())
    assert (tmp_path / "bad" / "config.json").is_file()  # kept for inspection
