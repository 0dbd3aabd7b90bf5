"""LM-Mixup's model-side pieces: the GRPO reward functions and the generation batch callable.

No Ray here. ``DistillRewards`` loads the sentence encoder and the rated library once and
hands TRL three reward functions (``quality``, ``alignment``, ``format``; TRL logs each
under its name) that call the pure rewards of ``mixray.algorithms.lmmixup_rewards``.
``DistillGenerator`` is a Ray Data batch callable (``mixray.distributed.pipeline``):
``__init__`` loads the distiller, ``__call__`` maps a batch of clusters (``cluster``,
``prompt`` = the user turn) to their generated ``output`` text.

The rated library file (``library.npz``, written by the ``distill_grpo`` stage):
``embeddings [L, d] float32`` (unit rows), ``classes [L] int64``, ``T [C, C]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from mixray.algorithms.lmmixup import SYSTEM_PROMPT, answer_text
from mixray.algorithms.lmmixup_rewards import KnnBayesRater, alignment_reward, format_reward
from mixray.models.callables import _device, _load_tokenizer, load_pretrained
from mixray.models.registry import resolve_model
from mixray.models.text import prompt_text

log = logging.getLogger("mixray.models")


def completion_text(completion: Any) -> str:
    """TRL hands a completion as text, or (chat prompts) as ``[{"role": "assistant", "content": …}]``."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict))


class DistillRewards:
    """The three GRPO rewards on completions, with one sentence encoder and one rated library.

    ``functions()`` -> ``[quality, alignment, format]`` (TRL reward callables:
    ``f(prompts, completions, reference, **kw) -> list[float]``). The answer (text inside
    ``<answer>``; empty when missing) is embedded once per batch and shared by quality and
    alignment. ``reward_model``: a sequence classifier's logit ≥ ``reward_threshold``
    replaces the kNN-Bayes quality reward.
    """

    def __init__(self, encoder_path: str, library_path: str, *, k: int = 16, good_class: int = 4,
                 alignment_threshold: float = 0.8, task: str = "qa", reward_model: str | None = None,
                 reward_threshold: float = 0.0, threads: int | None = None):
        from sentence_transformers import SentenceTransformer

        self.device = _device(threads)
        self.encoder = SentenceTransformer(resolve_model(encoder_path), device=str(self.device))
        with np.load(library_path) as z:
            self.rater = KnnBayesRater(z["embeddings"], z["classes"], k=k, good_class=good_class, T=z["T"])
        self.alignment_threshold, self.task = alignment_threshold, task
        self.scorer = None
        if reward_model:
            from mixray.models.callables import RewardModelScorer

            self.scorer, self.reward_threshold = RewardModelScorer(reward_model, threads=threads), reward_threshold
        self._cache: tuple[tuple[str, ...], np.ndarray] | None = None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False).astype(np.float64)

    def _answers(self, completions) -> tuple[list[str], np.ndarray]:
        answers = [(answer_text(completion_text(c)) or "").strip() for c in completions]
        key = tuple(answers)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.embed(answers))
        return answers, self._cache[1]

    def quality(self, completions, **_: Any) -> list[float]:
        answers, emb = self._answers(completions)
        if self.scorer is not None:
            qa = [a.partition("A:") for a in answers]
            batch = {"instruction": np.array([q.replace("Q:", "", 1).strip() for q, _, _ in qa]),
                     "input": np.array([""] * len(qa)), "output": np.array([a.strip() for _, _, a in qa])}
            raw = self.scorer(batch | {"id": np.arange(len(qa))})["score"]
            return [float(r >= self.reward_threshold) for r in raw]
        r = self.rater.reward(emb)
        return [0.0 if not a else float(v) for a, v in zip(answers, r, strict=True)]

    def alignment(self, completions, reference, **_: Any) -> list[float]:
        answers, emb = self._answers(completions)
        r = alignment_reward(emb, self.embed(reference), self.alignment_threshold)
        return [0.0 if not a else float(v) for a, v in zip(answers, r, strict=True)]

    def format(self, completions, **_: Any) -> list[float]:
        return [format_reward(completion_text(c), self.task) for c in completions]

    def functions(self) -> list[Callable]:
        def quality(prompts, completions, **kw):
            return self.quality(completions, **kw)

        def alignment(prompts, completions, reference, **kw):
            return self.alignment(completions, reference, **kw)

        def format(prompts, completions, **kw):  # noqa: A001  (TRL logs the reward by this name)
            return self.format(completions, **kw)

        return [quality, alignment, format]


def chat_prompt(tok, user: str) -> str:
    """The distiller's prompt text: the system turn and the user turn ``user`` (the cluster)
    through the chat template, generation prompt added (as SFT and GRPO see it)."""
    return prompt_text(tok, user, "", SYSTEM_PROMPT)


class DistillGenerator:
    """Ray Data callable: clusters (``cluster``, ``prompt``) -> ``cluster, output`` (the generated text).

    Greedy decoding when ``temperature == 0``, sampling otherwise (seeded per batch by its
    first cluster id, so a re-run gives the same text). ``repetition_penalty`` is Hugging
    Face's (logits of tokens already in the sequence divided by it when positive, multiplied
    when negative; 1.0 = off). Micro-batches of ``micro_batch`` prompts, left-padded.
    """

    def __init__(self, model_path: str, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, micro_batch: int = 8, max_prompt_length: int = 1024,
                 seed: int = 0, threads: int | None = None, trust_remote_code: bool = False,
                 precision: str = "auto", repetition_penalty: float = 1.0):
        self.device = _device(threads)
        model_path = resolve_model(model_path, "lmmixup.generate.base_model")  # on this node
        self.tok = _load_tokenizer(model_path, trust_remote_code)
        self.tok.padding_side = "left"
        self.model = load_pretrained(model_path, self.device, precision, trust_remote_code)
        self.gen = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0,
                    "pad_token_id": self.tok.pad_token_id, "repetition_penalty": repetition_penalty}
        if temperature > 0:
            self.gen |= {"temperature": temperature, "top_p": top_p}
        self.micro, self.max_prompt_length, self.seed = micro_batch, max_prompt_length, seed

    @torch.no_grad()
    def generate(self, prompts: Sequence[str]) -> list[str]:
        """Generated continuations of the user turns ``prompts`` (special tokens removed)."""
        out: list[str] = []
        for s in range(0, len(prompts), self.micro):
            texts = [chat_prompt(self.tok, p) for p in prompts[s : s + self.micro]]
            enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True,
                           max_length=self.max_prompt_length, add_special_tokens=False).to(self.device)
            ids = self.model.generate(**enc, **self.gen)
            out += self.tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        clusters = np.asarray(batch["cluster"])
        if self.gen["do_sample"]:
            torch.manual_seed(self.seed * 1_000_003 + int(clusters[0]))
        texts = self.generate([str(p) for p in batch["prompt"]])
        return {"cluster": clusters, "output": np.asarray(texts, dtype=object)}
