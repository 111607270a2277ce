"""Pipeline parallelism: the tiny model with 4 layers trains the same at PP=2 (1F1B), with
virtual stages (interleaved) and the distributed optimizer, and with TP=2 x PP=2 as at PP=1;
its checkpoints load at other pipeline layouts and continue the run; the non-finite guard is
agreed over the stages. The runs are ``train_step`` on forked gloo workers (the loop around it
is the torchrun test at the end)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from processes import FAST, TINY, in_world, losses, run_distributed, run_script, torchrun
from megatron_grove.checkpointing import TrainState, load_checkpoint, save_checkpoint
from megatron_grove.config import ConfigError, config_to_dict, load_config, validate_layout
from megatron_grove.data import heldout_text_path
from megatron_grove.hf_conversion.hf_checkpoint import load_megatron_state
from megatron_grove.training.metrics import read_metrics
from megatron_grove.runtime import current_runtime
from megatron_grove.training import setup_training, train_step
from megatron_grove.training.loss import reduce_step_loss
from megatron_grove.training.step import forward_step_func
from megatron_grove.training.validation import validation_loss

STEPS = 8
SAVED_AT = 4
PP4 = ["model.num_layers=4", "train.eval_iters=2"]
EP_DEPENDENT_COUNTERS = {"copies_sent_per_token", "intranode_copies_per_token",
                         "internode_copies_per_token"}


def _layout(pp: int = 1, vpp: int | None = None, tp: int = 1, ep: int = 2) -> dict:
    """``run_distributed``'s layout arguments and the matching config overrides."""
    overrides = [f"parallel.pipeline_model_parallel_size={pp}",
                 f"parallel.tensor_model_parallel_size={tp}",
                 f"parallel.expert_model_parallel_size={ep}",
                 f"parallel.sequence_parallel={str(tp > 1).lower()}"]
    if vpp:
        overrides.append(f"parallel.virtual_pipeline_model_parallel_size={vpp}")
    return {"kwargs": dict(pipeline_parallel=pp, virtual_pipeline=vpp, tensor_parallel=tp,
                           expert_parallel=ep), "overrides": overrides}


def _train(rank: int, overrides: list[str], first: int, last: int, save: str | None,
           load: str | None, poison_first_stage_grad: bool = False) -> dict:
    """Steps ``first..last`` of the run (after loading ``load``; saving step SAVED_AT to
    ``save``), then one validation: losses, validation loss, what the steps logged."""
    cfg = load_config(TINY, [*FAST, *PP4, *overrides])
    setup = setup_training(cfg, current_runtime(torch.device("cpu")))
    if load:
        state = load_checkpoint(load, setup.model_chunks, setup.optimizer)
        setup.scheduler.load_state_dict(state.scheduler)
        assert state.step == first - 1
    if poison_first_stage_grad:  # an inf gradient on the first stage's embedding only
        for chunk in setup.model_chunks:
            for name, param in chunk.module.named_parameters():
                if name == "embedding.word_embeddings.weight":
                    param.register_hook(lambda grad: grad * float("inf"))
    forward_step = forward_step_func(cfg, setup.runtime.device)
    out: dict = {"loss": {}, "skipped": [], "expert_load": {}, "counters": {},
                 "layers": [[layer.layer_number for layer in chunk.module.decoder.layers]
                            for chunk in setup.model_chunks]}
    for step in range(first, last + 1):
        result = train_step(setup, cfg, step, forward_step, None)
        out["loss"][step] = result.loss
        out["expert_load"][step] = result.expert_load
        out["counters"][step] = result.counters
        if not result.health.finite:
            out["skipped"].append((step, result.health.nonfinite_grad))
        if save and step == SAVED_AT:
            save_checkpoint(save, setup.model_chunks, setup.optimizer,
                            TrainState(step=step, consumed_samples=step * 8,
                                       scheduler=setup.scheduler.state_dict(),
                                       config=config_to_dict(cfg)))
    out["val_loss"] = reduce_step_loss(validation_loss(cfg, setup.model_chunks, setup.valid_dataset,
                                                       forward_step, setup.dp_rank, setup.dp_size),
                                       cfg.train.per_token_loss).value
    return out


def _run(layout: dict, world: int, first: int = 1, last: int = STEPS, save=None,
         load=None) -> list[dict]:
    return run_distributed(_train, world_size=world, timeout_s=600,
                           args=(layout["overrides"], first, last,
                                 str(save) if save else None, str(load) if load else None),
                           **layout["kwargs"])


def _same_on_every_rank(results: list[dict]) -> dict:
    """The run's figures, the same on every rank (but the layers each holds: ``layers``, one
    list of Megatron's 1-based layer numbers per model chunk and rank)."""
    layers = [out.pop("layers") for out in results]
    for other in results[1:]:
        assert other == results[0]
    return {**results[0], "layers": layers}


def _assert_same_run(actual: dict, expected: dict, steps, same_ep: bool = True,
                     validation: bool = True) -> None:
    """Losses to 1e-5, the same tokens per expert and MoE counters (the copies a token is
    sent in, to any rank, to its node's or to other nodes, depend on the EP size, the expert
    evaluations do not)."""
    for step in steps:
        assert actual["loss"][step] == pytest.approx(expected["loss"][step], rel=1e-5), step
        assert actual["expert_load"][step] == expected["expert_load"][step], step
        for key, values in expected["counters"][step].items():
            if key in EP_DEPENDENT_COUNTERS and not same_ep:
                continue
            assert actual["counters"][step][key] == pytest.approx(values, rel=1e-6), key
    if validation:  # after the last step
        assert actual["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def pp1(tmp_path_factory):
    """PP=1 x EP=2 (2 processes): 8 steps, step 4 saved."""
    root = tmp_path_factory.mktemp("pp1")
    return _same_on_every_rank(_run(_layout(), 2, save=root)), root


@pytest.fixture(scope="module")
def pp2(tmp_path_factory):
    """PP=2 x EP=2 (4 processes): 8 steps, step 4 saved."""
    root = tmp_path_factory.mktemp("pp2")
    return _same_on_every_rank(_run(_layout(pp=2), 4, save=root)), root


def test_pp2_trains_as_pp1(pp1, pp2):
    """Every stage reports the whole run: all 4 layers' expert loads and counters, the last
    stage's loss broadcast to the first."""
    assert len(pp1[0]["expert_load"][1]) == 4
    assert len(pp1[0]["counters"][1]["copies_sent_per_token"]) == 4
    assert pp2[0]["layers"] == [[[1, 2]], [[1, 2]], [[3, 4]], [[3, 4]]]  # rank = pp x 2 + dp
    _assert_same_run(pp2[0], pp1[0], range(1, STEPS + 1))


def test_virtual_stages_with_the_distributed_optimizer_train_as_pp1(pp1):
    """PP=2 x VPP=2 (one layer per model chunk, interleaved schedule) x EP=2, distributed
    optimizer."""
    layout = _layout(pp=2, vpp=2)
    layout["overrides"].append("parallel.use_distributed_optimizer=true")
    run = _same_on_every_rank(_run(layout, 4))
    assert run["layers"] == [[[1], [3]], [[1], [3]], [[2], [4]], [[2], [4]]]
    _assert_same_run(run, pp1[0], range(1, STEPS + 1))


@pytest.mark.parametrize("layout, world", [(_layout(pp=1), 2), (_layout(pp=4, ep=1), 4)],
                         ids=["pp1", "pp4"])
def test_pp2_checkpoint_continues_at_another_pipeline_size(pp1, pp2, layout, world):
    """Saved at PP=2, resumed at PP=1 and PP=4 (model and Adam state resharded): steps 5-8
    are the uninterrupted run's."""
    resumed = _same_on_every_rank(_run(layout, world, first=SAVED_AT + 1, load=pp2[1]))
    _assert_same_run(resumed, pp1[0], range(SAVED_AT + 1, STEPS + 1),
                     same_ep=layout["kwargs"]["expert_parallel"] == 2)


def test_pp1_checkpoint_continues_at_tp2_x_pp2(pp1):
    """Saved at PP=1, resumed at TP=2 x PP=2 x EP=2 (8 processes, sequence parallel): steps
    5-8 are the uninterrupted run's (TP changes Megatron's initialisation, not what loaded
    weights compute)."""
    resumed = _same_on_every_rank(_run(_layout(pp=2, tp=2, ep=2), 8, first=SAVED_AT + 1,
                                       load=pp1[1]))
    _assert_same_run(resumed, pp1[0], range(SAVED_AT + 1, STEPS + 1))


def test_uneven_stages_train_as_pp1(pp1):
    """4 layers as 1 + 3 (parallel.num_layers_in_first_pipeline_stage=1)."""
    layout = _layout(pp=2, ep=1)
    layout["overrides"].append("parallel.num_layers_in_first_pipeline_stage=1")
    run = _same_on_every_rank(_run(layout, 2, last=2))
    assert run["layers"] == [[[1]], [[2, 3, 4]]]
    _assert_same_run(run, pp1[0], [1, 2], same_ep=False, validation=False)


@pytest.mark.parametrize("overrides, message", [
    (["model.num_layers=3", "parallel.pipeline_model_parallel_size=2"],
     "model.num_layers=3: cannot be split over parallel.pipeline_model_parallel_size=2 stages "
     "(first stage None, last stage None); every stage needs the same number of layers, a "
     "multiple of the chunks per stage; set parallel.num_layers_in_first_pipeline_stage / "
     "num_layers_in_last_pipeline_stage for a count that does not divide"),
    (["model.num_layers=4", "parallel.pipeline_model_parallel_size=2",
      "parallel.virtual_pipeline_model_parallel_size=4"],
     "model.num_layers=4: cannot be split over parallel.pipeline_model_parallel_size=2 stages "
     "x virtual_pipeline_model_parallel_size=4 chunks"),
    (["parallel.virtual_pipeline_model_parallel_size=2"],
     "parallel.virtual_pipeline_model_parallel_size=2: needs >= 2 chunks and "
     "parallel.pipeline_model_parallel_size >= 2"),
    (["parallel.num_layers_in_last_pipeline_stage=1"],
     "parallel.num_layers_in_last_pipeline_stage=1: needs "
     "parallel.pipeline_model_parallel_size >= 2"),
])
def test_layer_counts_that_do_not_split_name_the_keys(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(TINY, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_interleaving_needs_whole_micro_batch_groups():
    cfg = load_config(TINY, ["model.num_layers=4", "parallel.pipeline_model_parallel_size=2",
                             "parallel.virtual_pipeline_model_parallel_size=2",
                             "parallel.expert_model_parallel_size=1",
                             "train.global_batch_size=6"])
    with pytest.raises(ConfigError, match="needs a multiple of pipeline_model_parallel_size 2 "
                                          r"micro-batches per data-parallel rank \(now 3"):
        validate_layout(cfg, world_size=2)


def test_a_non_finite_gradient_on_one_stage_skips_the_step_on_all():
    """An inf gradient on the first stage only (the last stage's loss is finite): every rank
    of both stages skips every step, naming the first stage's rank."""
    results = run_distributed(_train, world_size=2, pipeline_parallel=2, timeout_s=300,
                              args=(_layout(pp=2, ep=1)["overrides"], 1, 2, None, None, True))
    for out in results:
        assert out["skipped"] == [(1, (0,)), (2, (0,))]
        assert all(torch.isfinite(torch.tensor(list(out["loss"].values()))))


@pytest.mark.e2e
def test_the_trainer_runs_pp2_and_its_checkpoint_resumes(pp1, tmp_path):
    """torchrun, PP=2 x EP=1 (2 processes): the loop's losses, validation, metrics of every
    stage's layers and final line; its checkpoint resumes the run."""
    run = (*PP4, "parallel.pipeline_model_parallel_size=2",
           "parallel.expert_model_parallel_size=1", f"checkpoint.save={tmp_path / 'ckpt'}",
           "checkpoint.save_interval=4")
    out = torchrun(*run, "train.exit_at_iter=4", f"logging.dir={tmp_path / 'a'}").stdout
    assert f"saved checkpoint step 4 to {tmp_path / 'ckpt'}" in out
    out = torchrun(*run, f"logging.dir={tmp_path / 'a'}").stdout
    assert f"resumed from checkpoint step 4 in {tmp_path / 'ckpt'}" in out
    ran = losses(tmp_path / "a")
    assert sorted(ran) == list(range(1, STEPS + 1))
    for step in ran:
        assert ran[step] == pytest.approx(pp1[0]["loss"][step], rel=1e-5), step
    last = read_metrics(tmp_path / "a" / "metrics.jsonl")[-1]
    assert last["expert_load"] == pp1[0]["expert_load"][STEPS]
    assert len(last["routed_evals_per_token"]) == 4
    assert last["val_loss"] == pytest.approx(pp1[0]["val_loss"], rel=1e-5)
    assert f"validation at step 8/8: loss {last['val_loss']:.4f}" in out
    assert out.splitlines()[-1].startswith(f"done: 4 steps, loss {ran[5]:.4f} -> {ran[8]:.4f}")


@pytest.mark.e2e
def test_tools_read_a_pp2_checkpoint_as_the_pp1_one(pp1, pp2, tmp_path):
    """The converter's reader, tools/evaluate.py and tools/generate.py (one process) read the
    PP=2 checkpoint as the same model as the PP=1 one."""
    saved = {name: in_world(load_megatron_state, str(root))[1]
             for name, root in (("pp1", pp1[1]), ("pp2", pp2[1]))}
    assert saved["pp2"].keys() == saved["pp1"].keys()
    for name, tensor in saved["pp1"].items():
        torch.testing.assert_close(saved["pp2"][name], tensor, rtol=1e-5, atol=1e-6)
    text = tmp_path / "scene.txt"
    text.write_text(Path(heldout_text_path()).read_text()[:4000])
    ppl = {}
    for name, root in (("pp1", pp1[1]), ("pp2", pp2[1])):
        proc = run_script("tools/evaluate.py", "--checkpoint", str(root), "--text", str(text),
                          "--seq-length", "32", "--json", "--no-progress")
        assert proc.returncode == 0, proc.stderr[-2000:]
        ppl[name] = json.loads(proc.stdout.splitlines()[-1])["ppl"]
    assert ppl["pp2"] == pytest.approx(ppl["pp1"], rel=1e-5)
    proc = run_script("tools/generate.py", "--checkpoint", str(pp2[1]), "--prompt", "To be",
                      "--max-new-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1])["completion"]
    proc = run_script("tools/convert_checkpoint.py", "--source-format", "megatron",
                      "--target-format", "hf", "--input", str(pp2[1]), "--output",
                      str(tmp_path / "hf"), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 4
