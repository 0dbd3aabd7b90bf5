"""Batch callables: load a model in ``__init__``, map a column batch in ``__call__``.

They know nothing about Ray (NeMo Curator's pattern): ``mixray.distributed``
hands them to a Ray Data actor pool, tests and benchmarks call them directly.
A batch is ``dict[str, np.ndarray]`` with at least ``id, instruction, input,
output`` (and ``messages``, the turns of multi-turn examples, for the models that
take a response loss); the result has ``id`` plus the computed columns, one row
per input row.

Device: CUDA when the actor has a GPU, CPU otherwise (chosen at run time).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixray.algorithms.batching import Response, length_sorted_chunks, sft_batch
from mixray.algorithms.cores import resolve_threads
from mixray.algorithms.devices import resolve_device
from mixray.algorithms.ifd import ifd_quality, ifd_ratio
from mixray.algorithms.losses import row_mean_nll
from mixray.algorithms.pooling import l2_normalize, last_token, mean_pool
from mixray.errors import ConfigError
from mixray.models.registry import resolve_model
from mixray.models.sft import encode_example
from mixray.models.sft import load_tokenizer as _load_tokenizer
from mixray.models.text import build_texts, instruction_text

log = logging.getLogger("mixray.models")


def _device(threads: int | None) -> torch.device:
    """CUDA when this actor sees a GPU, else CPU with ``threads`` torch threads."""
    device = resolve_device("auto")
    if device.type == "cpu":
        torch.set_num_threads(resolve_threads(threads))  # default: the cores this process may use
    return device


def _texts(batch: dict[str, np.ndarray], kind: str) -> list[str]:
    return build_texts(kind, batch["instruction"].tolist(), batch["input"].tolist(),
                       batch["output"].tolist())


class SentenceEncoder:
    """sentence-transformers encoder (all-MiniLM-L6-v2 by default) -> ``embedding [B, d]``."""

    def __init__(self, model_path: str, text: str = "instruction", normalize: bool = True,
                 max_length: int = 256, encode_batch_size: int = 64, threads: int | None = None):
        from sentence_transformers import SentenceTransformer

        self.device = _device(threads)
        model_path = resolve_model(model_path)
        self.model = SentenceTransformer(model_path, device=str(self.device))
        self.model.max_seq_length = max_length
        self.text, self.normalize, self.encode_batch_size = text, normalize, encode_batch_size

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension()
                   if hasattr(self.model, "get_embedding_dimension")
                   else self.model.get_sentence_embedding_dimension())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Encode the batch in minibatches of similar *token* length (``length_sorted_chunks``).

        ``SentenceTransformer.encode`` groups its minibatches by character count, a poor proxy
        for tokens on mixed data (code, non-Latin scripts, texts past ``max_length``): on the
        benchmark's 20K instructions that pads to 1.42x the real tokens in 1,024-row batches,
        against 1.13x when sorted by token count. One ``encode`` call per sorted minibatch.
        """
        texts = _texts(batch, self.text)
        emb = np.empty((len(texts), self.dim), dtype=np.float32)
        for idx in length_sorted_chunks(self._token_lengths(texts), self.encode_batch_size):
            emb[idx] = self.model.encode(
                [texts[i] for i in idx], batch_size=len(idx), normalize_embeddings=self.normalize,
                convert_to_numpy=True, show_progress_bar=False,
            )
        return {"id": batch["id"], "embedding": emb}

    def _token_lengths(self, texts: list[str]) -> list[int]:
        """Tokens per text after truncation to ``max_seq_length`` (characters without a tokenizer)."""
        tok = getattr(self.model, "tokenizer", None)
        if tok is None:
            return [len(t) for t in texts]
        ids = tok(texts, truncation=True, max_length=self.model.max_seq_length)["input_ids"]
        return [len(x) for x in ids]


def load_input_embeddings(model_path: str) -> torch.Tensor:
    """The input embedding matrix ``[V, d]`` of a causal LM, without loading the rest.

    The parameter's name is found on a weightless (meta-device) copy of the
    model; only that tensor is read from the safetensors files. Falls back to
    loading the whole model when the checkpoint is not in safetensors.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    weight = skeleton.get_input_embeddings().weight
    name = next(n for n, p in skeleton.named_parameters() if p is weight)
    files = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            keys = set(st.keys())
            for cand in (name, name.removeprefix("model."), f"model.{name}"):
                if cand in keys:
                    return st.get_tensor(cand).float()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return model.get_input_embeddings().weight.detach().clone()


class LMEmbeddingEncoder:
    """Mean of a causal LM's *input embedding* vectors over the example's tokens (MDIT).

    No forward pass: ``v = mean_t E[x_t]`` with E the ``[V, d]`` embedding matrix.
    """

    def __init__(self, model_path: str, text: str = "instruction", normalize: bool = False,
                 max_length: int = 256, threads: int | None = None):
        self.device = _device(threads)
        model_path = resolve_model(model_path)
        self.tok = _load_tokenizer(model_path)
        self.matrix = load_input_embeddings(model_path).to(self.device)
        self.text, self.normalize, self.max_length = text, normalize, max_length

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        enc = self.tok(_texts(batch, self.text), truncation=True, max_length=self.max_length,
                       padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        v = mean_pool(torch.nn.functional.embedding(ids, self.matrix), mask)
        if self.normalize:
            v = l2_normalize(v)
        return {"id": batch["id"], "embedding": v.float().cpu().numpy()}


class LMLastHiddenEncoder:
    """A causal LM's last-layer hidden state at the example's final token (SFTMix's plots)."""

    def __init__(self, model_path: str, text: str = "full", normalize: bool = False,
                 max_length: int = 512, threads: int | None = None, micro_batch: int = 8):
        self.device = _device(threads)
        model_path = resolve_model(model_path)
        self.tok = _load_tokenizer(model_path)
        self.tok.padding_side = "right"
        self.model = load_pretrained(model_path, self.device)
        self.text, self.normalize, self.max_length, self.micro = text, normalize, max_length, micro_batch

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Forward ``micro_batch`` rows at a time, rows of similar length together (right padding)."""
        enc = self.tok(_texts(batch, self.text), truncation=True, max_length=self.max_length)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        out = torch.empty(len(ids), self.dim)
        for idx in length_sorted_chunks([len(x) for x in ids], self.micro):
            mb = self.tok.pad({"input_ids": [ids[i] for i in idx], "attention_mask": [mask[i] for i in idx]},
                              return_tensors="pt").to(self.device)
            h = self.model(**mb, output_hidden_states=True).hidden_states[-1]
            v = last_token(h, mb["attention_mask"]).float()
            out[idx] = (l2_normalize(v) if self.normalize else v).cpu()
        return {"id": batch["id"], "embedding": out.numpy()}


ENCODERS = {
    "sentence-transformers": SentenceEncoder,
    "lm-embedding": LMEmbeddingEncoder,
    "lm-last-hidden": LMLastHiddenEncoder,
}


@torch.no_grad()
def response_losses(model, seqs: list[tuple[list[int], Response]], pad_id: int, micro_batch: int,
                    device: torch.device) -> torch.Tensor:
    """Mean response NLL of each sequence under ``model`` -> ``[len(seqs)]`` float32 (CPU).

    ``seqs[i] = (ids, response)`` with the response as ``n_prompt`` or flat spans
    (``mixray.algorithms.batching``)::

        out[i] = −(1/N_i)·Σ_{n=1..N_i} log p(y_n | x, y_<n)      over the N_i response tokens

    SFTMix's ``Perp_c`` and both IFD losses are this function. Micro-batches of
    ``micro_batch`` sequences sorted by length, longest first (``length_sorted_chunks``:
    an out-of-memory shows on the first micro-batch), keep padding and the ``[b, T, V]``
    logits small; right padding, so the result does not depend on the batching.
    """
    out = torch.empty(len(seqs))
    for chunk in length_sorted_chunks([len(ids) for ids, _ in seqs], micro_batch):
        idx = chunk.tolist()
        mb = sft_batch([seqs[i][0] for i in idx], [seqs[i][1] for i in idx], pad_id)
        logits = model(input_ids=mb["input_ids"].to(device),
                       attention_mask=mb["attention_mask"].to(device)).logits
        out[idx] = row_mean_nll(logits, mb["targets"].to(device)).float().cpu()
    return out


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The weights' dtype for inference (``mixray.choices.INFERENCE_PRECISIONS``):
    ``auto`` = bfloat16 on CUDA, float32 on CPU; ``bf16`` / ``fp32`` as named.
    Log-probabilities are computed in float32 from the logits either way."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise ConfigError(f"precision must be one of auto, fp32, bf16; got {precision!r}")
    return dtypes[precision]


def load_pretrained(model_path: str, device: torch.device, precision: str = "auto",
                    trust_remote_code: bool = False, auto_class: Any = None):
    """``auto_class.from_pretrained`` (default ``AutoModelForCausalLM``; a LoRA adapter directory
    loads its base model) in eval mode on ``device``, weights in ``inference_dtype(precision)``."""
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class
    return auto_class.from_pretrained(model_path, dtype=inference_dtype(device, precision),
                                      trust_remote_code=trust_remote_code).to(device).eval()


def _encoded(tok, batch: dict[str, np.ndarray], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(ids, response spans) of each row: the training encoding (``encode_example``)."""
    msgs = batch.get("messages")
    out = []
    for i, (ins, inp, o) in enumerate(zip(batch["instruction"], batch["input"], batch["output"], strict=True)):
        m = msgs[i] if msgs is not None else None
        ids, spans, _ = encode_example(tok, ins, inp, o, max_length, None if m is None else list(m))
        out.append((ids, spans))
    return out


class IFDScorer:
    """IFD from a causal LM: ``raw = L(y|x) / L(y)``, ``score = ifd_quality(raw)``.

    ``y`` is the response as training sees it (``encode_example``: every assistant
    turn + EOS). ``L(y|x)``: its mean loss in the example's sequence; ``L(y)``: in a
    sequence of BOS (EOS if none) followed by the response tokens alone. Both
    through ``response_losses``.
    """

    backend = "ifd"

    def __init__(self, model_path: str, max_length: int = 512, micro_batch: int = 4,
                 threads: int | None = None, trust_remote_code: bool = False, precision: str = "auto"):
        self.device = _device(threads)
        model_path = resolve_model(model_path)
        self.tok = _load_tokenizer(model_path, trust_remote_code)
        self.model = load_pretrained(model_path, self.device, precision, trust_remote_code)
        self.max_length, self.micro = max_length, micro_batch
        prefix = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        self.prefix = [int(prefix)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seqs = _encoded(self.tok, batch, self.max_length)
        alone = []
        for ids, spans in seqs:
            response = [t for s, e in zip(spans[::2], spans[1::2], strict=True) for t in ids[s:e]]
            alone.append((self.prefix + response, len(self.prefix)))
        pad = self.tok.pad_token_id
        with_x = response_losses(self.model, seqs, pad, self.micro, self.device)
        without_x = response_losses(self.model, alone, pad, self.micro, self.device)
        ifd = ifd_ratio(with_x, without_x)
        return {
            "id": batch["id"],
            "raw": ifd.double().numpy(),
            "score": ifd_quality(ifd).double().numpy(),
            "loss_with_instruction": with_x.double().numpy(),
            "loss_without_instruction": without_x.double().numpy(),
        }


class ResponseLossScorer:
    """One checkpoint's mean response NLL of every example: SFTMix's ``Perp_c`` (``perp``).

    The sequences are the training encoding (``encode_example``, the same
    ``max_length`` as the reference run), the loss is ``response_losses``: the same
    code as IFD's. ``model_path``: a model directory or a LoRA adapter directory
    (loaded on its base model). Also returns ``response_tokens`` (N_i).
    """

    def __init__(self, model_path: str, max_length: int = 512, micro_batch: int = 4,
                 threads: int | None = None, trust_remote_code: bool = False, precision: str = "auto"):
        self.device = _device(threads)
        self.tok = _load_tokenizer(model_path, trust_remote_code)
        self.model = load_pretrained(model_path, self.device, precision, trust_remote_code)
        self.max_length, self.micro = max_length, micro_batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seqs = _encoded(self.tok, batch, self.max_length)
        perp = response_losses(self.model, seqs, self.tok.pad_token_id, self.micro, self.device)
        n = [sum(e - s for s, e in zip(sp[::2], sp[1::2], strict=True)) for _, sp in seqs]
        return {"id": batch["id"], "perp": perp.double().numpy(),
                "response_tokens": np.asarray(n, dtype=np.int64)}


class RewardModelScorer:
    """Any ``AutoModelForSequenceClassification`` reward model on (instruction, response).

    The pair goes through the tokenizer's chat template (user, assistant) when
    it has one, as a text pair otherwise; ``raw = score = logits[:, label_index]``.
    """

    backend = "reward-model"

    def __init__(self, model_path: str, max_length: int = 512, micro_batch: int = 8,
                 label_index: int = 0, threads: int | None = None, trust_remote_code: bool = False,
                 precision: str = "auto"):
        from transformers import AutoModelForSequenceClassification

        self.device = _device(threads)
        model_path = resolve_model(model_path)
        self.tok = _load_tokenizer(model_path, trust_remote_code)
        self.tok.padding_side = "right"
        self.model = load_pretrained(model_path, self.device, precision, trust_remote_code,
                                     AutoModelForSequenceClassification)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.max_length, self.micro, self.label_index = max_length, micro_batch, label_index

    def _encode(self, ins: list[str], inp: list[str], out: list[str]):
        if getattr(self.tok, "chat_template", None):
            texts = [
                self.tok.apply_chat_template(
                    [{"role": "user", "content": instruction_text(i, x)},
                     {"role": "assistant", "content": o}], tokenize=False)
                for i, x, o in zip(ins, inp, out, strict=True)
            ]
            return self.tok(texts, truncation=True, max_length=self.max_length, padding=True,
                            return_tensors="pt")
        return self.tok([instruction_text(i, x) for i, x in zip(ins, inp, strict=True)], out,
                        truncation="longest_first", max_length=self.max_length, padding=True,
                        return_tensors="pt")

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ins, inp, out = (batch[k].tolist() for k in ("instruction", "input", "output"))
        scores = []
        for s in range(0, len(ins), self.micro):
            enc = self._encode(ins[s : s + self.micro], inp[s : s + self.micro],
                               out[s : s + self.micro]).to(self.device)
            scores.append(self.model(**enc).logits[:, self.label_index].float().cpu())
        raw = torch.cat(scores).double().numpy()
        return {"id": batch["id"], "raw": raw, "score": raw}


SCORERS = {"ifd": IFDScorer, "reward-model": RewardModelScorer}
