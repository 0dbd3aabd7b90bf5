"""LM-Mixup's config section, recipes, MIXTURE-file reading and the model-side reward glue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from mixray.config import LMGRPOSettings, LMMixupConfig, LMRewardSettings, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_papers():
    c = LMMixupConfig()
    assert (c.clusters.min_size, c.clusters.max_size, c.clusters.mean, c.clusters.std) == (2, 5, 3.0, 1.0)
    assert c.rewards.weights == pytest.approx([0.5, 0.4, 0.1])
    assert (c.rewards.aggregation, c.rewards.alignment_threshold, c.rewards.knn_k) == ("sum_then_normalize", 0.8, 16)
    g = c.grpo
    assert (g.num_generations, g.temperature, g.beta, g.epsilon, g.epsilon_high, g.lr) == (4, 1.0, 0.01, 0.2, 0.3, 1e-6)
    assert (c.sft.lr, c.sft.epochs, c.sft.warmup_ratio, c.sft.loss) == (2e-5, 3, 0.05, "ntp")
    assert (c.merge.top_n, c.merge.long_tail_k, c.classes.low_below) == (5000, 15, 4)


@pytest.mark.parametrize("section, data, message", [
    (LMGRPOSettings, {"per_device_batch_size": 3, "num_workers": 2, "num_generations": 4}, "multiple of"),
    (LMRewardSettings, {"quality": "reward-model"}, "needs reward_model"),
    (LMRewardSettings, {"reward_model": "/x"}, "applies only with"),
    (LMRewardSettings, {"quality_weight": 0, "alignment_weight": 0, "format_weight": 0}, "sum to 0"),
    (LMMixupConfig, {"clusters": {"min_size": 6, "max_size": 5}}, "min_size=6 > max_size=5"),
    (LMMixupConfig, {"classes": {"method": "thresholds"}}, "needs cuts"),
    (LMMixupConfig, {"mixture": {"degrade": False}}, "no training pairs"),
    (LMMixupConfig, {"sft": {"loss": "sftmix"}}, "uses loss ntp"),
    (LMMixupConfig, {"rewards": {"aggregation": "mean"}}, "sum_then_normalize"),
])
def test_bad_settings_are_rejected(section, data, message):
    with pytest.raises(ValidationError, match=message):
        section.model_validate(data)


def test_both_recipes_validate_with_the_papers_settings():
    demo = load_config(ROOT / "configs" / "lmmixup.yaml")
    stages = ["ingest", "embed", "score", "imperfect", "mixture", "distill_sft", "distill_grpo", "distill", "train"]
    assert demo.stages == stages and demo.embed.text == "full" and demo.train.data == "distilled"
    assert demo.lmmixup.sft.model == demo.lmmixup.generate.base_model == "SmolLM2-135M-Instruct"
    paper = load_config(ROOT / "configs" / "paper" / "lmmixup_qwen.yaml")
    lm = paper.lmmixup
    assert paper.stages == stages
    assert "Qwen2.5-1.5B" in lm.sft.model and "Llama-3.1-8B" in paper.train.model and paper.train.lora.enabled
    assert (lm.grpo.num_generations, lm.grpo.lr, lm.grpo.beta) == (4, 1e-6, 0.01)
    assert (lm.sft.lr, lm.sft.epochs, lm.clusters.max_size, lm.merge.top_n) == (2e-5, 3, 20, 5000)


def test_mixture_files_resolve_against_the_config(tmp_path):
    (tmp_path / "data").mkdir()
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps({"ingest": {"sources": [{"name": "a", "path": "pkg://x"}]},
                             "lmmixup": {"mixture": {"files": ["data/mix.jsonl"]}}}))
    assert load_config(p).lmmixup.mixture.files == [str(tmp_path / "data" / "mix.jsonl")]


def test_mixture_file_pairs(tmp_path):
    from mixray.algorithms.lmmixup import MERGE_INSTRUCTION, parse_output
    from mixray.stages.mixture import mixture_file_pairs

    recs = [
        {"instruction": MERGE_INSTRUCTION, "input": "Q: 2+2?\n A: 4\n\nQ: two plus two\n A: four",
         "output": "Q: What is 2 + 2?\nA: 4"},                                     # bare pair: tags added
        {"instruction": MERGE_INSTRUCTION, "input": "Q: a\n A: b\n\nQ: c\n A: d",
         "output": "<think>x</think><answer>Q: a and c? A: b, d</answer>"},        # tagged: kept as is
        {"instruction": MERGE_INSTRUCTION, "input": "Q: a\n A: b", "output": "just text"},  # no Q/A
        {"instruction": MERGE_INSTRUCTION, "input": "", "output": "Q: a A: b"},              # no cluster
    ]
    f = tmp_path / "mix.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n{broken\n")
    pairs, bad = mixture_file_pairs(str(f))
    assert len(pairs) == 2 and sum(bad.values()) == 3
    assert bad["no_question_answer"] == 1 and bad["empty_input"] == 1
    assert pairs[0]["prompt"] == MERGE_INSTRUCTION + "\n\n" + recs[0]["input"]
    assert pairs[0]["reference"] == "Q: What is 2 + 2?\nA: 4" and pairs[0]["members"] == 2
    p = parse_output(pairs[0]["target"])
    assert (p.question, p.answer) == ("What is 2 + 2?", "4")
    assert pairs[1]["target"] == recs[1]["output"] and pairs[1]["reference"] == "Q: a and c?\nA: b, d"


def test_reward_functions_on_completions(tmp_path):
    """The TRL-facing reward functions: answers parsed from chat completions, shared embeddings."""
    from mixray.algorithms.lmmixup_rewards import alignment_reward, format_reward
    from mixray.models.distill import DistillRewards

    rng = np.random.default_rng(0)
    lib = rng.normal(size=(30, 384)).astype(np.float32)
    classes = rng.integers(0, 6, size=30)
    from mixray.algorithms.lmmixup_rewards import transition_matrix

    np.savez(tmp_path / "lib.npz", embeddings=lib, classes=classes, T=transition_matrix(lib, classes, 4))
    r = DistillRewards("all-MiniLM-L6-v2", str(tmp_path / "lib.npz"), k=4, threads=1)
    q, al, fmt = r.functions()
    assert [f.__name__ for f in (q, al, fmt)] == ["quality", "alignment", "format"]
    good = "<think>t</think><answer>Q: What is the capital of France?\nA: Paris</answer>"
    completions = [[{"role": "assistant", "content": good}], [{"role": "assistant", "content": "no tags"}]]
    ref = ["Q: What is the capital of France?\nA: Paris", "Q: What is 2+2?\nA: 4"]
    assert fmt(None, completions) == [format_reward(good), 0.0] == [1.0, 0.0]
    got = al(None, completions, reference=ref)
    expected = alignment_reward(r.embed(["Q: What is the capital of France?\nA: Paris"]), r.embed(ref[:1]))
    assert got == [float(expected[0]), 0.0] and got[0] == 1.0  # the same text: cosine 1
    quality = q(None, completions)
    assert quality[1] == 0.0 and quality[0] in (0.0, 1.0)  # no answer: no quality
    assert quality[0] == float(r.rater.reward(r.embed([ref[0]]))[0])
