"""Prompt formatting and tokenization of training rows (chat template or Alpaca; response-only targets),
single exchanges and multi-turn conversations (every assistant turn is a response, nothing else)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mixray.algorithms.batching import length_sorted_chunks, sft_batch
from mixray.algorithms.ifd import IGNORE_INDEX
from mixray.models.sft import SFTEncoder, encode_example, load_tokenizer
from mixray.models.text import ALPACA_PROMPT, conversation
from mixray.schema import EXAMPLE_SCHEMA

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "The answer is 5."},
        {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}]


def _responses(tok, ids, spans) -> list[str]:
    return [tok.decode(ids[s:e]) for s, e in zip(spans[::2], spans[1::2], strict=True)]


def test_chat_template_prompt_then_response_and_eos(smollm_tokenizer_dir):
    tok = load_tokenizer(str(smollm_tokenizer_dir))
    ids, spans, cut = encode_example(tok, "Add 2 and 3.", "", "The answer is 5.", 256)
    assert not cut and spans == [spans[0], len(ids)]
    prompt = tok.decode(ids[:spans[0]])
    assert prompt.startswith("<|im_start|>") and prompt.rstrip().endswith("<|im_start|>assistant")
    assert "Add 2 and 3." in prompt
    assert tok.decode(ids[spans[0]:-1]) == "The answer is 5."
    assert ids[-1] == tok.eos_token_id


def test_alpaca_template_without_chat_template(smollm_tokenizer_dir):
    tok = load_tokenizer(str(smollm_tokenizer_dir))
    tok.chat_template = None
    ids, spans, _ = encode_example(tok, "Name a colour.", "in French", "rouge", 256)
    assert tok.decode(ids[:spans[0]], skip_special_tokens=True) == ALPACA_PROMPT.format(
        ctx=", paired with an input that provides further context", instruction="Name a colour.",
        input_block="### Input:\nin French\n\n")
    assert tok.decode(ids[spans[0]:-1]) == "rouge"


def test_multi_turn_targets_are_every_assistant_turn_and_nothing_else(smollm_tokenizer_dir):
    """The sequence is the chat template's rendering of the whole conversation; the targets are
    exactly the three replies (+ their end-of-turn token), never a user turn or the template."""
    tok = load_tokenizer(str(smollm_tokenizer_dir))
    ids, spans, cut = encode_example(tok, "Hi", "", "Hello! How can I help?", 512, CHAT)
    assert not cut and len(spans) == 6
    assert tok.decode(ids) == tok.apply_chat_template(CHAT, tokenize=False).rstrip("\n")
    assert _responses(tok, ids, spans) == [t["content"] + "<|im_end|>" for t in CHAT[1::2]]
    targets = sft_batch([ids], [spans], pad_id=tok.pad_token_id)["targets"][0].tolist()
    trained = [i + 1 for i, t in enumerate(targets) if t != IGNORE_INDEX]  # positions of predicted tokens
    assert trained == [p for s, e in zip(spans[::2], spans[1::2], strict=True) for p in range(s, e)]
    assert all(targets[p - 1] == ids[p] for p in trained)
    text_between = tok.decode(ids[spans[1]:spans[2]])
    assert "Add 2 and 3." in text_between and "<|im_start|>assistant" in text_between
    # the first exchange alone (no messages) is the same tokens as the conversation's start
    first, first_spans, _ = encode_example(tok, "Hi", "", "Hello! How can I help?", 512)
    assert first == ids[:spans[1]] and first_spans == spans[:2]


def test_multi_turn_alpaca_and_truncation(smollm_tokenizer_dir):
    tok = load_tokenizer(str(smollm_tokenizer_dir))
    tok.chat_template = None
    ids, spans, _ = encode_example(tok, "Hi", "", "x", 512, CHAT)
    assert _responses(tok, ids, spans) == [t["content"] + tok.eos_token for t in CHAT[1::2]]
    assert "### Instruction:\nAdd 2 and 3.\n\n### Response:\n" in tok.decode(ids[spans[1]:spans[2]])
    # a budget that ends inside the second reply: the first exchange whole, the second reply cut, no third
    tok = load_tokenizer(str(smollm_tokenizer_dir))
    full, full_spans, _ = encode_example(tok, "Hi", "", "x", 512, CHAT)
    limit = full_spans[2] + 2
    ids, spans, cut = encode_example(tok, "Hi", "", "x", limit, CHAT)
    assert cut and len(ids) == limit and spans == [*full_spans[:3], limit] and ids == full[:limit]
    # a budget that ends inside the second user turn: that turn is dropped, not trained on
    ids, spans, cut = encode_example(tok, "Hi", "", "x", full_spans[1] + 3, CHAT)
    assert cut and ids == full[:full_spans[1]] and spans == full_spans[:2]


def test_conversation_normalises_messages():
    turns = [{"role": "assistant", "content": "Welcome!"},            # before any user turn: dropped
             {"role": "system", "content": "Be brief."},             # not first: dropped
             {"role": "user", "content": "a"}, {"role": "user", "content": "b"},  # joined
             {"role": "assistant", "content": " "},                  # empty: dropped
             {"role": "assistant", "content": "c"},
             {"role": "user", "content": "unanswered"}]              # after the last reply: dropped
    assert conversation("a", "", "c", turns) == [{"role": "user", "content": "a\n\nb"},
                                                 {"role": "assistant", "content": "c"}]
    sys_first = [{"role": "system", "content": "S"}, *CHAT[:2]]
    assert conversation("Hi", "", "x", sys_first) == sys_first
    assert conversation("Do it", "now", "ok", None) == [{"role": "user", "content": "Do it\nnow"},
                                                        {"role": "assistant", "content": "ok"}]
    assert conversation("q", "", "a", [{"role": "user", "content": "q"}]) == conversation("q", "", "a")


def test_encoder_batch_truncates_and_counts(smollm_tokenizer_dir):
    enc = SFTEncoder(str(smollm_tokenizer_dir), max_length=64)
    msgs = pa.array([None, None, CHAT], EXAMPLE_SCHEMA.field("messages").type)
    t = pa.table({"row": [0, 1, 2], "is_mix": [False, True, False],
                  "instruction_a": ["Hi", "Explain gravity.", "Hi"], "input_a": ["", "", ""],
                  "output_a": ["Hello!", " ".join(["falls"] * 80), "Hello! How can I help?"],
                  "messages_a": msgs,
                  "instruction_b": ["", "Add 1 and 1.", ""], "input_b": ["", "", ""], "output_b": ["", "2", ""],
                  "messages_b": pa.nulls(3, msgs.type)})
    out = enc(t)
    assert out.column_names == ["row", "is_mix", "ids_a", "spans_a", "ids_b", "spans_b", "truncated"]
    lens = [len(x) for x in out.column("ids_a").to_pylist()]
    assert lens[1] == 64 and lens[0] < 64
    assert out.column("truncated").to_pylist() == [0, 1, 1]  # the conversation does not fit in 64
    assert out.column("ids_b").to_pylist()[0] == [] and len(out.column("ids_b").to_pylist()[1]) > 0
    assert len(out.column("spans_a").to_pylist()[2]) == 4  # two replies fit, the third is dropped


def test_length_sorted_chunks_cover_every_row_once_longest_first():
    lengths = [5, 40, 12, 40, 3, 256, 7]
    chunks = length_sorted_chunks(lengths, 3)
    assert [c.tolist() for c in chunks] == [[5, 1, 3], [2, 6, 0], [4]]  # ties keep input order
    # padded tokens sum_c |c| * max_c L: 3*256 + 3*12 + 1*3, against 3*40 + 3*256 + 1*7 in input order
    assert sum(len(c) * max(lengths[i] for i in c) for c in chunks) == 807
    assert length_sorted_chunks([], 4) == []
    with pytest.raises(ValueError, match="chunk size"):
        length_sorted_chunks(lengths, 0)
    rng = np.random.default_rng(0)
    many = rng.integers(1, 300, 1000)
    assert sorted(np.concatenate(length_sorted_chunks(many, 64)).tolist()) == list(range(1000))
