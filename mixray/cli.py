"""The ``mixray`` command.

    mixray init     [RECIPE] [DIR] [--force]        copy a shipped config (demo, train_demo, mdit) into DIR
    mixray validate CONFIG [key.path=value ...]     check a config, report every problem
    mixray ingest   CONFIG [overrides] [--force]    sources -> examples.parquet + rejects
    mixray embed    CONFIG [overrides] [--force]    examples -> embeddings.parquet (Ray Data)
    mixray score    CONFIG [overrides] [--force]    examples -> quality.parquet (Ray Data)
    mixray dynamics CONFIG [overrides] [--force]    SFTMix: reference run -> confidence.parquet
    mixray train    CONFIG [overrides] [--force]    selection -> fine-tuned model (Ray Train + DeepSpeed)
    mixray run      CONFIG [overrides] [--force]    every stage listed in ``stages``, in order
    mixray report   RUN_DIR [RUN_DIR ...] [--out D] one HTML page (+ Markdown) over runs, and the eval table

Heavy libraries (ray, torch, transformers) are imported inside the subcommands,
so ``mixray --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mixray import console
from mixray.algorithms.cores import kernel_env
from mixray.errors import MixrayError
from mixray.stages import STAGES

log = logging.getLogger("mixray")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mixray",
        description="Data-centric instruction tuning at cluster scale, on Ray.",
        epilog="Overrides: key.path=value after CONFIG, e.g. embed.batch_size=512 ingest.sources.0.limit=100",
    )
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show everything: DEBUG logs, Ray's and the libraries' own output and "
                        "progress (default: mixray's lines and one progress bar per stage)")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (user errors print one line without it)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _init_parser(sub)
    helps = {"validate": "validate a config and print the resolved result"}
    helps |= {name: text for name, (_, text) in STAGES.items()}
    helps["run"] = "run the stages listed in the config's 'stages', in order"
    for name, text in helps.items():
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("config", metavar="CONFIG", help="YAML config file")
        sp.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
        if name != "validate":
            sp.add_argument("--force", action="store_true", help="recompute even if unchanged")
    text = "one self-contained HTML report (and a Markdown twin) over one run or several compared"
    rp = sub.add_parser("report", help=text, description=text)
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    rp.add_argument("--out", metavar="DIR", help="output directory (default: RUN_DIR/report, or "
                    "report-<a>-vs-<b> beside the first run when comparing)")
    return p


def _init_parser(sub) -> None:
    from mixray.choices import RECIPES

    text = "copy a config shipped with mixray (and the DeepSpeed templates) into a directory"
    sp = sub.add_parser("init", help=text, description=text + ", e.g. `mixray init demo .` "
                        "then `mixray run demo.yaml`")
    sp.add_argument("recipe", nargs="?", default="demo", choices=RECIPES, help="default: demo")
    sp.add_argument("dir", nargs="?", default=".", help="where to write it (default: .)")
    sp.add_argument("--force", action="store_true", help="overwrite existing files")


def _init(args) -> int:
    from mixray.recipes import init_recipe

    written = init_recipe(args.recipe, args.dir, args.force)
    for path in written:
        print(path)
    print(f"run it: mixray run {written[0]}   (check it: mixray validate {written[0]})",
          file=sys.stderr)
    return 0


def _validate(cfg) -> list[str]:
    """Checks beyond the schema that need no heavy import, one problem each: every source,
    every model the stages use (a directory, or an offline alias whose packages are installed)
    and every file the train stage would read."""
    from mixray.stages.ingest import source_problems

    return source_problems(cfg.ingest)[1] + _model_problems(cfg) + _train_file_problems(cfg)


def _model_problems(cfg) -> list[str]:
    from mixray.models.registry import check_model

    checks = [("embed.model", cfg.embed.model, "embed" in cfg.stages)]
    checks.append(("score.model", cfg.score.model, "score" in cfg.stages and cfg.score.backend != "column"))
    checks.append(("mix.model", cfg.mix.model, "mix" in cfg.stages))
    given = cfg.dynamics.checkpoints is not None or cfg.dynamics.reference_run is not None
    reference = cfg.reference_train().model  # train.model unless dynamics sets another (checked once)
    checks.append(("dynamics.model", reference, "dynamics" in cfg.stages and not given
                   and not (reference == cfg.train.model and "train" in cfg.stages)))
    checks.append(("train.model", cfg.train.model, "train" in cfg.stages))
    ev = "evaluate" in cfg.stages
    checks.append(("evaluate.model", cfg.evaluate.model or cfg.train.model, ev))
    checks.append(("evaluate.judge.model", cfg.evaluate.judge.model, ev and cfg.evaluate.judge.model))
    checks.append(("evaluate.contamination.model", cfg.evaluate.contamination.model,
                   ev and cfg.evaluate.contamination.enabled))
    lm = cfg.lmmixup
    checks.append(("lmmixup.sft.model", lm.sft.model, "distill_sft" in cfg.stages))
    checks.append(("lmmixup.grpo.model", lm.grpo.model or "", "distill_grpo" in cfg.stages and lm.grpo.model))
    checks.append(("lmmixup.generate.base_model", lm.generate.base_model,
                   "distill" in cfg.stages and lm.generate.distiller == "base"))
    checks.append(("lmmixup.rewards.reward_model", lm.rewards.reward_model or "",
                   bool({"distill_grpo", "distill"} & set(cfg.stages)) and bool(lm.rewards.reward_model)))
    problems = []
    for setting, name, used in checks:
        if used:
            try:
                check_model(name, setting)
            except MixrayError as e:
                problems.append(str(e))
    return problems + _benchmark_problems(cfg) if ev else problems


def _benchmark_problems(cfg) -> list[str]:
    from mixray.io.readers import resolve_path

    problems = []
    for b in cfg.evaluate.benchmarks:
        try:
            if not resolve_path(b.path).is_file():
                problems.append(f"evaluate.benchmarks[{b.name}].path: {b.path} does not exist")
        except MixrayError as e:
            problems.append(f"evaluate.benchmarks[{b.name}].path: {e}")
    return problems


def _train_file_problems(cfg) -> list[str]:
    """Files the train stage reads that are given in the config (a missing one is a problem)."""
    from pathlib import Path

    t = cfg.train
    if "train" not in cfg.stages:
        return []
    files = [("train.deepspeed.config_file", t.deepspeed.config_file if t.deepspeed.enabled else None),
             ("train.mdit.mix_plan", t.mdit.mix_plan if t.loss == "mdit" else None)]
    if t.loss == "sftmix" and t.sftmix.confidence and t.sftmix.confidence.endswith(".parquet"):
        files.append(("train.sftmix.confidence", t.sftmix.confidence))
    return [f"{key}: {path} does not exist" for key, path in files
            if path and not Path(path).expanduser().is_file()]


def _user_error(e: BaseException) -> MixrayError | None:
    """The MixrayError behind ``e``: itself, or the cause of a Ray task/actor error."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, MixrayError) and type(e).__module__.startswith("mixray"):
            return e
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return None


def _report(args) -> int:
    from mixray.report import write_report

    html_path, md_path, table = write_report(args.run_dirs, args.out)
    if table:
        print(table)
    else:
        print("(no run has an evaluate stage yet: no evaluation table)")
    print(f"report: {html_path}\nmarkdown: {md_path}")
    return 0


def _command(args) -> int:
    from mixray.config import dump_config, load_config

    if args.command == "report":
        return _report(args)
    if args.command == "init":
        return _init(args)
    cfg = load_config(args.config, args.overrides)
    if args.command == "validate":
        problems = _validate(cfg)
        if problems:
            print(f"{args.config}: {len(problems)} problem(s)", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            return 2
        print(dump_config(cfg), end="")
        print(f"{args.config}: OK", file=sys.stderr)
        return 0
    from mixray.stages.runner import run_stages

    run_stages(cfg, cfg.stages if args.command == "run" else [args.command], args.force)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console.setup(args.verbose)  # before ray, torch or transformers are imported
    os.environ.update(kernel_env())  # before torch loads OpenMP: selection and KMeans run here
    try:
        return _command(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        err = _user_error(e)
        if err is None or args.debug:
            raise
        print(f"mixray {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
