"""The evaluate stage's scorers against hand computations (pure metrics; a tiny model's requests)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixray.algorithms.evaluation import (
    choose_option,
    cut_at_stops,
    gsm8k_answer,
    gsm8k_prompt,
    judge_verdict,
    max_cosine,
    normalize_text,
    numbers_match,
    perplexity,
    question_text,
)


def test_perplexity_is_the_token_mean_loss():
    loss, ppl = perplexity([2.0, 3.0], [1, 3])
    assert loss == pytest.approx(5 / 4) and ppl == pytest.approx(math.exp(1.25))
    assert all(math.isnan(v) for v in perplexity([], []))


@pytest.mark.parametrize("text, want", [
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"), ("#### -3.50", "-3.5"), ("so the answer is $18.", "18"),
    ("The answer is 7. Then 9 more", "7"), ("3 apples and 4.0 pears", "4"), ("no number", None),
    ("####", None),
])
def test_gsm8k_answer(text, want):
    assert gsm8k_answer(text) == want


def test_gsm8k_exact_match_and_prompt():
    assert numbers_match(gsm8k_answer("x = 2\n#### 18"), gsm8k_answer("... so 18.0"))
    assert not numbers_match(None, "18") and not numbers_match("17", "18")
    p = gsm8k_prompt("Q2?", [("Q1?", "1 + 1 = <<1+1=2>>2\n#### 2")])
    assert p == "Question: Q1?\nAnswer: 1 + 1 = 2\n#### 2\n\nQuestion: Q2?\nAnswer:"
    assert cut_at_stops("42\n\nQuestion: next", ["\n\nQuestion:", "zzz"]) == "42"
    assert cut_at_stops("42", ["\n\n"]) == "42"


def test_choose_option_raw_and_length_normalised():
    # raw: -4 is the largest; per character: -6/30 = -0.2 beats -5/10 and -4/2
    assert choose_option([-5.0, -4.0, -6.0], [10, 2, 30]) == (1, 2)
    assert choose_option([-1.0, -1.0], [1, 1]) == (0, 0)  # ties: the first option


def test_normalize_and_question_text():
    assert normalize_text("  Janet’s ducks\n lay 16 EGGS, per day! ") == "janet’s ducks lay 16 eggs per day"
    assert normalize_text("A\u00a0b") == "a b"  # NFKC: no-break space
    assert question_text("Question: Why is the sky blue?\nAnswer:") == "Why is the sky blue?"


def test_max_cosine_equals_the_naive_matrix_and_blocks_do_not_matter():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(7, 5)), rng.normal(size=(23, 5)) * 3
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=1, keepdims=True)
    naive = qn @ kn.T
    for block in (1, 4, 100):
        best, at = max_cosine(q, k, block=block)
        assert best == pytest.approx(naive.max(1), abs=1e-5) and (at == naive.argmax(1)).all()


def test_judge_verdict_cancels_position():
    # candidate A-first: p(A) > p(B) wins; candidate B-second: p(B) > p(A) wins
    first = [[-1.0, -2.0], [-1.0, -2.0], [-3.0, -2.0]]
    second = [[-1.0, -2.0], [-2.0, -1.0], [-1.0, -2.0]]
    assert judge_verdict(first, second).tolist() == [0.5, 1.0, 0.0]


# ----------------------------------------------------------------------------- the model's requests

@pytest.fixture(scope="module")
def evaluator(tiny_lm_dir):
    from mixray.models.evaluation import LMEvaluator

    return LMEvaluator(str(tiny_lm_dir), max_length=256, max_new_tokens=6, micro_batch=2, threads=1)


def _hand_logprob(model, ids: list[int], n_ctx: int) -> tuple[float, int]:
    """Σ_t log p(ids[t] | ids[:t]) over the continuation, one sequence, no padding."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(n_ctx, len(ids))), len(ids) - n_ctx


def test_option_and_response_logprobs_match_a_hand_computation(evaluator):
    from mixray.models.sft import encode_example

    tok, model = evaluator.tok, evaluator.model
    batch = {"rid": np.array(["a", "b", "c"]), "kind": np.array(["option", "option", "response"]),
             "context": np.array(["Question: 2+2?\nAnswer:", "Question: what colour is a clear sky?\nAnswer:",
                                  "Add the numbers."]),
             "input": np.array(["", "", "2 and 3"]), "continuation": np.array([" 4", " blue", "5"]),
             "stop": np.array(["", "", ""])}
    got = evaluator(batch)
    for i in (0, 1):
        ctx = [tok.bos_token_id] + tok(str(batch["context"][i]), add_special_tokens=False)["input_ids"]
        cont = tok(str(batch["continuation"][i]), add_special_tokens=False)["input_ids"]
        lp, n = _hand_logprob(model, ctx + cont, len(ctx))
        assert got["logprob"][i] == pytest.approx(lp, abs=1e-4) and got["tokens"][i] == n
    ids, spans, _ = encode_example(tok, "Add the numbers.", "2 and 3", "5", 256)
    assert spans[1] == len(ids)
    lp, n = _hand_logprob(model, ids, spans[0])
    assert got["logprob"][2] == pytest.approx(lp, abs=1e-4) and got["tokens"][2] == n == len(ids) - spans[0]
    assert ids[-1] == tok.eos_token_id  # the response's loss covers EOS, as in training


def test_greedy_generation_matches_token_by_token_argmax(evaluator):
    tok, model = evaluator.tok, evaluator.model
    prompts = ["Question: 1+1?\nAnswer:", "Question: a longer question, with padding to the left?\nAnswer:"]
    got = evaluator({"rid": np.array(["g0", "g1"]), "kind": np.array(["generate"] * 2),
                     "context": np.array(prompts), "input": np.array(["", ""]),
                     "continuation": np.array(["", ""]), "stop": np.array(["", ""])})
    for i, p in enumerate(prompts):
        ids = [tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
                if nxt == tok.eos_token_id:
                    break
        n_prompt = 1 + len(tok(p, add_special_tokens=False)["input_ids"])
        assert got["text"][i] == tok.decode(ids[n_prompt:], skip_special_tokens=True)


def test_bf16_evaluator_holds_bf16_weights_and_agrees_with_float32(tiny_lm_dir, evaluator):
    """``precision: bf16`` (the demo's setting on CPU): the weights are bfloat16, the log-probs are
    still summed in float32/64 from the logits, and stay within bf16 rounding of float32's."""
    from mixray.models.callables import inference_dtype
    from mixray.models.evaluation import LMEvaluator

    cpu = torch.device("cpu")
    assert inference_dtype(cpu) == torch.float32 and inference_dtype(cpu, "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        inference_dtype(cpu, "fp16")
    bf16 = LMEvaluator(str(tiny_lm_dir), max_length=256, max_new_tokens=6, micro_batch=2, threads=1,
                       precision="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    batch = {"rid": np.array(["a", "b"]), "kind": np.array(["option", "response"]),
             "context": np.array(["Question: 2+2?\nAnswer:", "Add the numbers."]),
             "input": np.array(["", "2 and 3"]), "continuation": np.array([" 4", "5"]),
             "stop": np.array(["", ""])}
    lo, hi = bf16(batch), evaluator(batch)
    assert lo["logprob"].dtype == np.float64 and list(lo["tokens"]) == list(hi["tokens"])
    np.testing.assert_allclose(lo["logprob"], hi["logprob"], rtol=0.05, atol=0.05)
    assert not np.allclose(lo["logprob"], hi["logprob"], rtol=0, atol=1e-7)  # bf16 really ran
