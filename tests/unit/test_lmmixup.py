"""LM-Mixup's pure pieces (mixray.algorithms.lmmixup, .lmmixup_rewards) against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from mixray.algorithms import lmmixup as lm
from mixray.algorithms import lmmixup_rewards as rw
from mixray.errors import ClusteringInputError, InputError

GOOD = "<think>merge them</think>\n<answer>Q: What is 2+2?\nA: 4</answer>"


# ----------------------------------------------------------------------------- classes


def test_quality_classes_thresholds_quantiles_and_rating():
    s = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 2.5])
    # thresholds: class = number of cut points <= score
    assert lm.quality_classes(s, "thresholds", [1, 2, 3, 4, 5]).tolist() == [0, 1, 2, 3, 4, 5, 2]
    # six equal-count classes from quantiles of 12 distinct scores: two per class
    q = lm.quality_classes(np.arange(12.0), "quantiles")
    assert np.bincount(q).tolist() == [2, 2, 2, 2, 2, 2] and (np.diff(q) >= 0).all()
    # the authors' rating map: min(9, max(4, v)) - 4
    assert lm.quality_classes(np.array([1, 4, 5, 7, 9, 10.0]), "rating").tolist() == [0, 0, 1, 3, 5, 5]
    with pytest.raises(InputError, match="5 ascending"):
        lm.quality_classes(s, "thresholds", [1, 2])
    with pytest.raises(InputError, match="ascending"):
        lm.quality_classes(s, "thresholds", [1, 3, 2, 4, 5])


# ----------------------------------------------------------------------------- capacity clusters


@pytest.mark.parametrize("n", [2, 3, 7, 11, 12, 53, 200])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_capacities_are_in_bounds_and_sum_to_n(n, seed):
    caps = lm.draw_capacities(n, np.random.default_rng(seed), 3.0, 1.0, 2, 5)
    assert caps.sum() == n and caps.min() >= 2 and caps.max() <= 5


def test_capacities_fold_the_remainder():
    # a draw that always gives 5: 11 = 5 + 5 + 1 -> the 1 takes a unit from a 5 -> [5, 4, 2]
    caps = lm.draw_capacities(11, np.random.default_rng(0), mean=5.0, std=0.0, min_size=2, max_size=5)
    assert sorted(caps.tolist()) == [2, 4, 5]
    # all at min_size: 7 = 2 + 2 + 2 + 1 -> the 1 goes to one of the others -> [3, 2, 2]
    caps = lm.draw_capacities(7, np.random.default_rng(0), mean=2.0, std=0.0, min_size=2, max_size=5)
    assert sorted(caps.tolist()) == [2, 2, 3]
    with pytest.raises(ClusteringInputError, match="cannot be cut"):
        lm.draw_capacities(7, np.random.default_rng(0), mean=2.0, std=0.0, min_size=2, max_size=2)
    with pytest.raises(ClusteringInputError, match="at least min_size"):
        lm.draw_capacities(1, np.random.default_rng(0))


def test_capacity_assign_by_hand():
    # two centres (x and y axes), capacities 2 and 2, four points
    C = np.array([[1.0, 0.0], [0.0, 1.0]])
    X = np.array([[1.0, 0.0],    # cos to x: 1.0
                  [0.9, 0.1],    # best 0.994 (x)
                  [0.8, 0.2],    # best 0.970 (x) -> x is full after the two above -> y
                  [0.0, 1.0]])   # 1.0 (y)
    labels = lm.capacity_assign(X, C, np.array([2, 2]), top=1)  # top=1: the full row on demand
    assert labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("seed", [0, 3])
def test_capacity_kmeans_respects_sizes_and_assigns_every_point_once(seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(97, 8)).astype(np.float32)
    ck = lm.CapacityKMeans(min_size=2, max_size=5, mean=3, std=1, random_state=seed).fit(X)
    assert ck.labels_.shape == (97,) and (ck.labels_ >= 0).all()
    sizes = np.bincount(ck.labels_, minlength=len(ck.capacities_))
    assert sizes.tolist() == ck.capacities_.tolist()  # every centre filled exactly to capacity
    assert sizes.sum() == 97 and sizes.min() >= 2 and sizes.max() <= 5


def test_capacity_kmeans_takes_outside_centres():
    X = np.random.default_rng(0).normal(size=(20, 4))
    ck = lm.CapacityKMeans(random_state=0)
    k = len(ck.plan(20))
    ck.fit(X, centres=X[:k])
    assert np.bincount(ck.labels_).tolist() == ck.capacities_.tolist()
    with pytest.raises(ClusteringInputError, match="expected"):
        ck.fit(X, centres=X[: k + 1])


# ----------------------------------------------------------------------------- prompt, parsing


def test_prompt_template():
    msgs = lm.distill_messages([("What is 2+2?", "4"), ("2 plus 2?\r\n", " four ")])
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "<think>" in msgs[0]["content"] and "NEVER output anything outside" in msgs[0]["content"]
    assert msgs[1]["content"] == (lm.MERGE_INSTRUCTION + "\n\nQ: What is 2+2?\n A: 4\n\nQ: 2 plus 2?\n A: four")
    assert lm.parse_output(lm.target_text("q?", "a.", "why")) == lm.Parsed("q?", "a.")


@pytest.mark.parametrize("text, expected", [
    (GOOD, ("What is 2+2?", "4")),
    ("  <think></think><answer>Q: x A: y</answer>\n", ("x", "y")),
    ("Q: x A: y", "no_answer_tag"),
    ("<think>t</think><answer>Q: x A: y", "no_answer_tag"),
    ("sure! " + GOOD, "text_outside_tags"),
    (GOOD + " thanks", "text_outside_tags"),
    ("<answer>Q: x A: y</answer>", "text_outside_tags"),  # no think block
    ("<think>t</think><answer>just an answer</answer>", "no_question_answer"),
    ("<think>t</think><answer>Q: A: y</answer>", "empty_question"),
    ("<think>t</think><answer>Q: x A:   </answer>", "empty_answer"),
])
def test_parse_output(text, expected):
    p = lm.parse_output(text)
    if isinstance(expected, tuple):
        assert p.ok and (p.question, p.answer) == expected
    else:
        assert not p.ok and p.reason == expected and p.reason in lm.REJECT_REASONS


# ----------------------------------------------------------------------------- degradation


@pytest.mark.parametrize("kind", lm.DEGRADATIONS)
def test_each_degradation_changes_the_text(kind):
    text = ("The quick brown fox jumps over the lazy dog. It was a sunny day. "
            "Everyone in the park was happy and you could hear the birds.")
    out = lm.degrade(text, kind, np.random.default_rng(0))
    assert out != text and out.strip()
    if kind == "truncate":
        assert text.startswith(out) and len(out.split()) < len(text.split())
    if kind == "drop_sentences":
        assert len(out) < len(text)


def test_degraded_members_are_seeded_and_imperfect():
    q, a = "Explain photosynthesis briefly.", "Plants turn light, water and CO2 into sugar. Oxygen is released."
    m1 = lm.degraded_members(q, a, 4, np.random.default_rng(7))
    m2 = lm.degraded_members(q, a, 4, np.random.default_rng(7))
    assert m1 == m2 and len(m1) == 4
    assert all((mq, ma) != (q, a) for mq, ma in m1)
    with pytest.raises(InputError, match="allowed"):
        lm.degrade(q, "shuffle", np.random.default_rng(0))


# ----------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("text, expected", [
    (GOOD, 1.0),
    ("<think>t</think><answer>no qa here</answer>", 0.5),       # format ok, pattern missing
    ("preamble <think>t</think><answer>Q: x A: y</answer>", 0.5),  # pattern ok, text outside
    ("Q: x A: y", 0.0),                                          # no tags at all
    ("<answer>Q: x A: y</answer>", 0.5),                          # no think: only the pattern
    ("", 0.0),
])
def test_format_reward(text, expected):
    assert rw.format_reward(text) == expected


def test_alignment_reward_threshold():
    ref = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    ans = np.array([[1.0, 0.0],                       # cos 1
                    [0.8, 0.6],                       # cos 0.8 exactly -> counts
                    [0.7, np.sqrt(1 - 0.49)],         # cos 0.7
                    [0.0, 0.0]])                      # empty answer -> cos 0
    assert rw.alignment_reward(ans, ref, 0.8).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_knn_bayes_by_hand():
    # library on a line of angles: classes 0,0,5,5; k=2 neighbours, k_t=1
    ang = np.array([0.0, 0.1, 1.4, 1.5])
    lib = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    classes = np.array([0, 0, 5, 5])
    T = rw.transition_matrix(lib, classes, k_t=1, n_classes=6, smoothing=1e-2)
    # each class-0 item's nearest other is class 0 (2 counts), each class-5 item's is class 5
    row0 = np.full(6, 0.01)
    row0[0] += 2
    assert np.allclose(T[0], row0 / row0.sum())
    assert np.allclose(T[1], np.full(6, 1 / 6))  # no class-1 items: smoothing only
    rater = rw.KnnBayesRater(lib, classes, k=2, k_t=1, smoothing=1e-2)
    prior = (np.array([2, 0, 0, 0, 0, 2]) + 0.01) / (4 + 0.06)
    assert np.allclose(rater.prior, prior)
    q = np.array([[np.cos(1.45), np.sin(1.45)], [1.0, 0.0]])
    h = np.array([[0, 0, 0, 0, 0, 2.0], [2.0, 0, 0, 0, 0, 0]])
    logits = np.log(prior)[None] + h @ np.log(T).T
    post = np.exp(logits - logits.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    assert np.allclose(rater.posterior(q), post)
    assert np.allclose(rater.expected_class(q), post @ np.arange(6))
    assert rater.reward(q).tolist() == [1.0, 0.0]


def test_weights_are_normalised():
    assert np.allclose(rw.normalized_weights([5, 4, 1]), [0.5, 0.4, 0.1])
    with pytest.raises(InputError):
        rw.normalized_weights([0, 0, 0])


# A fixed batch: 2 prompts x G=3 samples, rewards (quality, alignment, format).
R = np.array([[1, 1, 1.0], [0, 1, 0.5], [0, 0, 0.0],
              [1, 0, 1.0], [1, 0, 1.0], [1, 0, 0.5]])
W = np.array([0.5, 0.4, 0.1])


def test_group_advantages_sum_then_normalize_by_hand():
    # totals: group 1 = 1.0, 0.45, 0.0 (mean 0.48333, sample std 0.50083)
    #         group 2 = 0.6, 0.6, 0.55 (mean 0.58333, sample std 0.028868)
    t1, t2 = np.array([1.0, 0.45, 0.0]), np.array([0.6, 0.6, 0.55])
    s1 = np.sqrt(((t1 - t1.mean()) ** 2).sum() / 2)
    s2 = np.sqrt(((t2 - t2.mean()) ** 2).sum() / 2)
    expected = np.concatenate([(t1 - t1.mean()) / (s1 + 1e-4), (t2 - t2.mean()) / (s2 + 1e-4)])
    adv = rw.group_advantages(R, W, 3, "sum_then_normalize")
    assert np.allclose(adv, expected)
    assert np.isclose(adv[0], (1.0 - 0.483333) / (0.500833 + 1e-4), atol=1e-4)


def test_group_advantages_normalize_then_sum_by_hand():
    z = np.zeros_like(R)
    for g in (slice(0, 3), slice(3, 6)):
        m, s = R[g].mean(0), R[g].std(0, ddof=1)
        z[g] = (R[g] - m) / (s + 1e-4)  # a constant reward gives 0 / 1e-4 = 0
    summed = z @ W
    expected = (summed - summed.mean()) / (summed.std(ddof=1) + 1e-4)
    adv = rw.group_advantages(R, W, 3, "normalize_then_sum")
    assert np.allclose(adv, expected)
    # group 2: only format varies; its third sample (format 0.5 vs 1.0) is the worst of the group
    assert adv[5] < adv[3] == pytest.approx(adv[4])
    with pytest.raises(InputError, match="allowed"):
        rw.group_advantages(R, W, 3, "mean")
    with pytest.raises(InputError, match="multiple of G"):
        rw.group_advantages(R, W, 4)


def test_long_tail_scores_by_hand():
    # 3 unit vectors at angles 0, 0.1, 1.5 (k = 1): nearest-other distances
    ang = np.array([0.0, 0.1, 1.5])
    E = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    d = np.array([1 - np.cos(0.1), 1 - np.cos(0.1), 1 - np.cos(1.4)])
    expected = (d - d.min()) / (d.max() - d.min())
    assert np.allclose(rw.long_tail_scores(E, k=1), expected)
    assert rw.long_tail_scores(E[:1]).tolist() == [0.0]
    # k larger than the pool: every other row is a neighbour
    d2 = np.array([(2 - np.cos(0.1) - np.cos(1.5)) / 2, (2 - np.cos(0.1) - np.cos(1.4)) / 2,
                   (2 - np.cos(1.5) - np.cos(1.4)) / 2])
    assert np.allclose(rw.long_tail_scores(E, k=15), (d2 - d2.min()) / (d2.max() - d2.min()))
