"""Chat data for supervised fine-tuning: templates and loss masks (against transformers'
apply_chat_template), tools/preprocess_data.py --chat (bad records, nothing half-written),
packing whole conversations, the packed samples Megatron's datasets serve (mask, attention,
positions; blends with plain text), attention isolation in the real model, and the per-token
loss reduction."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

from processes import ROOT, in_world, run_distributed, run_script
from megatron_grove.data import build_gpt_datasets, tokenize_to_indexed_dataset
from megatron_grove.data.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ChatRecordError,
    ChatTemplate,
    conversation_of,
    is_chat_prefix,
)
from megatron_grove.data.chat_dataset import pack_conversations
from megatron_grove.data.chat_preprocess import preprocess_chat
from megatron_grove.data.preprocess import InputError
from megatron_grove.data.tokenizer import default_tokenizer_path, load_tokenizer
from megatron_grove.generation import Sampling, generate_with_logits
from megatron_grove.training.loss import StepLoss

CONVERSATION = [{"role": "system", "content": "Answer from the text."},
                {"role": "user", "content": "Who speaks the line \"Beware the Ides of March\"?"},
                {"role": "assistant", "content": "Soothsayer."},
                {"role": "user", "content": "And what line comes after it?"},
                {"role": "assistant", "content": "What man is that?"}]

# A non-ChatML template, written as Hugging Face tokenizers carry them (Llama-3 style headers,
# the end-of-turn marker from the special tokens, whitespace control).
HEADER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def _hf_tokenizer_dir(tmp_path, template=None, jinja_file=None):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(default_tokenizer_path(), folder / "tokenizer.json")
    config = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    if template:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja_file:
        (folder / "chat_template.jinja").write_text(jinja_file)
    return folder


def test_default_template_masks_the_assistant_turns_and_their_end():
    tokenizer = load_tokenizer()
    template = ChatTemplate.for_tokenizer(None, tokenizer)
    assert template.template == DEFAULT_CHAT_TEMPLATE and template.end_of_turn == "<|im_end|>"
    encoded = template.encode(CONVERSATION)
    assert encoded.ids[-1] == tokenizer.eod and encoded.loss_mask[-1] == 0
    assert tokenizer.decode(encoded.ids[:-1]) == template.render(CONVERSATION)
    masked = tokenizer.decode(encoded.ids[encoded.loss_mask == 1])
    assert masked == "Soothsayer.<|im_end|>\nWhat man is that?<|im_end|>\n"
    unmasked = tokenizer.decode(encoded.ids[encoded.loss_mask == 0])
    assert "Beware the Ides" in unmasked and "Soothsayer" not in unmasked
    # a prompt for generation tokenises exactly as the same text did in training
    prompt = template.encode_prompt(CONVERSATION[:2])
    assert list(encoded.ids[:len(prompt)]) == prompt
    assert encoded.loss_mask[len(prompt) - 1] == 0 and encoded.loss_mask[len(prompt)] == 1


@pytest.mark.parametrize("where", ["tokenizer_config", "chat_template.jinja"])
def test_tokenizer_template_renders_as_transformers_applies_it(tmp_path, where):
    from transformers import PreTrainedTokenizerFast

    folder = _hf_tokenizer_dir(tmp_path, HEADER_TEMPLATE if where == "tokenizer_config" else
                               "{{ 'unused' }}", HEADER_TEMPLATE if where != "tokenizer_config"
                               else None)
    tokenizer = load_tokenizer(str(folder))
    template = ChatTemplate.for_tokenizer(str(folder), tokenizer)
    peer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   chat_template=HEADER_TEMPLATE)
    for messages, gen in ((CONVERSATION, False), (CONVERSATION[:4], True)):
        assert template.render(messages, gen) == peer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen)
    assert template.end_of_turn == "<|eot_id|>"
    encoded = template.encode(CONVERSATION)
    assert tokenizer.decode(encoded.ids[encoded.loss_mask == 1]) == \
        "Soothsayer.<|eot_id|>What man is that?<|eot_id|>"


@pytest.mark.parametrize("record, why", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"},
                   {"role": "assistant", "content": "x"}]}, "message 1: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": " "},
                   {"role": "assistant", "content": "x"}]}, "message 1 (user): empty content"),
    ({"prompt": "hi", "response": ""}, "message 2 (assistant): empty content"),
    ({"text": "plain"}, "neither 'messages' nor a 'prompt'/'response' pair"),
])
def test_bad_records_say_why(record, why):
    with pytest.raises(ChatRecordError, match="^" + re.escape(why)):
        conversation_of(record)


def test_prompt_response_pair_is_a_conversation():
    assert conversation_of({"system": "s", "prompt": "p", "response": "r"}) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "p"},
        {"role": "assistant", "content": "r"}]


def _chat_jsonl(path, records, extra_lines=()):
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_preprocess_chat_writes_tokens_and_mask(tmp_path):
    records = [{"messages": CONVERSATION}, {"prompt": "Who?", "response": "Brutus."}]
    source = _chat_jsonl(tmp_path / "chat.jsonl", records)
    result = preprocess_chat([str(source)], str(tmp_path / "out"), progress=False)
    assert is_chat_prefix(str(tmp_path / "out"))
    template = ChatTemplate.for_tokenizer(None, load_tokenizer())
    expected = [template.encode(conversation_of(r)) for r in records]
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    tokens, masks = IndexedDataset(str(tmp_path / "out")), IndexedDataset(
        str(tmp_path / "out.loss_mask"))
    assert len(tokens) == len(masks) == 2
    for i, e in enumerate(expected):
        assert np.array_equal(tokens[i], e.ids) and np.array_equal(masks[i], e.loss_mask)
    assert result.loss_tokens == sum(int(e.loss_mask.sum()) for e in expected)
    assert result.tokens == sum(len(e.ids) for e in expected)


def test_bad_record_stops_naming_its_line_and_leaves_nothing(tmp_path):
    source = _chat_jsonl(tmp_path / "chat.jsonl", [{"prompt": "a", "response": "b"}],
                         ["", '{"messages": [{"role": "user", "content": "x"}]}', "{not json"])
    with pytest.raises(InputError, match=r"chat\.jsonl:3: no assistant turn"):
        preprocess_chat([str(source)], str(tmp_path / "out"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]
    result = preprocess_chat([str(source)], str(tmp_path / "out"), skip_bad=True,
                             progress=False)
    assert (result.conversations, result.skipped_bad) == (1, 2)
    assert "chat.jsonl:4: invalid JSON" in result.skipped_examples[1]


@pytest.mark.e2e
def test_preprocess_tool_chat_bad_input_is_one_line_exit_2(tmp_path):
    source = _chat_jsonl(tmp_path / "chat.jsonl", [],
                         ['{"messages": [{"role": "user", "content": "x"}, '
                          '{"role": "assistant", "content": ""}]}'])
    proc = run_script("tools/preprocess_data.py", "--chat", "--input", str(source),
                      "--output-prefix", str(tmp_path / "out"), "--no-progress")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"preprocess_data.py: error: {source}:1: message 2 (assistant): empty content "
        "(--skip-bad leaves such records out)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]


def test_packing_keeps_conversations_whole():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 40, size=200)
    lengths[[7, 50]] = [95, 33]  # longer than a sample / exactly one
    capacity = 33
    samples = pack_conversations(lengths, capacity)
    seen: dict[int, list[tuple[int, int]]] = {}
    for sample in samples:
        assert sum(n for _, _, n in sample) <= capacity
        for doc, offset, n in sample:
            seen.setdefault(doc, []).append((offset, n))
    assert sorted(seen) == list(range(200))  # in order, every document
    for doc, pieces in seen.items():
        if lengths[doc] <= capacity:
            assert pieces == [(0, lengths[doc])]  # whole, in one sample
    # the long one: its own samples, cut every capacity-1 tokens (each label predicted once)
    assert seen[7] == [(0, 33), (32, 33), (64, 31)]
    assert [d for d, _, _ in samples[[i for i, s in enumerate(samples)
                                      if s[0][0] == 7][0]]] == [7]
    # greedy: a sample is closed only when the next conversation does not fit
    for a, b in zip(samples, samples[1:]):
        if lengths[a[0][0]] <= capacity and lengths[b[0][0]] <= capacity:
            assert sum(n for _, _, n in a) + lengths[b[0][0]] > capacity


@pytest.fixture(scope="module")
def chat_prefix(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    from megatron_grove.data.play_chat import play_chat_records
    train, _ = play_chat_records(per_play=15)
    source = _chat_jsonl(folder / "chat.jsonl", train)
    preprocess_chat([str(source)], str(folder / "chat"), progress=False)
    return str(folder / "chat")


def test_packed_samples_carry_mask_attention_and_positions(chat_prefix, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    tokenizer = load_tokenizer()
    seq = 96
    train, _ = build_gpt_datasets(([chat_prefix], None), None, "100,0,0", seq, (40, 0), 5,
                                  tokenizer, cache_dir=str(tmp_path),
                                  create_attention_mask=False)
    tokens, masks = IndexedDataset(chat_prefix), IndexedDataset(chat_prefix + ".loss_mask")
    assert len(train) >= 40
    for i in range(len(train)):
        sample, pieces = train[i], train.samples[i]
        text = np.concatenate([tokens.get(d, o, n) for d, o, n in pieces])
        mask = np.concatenate([masks.get(d, o, n) for d, o, n in pieces])
        used = len(text)
        assert used <= seq + 1
        assert torch.equal(sample["tokens"][:used - 1], torch.from_numpy(text[:-1]).long())
        assert torch.equal(sample["labels"][:used - 1], torch.from_numpy(text[1:]).long())
        starts = np.cumsum([0] + [n for _, _, n in pieces])
        expected_mask = mask[1:].astype(np.float32)
        expected_mask[starts[1:-1] - 1] = 0  # never predict across a boundary
        assert torch.equal(sample["loss_mask"][:used - 1], torch.from_numpy(expected_mask))
        assert not sample["loss_mask"][used - 1:].any()  # padding
        attention = sample["attention_mask"][0]
        for a, b in zip(starts, np.minimum(starts[1:], seq)):
            block = attention[a:b, a:b]
            assert torch.equal(block, torch.ones_like(block).triu(1))  # causal inside
            assert attention[a:b, :a].all()  # nothing earlier
            assert torch.equal(sample["position_ids"][a:b], torch.arange(b - a))


def test_blend_serves_plain_text_as_gpt_dataset_does(chat_prefix, tmp_path):
    tokenizer = load_tokenizer()
    plain = str(tmp_path / "plain")
    tokenize_to_indexed_dataset(["To be, or not to be, that is the question. " * 20] * 6,
                                plain, tokenizer)
    train, _ = build_gpt_datasets(([chat_prefix, plain], [0.5, 0.5]), None, "100,0,0", 64,
                                  (20, 0), 5, tokenizer, cache_dir=str(tmp_path),
                                  create_attention_mask=False)
    kinds = {int(train[i]["dataset_id"]) for i in range(20)}
    assert kinds == {0, 1}
    chat_loss_tokens = 0
    for i in range(20):
        sample = train[i]
        if int(sample["dataset_id"]) == 1:  # plain: every token counts, causal attention
            assert sample["loss_mask"].all()
            assert torch.equal(sample["attention_mask"][0],
                               torch.ones(64, 64, dtype=torch.bool).triu(1))
            assert torch.equal(sample["position_ids"], torch.arange(64))
        else:  # chat: the assistant's tokens only (a long conversation's first piece: none)
            assert sample["loss_mask"].sum() < 64
            chat_loss_tokens += int(sample["loss_mask"].sum())
    assert chat_loss_tokens > 0


def _isolation_losses():
    """Per-token losses of conversation B packed after A (block-diagonal mask) and of B alone."""
    from megatron_grove.config import load_config
    from megatron_grove.megatron_config import to_transformer_config
    from megatron_grove.model import build_gpt_model, causal_attention_mask

    cfg = load_config(str(ROOT / "configs" / "tiny_cpu.yaml"),
                      ["model.seq_length=48", "parallel.expert_model_parallel_size=1"])
    model = build_gpt_model(to_transformer_config(cfg), 4096, 48, seed=3).eval()
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(2, 4096, (20,), generator=gen), torch.randint(2, 4096, (28,), generator=gen)
    packed = torch.cat([a, b])[None]
    segment = torch.tensor([0] * 20 + [1] * 28)
    mask = ~(torch.ones(48, 48, dtype=torch.bool).tril() & (segment[:, None] == segment[None]))
    with torch.no_grad():
        together = model(packed, torch.arange(48)[None], mask[None, None], labels=packed)[0, 20:]
        alone = model(b[None], torch.arange(28)[None], causal_attention_mask(28, "cpu"),
                      labels=b[None])[0]
        leaky = model(packed, torch.arange(48)[None], causal_attention_mask(48, "cpu"),
                      labels=packed)[0, 20:]
    return together, alone, leaky


def test_packed_conversation_attends_only_to_itself():
    """The real model (CPU, Megatron's local attention with our explicit mask): conversation B
    packed after A scores its tokens as B alone does; with the plain causal mask it would not."""
    together, alone, leaky = in_world(_isolation_losses)
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaky, alone, rtol=1e-3, atol=1e-3)


def _step_losses(rank):
    reports = {0: [[6.0, 3.0], [1.0, 1.0]], 1: [[0.0, 0.0], [9.0, 4.0]]}[rank]
    per_token = StepLoss([torch.tensor(r) for r in reports], per_token=True)
    per_micro_batch = StepLoss([torch.tensor(r) for r in reports], per_token=False)
    empty = StepLoss([torch.tensor([0.0, 0.0])], per_token=True)
    return per_token.value, per_token.tokens, per_micro_batch.value, empty.value, float(empty.local)


def test_step_loss_is_the_mean_over_the_global_batch_loss_tokens():
    for value, tokens, per_micro_batch, empty, empty_local in run_distributed(_step_losses, 2):
        assert value == pytest.approx((6 + 1 + 0 + 9) / (3 + 1 + 0 + 4)) and tokens == 8
        # the default: each micro-batch's own mean (0 tokens: 0), averaged
        assert per_micro_batch == pytest.approx(((2 + 1) / 2 + (0 + 9 / 4) / 2) / 2)
        assert math.isnan(empty) and math.isnan(empty_local)  # skipped as non-finite


def test_generation_stops_at_the_end_of_the_turn():
    tokenizer = load_tokenizer()
    template = ChatTemplate.for_tokenizer(None, tokenizer)
    script = tokenizer.encode("Brutus.<|im_end|>\nand more")
    vocab = 4096

    def logits_of(ids):
        step = ids.shape[1] - 3
        out = torch.zeros(1, ids.shape[1], vocab)
        out[0, -1, script[min(step, len(script) - 1)]] = 1.0
        return out

    new = generate_with_logits(logits_of, [5, 6, 7], Sampling(max_new_tokens=40), 64,
                               eos=tokenizer.eod, stop=template.turn_ended)
    assert template.answer_of(tokenizer.decode(new)) == ("Brutus.", True)
    assert "and more" not in tokenizer.decode(new)


def test_stale_loss_mask_is_refused_in_one_line(tmp_path):
    from megatron_grove.config import ConfigError
    from megatron_grove.data import check_sources

    source = _chat_jsonl(tmp_path / "chat.jsonl", [{"prompt": "Who?", "response": "Brutus."}])
    prefix = str(tmp_path / "data")
    preprocess_chat([str(source)], prefix, progress=False)
    check_sources(([prefix], None), None, "100,0,0")  # matching: accepted
    tokenize_to_indexed_dataset(["other text, written over the chat data"], prefix,
                                load_tokenizer())
    with pytest.raises(ConfigError, match=r"^data.path: .*data\.loss_mask does not match .*"
                                          r"tools/preprocess_data\.py --chat$"):
        check_sources(([prefix], None), None, "100,0,0")


def _per_token_gradients(rank, prefix):
    """The trainer's step (Megatron's schedule and finalize_model_grads, 2 data-parallel ranks
    of 2 micro-batches each) vs autograd of the mean over the global batch's loss tokens."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_grove.config import load_config
    from megatron_grove.runtime import current_runtime
    from megatron_grove.training import micro_batches, setup_training
    from megatron_grove.training.step import forward_step_func

    cfg = load_config(str(ROOT / "configs" / "tiny_cpu.yaml"), [
        "model.seq_length=48", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "moe.ffn_hidden_size=64", "parallel.expert_model_parallel_size=1", "train.iters=2",
        "train.lr_warmup_iters=1",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.per_token_loss=true",
        f"data.path={prefix}", "data.split=100,0,0", "train.eval_iters=0"])
    setup = setup_training(cfg, current_runtime(torch.device("cpu")))
    module = setup.model.module
    params = [p for p in module.parameters() if p.requires_grad]
    every = [b for r in range(2) for b in micro_batches(setup.dataset, 1, 8, 2, r, 2)]
    losses = [module(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
              for b in every]
    total = sum((loss * b["loss_mask"]).sum() for loss, b in zip(losses, every))
    tokens = sum(b["loss_mask"].sum() for b in every)
    expected = torch.autograd.grad(total / tokens, params)
    setup.model.zero_grad_buffer()
    batches = micro_batches(setup.dataset, 1, 8, 2, setup.dp_rank, setup.dp_size)
    get_forward_backward_func()(
        forward_step_func=forward_step_func(cfg, torch.device("cpu")),
        data_iterator=iter(batches), model=[setup.model], num_microbatches=len(batches),
        seq_length=48, micro_batch_size=2, forward_only=False)
    worst = max(float((p.main_grad - e).abs().max() / e.abs().max().clamp(min=1e-12))
                for p, e in zip(params, expected))
    uneven = [float(b["loss_mask"].sum()) for b in every]
    return worst, uneven


def test_per_token_loss_gradients_are_those_of_the_global_token_mean(chat_prefix):
    for worst, uneven in run_distributed(_per_token_gradients, 2, args=(chat_prefix,)):
        assert len(set(uneven)) > 1  # micro-batches with different numbers of loss tokens
        assert worst < 1e-5


def test_template_that_rewrites_earlier_turns_is_refused():
    last_only = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(ValueError, match="does not render turn 2 as the continuation"):
        ChatTemplate(last_only, load_tokenizer())
