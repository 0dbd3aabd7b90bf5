"""Supervised fine-tuning examples -> token ids and response spans (chat template or Alpaca).

``encode_example`` is the one encoding of an example that training, IFD and
SFTMix's training dynamics share: the example's conversation
(``mixray.models.text.conversation``: one exchange, or every turn of a multi-turn
example) cut into segments by ``prompt_segments``, each ``prompt + response +
EOS``. The *response* is every assistant turn's tokens and its EOS; it is
returned as flat token spans ``[s_0, e_0, s_1, e_1, ...]`` (``ids[s_k:e_k]`` is
the k-th response), which ``mixray.algorithms.batching`` turns into targets.
A single exchange is ``prompt_text`` (the model's chat template with one user
turn, or the Alpaca template) followed by the response and EOS.

``SFTEncoder`` is a Ray Data batch callable (it knows nothing about Ray): its
``__init__`` loads the tokenizer, ``__call__`` maps a pyarrow batch of training
rows (``instruction_a, input_a, output_a, messages_a``, an optional ``system_a``: a
system turn, and for an MDIT mix the ``_b`` side) to ``ids_a, spans_a, ids_b, spans_b,
truncated``.
"""

from __future__ import annotations

import pyarrow as pa

from mixray.algorithms.batching import truncate_pair
from mixray.models.registry import resolve_model
from mixray.models.text import conversation, prompt_segments, prompt_text

__all__ = ["SFTEncoder", "encode_example", "load_tokenizer"]

TOKEN_COLUMNS = ("ids_a", "spans_a", "ids_b", "spans_b", "truncated")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The model's tokenizer; its pad token is EOS when it has none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_example(tok, instruction: str, input_: str, output: str, max_length: int,
                   messages=None, system: str | None = None) -> tuple[list[int], list[int], bool]:
    """One example -> ``(ids, spans, truncated)``; ``spans``: the flat response spans.

    The first exchange is fitted by ``truncate_pair`` (the prompt keeps its end, the
    response at least half the budget); later turns follow while they fit, the last
    one cut at ``max_length`` (a turn whose prompt leaves no room is dropped).
    ``truncated``: anything was cut or dropped. ``system``: a system turn before the
    first prompt (LM-Mixup's distiller), unless the conversation opens with its own.
    """
    special = not getattr(tok, "chat_template", None)  # the Alpaca text gets the tokenizer's BOS
    single = messages is None or len(messages) == 0
    turns = conversation(instruction, input_, output, messages)
    if system and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system}, *turns]
    segments = prompt_segments(tok, turns, first_prompt=prompt_text(tok, instruction, input_, system)
                               if single else None)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    ids: list[int] = []
    spans: list[int] = []
    cut = False
    for k, (prompt_str, response_str) in enumerate(segments):
        prompt = tok(prompt_str, add_special_tokens=special and k == 0)["input_ids"]
        response = tok(response_str, add_special_tokens=False)["input_ids"] + eos
        if k == 0:
            prompt, response, cut = truncate_pair(prompt, response, max_length)
        else:
            room = max_length - len(ids) - len(prompt)
            if room < 1:
                cut = True
                break
            cut = len(response) > room
            response = response[:room]
        spans += [len(ids) + len(prompt), len(ids) + len(prompt) + len(response)]
        ids += prompt + response
        if cut:
            break
    return ids, spans, cut


class SFTEncoder:
    """Ray Data callable: training rows (pyarrow) -> the same rows plus token columns.

    ``model_path``: a model directory or an offline alias, resolved on the actor's node.
    """

    def __init__(self, model_path: str, max_length: int, trust_remote_code: bool = False):
        self.tok = load_tokenizer(resolve_model(model_path, "train.model"), trust_remote_code)
        self.max_length = max_length

    def _side(self, cols: dict, side: str, i: int) -> tuple[list[int], list[int], bool]:
        turns = cols.get(f"messages_{side}")  # absent from rows of single-turn data
        system = cols.get(f"system_{side}")  # LM-Mixup's distiller rows only
        return encode_example(self.tok, cols[f"instruction_{side}"][i], cols[f"input_{side}"][i],
                              cols[f"output_{side}"][i], self.max_length,
                              turns[i] if turns is not None else None,
                              system[i] if system is not None else None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = batch.to_pydict()
        out = {k: [] for k in TOKEN_COLUMNS}
        for i in range(batch.num_rows):
            ids, spans, cut = self._side(cols, "a", i)
            out["ids_a"].append(ids)
            out["spans_a"].append(spans)
            n_cut = int(cut)
            if cols["is_mix"][i]:
                ids, spans, cut = self._side(cols, "b", i)
                n_cut += int(cut)
            else:
                ids, spans = [], []
            out["ids_b"].append(ids)
            out["spans_b"].append(spans)
            out["truncated"].append(n_cut)
        keep = [c for c in batch.column_names if c not in TOKEN_COLUMNS and not c.startswith(
            ("instruction_", "input_", "output_", "messages_", "system_"))]
        table = batch.select(keep)
        for name, typ in (("ids_a", pa.list_(pa.int32())), ("spans_a", pa.list_(pa.int32())),
                          ("ids_b", pa.list_(pa.int32())), ("spans_b", pa.list_(pa.int32())),
                          ("truncated", pa.int8())):
            table = table.append_column(name, pa.array(out[name], typ))
        return table
