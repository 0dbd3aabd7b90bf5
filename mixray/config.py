"""Typed run configuration: YAML in, validated pydantic models out.

Every section forbids unknown keys, so a typo (``embed.batchsize``) is an error
that names the key instead of a silently ignored setting. ``a.b=c`` overrides
from the command line are applied to the raw YAML before validation, so they
are validated exactly like the file.

This module imports only pydantic and yaml: ``mixray --help`` and
``mixray validate`` stay instant.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mixray.errors import ConfigError

# Closed choices, looked up in one place (STYLE.md §8).
SourceFormat = Literal["auto", "jsonl", "json", "parquet", "csv", "hf"]
EncoderKind = Literal["sentence-transformers", "lm-embedding", "lm-last-hidden"]
EmbedText = Literal["instruction", "full", "output"]
ScoreBackend = Literal["ifd", "reward-model", "column"]
SelectMethod = Literal["qdit", "random", "quality", "threshold", "cluster"]
SelectOptimizer = Literal["lazy", "naive", "stochastic"]
SelectDistributed = Literal["none", "sharded", "greedi"]
Device = Literal["auto", "cpu", "cuda"]
StageName = Literal["ingest", "embed", "score", "select"]
STAGE_ORDER: tuple[StageName, ...] = ("ingest", "embed", "score", "select")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    all turns. ``quality`` (optional) carries a numeric score column.
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


class IngestConfig(_Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    drop_duplicates: bool = False

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


class EmbedConfig(ActorPoolConfig):
    encoder: EncoderKind = "sentence-transformers"
    model: str = "all-MiniLM-L6-v2"
    text: EmbedText = "instruction"
    normalize: bool = True
    max_length: int = Field(default=256, ge=8)
    encode_batch_size: int = Field(default=64, ge=1, description="sentence-transformers minibatch")


class ScoreConfig(ActorPoolConfig):
    backend: ScoreBackend = "ifd"
    model: str = "SmolLM2-135M-Instruct"
    column: str = "quality"
    max_length: int = Field(default=512, ge=16)
    label_index: int = Field(default=0, ge=0, description="reward-model logit used as score")
    batch_size: int = Field(default=16, ge=1)
    sample: int | None = Field(default=None, ge=1, description="score a seeded sample only")
    trust_remote_code: bool = False


class SelectConfig(_Strict):
    """QDIT selection (methods.md §1): K examples maximising (1-a)*d(A)/N + a*mean q(A).

    ``alpha`` may be a list (a sweep): one selection per value, the first one
    is the main selection (``selection.parquet``, ``selected.jsonl``).
    """

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
    actors: int = Field(default=2, ge=1, description="sharded: number of shard actors")
    partitions: int = Field(default=4, ge=1, description="greedi: number of partitions")
    num_cpus: float = Field(default=1, gt=0, description="CPUs reserved per actor/task")
    num_gpus: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        default="auto", description="GPUs per actor; auto = 1 when the cluster has GPUs, else 0")
    threads: int | None = Field(default=None, ge=1,
                                description="torch threads (driver and each CPU actor)")
    memory_budget_mb: float = Field(
        default=512, ge=0, description="sparse similarity cache (MB, total); 0 = fully matrix-free")
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


class RunConfig(_Strict):
    run_dir: str = "runs/default"
    seed: int = 0
    stages: list[StageName] = Field(default_factory=lambda: list(STAGE_ORDER))
    ray: RayConfig = RayConfig()
    ingest: IngestConfig
    embed: EmbedConfig = EmbedConfig()
    score: ScoreConfig = ScoreConfig()
    select: SelectConfig = SelectConfig()

    @model_validator(mode="after")
    def _stage_order(self) -> RunConfig:
        order = [STAGE_ORDER.index(s) for s in self.stages]
        if order != sorted(set(order)):
            raise ValueError(f"stages must be unique and in the order {list(STAGE_ORDER)}")
        return self


def section_hash(section: BaseModel | dict[str, Any]) -> str:
    """Stable sha256 of a config section (what a stage's skip decision keys on)."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _parse_scalar(text: str) -> Any:
    """``a.b=c`` values are parsed as YAML scalars/flow collections: 3, true, null, [1, 2]."""
    return yaml.safe_load(text) if text != "" else ""


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
            node[int(last)] = _parse_scalar(value)
        else:
            node[last] = _parse_scalar(value)
    return raw


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {err.error_count()} problem(s)"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a setting of this section)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML, apply overrides, validate. Raises ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    apply_overrides(raw, overrides or [])
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
