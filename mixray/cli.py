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
from pathlib import Path

from mixray.errors import MixrayError
from mixray.stages import STAGES, run_stage

log = logging.getLogger("mixray")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mixray",
        description="Data-centric instruction tuning at cluster scale, on Ray.",
        epilog="Overrides: key.path=value after CONFIG, e.g. embed.batch_size=512 ingest.sources.0.limit=100",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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


def _run_stages(cfg, stages: list[str], force: bool) -> dict:
    from mixray.config import dump_config

    run_dir = Path(cfg.run_dir).resolve()  # Ray workers do not share the driver's working directory
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    results = {stage: run_stage(stage, cfg, run_dir, force) for stage in stages}
    log.info("done: %s -> %s", ", ".join(stages), run_dir)
    return results


def _validate(cfg) -> list[str]:
    """Checks beyond the schema that need no heavy import: files and models exist."""
    from mixray.models.registry import check_model
    from mixray.stages.ingest import source_paths

    problems = []
    try:
        source_paths(cfg.ingest)
    except MixrayError as e:
        problems.append(str(e))
    checks = [("embed.model", cfg.embed.model, "embed" in cfg.stages)]
    checks.append(("score.model", cfg.score.model, "score" in cfg.stages and cfg.score.backend != "column"))
    checks.append(("mix.model", cfg.mix.model, "mix" in cfg.stages))
    checks.append(("train.model", cfg.train.model, "train" in cfg.stages))
    for setting, name, used in checks:
        if used:
            try:
                check_model(name, setting)
            except MixrayError as e:
                problems.append(str(e))
    return problems


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    from mixray.config import dump_config, load_config

    try:
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
        stages = cfg.stages if args.command == "run" else [args.command]
        _run_stages(cfg, stages, args.force)
        return 0
    except MixrayError as e:
        print(f"mixray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
