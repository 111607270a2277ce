"""The routing choices a checkpoint was trained with (score function, norm_topk_prob, expert
bias in selection) are stored with it and kept on resume: a resumed run that routes otherwise
is refused in one line; a run starting from a model-only checkpoint may change them, and says
so."""

import pytest

from megatron_grove.checkpointing import CheckpointError, TrainState
from megatron_grove.config import config_to_dict, load_config, routing_differences
from megatron_grove.training.resume import check_resume_routing
from processes import torchrun


def test_routing_differences_name_each_key_and_default_missing_ones():
    saved = config_to_dict(load_config(None, ["moe.router_score_function=sigmoid",
                                              "moe.expert_bias_in_selection=false"]))
    run = load_config(None, ["moe.norm_topk_prob=false"])
    assert routing_differences(saved, run) == [
        "moe.router_score_function=sigmoid (this run: softmax)",
        "moe.norm_topk_prob=true (this run: false)",
        "moe.expert_bias_in_selection=false (this run: true)"]
    older = config_to_dict(load_config(None))  # a checkpoint written before these keys existed
    for key in ("norm_topk_prob", "expert_bias_in_selection"):
        del older["moe"][key]
    assert routing_differences(older, load_config(None)) == []


def test_resume_refuses_other_routing_and_model_only_start_notes_it(capsys):
    saved = config_to_dict(load_config(None, ["moe.expert_bias_in_selection=false"]))
    run = load_config(None)
    with pytest.raises(CheckpointError, match=r"^checkpoint.load=ckpt: this run routes "
                       r"differently from the run it resumes: moe.expert_bias_in_selection=false "
                       r"\(this run: true\); set those keys"):
        check_resume_routing("ckpt", TrainState(4, 32, {"last": 4}, saved), run, True)
    check_resume_routing("ckpt", TrainState(0, 0, None, saved), run, True)
    assert capsys.readouterr().out == (
        "note: starting from the model-only checkpoint ckpt with other routing than it was saved "
        "with: moe.expert_bias_in_selection=false (this run: true)\n")


@pytest.mark.e2e
def test_torchrun_resume_with_another_score_function_exits_2(tmp_path):
    torchrun("parallel.expert_model_parallel_size=2", "train.exit_at_iter=2",
             f"checkpoint.save={tmp_path / 'ckpt'}", f"logging.dir={tmp_path / 'log'}")
    proc = torchrun("parallel.expert_model_parallel_size=2", "moe.router_score_function=sigmoid",
                    f"checkpoint.load={tmp_path / 'ckpt'}", f"logging.dir={tmp_path / 'log2'}",
                    check=False)
    assert proc.returncode != 0 and "[rank0]: Traceback" not in proc.stderr
    ours = [line for line in proc.stderr.splitlines() if "checkpoint error" in line]
    assert len(ours) == 1 and ours[0].endswith(
        "moe.router_score_function=softmax (this run: sigmoid); set those keys to the "
        "checkpoint's values (start from a model-only checkpoint, e.g. "
        "tools/convert_checkpoint.py's output, to change them)")
