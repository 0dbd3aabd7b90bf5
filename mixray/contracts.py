"""The data contracts of a run directory: every stage output's file name and schema, in one place.

Producers and consumers import the same :class:`Artifact`, so a file name or a
column is defined once::

    <run_dir>/<artifact.stage>/<artifact.name>

A stage declares the artifacts it reads (``requires``) and writes (``outputs``);
the stage runner (``mixray.stages.runner``) keys skip decisions on the recorded
hashes of the inputs and checks that a stage writes only what it declared.
``schema`` is the Arrow schema of a Parquet artifact when it is fixed (the
embeddings' width depends on the encoder, so theirs is built at run time).
A ``name`` with ``{fields}`` is a family of files (``selection_alpha{alpha}.parquet``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from mixray.schema import EXAMPLE_SCHEMA, REJECT_SCHEMA


@dataclass(frozen=True)
class Artifact:
    """One output of one stage: ``<run_dir>/<stage>/<name>``."""

    stage: str
    name: str
    schema: pa.Schema | None = None
    doc: str = ""

    def path(self, run_dir: Path, **fields: object) -> Path:
        return Path(run_dir) / self.stage / self.filename(**fields)

    def filename(self, **fields: object) -> str:
        return self.name.format(**fields) if fields else self.name

    @property
    def is_family(self) -> bool:
        return "{" in self.name

    def matches(self, filename: str) -> bool:
        """Whether ``filename`` is this artifact (or a member of this family)."""
        if not self.is_family:
            return filename == self.name
        head, _, rest = self.name.partition("{")
        tail = rest.partition("}")[2]
        return filename.startswith(head) and filename.endswith(tail) and len(filename) > len(head + tail)


# ----------------------------------------------------------------------------- ingest

EXAMPLES = Artifact("ingest", "examples.parquet", EXAMPLE_SCHEMA,
                    "every usable record in the example schema, in source order")
REJECTS = Artifact("ingest", "rejects.parquet", REJECT_SCHEMA,
                   "every unusable record: source, file, line, row, reason, detail, raw")
DUPLICATE_SCHEMA = pa.schema([("id", pa.string()), ("duplicate_of", pa.string())])
DUPLICATES = Artifact("ingest", "duplicates.parquet", DUPLICATE_SCHEMA,
                      "exact duplicates: id, duplicate_of")
HELDOUT = Artifact("ingest", "heldout.parquet", EXAMPLE_SCHEMA,
                   "the evaluation split (ingest.heldout): examples chosen by a hash of their id")


def in_eval_split(example_id: str, fraction: float) -> bool:
    """Whether an example belongs to the evaluation split: ``u(id) < fraction`` with
    ``u(id) = first 8 bytes of sha256(id) / 2^64``, uniform in [0, 1).

    The same id is always on the same side, whatever the order or size of the pool, so
    adding data never moves an example between training and evaluation.
    """
    digest = hashlib.sha256(example_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction

# ----------------------------------------------------------------------------- embed, score

EMBEDDINGS = Artifact("embed", "embeddings.parquet", None,
                      "id, embedding (fixed_size_list<float32>[d]); metadata mixray.encoder/model/"
                      "text/dim/normalized")
QUALITY_SCHEMA = pa.schema([("id", pa.string()), ("raw", pa.float64()), ("score", pa.float64()),
                            ("backend", pa.string())])
QUALITY = Artifact("score", "quality.parquet", None,
                   "id, raw, score (higher is better), backend (+ backend columns, e.g. IFD losses)")
SCORE_REJECT_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string())])
SCORE_REJECTS = Artifact("score", "rejects.parquet", SCORE_REJECT_SCHEMA,
                         "examples without a defined score: id, reason")

# ----------------------------------------------------------------------------- select (QDIT)

SELECTION_SCHEMA = pa.schema([("id", pa.string()), ("rank", pa.int64()), ("gain", pa.float64()),
                              ("score", pa.float64()), ("quality", pa.float64())])
SELECTION = Artifact("select", "selection.parquet", SELECTION_SCHEMA,
                     "the main alpha's selection: id, rank (1 = first), gain, score, quality")
SWEEP_SELECTION = Artifact("select", "selection_alpha{alpha}.parquet", SELECTION_SCHEMA,
                           "one selection per alpha of a sweep")
SELECTED = Artifact("select", "selected.jsonl", None, "the selected examples, in rank order")
SWEEP_TABLE = Artifact("select", "alpha_sweep.csv", None,
                       "alpha, objective, diversity, quality_mean, time_s (+ a random row)")
SWEEP_PLOT = Artifact("select", "alpha_sweep.png", None, "mean quality vs diversity per alpha")

# ----------------------------------------------------------------------------- mix, cluster (MDIT)

MIX_SCHEMA = pa.schema([
    ("mix_id", pa.string()), ("a_id", pa.string()), ("b_id", pa.string()),
    ("task_a", pa.string()), ("task_b", pa.string()), ("lam", pa.float64()),
    ("round", pa.int64()), ("len_a", pa.int64()), ("len_b", pa.int64()),
    ("bucket_a", pa.int64()), ("bucket_b", pa.int64()),
])


def mix_id(a_id: str, b_id: str) -> str:
    """A mix's id: ``mix:<16 hex of sha256(a_id, b_id)>``, stable across runs."""
    return "mix:" + hashlib.sha256(f"{a_id}\x1f{b_id}".encode()).hexdigest()[:16]


def pair_name(task_a: str, task_b: str) -> str:
    """The task of a mix: ``task_a×task_b``."""
    return f"{task_a}×{task_b}"


MIX_PLAN = Artifact("mix", "mix_plan.parquet", MIX_SCHEMA, "MDIT's cross-task mixes (pairs, λ)")

CLUSTER_SELECTION_SCHEMA = pa.schema([
    ("id", pa.string()), ("rank", pa.int64()), ("cluster", pa.int64()), ("dist", pa.float64()),
    ("is_mix", pa.bool_()), ("a_id", pa.string()), ("b_id", pa.string()), ("lam", pa.float64()),
    ("task", pa.string()), ("within", pa.int64()),
])
CLUSTER_SELECTION = Artifact("cluster", "selection.parquet", CLUSTER_SELECTION_SCHEMA,
                             "MDIT's kept originals and mixes, nearest their centroid first")
CENTROIDS = Artifact("cluster", "centroids.parquet", None, "cluster, size, centroid")
CLUSTER_PLOT = Artifact("cluster", "originals_vs_mixes.png", None, "t-SNE/PCA map")

# Stages whose ``selection.parquet`` can feed training, latest first (``train.data: auto``).
SELECTIONS = (CLUSTER_SELECTION, SELECTION)

# ----------------------------------------------------------------------------- LM-Mixup (docs/lmmixup.md)

CLASSES_SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float64()), ("class", pa.int64()),
                            ("low", pa.bool_())])
QUALITY_CLASSES = Artifact("imperfect", "classes.parquet", CLASSES_SCHEMA,
                           "every scored example: id, score, class (0-5), low (class < low_below)")
LOW_CLUSTER_SCHEMA = pa.schema([("cluster", pa.int64()), ("member_ids", pa.list_(pa.string())),
                                ("size", pa.int64()), ("prompt", pa.string())])
LOW_CLUSTERS = Artifact("imperfect", "clusters.parquet", LOW_CLUSTER_SCHEMA,
                        "capacity-constrained clusters of the low-quality examples: cluster, member_ids, "
                        "size, prompt (the distiller's user turn)")
CLUSTER_SIZES = Artifact("imperfect", "cluster_sizes.png", None, "histogram of the cluster sizes")

PAIR_SCHEMA = pa.schema([("id", pa.string()), ("origin", pa.string()), ("target_id", pa.string()),
                         ("prompt", pa.string()), ("target", pa.string()), ("reference", pa.string()),
                         ("members", pa.int64())])
MIXTURE_PAIRS = Artifact("mixture", "pairs.parquet", PAIR_SCHEMA,
                         "the distiller's training pairs: id, origin ('mixture' file | 'degraded'), "
                         "target_id, prompt (user turn), target (<think>..</think><answer>Q: .. A: ..</answer>), "
                         "reference (the answer body 'Q: ..\\nA: ..'), members")

SFT_MODEL = Artifact("distill_sft", "model", None, "the SFT distiller (Hugging Face format)")
SFT_MERGED = Artifact("distill_sft", "merged", None, "LoRA merged into the base weights")
SFT_METRICS = Artifact("distill_sft", "metrics.csv", None, "one row per optimizer step and attempt")
SFT_PLOT = Artifact("distill_sft", "loss.png", None, "the SFT loss curve")
SFT_ROWS = Artifact("distill_sft", "rows.parquet", None, "the SFT rows (as train/rows.parquet)")

GRPO_MODEL = Artifact("distill_grpo", "model", None, "the GRPO distiller (Hugging Face format)")
GRPO_METRICS = Artifact("distill_grpo", "metrics.csv", None,
                        "per step: loss, reward, reward_std, quality, alignment, format, advantage_std, kl, ...")
GRPO_PLOT = Artifact("distill_grpo", "rewards.png", None, "per-reward means, total reward, advantage spread")
REWARD_LIBRARY = Artifact("distill_grpo", "library.npz", None,
                          "the rated library: embeddings [L, d], classes [L], T [6, 6]")

DISTILLED_SCHEMA = pa.schema([
    ("id", pa.string()), ("cluster", pa.int64()), ("instruction", pa.string()), ("output", pa.string()),
    ("expected_class", pa.float64()), ("kept", pa.bool_()), ("long_tail", pa.float64()),
    ("rank", pa.int64()), ("member_ids", pa.list_(pa.string())), ("raw", pa.string())])
DISTILLED = Artifact("distill", "distilled.parquet", DISTILLED_SCHEMA,
                     "every well-formed distillation: id, cluster, instruction, output, expected_class, "
                     "kept (re-scored good), long_tail, rank (kept only, 1 = rarest), member_ids, raw")
DISTILL_REJECT_SCHEMA = pa.schema([("cluster", pa.int64()), ("reason", pa.string()), ("raw", pa.string())])
DISTILL_REJECTS = Artifact("distill", "rejects.parquet", DISTILL_REJECT_SCHEMA,
                           "malformed generations: cluster, reason (REJECT_REASONS), raw")
MERGED = Artifact("distill", "merged.parquet", EXAMPLE_SCHEMA,
                  "the top N kept distillations + the high-quality originals, in the example schema "
                  "(train.data: distilled; or an ingest source of another run)")

# ----------------------------------------------------------------------------- train

TRAIN_MODEL = Artifact("train", "model", None, "the fine-tuned model or LoRA adapter + tokenizer")
TRAIN_MERGED = Artifact("train", "merged", None, "LoRA merged into the base weights")
TRAIN_METRICS = Artifact("train", "metrics.csv", None, "one row per optimizer step and attempt")
TRAIN_PLOT = Artifact("train", "loss.png", None, "the loss curves")
TRAIN_ROWS = Artifact("train", "rows.parquet", None,
                      "the training rows: id, is_mix, a_id, b_id, lam, group, shard, truncated, tokens")

# ----------------------------------------------------------------------------- dynamics (SFTMix)

SPLITS = ("confident", "unconfident")  # the values of CONFIDENCE's split column


def confidence_schema(n_checkpoints: int) -> pa.Schema:
    """``id, perp_1..perp_C, conf, variability, split`` (C = the number of checkpoints)."""
    return pa.schema([("id", pa.string()),
                      *((f"perp_{c}", pa.float64()) for c in range(1, n_checkpoints + 1)),
                      ("conf", pa.float64()), ("variability", pa.float64()), ("split", pa.string())])


CONFIDENCE = Artifact("dynamics", "confidence.parquet", None,
                      "the SFTMix split: id, perp_1..perp_C (mean response NLL per checkpoint), conf "
                      "(−mean perp), variability (std of perp), split ('confident'/'unconfident'); "
                      "schema: confidence_schema(C)")
DATA_MAP = Artifact("dynamics", "data_map.png", None,
                    "data map: confidence vs variability per example, coloured by split")
CONFIDENCE_HIST = Artifact("dynamics", "confidence_hist.png", None, "histogram of conf by split")

# ----------------------------------------------------------------------------- evaluate

RESULT_SCHEMA = pa.schema([
    ("model", pa.string()), ("benchmark", pa.string()), ("metric", pa.string()), ("id", pa.string()),
    ("prediction", pa.string()), ("reference", pa.string()), ("score", pa.float64()),
    ("nll", pa.float64()), ("tokens", pa.int64()),
])
EVAL_RESULTS = Artifact("evaluate", "results.parquet", RESULT_SCHEMA,
                        "one row per model, benchmark, metric and item: prediction, reference, score "
                        "(+ summed response NLL and tokens for the held-out loss)")
EVAL_SUMMARY = Artifact("evaluate", "summary.json", None,
                        "per benchmark and metric: n, the value per model, delta trained - base; "
                        "the contamination check's counts")
CONTAMINATION_SCHEMA = pa.schema([
    ("benchmark", pa.string()), ("id", pa.string()), ("match", pa.string()), ("pool_id", pa.string()),
    ("cosine", pa.float64()), ("text", pa.string()),
])
CONTAMINATION = Artifact("evaluate", "contamination.parquet", CONTAMINATION_SCHEMA,
                         "evaluation items found in the training pool: match exact | near, the pool "
                         "example, cosine")
