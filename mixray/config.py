"""Typed run configuration: YAML in, validated pydantic models out.

Every section forbids unknown keys, so a typo (``embed.batchsize``) is an error
that names the key instead of a silently ignored setting. Values are strict: an
integer setting takes an integer (not ``true``, ``1.0`` or ``"5"``), a boolean
takes ``true``/``false``, a float takes a number (not a boolean); a YAML list is
accepted where a pair is expected. A key repeated in one YAML mapping is an error
naming the key and its line (YAML would silently keep the last). ``a.b=c``
overrides from the command line are applied to the raw YAML before validation,
so they are validated exactly like the file.

This module imports only pydantic and yaml: ``mixray --help`` and
``mixray validate`` stay instant.
"""

from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mixray import choices
from mixray.errors import ConfigError

# Closed choices: one source, mixray.choices (STYLE.md §8); registries use the same tuples.
SourceFormat = Literal[choices.SOURCE_FORMATS]
EncoderKind = Literal[choices.ENCODERS]
EmbedText = Literal[choices.EMBED_TEXTS]
ScoreBackend = Literal[choices.SCORE_BACKENDS]
KMeansInit = Literal[choices.CLUSTER_INITS]
ClusterPlot = Literal[choices.CLUSTER_PLOTS]
TrainLoss = Literal[choices.LOSSES]
TrainData = Literal[choices.TRAIN_DATA]
TrainPrecision = Literal[choices.PRECISIONS]
TrainPreset = Literal[choices.TRAIN_PRESETS]
SftMixNormalizer = Literal[choices.SFTMIX_NORMALIZERS]
SelectMethod = Literal[choices.SELECT_METHODS]
SelectOptimizer = Literal[choices.SELECT_OPTIMIZERS]
SelectDistributed = Literal[choices.SELECT_DISTRIBUTED]
Device = Literal[choices.DEVICES]
StageName = Literal[choices.STAGES]
BenchmarkKind = Literal[choices.BENCHMARK_KINDS]
ContaminationAction = Literal[choices.CONTAMINATION_ACTIONS]
STAGE_ORDER: tuple[str, ...] = choices.STAGES


# YAML has no tuples: where a pair is expected a list is accepted (its items stay strict).
FloatPair = Annotated[tuple[float, float], Strict(False)]
StrPair = Annotated[tuple[str, str], Strict(False)]


class _Strict(BaseModel):
    """No unknown keys; strict types (``select.k: true`` is not 1, ``"5"`` is not 5)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)
    # keys that were renamed: old -> new; using the old one is an error that names the new one
    RENAMED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = [k for k in cls.RENAMED if k in data]
            if old:
                raise ValueError("; ".join(f"{k!r} was renamed to {cls.RENAMED[k]!r}" for k in old))
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # strict mode still maps true onto Literal[0, 1, 2, 3]'s 1 (true == 1 in Python)
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and not _admits_bool(field.annotation):
            raise ValueError(f"a boolean is not allowed here, got {json.dumps(value)}")
        return value


def _admits_bool(tp: Any) -> bool:
    """Whether a field's type accepts a boolean (bool itself, or a union/Literal holding one)."""
    if tp is bool or tp is Any:
        return True
    args = get_args(tp)
    if get_origin(tp) is Literal:
        return any(isinstance(a, bool) for a in args)
    if get_origin(tp) is Annotated:
        return _admits_bool(args[0])
    return get_origin(tp) in (Union, types.UnionType) and any(_admits_bool(a) for a in args)


def _only_for(section: BaseModel, key: str, used: bool, when: str) -> None:
    """A setting given explicitly where it has no effect is an error, not silently ignored."""
    if not used and key in section.model_fields_set:
        raise ValueError(f"{key} applies only with {when}; remove it")


class RayConfig(_Strict):
    """Where to run. ``address: null`` starts a local Ray sized to this machine."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1, description="local Ray only")
    num_gpus: int | None = Field(default=None, ge=0, description="local Ray only")
    object_store_memory: int | None = Field(
        default=None, ge=78_643_200, description="bytes, local Ray only; default 30% of RAM, max 2 GB"
    )
    include_dashboard: bool = False


class FieldMap(_Strict):
    """Names of the *source's* fields that feed each schema field.

    ``input`` may be absent from a record (it becomes ""); ``instruction`` and
    ``output`` must be present and non-empty. ``id`` (optional) takes the
    record's own id; otherwise ids are derived from the content.
    ``conversations`` names a multi-turn list (ShareGPT ``[{from, value}]`` or
    chat ``[{role, content}]``); when set, instruction/output come from the
    first user turn and the assistant's reply to it, and ``messages`` keeps
    all turns (training, IFD and SFTMix's dynamics use every assistant turn).
    ``quality`` (optional) carries a numeric score column.
    """

    instruction: str = "instruction"
    input: str | None = "input"
    output: str = "output"
    id: str | None = None
    conversations: str | None = None
    quality: str | None = None


class SourceConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    path: str = Field(description="file/dir, or pkg://<package>/<path inside it>")
    format: SourceFormat = "auto"
    task: str | None = None
    fields: FieldMap = FieldMap()
    split: str = Field(default="train", description="for a saved DatasetDict")
    limit: int | None = Field(default=None, ge=1, description="read at most this many records")

    @property
    def task_name(self) -> str:
        return self.task or self.name


class HeldoutConfig(_Strict):
    """The evaluation split of the pool: examples chosen by a hash of their id (stable, order-free)."""

    fraction: float = Field(default=0.0, ge=0, lt=1, description="share of the examples held out for "
                            "evaluation (ingest/heldout.parquet); 0 = no split")
    exclude: bool = Field(default=True, description="keep them out of examples.parquet, so no stage "
                          "selects or trains on them; false: they stay in the pool too")


class IngestConfig(_Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    drop_duplicates: bool = False
    heldout: HeldoutConfig = HeldoutConfig()

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique; repeated: {dup}")
        return v


class ActorPoolConfig(_Strict):
    """Knobs of a Ray Data actor pool (used only by mixray.distributed.pipeline)."""

    concurrency: int = Field(default=1, ge=1, description="number of actors")
    batch_size: int = Field(default=256, ge=1, description="rows per Ray Data batch")
    num_gpus: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        default="auto", description="GPUs per actor; auto = 1 when the cluster has GPUs, else 0"
    )
    num_cpus: float = Field(default=1, gt=0, description="CPUs reserved per actor")
    threads: int | None = Field(
        default=None, ge=1, description="torch threads per CPU actor; default: num_cpus"
    )


class ModelPoolConfig(ActorPoolConfig):
    """An actor pool that runs a causal LM (or a reward model): the weights' dtype too."""

    precision: Literal[choices.INFERENCE_PRECISIONS] = Field(
        default="auto", description="auto: bf16 on CUDA, fp32 on CPU; bf16 on a CPU with AMX/AVX-512 "
        "runs forwards 3-5x faster (log-probs to ~1e-2)")


class EmbedConfig(ActorPoolConfig):
    encoder: EncoderKind = "sentence-transformers"
    model: str = "all-MiniLM-L6-v2"
    text: EmbedText = "instruction"
    normalize: bool = True
    max_length: int = Field(default=256, ge=8)
    encode_batch_size: int = Field(default=64, ge=1, description="sentence-transformers minibatch")

    @model_validator(mode="after")
    def _used_settings(self) -> EmbedConfig:
        _only_for(self, "encode_batch_size", self.encoder == "sentence-transformers",
                  "encoder: sentence-transformers")
        return self


class ScoreConfig(ModelPoolConfig):
    backend: ScoreBackend = "ifd"
    model: str = "SmolLM2-135M-Instruct"
    column: str = "quality"
    max_length: int = Field(default=512, ge=16)
    label_index: int = Field(default=0, ge=0, description="reward-model logit used as score")
    batch_size: int = Field(default=16, ge=1)
    sample: int | None = Field(default=None, ge=1, description="score a seeded sample only")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _used_settings(self) -> ScoreConfig:
        _only_for(self, "label_index", self.backend == "reward-model", "backend: reward-model")
        _only_for(self, "column", self.backend == "column", "backend: column")
        _only_for(self, "precision", self.backend != "column", "a model backend (ifd, reward-model)")
        return self


class MixConfig(_Strict):
    """MDIT's mix plan: cross-task pairs of similar input length, λ ~ Beta(α, α) (docs/mdit.md)."""

    model: str = Field(default="SmolLM2-135M-Instruct",
                       description="tokenizer for input token lengths (the model to be tuned)")
    pairs: list[StrPair] | None = Field(
        default=None, description="task pairs to mix, e.g. [[alpaca, gsm8k]]; null = all pairs")
    alpha: float = Field(default=8.0, gt=0, description="λ ~ Beta(alpha, alpha); paper: 8 (best in ablation: 4)")
    mixes_per_pair: int = Field(default=1, ge=1,
                                description="T: mixes per example and partner task (paper: T <= 2)")
    bucket_width: int = Field(default=32, ge=1, description="input-length bucket width, tokens")
    max_length: int | None = Field(default=None, ge=1,
                                   description="examples with longer inputs (tokens) are not mixed")
    max_bucket_gap: int | None = Field(
        default=None, ge=0, description="farthest bucket a partner may come from; null = nearest free")


class ClusterConfig(_Strict):
    """MDIT's selection: KMeans on originals ∪ mixes over Ray actors, nearest-to-centroid (docs/mdit.md)."""

    RENAMED: ClassVar[dict[str, str]] = {"actors": "concurrency"}

    budget: int = Field(default=1000, ge=1, description="number of points to keep")
    n_clusters: int | None = Field(default=None, ge=1, description="m; null = budget (the paper's setting)")
    per_cluster: int | None = Field(default=None, ge=0,
                                    description="kept per cluster before the global fill; null = budget // m")
    init: KMeansInit = Field(default="auto", description="auto = k-means|| for m <= 1024, else random")
    max_iter: int = Field(default=100, ge=1)
    tol: float = Field(default=1e-4, ge=0, description="relative to the mean feature variance (as sklearn)")
    oversampling: float = Field(default=2.0, gt=0, description="k-means||: ℓ = oversampling · m per round")
    init_rounds: int = Field(default=5, ge=1, description="k-means|| rounds")
    concurrency: int = Field(default=2, ge=1, description="Ray actors holding shards of the points")
    num_cpus: float = Field(default=1, gt=0, description="CPUs reserved per actor")
    num_gpus: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        default="auto", description="GPUs per actor; auto = 1 when the cluster has GPUs, else 0")
    threads: int | None = Field(default=None, ge=1, description="torch threads per CPU actor; default num_cpus")
    centre_block: int = Field(default=4096, ge=1, description="centres per distance block (memory)")
    plot: ClusterPlot = Field(default="tsne", description="2-D map of originals vs mixes (PNG)")
    plot_sample: int = Field(default=2000, ge=10, description="points drawn for the plot")


class LoraSettings(_Strict):
    """peft LoRA adapters instead of full fine-tuning (``enabled: true``)."""

    enabled: bool = False
    r: int = Field(default=16, ge=1, description="adapter rank")
    alpha: float = Field(default=32, gt=0, description="scaling: alpha / r")
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
        description="module names (or name suffixes) to adapt, or ['all-linear']")
    merge: bool = Field(default=False, description="also export the merged full weights (train/merged)")


class DeepSpeedSettings(_Strict):
    """DeepSpeed ZeRO (``enabled: false`` = plain PyTorch DDP)."""

    enabled: bool = True
    stage: Literal[choices.ZERO_STAGES] = 2
    offload_optimizer: bool = Field(
        default=False, description="optimizer states in CPU RAM (DeepSpeedCPUAdam, compiled once)")
    offload_params: bool = Field(default=False, description="ZeRO-3 only: parameters in CPU RAM")
    config_file: str | None = Field(
        default=None, description="a DeepSpeed JSON (configs/deepspeed/*.json) merged over the "
        "generated config; its \"auto\" values are filled from this section")
    cpu_shm_comm: bool = Field(
        default=False, description="CPU only: build DeepSpeed's shared-memory allreduce "
        "(~1 min compile on first use); off = gloo")

    @model_validator(mode="after")
    def _offload(self) -> DeepSpeedSettings:
        if self.offload_params and self.stage != 3:
            raise ValueError(f"offload_params needs stage 3 (got stage {self.stage})")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3 (got stage 0)")
        return self


class SftMixSettings(_Strict):
    alpha: float = Field(default=0.5, gt=0, description="λ ~ Beta(alpha, alpha) per pair")
    mu: float = Field(default=0.2, ge=0, description="weight of the Mixup term")
    normalizer: SftMixNormalizer = Field(
        default="shared", description="shared: NTP and Mixup sums both over the NTP token count "
        "(the paper's eq. 5 times a constant); separate: each over its own token count")
    confidence: str | None = Field(
        default=None, description="the confident/unconfident split: a column of examples.parquet "
        "(bool, 'confident'/'unconfident', or a number split at the median), or a parquet file "
        "with id + confidence (number) or id + split; null: <run_dir>/dynamics/confidence.parquet")


class MditSettings(_Strict):
    mix_plan: str | None = Field(
        default=None, description="mix plan parquet (mix_id, a_id, b_id, lam, ...); "
        "null: <run_dir>/mix/mix_plan.parquet. Unused with data: cluster (mixes come from the selection)")


class FaultInjection(_Strict):
    """Testing aid: make one worker raise once after optimizer step ``fail_at_step``."""

    fail_at_step: int | None = Field(default=None, ge=1)
    rank: int = Field(default=0, ge=0)


# The papers' settings (methods.md §2-3); a preset fills only the keys the user did not set.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "sftmix": {"loss": "sftmix", "lr": 2e-6, "weight_decay": 0.1, "warmup_ratio": 0.1,
               "micro_batch_size": 8, "grad_accum": 4, "epochs": 3,
               "sftmix": {"alpha": 0.5, "mu": 0.2}},
    "mdit": {"loss": "mdit", "lr": 2e-5, "epochs": 3, "global_batch_size": 16},
}


class TrainConfig(_Strict):
    """Fine-tuning on Ray Train (+ DeepSpeed ZeRO): loss ntp | mdit | sftmix, full or LoRA."""

    RENAMED: ClassVar[dict[str, str]] = {"tokenize_workers": "tokenize_concurrency"}

    preset: TrainPreset = Field(default="none", description="fill unset keys with a paper's settings")
    model: str = Field(default="SmolLM2-135M-Instruct", description="HF directory or offline alias")
    trust_remote_code: bool = False
    loss: TrainLoss = "ntp"
    data: TrainData = Field(
        default="auto", description="auto: the latest selection present (cluster, then select), "
        "else all examples")
    max_length: int = Field(default=512, ge=8, description="tokens per sequence (prompt + response)")
    micro_batch_size: int = Field(default=4, ge=1, description="examples per worker per forward")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    global_batch_size: int | None = Field(
        default=None, ge=1, description="if set, grad_accum = global / (micro_batch_size × num_workers)")
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    lr: float = Field(default=2e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.03, ge=0, le=1, description="cosine schedule warm-up share")
    adam_betas: FloatPair = (0.9, 0.999)
    adam_eps: float = Field(default=1e-8, gt=0)
    max_grad_norm: float = Field(default=1.0, ge=0, description="0 = no clipping")
    precision: TrainPrecision = Field(default="auto", description="auto: bf16 on GPUs that have it, else fp32")
    gradient_checkpointing: bool = False
    lora: LoraSettings = LoraSettings()
    deepspeed: DeepSpeedSettings = DeepSpeedSettings()
    sftmix: SftMixSettings = SftMixSettings()
    mdit: MditSettings = MditSettings()
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers (one per GPU on GPUs)")
    use_gpu: bool | Literal["auto"] = Field(default="auto", description="auto: GPUs when the cluster has them")
    resources_per_worker: dict[str, float] | None = Field(
        default=None, description="e.g. {CPU: 8, GPU: 1}; default 1 CPU (+1 GPU)")
    threads: int | None = Field(default=None, ge=1, description="torch threads per CPU worker; default: its CPUs")
    checkpoint_every: int = Field(default=100, ge=0, description="optimizer steps; 0 = only at the end")
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=1, ge=0, description="worker-group restarts, each from the last checkpoint")
    report_every_s: float = Field(
        default=10.0, ge=0, description="seconds between metric reports to Ray Train (every step "
        "goes to metrics.csv and TensorBoard; a report blocks until Ray's controller takes it, "
        "about one per 2 s, so reporting each fast step would stall training)")
    loss_chunk_rows: int | None = Field(
        default=None, ge=1, description="logit rows per V-wide loss chunk; null: 64 MB of float32 per chunk")
    tokenize_concurrency: int = Field(default=1, ge=1, description="Ray Data actors that tokenize")
    fault_injection: FaultInjection = FaultInjection()

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset", "none") not in TRAIN_PRESETS:
            return data
        return _fill(dict(data), TRAIN_PRESETS[data.get("preset", "none")])

    @model_validator(mode="after")
    def _batches(self) -> TrainConfig:
        if self.loss == "sftmix" and self.micro_batch_size % 2:
            raise ValueError(
                f"micro_batch_size={self.micro_batch_size}: sftmix puts b confident + b unconfident "
                "examples in every micro-batch, so it must be even")
        if self.global_batch_size is not None:
            per_step = self.micro_batch_size * self.num_workers
            if self.global_batch_size % per_step:
                raise ValueError(
                    f"global_batch_size={self.global_batch_size} is not a multiple of "
                    f"micro_batch_size × num_workers = {self.micro_batch_size} × {self.num_workers}")
        if self.fault_injection.rank >= self.num_workers:
            raise ValueError(f"fault_injection.rank={self.fault_injection.rank} but num_workers={self.num_workers}")
        return self

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step (from global_batch_size when it is set)."""
        if self.global_batch_size is None:
            return self.grad_accum
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)


def _fill(data: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``defaults`` filled in where a key is absent (recursively for sections)."""
    for k, v in defaults.items():
        if k not in data:
            data[k] = v
        elif isinstance(v, dict) and isinstance(data[k], dict):
            data[k] = _fill(dict(data[k]), v)
    return data


class DynamicsConfig(ModelPoolConfig):
    """SFTMix's training dynamics (docs/sftmix.md): a reference run with NTP, C checkpoints of it,
    every example's mean response NLL at each on a Ray Data actor pool -> confidence split.

    The reference run is the ``train`` section with ``loss: ntp`` (same examples, same
    settings), ``model`` and the keys of ``train`` (``dynamics.train``) overriding it.
    ``checkpoints`` (model/adapter directories) or ``reference_run`` (a directory of
    ``step-<n>/`` exports, e.g. another run's ``dynamics/reference``) skip the training.
    """

    model: str | None = Field(default=None, description="the reference model; null = train.model")
    train: dict[str, Any] = Field(
        default_factory=dict, description="train keys that differ for the reference run, e.g. "
        "{lr: 1e-4, epochs: 2, lora: {enabled: true}}; loss is always ntp")
    num_checkpoints: int = Field(default=5, ge=1, description="C: evenly spaced over the reference run")
    checkpoints: list[str] | None = Field(
        default=None, min_length=1, description="given checkpoints (model or LoRA adapter "
        "directories, in training order): scored as they are, nothing is trained")
    reference_run: str | None = Field(
        default=None, description="an existing reference run: a directory of step-<n>/ exports, "
        "scored in step order, nothing is trained")
    max_length: int | None = Field(default=None, ge=8, description="tokens per scored sequence; "
                                   "null = the reference run's train max_length")
    micro_batch: int = Field(default=4, ge=1, description="sequences per forward in a scoring actor")
    batch_size: int = Field(default=64, ge=1, description="rows per Ray Data batch")

    @model_validator(mode="after")
    def _one_source(self) -> DynamicsConfig:
        if self.checkpoints is not None and self.reference_run is not None:
            raise ValueError("give checkpoints or reference_run, not both")
        given = self.checkpoints is not None or self.reference_run is not None
        for key in ("num_checkpoints", "model", "train"):
            _only_for(self, key, not given, "a reference run trained here (no checkpoints or reference_run)")
        bad = sorted(set(self.train) & {"loss", "preset", "sftmix", "mdit"})
        if bad:
            raise ValueError(f"train: {bad} cannot be set for the reference run (it trains with ntp; "
                             "set the keys themselves instead of a preset)")
        return self


# train keys that do not carry over to the reference run of the dynamics stage
_NOT_IN_REFERENCE = ("preset", "loss", "sftmix", "mdit", "fault_injection")
class LMClassesSettings(_Strict):
    """LM-Mixup's quality classes 0-5 from ``score/quality.parquet`` (methods.md §4)."""

    method: Literal[choices.LMMIXUP_CLASS_METHODS] = Field(
        default="quantiles", description="quantiles of the score | thresholds on it | rating "
        "(an LLM rating 1-10: min(9, max(4, v)) - 4)")
    cuts: list[float] | None = Field(
        default=None, min_length=5, max_length=5, description="5 ascending quantile levels in (0, 1) "
        "(default: six equal-count classes) or 5 ascending score thresholds (required for thresholds)")
    low_below: int = Field(default=4, ge=1, le=5, description="class < low_below is low quality; "
                           ">= it is high quality (the rewards' good class too)")

    @model_validator(mode="after")
    def _cuts(self) -> LMClassesSettings:
        if self.method == "thresholds" and self.cuts is None:
            raise ValueError("method: thresholds needs cuts (5 ascending score values)")
        _only_for(self, "cuts", self.method != "rating", "method: quantiles or thresholds")
        return self


class LMClustersSettings(_Strict):
    """Capacity-constrained clusters of the low-quality examples (sizes drawn from N(mean, std))."""

    min_size: int = Field(default=2, ge=1)
    max_size: int = Field(default=5, ge=1, description="the paper's runs: 2-20")
    mean: float = Field(default=3.0, gt=0)
    std: float = Field(default=1.0, ge=0)
    max_iter: int = Field(default=100, ge=1, description="KMeans iterations")
    top_centres: int = Field(default=8, ge=1, description="centres kept per point for the greedy fill")
    distributed_above: int = Field(default=50_000, ge=1,
                                   description="more low-quality points: KMeans over Ray actors")
    concurrency: int = Field(default=2, ge=1, description="actors of the distributed KMeans")
    num_cpus: float = Field(default=1, gt=0)
    threads: int | None = Field(default=None, ge=1)
    max_member_chars: int = Field(default=1500, ge=50,
                                  description="each member's question and answer are cut to this in the prompt")

    @model_validator(mode="after")
    def _sizes(self) -> LMClustersSettings:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size={self.min_size} > max_size={self.max_size}")
        return self


class LMMixtureSettings(_Strict):
    """The distiller's training pairs: MIXTURE files and/or pairs built by rule-based degradation."""

    files: list[str] = Field(default_factory=list, description="MIXTURE-format files (jsonl/json/parquet): "
                             "instruction, input = the cluster ('Q: ...\\n A: ...' joined by blank "
                             "lines), output = the distilled pair ('Q: ... A: ...', tags optional)")
    degrade: bool = Field(default=True, description="build pairs from high-quality examples by degradation")
    targets: int | None = Field(default=200, ge=1, description="high-quality examples degraded (null: all)")
    max_target_chars: int = Field(default=2000, ge=20,
                                  description="longer high-quality examples (question + answer) are not used")
    min_members: int = Field(default=2, ge=1)
    max_members: int = Field(default=5, ge=1)
    kinds: list[Literal[choices.LMMIXUP_DEGRADATIONS]] = Field(
        default_factory=lambda: list(choices.LMMIXUP_DEGRADATIONS), min_length=1)

    @model_validator(mode="after")
    def _source(self) -> LMMixtureSettings:
        if not self.files and not self.degrade:
            raise ValueError("no training pairs: give files or set degrade: true")
        if self.min_members > self.max_members:
            raise ValueError(f"min_members={self.min_members} > max_members={self.max_members}")
        return self


class LMRewardSettings(_Strict):
    """GRPO's rewards (methods.md §4): quality (kNN-Bayes or a reward model), alignment, format."""

    quality_weight: float = Field(default=0.5, ge=0)
    alignment_weight: float = Field(default=0.4, ge=0)
    format_weight: float = Field(default=0.1, ge=0)
    aggregation: Literal[choices.LMMIXUP_AGGREGATIONS] = "sum_then_normalize"
    alignment_threshold: float = Field(default=0.8, ge=-1, le=1)
    quality: Literal[choices.LMMIXUP_QUALITY] = "knn-bayes"
    reward_model: str | None = Field(default=None, description="quality: reward-model: its directory")
    reward_threshold: float = Field(default=0.0, description="reward-model logit counted as good")
    knn_k: int = Field(default=16, ge=1, description="rated neighbours of an answer")
    transition_k: int = Field(default=16, ge=1, description="k_t: neighbours per library item for T")
    smoothing: float = Field(default=1e-2, gt=0)
    library_max: int = Field(default=20_000, ge=2, description="rated library: a seeded sample of the pool")
    task: Literal[choices.LMMIXUP_TASKS] = "qa"

    @model_validator(mode="after")
    def _quality(self) -> LMRewardSettings:
        if self.quality_weight + self.alignment_weight + self.format_weight <= 0:
            raise ValueError("the reward weights sum to 0")
        if self.quality == "reward-model" and not self.reward_model:
            raise ValueError("quality: reward-model needs reward_model (a directory)")
        _only_for(self, "reward_model", self.quality == "reward-model", "quality: reward-model")
        return self

    @property
    def weights(self) -> list[float]:
        total = self.quality_weight + self.alignment_weight + self.format_weight
        return [w / total for w in (self.quality_weight, self.alignment_weight, self.format_weight)]


class LMGRPOSettings(_Strict):
    """GRPO of the distiller on Ray Train + DeepSpeed with TRL's GRPOTrainer (methods.md §4)."""

    model: str | None = Field(default=None, description="null: the distill_sft model of this run")
    prompts: int | None = Field(default=None, ge=1, description="training pairs used as prompts (null: all)")
    num_generations: int = Field(default=4, ge=2, description="G samples per prompt")
    temperature: float = Field(default=1.0, gt=0)
    repetition_penalty: float = Field(default=1.0, gt=0, description="as lmmixup.generate's; 1.0 = none")
    max_completion_length: int = Field(default=256, ge=8)
    beta: float = Field(default=0.01, ge=0, description="k3 KL coefficient to the starting model")
    epsilon: float = Field(default=0.2, gt=0, description="ratio clip, low side")
    epsilon_high: float = Field(default=0.3, gt=0, description="ratio clip, high side")
    loss_type: Literal["dapo", "bnpo", "grpo", "dr_grpo"] = Field(
        default="dapo", description="dapo: token mean over the accumulated batch (the authors')")
    lr: float = Field(default=1e-6, gt=0)
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    max_grad_norm: float = Field(default=1.0, ge=0)
    max_steps: int = Field(default=100, ge=1)
    per_device_batch_size: int = Field(default=4, ge=1, description="completions per worker per step")
    grad_accum: int = Field(default=1, ge=1)
    save_steps: int = Field(default=50, ge=1, description="checkpoint every n steps (the resume point)")
    num_workers: int = Field(default=2, ge=1)
    resources_per_worker: dict[str, float] | None = None
    use_gpu: bool | Literal["auto"] = "auto"
    threads: int | None = Field(default=None, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    precision: Literal["auto", "fp32", "bf16"] = Field(default="auto", description="auto: bf16 on GPUs, else fp32")
    max_failures: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _groups(self) -> LMGRPOSettings:
        per_step = self.per_device_batch_size * self.num_workers * self.grad_accum
        if per_step % self.num_generations:
            raise ValueError(f"per_device_batch_size × num_workers × grad_accum = {per_step} completions "
                             f"per step must be a multiple of num_generations={self.num_generations}")
        return self


class LMGenerateSettings(ModelPoolConfig):
    """One distillation per low-quality cluster, over a Ray Data actor pool."""

    distiller: Literal[choices.LMMIXUP_DISTILLERS] = Field(
        default="auto", description="auto: the GRPO model if present, else the SFT one; base: base_model")
    base_model: str = Field(default="SmolLM2-135M-Instruct", description="distiller: base")
    batch_size: int = Field(default=16, ge=1)
    micro_batch: int = Field(default=8, ge=1, description="prompts per generate call")
    max_new_tokens: int = Field(default=256, ge=8)
    max_prompt_length: int = Field(default=1024, ge=32)
    temperature: float = Field(default=0.0, ge=0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0, le=1)
    repetition_penalty: float = Field(
        default=1.0, gt=0, description="Hugging Face generate's repetition (CTRL) penalty; 1.0 = none")
    clusters: int | None = Field(default=None, ge=1, description="distil only the first n clusters")


class LMMergeSettings(_Strict):
    """Keep the good distillations, rank them by long-tail score, merge with the high-quality originals."""

    top_n: int = Field(default=5000, ge=1, description="distilled pairs kept (authors: 5K)")
    long_tail_k: int = Field(default=15, ge=1)
    high_quality: bool = Field(default=True, description="add the high-quality originals")
    high_quality_limit: int | None = Field(default=None, ge=1, description="at most this many (best first)")


def _sft_defaults() -> TrainConfig:
    return TrainConfig(lr=2e-5, epochs=3, warmup_ratio=0.05, data="all")


class LMMixupConfig(_Strict):
    """LM-Mixup (docs/lmmixup.md): stages imperfect, mixture, distill_sft, distill_grpo, distill."""

    classes: LMClassesSettings = LMClassesSettings()
    clusters: LMClustersSettings = LMClustersSettings()
    mixture: LMMixtureSettings = LMMixtureSettings()
    sft: TrainConfig = Field(default_factory=_sft_defaults, description="the distiller's SFT (ntp)")
    grpo: LMGRPOSettings = LMGRPOSettings()
    rewards: LMRewardSettings = LMRewardSettings()
    generate: LMGenerateSettings = LMGenerateSettings()
    merge: LMMergeSettings = LMMergeSettings()

    @field_validator("sft")
    @classmethod
    def _ntp(cls, v: TrainConfig) -> TrainConfig:
        if v.loss != "ntp":
            raise ValueError(f"the distiller's SFT uses loss ntp, got {v.loss}")
        return v


class SelectConfig(_Strict):
    """QDIT selection (methods.md §1): K examples maximising (1-a)*d(A)/N + a*mean q(A).

    ``alpha`` may be a list (a sweep): one selection per value, the first one
    is the main selection (``selection.parquet``, ``selected.jsonl``).
    """

    RENAMED: ClassVar[dict[str, str]] = {"actors": "concurrency"}

    method: SelectMethod = Field(
        default="qdit", description="qdit | random | quality (top-K) | threshold | cluster")
    k: int = Field(default=1000, ge=1, description="examples to select (at most the pool size)")
    alpha: float | list[float] = Field(
        default=0.7, description="quality weight in [0, 1]; 0 = pure diversity, 1 = top-K quality")
    optimizer: SelectOptimizer = Field(
        default="lazy", description="lazy (exact, fast) | naive (exact reference) | stochastic")
    epsilon: float = Field(default=0.01, gt=0, lt=1,
                           description="stochastic greedy: ceil(N/K*ln(1/epsilon)) samples per step")
    seed: int | None = Field(default=None, description="default: the run's seed")
    distributed: SelectDistributed = Field(
        default="none", description="none | sharded (exact, P actors) | greedi (approximate)")
    concurrency: int = Field(default=2, ge=1, description="sharded: number of shard actors")
    partitions: int = Field(default=4, ge=1, description="greedi: number of partitions")
    num_cpus: float = Field(default=1, gt=0, description="CPUs reserved per actor/task")
    num_gpus: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        default="auto", description="GPUs per actor; auto = 1 when the cluster has GPUs, else 0")
    threads: int | None = Field(default=None, ge=1,
                                description="torch threads (driver and each CPU actor)")
    memory_budget_mb: float = Field(
        default=512, ge=0,
        description="similarity cache (MB, total): the whole matrix when 4·N² bytes fit (fastest), "
                    "else a sparse cache; 0 = fully matrix-free")
    checkpoint_every: int = Field(default=100, ge=0,
                                  description="greedy steps between checkpoints; 0 = never")
    device: Device = Field(default="auto", description="auto (CUDA if present) | cpu | cuda")
    tau: float = Field(default=0.5, ge=-1, le=1, description="threshold: max cosine to a kept point")
    n_clusters: int = Field(default=100, ge=1, description="cluster: k-means clusters")

    @field_validator("alpha")
    @classmethod
    def _alphas_in_range(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values:
            raise ValueError("alpha list is empty; give a number in [0, 1] or a non-empty list")
        bad = [a for a in values if not (0.0 <= a <= 1.0)]
        if bad:
            raise ValueError(f"alpha values must be in [0, 1], got {bad}")
        if len(set(values)) != len(values):
            raise ValueError(f"alpha values must be distinct, got {values}")
        return v

    @property
    def alphas(self) -> list[float]:
        return [float(a) for a in (self.alpha if isinstance(self.alpha, list) else [self.alpha])]


class BenchmarkConfig(_Strict):
    """One benchmark file: GSM8K (``{question, answer}`` lines) or multiple choice (lm-eval style
    ``{query, choices, gold}`` lines, or request files whose lines carry them under ``doc``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    kind: BenchmarkKind
    path: str = Field(description="file (.jsonl, .jsonl.gz) or pkg://<package>/<path>")
    limit: int | None = Field(default=100, ge=1, description="items evaluated; null = all")
    offset: int = Field(default=0, ge=0, description="records skipped first (e.g. those a "
                        "training source reads)")
    shots: int = Field(default=0, ge=0, description="gsm8k: worked examples in the prompt, the "
                       "records right after offset (never evaluated)")

    @model_validator(mode="after")
    def _used_settings(self) -> BenchmarkConfig:
        _only_for(self, "shots", self.kind == "gsm8k", "kind: gsm8k")
        return self


class ContaminationConfig(_Strict):
    """Before evaluating, each item is checked against the training pool (ingest/examples.parquet)."""

    enabled: bool = True
    on_hit: ContaminationAction = Field(default="exclude", description="exclude the item (and "
                                        "report it) | fail the run")
    threshold: float = Field(default=0.9, gt=0, le=1, description="near duplicate: cosine >= this")
    model: str = Field(default="all-MiniLM-L6-v2", description="sentence encoder for near duplicates")


class JudgeConfig(_Strict):
    """Optional pairwise LLM judge (MT-Bench style): trained vs base answers to held-out prompts."""

    model: str | None = Field(default=None, description="a causal LM directory or alias; null = off")
    limit: int = Field(default=20, ge=1, description="held-out prompts judged")


class EvaluateConfig(ModelPoolConfig):
    """The evaluate stage: base and trained model on held-out data and benchmarks (docs/evaluate.md)."""

    model: str | None = Field(default=None, description="the base model; null = train.model")
    trained: str = Field(default="auto", description="auto: <run_dir>/train/merged, else train/model, "
                         "when the train stage has run; none: the base model only; or a directory")
    base: bool = Field(default=True, description="evaluate the base model too (the deltas)")
    heldout: bool = Field(default=True, description="response loss on ingest/heldout.parquet "
                          "(ingest.heldout.fraction > 0)")
    heldout_limit: int | None = Field(default=None, ge=1, description="held-out examples used")
    benchmarks: list[BenchmarkConfig] = Field(default_factory=list)
    contamination: ContaminationConfig = ContaminationConfig()
    judge: JudgeConfig = JudgeConfig()
    max_length: int = Field(default=1024, ge=16, description="tokens of context + continuation")
    max_new_tokens: int = Field(default=256, ge=1, description="greedy generation length")
    micro_batch: int = Field(default=4, ge=1, description="sequences per forward pass in an actor")
    batch_size: int = Field(default=64, ge=1)
    trust_remote_code: bool = False

    @field_validator("benchmarks")
    @classmethod
    def _unique_names(cls, v: list[BenchmarkConfig]) -> list[BenchmarkConfig]:
        names = [b.name for b in v]
        dup = sorted({n for n in names if names.count(n) > 1} | ({"heldout", "judge"} & set(names)))
        if dup:
            raise ValueError(f"benchmark names must be unique and not 'heldout' or 'judge'; got {dup}")
        return v


class RunConfig(_Strict):
    run_dir: str = "runs/default"
    seed: int = 0
    stages: list[StageName] = Field(
        default_factory=lambda: ["ingest", "embed", "score"],
        description="what `mixray run` runs, in STAGE_ORDER; default: the data plane only")
    ray: RayConfig = RayConfig()
    ingest: IngestConfig
    embed: EmbedConfig = EmbedConfig()
    score: ScoreConfig = ScoreConfig()
    select: SelectConfig = SelectConfig()
    mix: MixConfig = MixConfig()
    cluster: ClusterConfig = ClusterConfig()
    dynamics: DynamicsConfig = DynamicsConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    lmmixup: LMMixupConfig = LMMixupConfig()

    @field_validator("stages")
    @classmethod
    def _stage_order(cls, v: list[StageName]) -> list[StageName]:
        # a field validator (not a model validator) so it is reported with every other problem
        order = [STAGE_ORDER.index(s) for s in v]
        if order != sorted(set(order)):
            raise ValueError(f"stages must be unique and in the order {list(STAGE_ORDER)}")
        return v

    @model_validator(mode="after")
    def _reference_settings(self) -> RunConfig:
        try:
            self.reference_train()
        except ValidationError as e:
            raise ValueError(format_validation_error(e, "dynamics.train (the reference run)")) from None
        return self

    def reference_train(self) -> TrainConfig:
        """The train settings of the dynamics stage's reference run (see ``DynamicsConfig``).

        ``train`` without its loss-specific keys, ``dynamics.model`` and ``dynamics.train``
        over it, ``loss: ntp``.
        """
        base = self.train.model_dump(mode="json", exclude=set(_NOT_IN_REFERENCE))
        if self.dynamics.model is not None:
            base["model"] = self.dynamics.model
        return TrainConfig.model_validate(_fill(dict(self.dynamics.train), base) | {"loss": "ntp"})


def section_hash(section: BaseModel | dict[str, Any]) -> str:
    """Stable sha256 of a config section (what a stage's skip decision keys on)."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key repeated in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *anchor" merges are overridden by the keys beside them
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {seen[key]})",
                        key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str, origin: str) -> Any:
    """Parse YAML text; a syntax error or a duplicate key is a ConfigError naming ``origin:line``."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{origin}:{mark.line + 1}" if mark is not None else origin
        if e.problem and e.problem.startswith("duplicate key"):
            raise ConfigError(e.problem, where=where) from None
        raise ConfigError(f"not valid YAML: {e}", where=origin) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", where=origin) from None


def _parse_scalar(text: str, key: str = "") -> Any:
    """``a.b=c`` values are parsed as YAML scalars/flow collections: 3, true, null, [1, 2]."""
    if text == "":
        return ""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override value {text!r} is not a YAML value ({problem}); quote strings, "
                          "close brackets: key=[0.5, 0.7]", where=key) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw config dict (in place, returned).

    A list element is addressed by its index (``ingest.sources.0.limit=10``).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {key!r}: {'.'.join(parts[: i + 1])} is not a valid index")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict | list):
                    raise ConfigError(f"override {key!r}: {'.'.join(parts[: i + 1])} is not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {key!r}: {last!r} is not a valid index")
            node[int(last)] = _parse_scalar(value, key)
        else:
            node[last] = _parse_scalar(value, key)
    return raw


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {err.error_count()} problem(s)"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a setting of this section)"
        elif e["type"].endswith(("_type", "_parsing")) or e["type"] == "literal_error":
            msg += f", got {_shown(e.get('input'))}"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


# Keys that name files, resolved against the config file's directory by load_config.
# (section path, key): "*" walks every element of a list.
PATH_KEYS: tuple[tuple[str, ...], ...] = (
    ("ingest", "sources", "*", "path"), ("train", "deepspeed", "config_file"),
    ("train", "mdit", "mix_plan"), ("dynamics", "checkpoints", "*"), ("dynamics", "reference_run"),
    ("dynamics", "train", "deepspeed", "config_file"), ("evaluate", "benchmarks", "*", "path"),
    ("lmmixup", "mixture", "files", "*"), ("lmmixup", "sft", "deepspeed", "config_file"))
# Keys that hold a file/directory OR a name (model alias, hub id, column): resolved only when
# written as an explicit relative path (./x, ../x) or when that path exists beside the config.
PATH_OR_NAME_KEYS: tuple[tuple[str, ...], ...] = (
    ("embed", "model"), ("score", "model"), ("mix", "model"), ("train", "model"),
    ("train", "sftmix", "confidence"), ("dynamics", "model"), ("dynamics", "train", "model"),
    ("evaluate", "model"), ("evaluate", "trained"), ("evaluate", "judge", "model"),
    ("evaluate", "contamination", "model"), ("lmmixup", "sft", "model"), ("lmmixup", "grpo", "model"),
    ("lmmixup", "generate", "base_model"), ("lmmixup", "rewards", "reward_model"))


def _anchor(value: Any, base: Path, name_or_path: bool) -> Any:
    """``value`` as an absolute path under ``base`` if it is a relative path, else unchanged."""
    if not isinstance(value, str) or not value or "://" in value or value.startswith("~"):
        return value  # pkg://, s3://..., ~/...: not relative to the config
    if Path(value).is_absolute():
        return value
    candidate = (base / value).resolve()
    if name_or_path and not (value.startswith(("./", "../")) or candidate.exists()):
        return value
    return str(candidate)


def _walk(node: Any, keys: tuple[str, ...], base: Path, name_or_path: bool) -> None:
    """Anchor the value at ``keys`` inside the raw YAML ``node`` (in place; tolerant of bad shapes)."""
    head, rest = keys[0], keys[1:]
    if head == "*":
        children: Any = range(len(node)) if isinstance(node, list) else ()
    else:
        children = (head,) if isinstance(node, dict) and head in node else ()
    for k in children:
        if rest:
            _walk(node[k], rest, base, name_or_path)
        else:
            node[k] = _anchor(node[k], base, name_or_path)


def resolve_config_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the relative file paths of a raw config absolute under ``base`` (in place, returned).

    ``base`` is the config file's directory, so a config works from any working directory.
    ``pkg://``, URLs, ``~`` and absolute paths are unchanged; ``run_dir`` is NOT resolved
    here (it stays relative to the working directory, where the user runs mixray).
    """
    for keys in PATH_KEYS:
        _walk(raw, keys, base, name_or_path=False)
    for keys in PATH_OR_NAME_KEYS:
        _walk(raw, keys, base, name_or_path=True)
    return raw


def _shown(value: Any) -> str:
    """A received value as the user wrote it in YAML (true, not True), cut short."""
    text = json.dumps(value, default=str) if isinstance(value, bool | None | int | float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML, apply overrides, validate. Raises ConfigError listing every problem.

    Relative paths written in the file resolve against the file's directory
    (:func:`resolve_config_paths`); paths given as overrides on the command line are
    left as typed (relative to the working directory, like any shell argument), and so is
    ``run_dir``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = _yaml_load(path.read_text(encoding="utf-8"), str(path)) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})",
                          where=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    resolve_config_paths(raw, path.resolve().parent)
    apply_overrides(raw, overrides or [])
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
