"""The ``mixray`` command.

    mixray validate CONFIG [key.path=value ...]     check a config, report every problem
    mixray ingest   CONFIG [overrides] [--force]    sources -> examples.parquet + rejects
    mixray embed    CONFIG [overrides] [--force]    examples -> embeddings.parquet (Ray Data)
    mixray score    CONFIG [overrides] [--force]    examples -> quality.parquet (Ray Data)
    mixray train    CONFIG [overrides] [--force]    selection -> fine-tuned model (Ray Train + DeepSpeed)
    mixray run      CONFIG [overrides] [--force]    every stage listed in ``stages``, in order

Heavy libraries (ray, torch, transformers) are imported inside the subcommands,
so ``mixray --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mixray.errors import MixrayError
from mixray.stages import STAGES

log = logging.getLogger("mixray")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mixray",
        description="Data-centric instruction tuning at cluster scale, on Ray.",
        epilog="Overrides: key.path=value after CONFIG, e.g. embed.batch_size=512 ingest.sources.0.limit=100",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (user errors print one line without it)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {"validate": "validate a config and print the resolved result"}
    helps |= {name: text for name, (_, text) in STAGES.items()}
    helps["run"] = "run the stages listed in the config's 'stages', in order"
    for name, text in helps.items():
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("config", metavar="CONFIG", help="YAML config file")
        sp.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
        if name != "validate":
            sp.add_argument("--force", action="store_true", help="recompute even if unchanged")
    return p


def _validate(cfg) -> list[str]:
    """Checks beyond the schema that need no heavy import: files and models exist (one per problem)."""
    from mixray.models.registry import check_model
    from mixray.stages.ingest import source_problems

    problems = source_problems(cfg.ingest)[1]
    checks = [("embed.model", cfg.embed.model, "embed" in cfg.stages)]
    checks.append(("score.model", cfg.score.model, "score" in cfg.stages and cfg.score.backend != "column"))
    checks.append(("mix.model", cfg.mix.model, "mix" in cfg.stages))
    checks.append(("train.model", cfg.train.model, "train" in cfg.stages))
    lm = cfg.lmmixup
    checks.append(("lmmixup.sft.model", lm.sft.model, "distill_sft" in cfg.stages))
    checks.append(("lmmixup.grpo.model", lm.grpo.model or "", "distill_grpo" in cfg.stages and lm.grpo.model))
    checks.append(("lmmixup.generate.base_model", lm.generate.base_model,
                   "distill" in cfg.stages and lm.generate.distiller == "base"))
    checks.append(("lmmixup.rewards.reward_model", lm.rewards.reward_model or "",
                   bool({"distill_grpo", "distill"} & set(cfg.stages)) and bool(lm.rewards.reward_model)))
    for setting, name, used in checks:
        if used:
            try:
                check_model(name, setting)
            except MixrayError as e:
                problems.append(str(e))
    return problems


def _user_error(e: BaseException) -> MixrayError | None:
    """The MixrayError behind ``e``: itself, or the cause of a Ray task/actor error."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, MixrayError) and type(e).__module__.startswith("mixray"):
            return e
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return None


def _command(args) -> int:
    from mixray.config import dump_config, load_config

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
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
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
