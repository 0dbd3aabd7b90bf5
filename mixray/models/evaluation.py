"""Ray Data batch callable of the evaluate stage: log-likelihoods and greedy generations of a causal LM.

``LMEvaluator`` knows nothing about Ray (``mixray.distributed.pipeline.map_with_actors``
runs it in an actor pool). Each batch row is one *request*, like lm-evaluation-harness's:

=============  ===============================================  ======================================
``kind``       input columns                                    output
=============  ===============================================  ======================================
``response``   ``context`` = instruction, ``input``,            ``logprob`` = Σ log p(response + EOS |
               ``continuation`` = response                      prompt), ``tokens`` (tokenized exactly
                                                                as training does: ``encode_example``)
``option``     ``context``, ``continuation`` (raw text)         ``logprob`` = Σ log p(continuation |
                                                                BOS + context), ``tokens``, ``greedy``
``generate``   ``context`` (the prompt, raw text), ``stop``     ``text``: the greedy completion, cut at
               (stop strings joined by ``STOP_SEP``)            the first stop string
``chat``       ``context`` = instruction, ``input``, ``stop``   ``text``: the greedy answer to the
                                                                prompt training uses (``prompt_text``)
=============  ===============================================  ======================================

The model is any Hugging Face causal LM directory, or a LoRA adapter directory
(``from_pretrained`` loads its base model and applies it). CUDA when the actor has a GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from mixray.algorithms.batching import sft_batch
from mixray.algorithms.evaluation import cut_at_stops, target_logprobs
from mixray.models.callables import _device, _load_tokenizer, load_pretrained
from mixray.models.registry import resolve_model
from mixray.models.sft import encode_example
from mixray.models.text import prompt_text

STOP_SEP = "\x1f"
REQUEST_KINDS = ("response", "option", "generate", "chat")
REQUEST_COLUMNS = ("rid", "kind", "context", "input", "continuation", "stop")


class LMEvaluator:
    """Log-likelihood and greedy-generation requests on one model (see the module docstring)."""

    def __init__(self, model_path: str, max_length: int = 1024, max_new_tokens: int = 256,
                 micro_batch: int = 4, threads: int | None = None, trust_remote_code: bool = False,
                 precision: str = "auto"):
        self.device = _device(threads)
        path = resolve_model(model_path)
        self.tok = _load_tokenizer(path, trust_remote_code)
        self.model = load_pretrained(path, self.device, precision, trust_remote_code)
        self.max_length, self.max_new, self.micro = max_length, max_new_tokens, micro_batch
        bos = self.tok.bos_token_id
        self.prefix = [int(bos)] if bos is not None else []

    def encode(self, kind: str, context: str, input_: str, continuation: str) -> tuple[list[int], int]:
        """``(ids, n_context)`` of a log-likelihood request; the context's start is cut to fit."""
        if kind == "response":
            ids, spans, _ = encode_example(self.tok, context, input_, continuation, self.max_length)
            return ids, spans[0]  # one exchange: the response is ids[spans[0]:], EOS included
        ctx = self.prefix + self.tok(context, add_special_tokens=False)["input_ids"]
        cont = self.tok(continuation, add_special_tokens=False)["input_ids"][: self.max_length - 1]
        ctx = ctx[max(0, len(ctx) + len(cont) - self.max_length):]
        return ctx + cont, len(ctx)

    @torch.no_grad()
    def logliks(self, seqs: list[tuple[list[int], int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(logprob [n], tokens [n], greedy [n])`` for ``(ids, n_context)`` sequences."""
        n = len(seqs)
        out = (np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool))
        order = sorted(range(n), key=lambda i: len(seqs[i][0]))  # little padding per micro-batch
        for s in range(0, n, self.micro):
            idx = order[s : s + self.micro]
            b = sft_batch([seqs[i][0] for i in idx], [seqs[i][1] for i in idx], self.tok.pad_token_id)
            logits = self.model(input_ids=b["input_ids"].to(self.device),
                                attention_mask=b["attention_mask"].to(self.device)).logits
            lp, cnt, greedy = target_logprobs(logits, b["targets"].to(self.device))
            out[0][idx], out[1][idx], out[2][idx] = lp.cpu().numpy(), cnt.cpu().numpy(), greedy.cpu().numpy()
        return out

    def prompt_ids(self, kind: str, context: str, input_: str) -> list[int]:
        """Token ids of a generation prompt: BOS + raw text, or (``chat``) the training prompt."""
        if kind == "chat":
            special = not getattr(self.tok, "chat_template", None)
            return self.tok(prompt_text(self.tok, context, input_), add_special_tokens=special)["input_ids"]
        return self.prefix + self.tok(context, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], stops: list[list[str]]) -> list[str]:
        """Greedy completions of token-id prompts (at most ``max_new_tokens``; a prompt keeps its
        last ``max_length − max_new_tokens`` tokens), each cut at its first stop string."""
        self.tok.padding_side = "left"
        texts = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        budget = max(1, self.max_length - self.max_new)
        for s in range(0, len(order), self.micro):
            idx = order[s : s + self.micro]
            ids = [prompts[i][-budget:] for i in idx]
            enc = self.tok.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
            group_stops = sorted({x for i in idx for x in stops[i] if x})
            gen = self.model.generate(**enc, max_new_tokens=self.max_new, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id, tokenizer=self.tok,
                                      stop_strings=group_stops or None)
            for row, i in enumerate(idx):
                new = self.tok.decode(gen[row, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                texts[i] = cut_at_stops(new, stops[i])
        return texts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kinds = batch["kind"].tolist()
        n = len(kinds)
        logprob, tokens = np.zeros(n), np.zeros(n, dtype=np.int64)
        greedy, text = np.zeros(n, dtype=bool), np.asarray([""] * n, dtype=object)
        ll = [i for i, k in enumerate(kinds) if k in ("response", "option")]
        if ll:
            seqs = [self.encode(kinds[i], str(batch["context"][i]), str(batch["input"][i]),
                                str(batch["continuation"][i])) for i in ll]
            logprob[ll], tokens[ll], greedy[ll] = self.logliks(seqs)
        gen = [i for i, k in enumerate(kinds) if k in ("generate", "chat")]
        if gen:
            prompts = [self.prompt_ids(kinds[i], str(batch["context"][i]), str(batch["input"][i]))
                       for i in gen]
            text[gen] = self.generate(prompts, [str(batch["stop"][i]).split(STOP_SEP) for i in gen])
        return {"rid": batch["rid"], "logprob": logprob, "tokens": tokens, "greedy": greedy,
                "text": text}
