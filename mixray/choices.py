"""Every closed choice of mixray, in one place (a leaf module: it imports nothing).

The config's ``Literal`` types are built from these tuples (``Literal[SCORE_BACKENDS]``),
and every registry keyed by a choice (stages, encoders, scorers, training objectives,
selectors) has exactly these keys; ``tests/unit/test_choices.py`` checks that they agree.
Adding a choice means adding it here and to its one registry.
"""

from __future__ import annotations

# ingest
SOURCE_FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "hf")

# what a local model directory must hold for its use (mixray.models.registry.check_model):
# "model" (AutoModel + AutoTokenizer: score, train), "sentence-transformers" (embed),
# "tokenizer" (mix), "any" (one of them; an empty directory never passes)
MODEL_NEEDS = ("any", "model", "sentence-transformers", "tokenizer")

# embed / score (registries: mixray.models.callables.ENCODERS, SCORERS)
ENCODERS = ("sentence-transformers", "lm-embedding", "lm-last-hidden")
EMBED_TEXTS = ("instruction", "full", "output")
SCORE_BACKENDS = ("ifd", "reward-model", "column")
MODEL_SCORERS = ("ifd", "reward-model")  # the backends that run a model on Ray Data

# select (QDIT; mixray.algorithms.qdit)
SELECT_METHODS = ("qdit", "random", "quality", "threshold", "cluster")
SELECT_OPTIMIZERS = ("lazy", "naive", "stochastic")
SELECT_DISTRIBUTED = ("none", "sharded", "greedi")
DEVICES = ("auto", "cpu", "cuda")

# KMeans (mixray.algorithms.kmeans, mixray.distributed.kmeans)
KMEANS_INITS = ("k-means++", "random")  # single process
DISTRIBUTED_KMEANS_INITS = ("k-means||", "k-means++", "random")
CLUSTER_INITS = ("auto", *DISTRIBUTED_KMEANS_INITS)  # the config's (auto: by the number of clusters)
CLUSTER_PLOTS = ("tsne", "pca", "none")

# train (registry: mixray.training.objectives.OBJECTIVES)
LOSSES = ("ntp", "mdit", "sftmix")
TRAIN_DATA = ("auto", "all", "select", "cluster", "distilled")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# inference (score, dynamics, LM-Mixup generation, evaluate): auto = bf16 on CUDA, fp32 on CPU
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16")
TRAIN_PRESETS = ("none", "sftmix", "mdit")
SFTMIX_NORMALIZERS = ("shared", "separate")  # both SFTMix terms over one normaliser, or each over its own
ZERO_STAGES = (0, 1, 2, 3)

# evaluate (mixray.io.benchmarks.READERS; mixray.stages.evaluate)
BENCHMARK_KINDS = ("gsm8k", "multiple-choice")
CONTAMINATION_ACTIONS = ("exclude", "fail")
# the configs shipped in mixray/configs/ (`mixray init <recipe>`; mixray.recipes)
RECIPES = ("demo", "train_demo", "mdit", "sftmix", "lmmixup")

# LM-Mixup (mixray.algorithms.lmmixup, .lmmixup_rewards)
LMMIXUP_CLASS_METHODS = ("quantiles", "thresholds", "rating")
LMMIXUP_DEGRADATIONS = ("truncate", "drop_sentences", "typos", "rewrite")
LMMIXUP_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
LMMIXUP_QUALITY = ("knn-bayes", "reward-model")
LMMIXUP_TASKS = ("qa",)
LMMIXUP_DISTILLERS = ("auto", "grpo", "sft", "base")

# the stages of a run, in run order (registry: mixray.stages.STAGES)
STAGES = ("ingest", "embed", "score", "imperfect", "mixture", "distill_sft", "distill_grpo", "distill",
          "select", "mix", "cluster", "dynamics", "train", "evaluate")
