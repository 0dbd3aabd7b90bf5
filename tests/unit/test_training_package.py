"""The training package's pieces that run without Ray: objectives, loop config, sampler windows,
metrics log, the loop's checkpoint state, the Hugging Face export."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixray.algorithms.sampling import CONFIDENT, UNCONFIDENT, UNPAIRED
from mixray.choices import LOSSES
from mixray.errors import TrainingConfigError
from mixray.training.engines import checkpoint_run_name, load_loop_state, save_loop_state
from mixray.training.loop import LOOP_KEYS, _windows, check_loop_config, step_export_dir
from mixray.training.metrics import MetricsLog, read_metrics
from mixray.training.objectives import OBJECTIVES, make_objective

V = 40


def test_the_registry_has_exactly_the_losses_of_choices():
    assert tuple(OBJECTIVES) == LOSSES
    assert all(cls.name == name for name, cls in OBJECTIVES.items())
    assert [name for name, cls in OBJECTIVES.items() if cls.paired] == ["sftmix"]
    with pytest.raises(TrainingConfigError, match="unknown loss 'dpo'.*'ntp', 'mdit', 'sftmix'") as e:
        make_objective({"loss": "dpo", "pad_id": 0})
    assert e.value.where == "loss"


# ----------------------------------------------------------------------------- objectives

class _Engine:
    """The two calls an objective makes of an engine, over a plain model."""

    def __init__(self, model):
        self.model = model

    def forward(self, **kw):
        return self.model(**kw, use_cache=False)

    def input_embeddings(self):
        return self.model.get_input_embeddings()


@pytest.fixture(scope="module")
def engine():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    return _Engine(LlamaForCausalLM(cfg).double().eval())


def _shard():
    """6 sequences (prompt, response) of different lengths; rows 4, 5 are MDIT mixes of 0+2 and 1+3."""
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, V, n).tolist() for n in (7, 10, 6, 9, 8, 11)]
    prompt = [3, 4, 2, 5, 3, 4]
    spans = [[p, len(s)] for p, s in zip(prompt, ids, strict=True)]  # one response after the prompt
    return {"ids_a": ids, "spans_a": spans, "prompt_a": prompt,
            "ids_b": [[], [], [], [], ids[2], ids[3]], "spans_b": [[], [], [], [], spans[2], spans[3]],
            "lam": [1.0, 1.0, 1.0, 1.0, 0.25, 0.6], "is_mix": [False] * 4 + [True] * 2}


def _naive_ce_sum(model, ids: list[int], n_prompt: int) -> tuple[torch.Tensor, int]:
    """Σ CE of one unpadded sequence's response tokens, and their number."""
    logits = model(torch.tensor([ids])).logits[0]
    targets = torch.tensor(ids[n_prompt:])
    return F.cross_entropy(logits[n_prompt - 1: len(ids) - 1], targets, reduction="sum"), len(targets)


def _config(loss, **kw):
    return {"loss": loss, "pad_id": 0, "chunk_rows": None, "sftmix_mu": 0.2} | kw


def test_ntp_objective_is_the_token_mean_over_the_window(engine):
    """Two micro-batches with the window's normaliser add up to the naive token mean of all rows."""
    shard, obj = _shard(), make_objective(_config("ntp"))
    mbs = [obj.batch(shard, [0, 1]), obj.batch(shard, [2, 3])]
    counts = [obj.normalizer_counts(mb) for mb in mbs]
    norms = [sum(c[k] for c in counts) for k in range(2)]
    losses = [obj.step(engine, mb, norms) for mb in mbs]
    naive = [_naive_ce_sum(engine.model, shard["ids_a"][i], shard["prompt_a"][i]) for i in range(4)]
    assert norms == [float(sum(n for _, n in naive)), 0.0]
    total = sum(loss for loss, _ in losses)
    torch.testing.assert_close(total, sum(s for s, _ in naive) / norms[0])
    assert all(parts["mix"] == 0 and torch.equal(parts["ntp"], loss.detach()) for loss, parts in losses)
    assert (mbs[0]["tokens"], mbs[0]["examples"]) == (17, 2)


def test_sftmix_objective_counts_pair_positions_and_adds_mu_times_mixup(engine):
    shard, obj = _shard(), make_objective(_config("sftmix"))
    mb = obj.batch(shard, [0, 1, 2, 3], lam=np.array([0.3, 0.8]))  # pairs (0, 2) and (1, 3)
    n_resp = [len(s) - p for s, p in zip(shard["ids_a"], shard["prompt_a"], strict=True)]
    counts = obj.normalizer_counts(mb)
    assert counts == (float(sum(n_resp[:4])), float(min(n_resp[0], n_resp[2]) + min(n_resp[1], n_resp[3])))
    loss, parts = obj.step(engine, mb, counts)
    torch.testing.assert_close(loss.detach(), parts["ntp"] + 0.2 * parts["mix"])
    naive = [_naive_ce_sum(engine.model, shard["ids_a"][i], shard["prompt_a"][i]) for i in range(4)]
    torch.testing.assert_close(parts["ntp"], sum(s for s, _ in naive) / counts[0])
    # the default normaliser is shared (both sums over the NTP count); separate divides the Mixup sum by
    # its own count: the same sum either way
    sep = make_objective(_config("sftmix", sftmix_normalizer="separate"))
    loss_sep, parts_sep = sep.step(engine, mb, counts)
    torch.testing.assert_close(parts_sep["ntp"], parts["ntp"])
    torch.testing.assert_close(parts_sep["mix"] * counts[1], parts["mix"] * counts[0])
    torch.testing.assert_close(loss_sep.detach(), parts_sep["ntp"] + 0.2 * parts_sep["mix"])


def test_mdit_objective_trains_originals_as_ntp_and_mixes_symmetrically(engine):
    shard = _shard()
    ntp, mdit = make_objective(_config("ntp")), make_objective(_config("mdit"))
    a = mdit.batch(shard, [0, 1, 2])
    assert mdit.normalizer_counts(a) == ntp.normalizer_counts(ntp.batch(shard, [0, 1, 2]))
    loss, parts = mdit.step(engine, a, mdit.normalizer_counts(a))
    torch.testing.assert_close(loss, ntp.step(engine, ntp.batch(shard, [0, 1, 2]), mdit.normalizer_counts(a))[0])
    assert parts["mix"] == 0
    # a mix of (a, b, λ) is the mix of (b, a, 1 − λ): swap the sides of rows 4 and 5
    swapped = {"ids_a": shard["ids_b"], "spans_a": shard["spans_b"], "ids_b": shard["ids_a"],
               "spans_b": shard["spans_a"], "lam": [1 - x for x in shard["lam"]], "is_mix": shard["is_mix"]}
    m, s = mdit.batch(shard, [4, 5]), mdit.batch(swapped, [4, 5])
    assert mdit.normalizer_counts(m) == pytest.approx(mdit.normalizer_counts(s))
    lm, pm = mdit.step(engine, m, mdit.normalizer_counts(m))
    torch.testing.assert_close(lm, mdit.step(engine, s, mdit.normalizer_counts(m))[0])
    assert pm["ntp"] == 0 and pm["mix"] > 0


# ----------------------------------------------------------------------------- loop config, windows

def _loop_config(**kw):
    return dict.fromkeys(LOOP_KEYS) | {"total_steps": 6, "export_dir": "/runs/x/train/model"} | kw


def test_loop_config_defaults_and_export_steps():
    c = check_loop_config(_loop_config())
    assert c["export_steps"] == [] and c["export_steps_dir"] is None
    assert str(step_export_dir(c, 4)) == "/runs/x/train/checkpoints/step-4"
    c = check_loop_config(_loop_config(export_steps=[2, 6], export_steps_dir="/tmp/ck"))
    assert str(step_export_dir(c, 2)) == "/tmp/ck/step-2"
    for bad in ([0], [7], [2.0], 3):
        with pytest.raises(TrainingConfigError, match=r"export_steps must be .* in \[1, 6\]") as e:
            check_loop_config(_loop_config(export_steps=bad))
        assert e.value.where == "export_steps"
    with pytest.raises(TrainingConfigError, match=r"misses \['lr'\]"):
        check_loop_config({k: v for k, v in _loop_config().items() if k != "lr"})


@pytest.mark.parametrize("paired", [False, True])
def test_a_resumed_run_gets_the_windows_it_would_have_had(paired):
    groups = np.array([CONFIDENT, UNCONFIDENT] * 8) if paired else np.full(16, UNPAIRED)
    config = {"grad_accum": 2, "steps_per_epoch": 2, "total_steps": 5, "seed": 3, "micro_batch_size": 2,
              "sftmix_alpha": 0.5}
    whole = list(_windows(config, {"group": groups}, 1, 0, paired))
    assert [(s, e) for s, e, _ in whole] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2)]
    assert all(len(w) == 2 and all(len(rows) == 2 for rows, _ in w) for _, _, w in whole)
    assert all((lam is not None) == paired for _, _, w in whole for _, lam in w)
    resumed = list(_windows(config, {"group": groups}, 1, 3, paired))
    assert [s for s, _, _ in resumed] == [4, 5]
    for (_, _, w1), (_, _, w2) in zip(whole[3:], resumed, strict=True):
        assert [r for r, _ in w1] == [r for r, _ in w2]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(w1, w2, strict=True) if a is not None)


# ----------------------------------------------------------------------------- metrics, loop state

def _row(step, loss):
    return {"step": step, "epoch": 0, "loss": loss, "ntp": loss, "mix": 0.0, "lr": 1e-3, "grad_norm": 1.0,
            "tokens": 10, "tokens_per_s": 5.0, "step_time_s": 2.0, "examples": 4, "time": 0.0}


def test_metrics_log_appends_attempts_and_the_curve_keeps_the_last(tmp_path):
    first = MetricsLog(tmp_path, resumed_from=0)
    for s, loss in ((1, 3.0), (2, 2.5), (3, 2.2)):
        first.write(_row(s, loss))
    first.close()
    second = MetricsLog(tmp_path, resumed_from=2)  # a restarted group resumes from step 2
    for s, loss in ((3, 2.1), (4, 2.0)):
        second.write(_row(s, loss))
    second.close()
    with open(tmp_path / "metrics.csv", newline="") as f:
        raw = list(csv.DictReader(f))
    assert [(r["attempt"], r["step"]) for r in raw] == [("0", "1"), ("0", "2"), ("0", "3"), ("1", "3"), ("1", "4")]
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.csv")] == [3.0, 2.5, 2.1, 2.0]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_loop_state_round_trip(tmp_path):
    torch.manual_seed(5)
    save_loop_state(tmp_path, 0, 7, "run-abc")
    save_loop_state(tmp_path, 1, 7, "run-abc")
    expected = torch.rand(3)
    torch.manual_seed(99)
    assert checkpoint_run_name(tmp_path) == "run-abc" and checkpoint_run_name(tmp_path / "rng") is None
    assert load_loop_state(tmp_path, 1) == 7
    torch.testing.assert_close(torch.rand(3), expected)  # the RNG continues where it was saved


# ----------------------------------------------------------------------------- export

def test_export_hf_writes_a_loadable_directory_in_place_of_the_old(tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mixray.training.export import export_hf

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    out = tmp_path / "checkpoints" / "step-1"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an earlier attempt")
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    export_hf(model, out, model_path=str(tiny_lm_dir))
    assert not (out / "stale.txt").exists() and not (tmp_path / "checkpoints" / "step-1.partial").exists()
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(back.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(tiny_lm_dir))


def _lrs(warmup: int, total: int) -> list[float]:
    """The lr each optimizer step 1..total trains at, under the engines' schedule."""
    from mixray.training.engines import _scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = _scheduler({"warmup_steps": warmup, "total_steps": total})(opt)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_no_optimizer_step_runs_at_lr_zero():
    """Issue 11: with a warm-up, step 1 ran at lr = 0 (a step that changes nothing)."""
    lrs = _lrs(warmup=4, total=12)
    assert min(lrs) > 0
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warm-up, peak at step W
    assert lrs[4] == 1.0 and all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False))  # cosine
    assert lrs[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 7 / 8)))


def test_without_warm_up_the_schedule_is_the_plain_cosine():
    """What the pinned first losses of tests/integration/test_train.py were trained with."""
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_cosine_schedule_with_warmup(opt, 0, 10)
    want = []
    for _ in range(10):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        hf.step()
    assert _lrs(warmup=0, total=10) == pytest.approx(want, rel=1e-12)


def test_single_worker_grpo_hides_the_distributed_env_from_accelerate(monkeypatch):
    """A 1-worker GRPO run without DeepSpeed must not be DDP-wrapped (1.28x TRL alone before):
    Accelerate sees no RANK/LOCAL_RANK while the trainer exists, and they come back after."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    from mixray.training.grpo import _single_process

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with _single_process(alone=True):
        assert not any(k in os.environ for k in env)
        PartialState._reset_state()
        assert PartialState(cpu=True).distributed_type == DistributedType.NO
        PartialState._reset_state()
    assert {k: os.environ[k] for k in env} == env
    with _single_process(alone=False):  # several workers or DeepSpeed: untouched
        assert {k: os.environ[k] for k in env} == env


def test_grpo_generation_kwargs_reach_the_generation_config(tmp_path):
    """The optional ``generation_kwargs`` of the GRPO loop config go to TRL's GRPOConfig (and from
    there into every completion's GenerationConfig); absent, TRL's defaults stay."""
    from mixray.training.grpo import grpo_args

    config = {"output_dir": str(tmp_path), "seed": 0, "lr": 1e-6, "per_device_batch_size": 4,
              "grad_accum": 1, "max_steps": 2, "num_generations": 4, "temperature": 1.0,
              "repetition_penalty": 1.0, "max_completion_length": 16, "beta": 0.0, "epsilon": 0.2,
              "epsilon_high": 0.3, "loss_type": "dapo", "aggregation": "sum_then_normalize",
              "reward_weights": [0.5, 0.4, 0.1], "warmup_ratio": 0.0, "max_grad_norm": 1.0,
              "save_steps": 10, "deepspeed": None}
    assert grpo_args(config, 1).generation_kwargs is None
    args = grpo_args(config | {"generation_kwargs": {"min_new_tokens": 16}}, 1)
    assert args.generation_kwargs == {"min_new_tokens": 16}
