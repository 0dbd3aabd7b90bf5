"""Supervised fine-tuning examples -> token ids (prompt by the chat template or Alpaca).

``SFTEncoder`` is a Ray Data batch callable (it knows nothing about Ray): its
``__init__`` loads the tokenizer, ``__call__`` maps a pyarrow batch of training
rows (``instruction_a, input_a, output_a`` and, for an MDIT mix, the ``_b``
side, and an optional ``system_a``: a system turn) to ``ids_a, prompt_a, ids_b, prompt_b,
truncated``. A sequence is the
prompt (``prompt_text``: the model's chat template with one user turn when it
has one, the Alpaca template otherwise) followed by the response and the
end-of-sequence token; ``prompt_*`` counts the prompt tokens, so the loss
covers the response tokens only. ``truncate_pair`` fits both into ``max_length``.
"""

from __future__ import annotations

import pyarrow as pa

from mixray.algorithms.batching import truncate_pair
from mixray.models.callables import _load_tokenizer as load_tokenizer  # pad token = EOS if unset
from mixray.models.text import prompt_text

__all__ = ["SFTEncoder", "encode_example", "load_tokenizer"]

TOKEN_COLUMNS = ("ids_a", "prompt_a", "ids_b", "prompt_b", "truncated")


def encode_example(tok, instruction: str, input_: str, output: str, max_length: int,
                   system: str | None = None) -> tuple[list[int], int, bool]:
    """One example -> ``(ids, n_prompt, truncated)`` with ``ids = prompt + response + [eos]``."""
    # A chat template spells out its own special tokens; the Alpaca text gets the tokenizer's BOS.
    special = not getattr(tok, "chat_template", None)
    prompt = tok(prompt_text(tok, instruction, input_, system), add_special_tokens=special)["input_ids"]
    response = tok(output, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        response = response + [tok.eos_token_id]
    prompt, response, cut = truncate_pair(prompt, response, max_length)
    return prompt + response, len(prompt), cut


class SFTEncoder:
    """Ray Data callable: training rows (pyarrow) -> the same rows plus token columns."""

    def __init__(self, model_path: str, max_length: int, trust_remote_code: bool = False):
        self.tok = load_tokenizer(model_path, trust_remote_code)
        self.max_length = max_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = batch.to_pydict()
        out = {k: [] for k in TOKEN_COLUMNS}
        for i in range(batch.num_rows):
            ids, n_p, cut = encode_example(self.tok, cols["instruction_a"][i], cols["input_a"][i],
                                           cols["output_a"][i], self.max_length,
                                           cols["system_a"][i] if "system_a" in cols else None)
            out["ids_a"].append(ids)
            out["prompt_a"].append(n_p)
            n_cut = int(cut)
            if cols["is_mix"][i]:
                ids, n_p, cut = encode_example(self.tok, cols["instruction_b"][i], cols["input_b"][i],
                                               cols["output_b"][i], self.max_length)
                n_cut += int(cut)
            else:
                ids, n_p = [], 0
            out["ids_b"].append(ids)
            out["prompt_b"].append(n_p)
            out["truncated"].append(n_cut)
        keep = [c for c in batch.column_names if c not in TOKEN_COLUMNS and not c.startswith(
            ("instruction_", "input_", "output_", "system_"))]
        table = batch.select(keep)
        for name, typ in (("ids_a", pa.list_(pa.int32())), ("prompt_a", pa.int32()),
                          ("ids_b", pa.list_(pa.int32())), ("prompt_b", pa.int32()),
                          ("truncated", pa.int8())):
            table = table.append_column(name, pa.array(out[name], typ))
        return table
