"""Golden values of the training losses (apricot style): pinned numbers on one fixed batch.

Every loss of ``mixray.algorithms.losses`` runs on one seeded batch (token
sequences with prompts and padding, built by ``mixray.algorithms.batching``) in
float64 and float32; its value, its components and the norm of its gradient
(w.r.t. the logits, and for MDIT w.r.t. the input-embedding table too) are
pinned as literal numbers, written from the code before the training package
was refactored (SFTMix's ``shared`` normalisation: added with issue 12, from the
code that introduced it; ``sftmix`` keeps the earlier ``separate`` pins). A change of
the math, the normalisers, the batching or the kernel's precision fails here with
the number that moved.
"""

from __future__ import annotations

import pytest
import torch

from mixray.algorithms.batching import mix_batch, sft_batch
from mixray.algorithms.losses import (
    mdit_loss,
    mix_embeddings,
    mixup_cross_entropy,
    ntp_loss,
    sftmix_loss,
)

V, D = 23, 8  # vocabulary, embedding width
REL = 1e-6

# (value, components..., gradient norms) per loss and dtype, written from the pre-refactor code.
# ntp_loss in float64 differs from sftmix's NTP part at 1e-8: its weights 1/N are float32.
GOLDEN = {
    ("ntp", "float64"): [3.407158249229893, 0.23274980541091939],
    ("ntp", "float32"): [3.407158374786377, 0.232749804854393],
    ("sftmix", "float64"): [4.050614176899329, 3.407158223844586, 3.217279765273716, 0.2610603467311879],
    ("sftmix", "float32"): [4.050614356994629, 3.407158613204956, 3.2172799110412598, 0.26106032729148865],
    # normalization="shared" (the default since issue 12; the pins above are "separate"): the same NTP,
    # the Mixup sum over the NTP count (18 tokens) instead of its own (Σ N' = 7): 3.2172797·7/18
    ("sftmix_shared", "float64"): [3.6573910944769863, 3.407158223844586, 1.2511643531620007,
                                   0.24326613547750656],
    ("sftmix_shared", "float32"): [3.657391309738159, 3.407158613204956, 1.251164436340332,
                                   0.24326613545417786],
    ("mdit", "float64"): [6.247477839625185, 2.8438406276542065, 3.4036372119709792, 0.23891939932771744,
                          0.8605680222209628],
    ("mdit", "float32"): [6.247478485107422, 2.8438405990600586, 3.403637409210205, 0.23891939222812653,
                          0.8605680465698242],
    ("mixup_cross_entropy", "float64"): [3.2508114631038247, 0.20960769360014017],
    ("mixup_cross_entropy", "float32"): [3.2508113384246826, 0.20960769057273865],
}


def _sequences(gen: torch.Generator, n: int) -> tuple[list[list[int]], list[int]]:
    seqs, n_prompt = [], []
    for _ in range(n):
        length = int(torch.randint(5, 12, (1,), generator=gen))
        seqs.append(torch.randint(0, V, (length,), generator=gen).tolist())
        n_prompt.append(int(torch.randint(1, length - 1, (1,), generator=gen)))
    return seqs, n_prompt


@pytest.fixture(scope="module")
def batch() -> dict:
    """4 sequences (a sides), 4 more (b sides; one original row with no b), logits, embedding table, head."""
    gen = torch.Generator().manual_seed(20240601)
    a, pa = _sequences(gen, 4)
    b, pb = _sequences(gen, 4)
    sft = sft_batch(a, pa, pad_id=0)
    mix = mix_batch(a, pa, [b[0], b[1], [], b[3]], [pb[0], pb[1], 0, pb[3]], [0.3, 0.65, 1.0, 0.9], pad_id=0)
    assert sft["targets"].shape == mix["targets_a"].shape == (4, 11)
    return {"sft": sft, "mix": mix, "is_mix": torch.tensor([True, True, False, True]),
            "logits": torch.randn(4, 11, V, generator=gen, dtype=torch.float64),
            "table": torch.randn(V, D, generator=gen, dtype=torch.float64),
            "head": torch.randn(D, V, generator=gen, dtype=torch.float64)}


def _leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).clone().requires_grad_()


def _ntp(batch, dtype, chunk):
    logits = _leaf(batch["logits"], dtype)
    loss = ntp_loss(logits, batch["sft"]["targets"], chunk_rows=chunk)
    loss.backward()
    return [loss.item(), logits.grad.norm().item()]


def _sftmix(batch, dtype, chunk, normalization="separate"):
    """Rows 0, 1 confident, paired with the unconfident rows 2, 3; μ = 0.2."""
    logits = _leaf(batch["logits"], dtype)
    lam = torch.tensor([0.3, 0.7], dtype=dtype)
    total, ntp, mix = sftmix_loss(logits, batch["sft"]["targets"], torch.tensor([0, 1]), torch.tensor([2, 3]),
                                  lam, mu=0.2, chunk_rows=chunk, normalization=normalization)
    total.backward()
    return [total.item(), ntp.item(), mix.item(), logits.grad.norm().item()]


def _sftmix_shared(batch, dtype, chunk):
    return _sftmix(batch, dtype, chunk, "shared")


def _mdit(batch, dtype, chunk):
    """The MDIT step: embed both sides with one table, mix them, a linear head, the mixed-target CE."""
    m = batch["mix"]
    table = _leaf(batch["table"], dtype)
    h, mask = mix_embeddings(table[m["input_ids_a"]], m["attention_mask_a"], table[m["input_ids_b"]],
                             m["attention_mask_b"], m["lam"].to(dtype))
    logits = h @ batch["head"].to(dtype)
    logits.retain_grad()
    total, orig, mix = mdit_loss(logits, m["targets_a"], m["targets_b"], m["lam"].to(dtype), batch["is_mix"],
                                  chunk_rows=chunk)
    total.backward()
    assert int(mask.sum()) == 33  # the union of both sides' tokens
    return [total.item(), orig.item(), mix.item(), logits.grad.norm().item(), table.grad.norm().item()]


def _mixup(batch, dtype, chunk):
    m = batch["mix"]
    logits = _leaf(batch["logits"], dtype)
    loss = mixup_cross_entropy(logits, m["targets_a"], m["targets_b"], m["lam"].to(dtype), chunk_rows=chunk)
    loss.backward()
    return [loss.item(), logits.grad.norm().item()]


LOSSES = {"ntp": _ntp, "sftmix": _sftmix, "sftmix_shared": _sftmix_shared, "mdit": _mdit,
          "mixup_cross_entropy": _mixup}


@pytest.mark.parametrize("chunk", [None, 3], ids=["one-chunk", "chunks-of-3"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_loss_value_and_gradient_norm_are_pinned(batch, loss, dtype, chunk):
    """The same numbers whether the kernel takes all logit rows in one chunk or in chunks of 3."""
    got = LOSSES[loss](batch, getattr(torch, dtype), chunk)
    assert got == pytest.approx(GOLDEN[loss, dtype], rel=REL, abs=0)
