"""End-to-end supervised fine-tuning under real torchrun (2 gloo processes) on chat data made
from the embedded plays: the logged loss tokens, EP=1 vs EP=2, exact resume, and chat
generation from the checkpoint and from its Hugging Face export."""

import json

import pytest

from processes import losses, run_script, torchrun
from megatron_grove.checkpointing.checkpoint import latest_iteration
from megatron_grove.data import build_gpt_datasets
from megatron_grove.data.chat import ChatTemplate
from megatron_grove.data.chat_preprocess import preprocess_chat
from megatron_grove.data.play_chat import play_chat_records
from megatron_grove.data.tokenizer import load_tokenizer
from megatron_grove.training.data import micro_batches
from megatron_grove.training.metrics import read_metrics

pytestmark = pytest.mark.e2e

SEQ = 128


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("play_chat")
    train, valid = play_chat_records(per_play=40)
    for name, records in (("train", train), ("valid", valid)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        preprocess_chat([str(folder / f"{name}.jsonl")], str(folder / name), progress=False)
    return folder


def _sft(chat_data, *overrides, check=True):
    return torchrun(f"model.seq_length={SEQ}", "train.per_token_loss=true",
                    f"data.path={chat_data / 'train'}", f"data.valid_path={chat_data / 'valid'}",
                    "data.split=null", "train.eval_interval=4", "train.eval_iters=2", *overrides,
                    check=check)


@pytest.fixture(scope="module")
def sft_ep2(chat_data, tmp_path_factory):
    """8 uninterrupted SFT steps at EP=2, checkpointed at the end."""
    run = tmp_path_factory.mktemp("sft_ep2")
    _sft(chat_data, "parallel.expert_model_parallel_size=2", f"checkpoint.save={run / 'ckpt'}",
         f"logging.dir={run / 'log'}")
    return run


def test_loss_tokens_are_the_assistant_tokens_of_each_global_batch(chat_data, sft_ep2, tmp_path):
    """metrics.jsonl's loss_tokens = the masked-in tokens of the step's samples, recounted here
    from Megatron's datasets as the run built them; validation scores the same every time."""
    train, valid = build_gpt_datasets(([str(chat_data / "train")], None),
                                      ([str(chat_data / "valid")], None), None, SEQ, (64, 16),
                                      1234, load_tokenizer(), cache_dir=str(tmp_path))
    records = read_metrics(sft_ep2 / "log" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        expected = sum(int(b["loss_mask"].sum()) for b in micro_batches(train, r["step"], 8, 2,
                                                                         0, 1))
        assert r["loss_tokens"] == expected and 0 < expected < 8 * SEQ / 2
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [4, 8]
    assert {r["val_loss_tokens"] for r in val} == {
        sum(int(b["loss_mask"].sum()) for s in (1, 2) for b in micro_batches(valid, s, 8, 2, 0, 1))}
    assert records[-1]["loss"] < records[0]["loss"] - 0.3


def test_expert_parallel_matches_data_parallel_on_chat_data(chat_data, sft_ep2, tmp_path):
    _sft(chat_data, "parallel.expert_model_parallel_size=1", f"logging.dir={tmp_path}")
    ep1, ep2 = losses(tmp_path), losses(sft_ep2 / "log")
    assert ep1.keys() == ep2.keys()
    for step in ep1:
        assert ep1[step] == pytest.approx(ep2[step], rel=1e-5), step
    val1, val2 = (read_metrics(log / "metrics.jsonl")[-1]["val_loss"]
                  for log in (tmp_path, sft_ep2 / "log"))
    assert val1 == pytest.approx(val2, rel=1e-5)


def test_pipeline_parallel_matches_expert_parallel_on_chat_data(chat_data, sft_ep2, tmp_path):
    """PP=2 (one layer per stage): the loss reports exist on the last stage only; the loss and
    the loss tokens rank 0 logs (first stage) are broadcast from there."""
    _sft(chat_data, "parallel.expert_model_parallel_size=1",
         "parallel.pipeline_model_parallel_size=2", f"logging.dir={tmp_path}")
    pp2, ep2 = (read_metrics(log / "metrics.jsonl") for log in (tmp_path, sft_ep2 / "log"))
    assert [r["step"] for r in pp2] == [r["step"] for r in ep2]
    for a, b in zip(pp2, ep2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a["loss_tokens"] == b["loss_tokens"], a["step"]
        if "val_loss" in b:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5), a["step"]
            assert a["val_loss_tokens"] == b["val_loss_tokens"], a["step"]


def test_resume_is_identical_to_uninterrupted_on_chat_data(chat_data, sft_ep2, tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "log"
    _sft(chat_data, "parallel.expert_model_parallel_size=2", "train.exit_at_iter=4",
         f"checkpoint.save={ckpt}", f"logging.dir={log}")
    _sft(chat_data, "parallel.expert_model_parallel_size=2", f"checkpoint.load={ckpt}",
         f"checkpoint.save={ckpt}", f"logging.dir={log}")
    resumed, straight = losses(log), losses(sft_ep2 / "log")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == straight[step], step
    assert read_metrics(log / "metrics.jsonl")[-1]["val_loss"] == \
        read_metrics(sft_ep2 / "log" / "metrics.jsonl")[-1]["val_loss"]


def test_nonfinite_guard_stops_a_diverging_sft_run_with_a_finite_checkpoint(chat_data, tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "log"
    proc = _sft(chat_data, "parallel.expert_model_parallel_size=2", "train.lr=1e6",
                "train.max_skipped_steps=1", "checkpoint.save_interval=1",
                f"checkpoint.save={ckpt}", f"logging.dir={log}", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]  # the launcher exits with the job's code
    records = read_metrics(log / "metrics.jsonl")
    skipped = [r["step"] for r in records if r["skipped"]]
    assert len(skipped) == 2 and skipped[1] == skipped[0] + 1
    assert latest_iteration(ckpt) == (skipped[0] - 1 or None)  # none saved from a skip on


def test_chat_generation_from_checkpoint_and_its_hf_export(sft_ep2, tmp_path):
    """generate.py --chat renders the user turn with the template (ChatML: the shipped tokenizer
    has none, nor has the export), and the Megatron checkpoint (our model code) and its HF export
    (transformers' generate) answer with the same greedy tokens."""
    hf = tmp_path / "hf"
    proc = run_script("tools/convert_checkpoint.py", "--source-format", "megatron",
                      "--target-format", "hf", "--input", str(sft_ep2 / "ckpt"), "--output",
                      str(hf))
    assert proc.returncode == 0, proc.stderr[-2000:]
    prompt = 'In Macbeth, who speaks the line "So foul and fair a day I have not seen."?'
    outputs = []
    for checkpoint in (sft_ep2 / "ckpt", hf):
        proc = run_script("tools/generate.py", "--checkpoint", str(checkpoint), "--chat",
                          "--system", "Answer briefly.", "--prompt", prompt,
                          "--max-new-tokens", "12", "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ours, theirs = outputs
    assert "transformers" not in ours["backend"] and "generate()" in theirs["backend"]
    template = ChatTemplate.for_tokenizer(None, load_tokenizer())
    expected = template.encode_prompt([{"role": "system", "content": "Answer briefly."},
                                       {"role": "user", "content": prompt}])
    assert ours["prompt_ids"] == theirs["prompt_ids"] == expected
    assert ours["completion_ids"] == theirs["completion_ids"]
    assert ours["answer"] == theirs["answer"]
    assert ours["turn_ended"] == (template.end_of_turn in ours["completion"])


def test_system_without_chat_is_refused_in_one_line(tmp_path):
    proc = run_script("tools/generate.py", "--checkpoint", str(tmp_path), "--prompt", "x",
                      "--system", "s")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "generate.py: error: --system: needs --chat"
