"""Prompt formatting and tokenization of training rows (chat template or Alpaca; response-only targets)."""

from __future__ import annotations

import pyarrow as pa

from mixray.models.sft import SFTEncoder, encode_example, load_tokenizer
from mixray.models.text import ALPACA_PROMPT


def test_chat_template_prompt_then_response_and_eos(smollm_tokenizer_dir):
    tok = load_tokenizer(str(smollm_tokenizer_dir))
    ids, n_prompt, cut = encode_example(tok, "Add 2 and 3.", "", "The answer is 5.", 256)
    assert not cut
    prompt = tok.decode(ids[:n_prompt])
    assert prompt.startswith("<|im_start|>") and prompt.rstrip().endswith("<|im_start|>assistant")
    assert "Add 2 and 3." in prompt
    assert tok.decode(ids[n_prompt:-1]) == "The answer is 5."
    assert ids[-1] == tok.eos_token_id


def test_alpaca_template_without_chat_template(smollm_tokenizer_dir):
    tok = load_tokenizer(str(smollm_tokenizer_dir))
    tok.chat_template = None
    ids, n_prompt, _ = encode_example(tok, "Name a colour.", "in French", "rouge", 256)
    assert tok.decode(ids[:n_prompt], skip_special_tokens=True) == ALPACA_PROMPT.format(
        ctx=", paired with an input that provides further context", instruction="Name a colour.",
        input_block="### Input:\nin French\n\n")
    assert tok.decode(ids[n_prompt:-1]) == "rouge"


def test_encoder_batch_truncates_and_counts(smollm_tokenizer_dir):
    enc = SFTEncoder(str(smollm_tokenizer_dir), max_length=64)
    t = pa.table({"row": [0, 1], "is_mix": [False, True],
                  "instruction_a": ["Hi", "Explain gravity."], "input_a": ["", ""],
                  "output_a": ["Hello!", " ".join(["falls"] * 80)],
                  "instruction_b": ["", "Add 1 and 1."], "input_b": ["", ""], "output_b": ["", "2"]})
    out = enc(t)
    assert out.column_names == ["row", "is_mix", "ids_a", "prompt_a", "ids_b", "prompt_b", "truncated"]
    lens = [len(x) for x in out.column("ids_a").to_pylist()]
    assert lens[1] == 64 and lens[0] < 64
    assert out.column("truncated").to_pylist() == [0, 1]
    assert out.column("ids_b").to_pylist()[0] == [] and len(out.column("ids_b").to_pylist()[1]) > 0
