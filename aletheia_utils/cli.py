"""The `aletheia` command: `run` executes the notebooks with papermill; `validate-data` checks JSONL files;
`curate-at-scale` runs 01's curation as a datatrove pipeline; `setup-llama-cpp` fetches and builds llama.cpp's tools
for the installed llama-cpp-python; `gateway` serves the OpenAI-compatible gateway."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import config, data, llamacpp, pipeline


def _run(args) -> int:
    overrides = config.parse_overrides(args.set)
    if args.run_name:
        overrides["run.name"] = args.run_name
    cfg = config.load(args.params, overrides)
    try:
        pipeline.run(cfg, start=args.from_stage, stop=args.to_stage, force=args.force,
                     notebooks=Path(args.notebooks), log_output=args.log_output)
    except pipeline.StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"the partly executed notebook is in {pipeline.RunPaths.for_run(cfg).root / 'notebooks'}",
              file=sys.stderr)
        return 1
    except pipeline.RunLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _validate_data(args) -> int:
    failed = False
    for path in args.files:
        if not Path(path).is_file():
            print(f"{path}: no such file", file=sys.stderr)
            failed = True
            continue
        ok, problems = data.validate_file(path, args.kind)
        for p in problems:
            print(p, file=sys.stderr)
        empty = ok == 0 and not problems  # no rows at all: nothing to train or evaluate on is a problem too
        if empty:
            print(f"{path}: empty: no {args.kind} rows (blank lines only or no lines)", file=sys.stderr)
        print(f"{path}: {ok} valid {args.kind} row(s), {len(problems) + empty} problem(s)")
        failed |= bool(problems) or empty
    return 2 if failed else 0


def _curate_at_scale(args) -> int:
    from . import curate_scale  # deferred: datatrove loads only for this command

    cfg = config.load(args.params, config.parse_overrides(args.set))
    try:
        summary = curate_scale.run_params(cfg, args.input or cfg.data.raw_glob, args.output, fresh=args.fresh)
    except data.InvalidData as e:
        print(e, file=sys.stderr)
        return 2
    except (curate_scale.ExecutorUnavailable, curate_scale.StageFailed, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def _setup_llama_cpp(args) -> int:
    for key, value in llamacpp.setup().items():
        print(f"{key}: {value}")
    return 0


def _gateway(args) -> int:
    from . import gateway  # deferred: FastAPI, httpx and Prometheus load only for `aletheia gateway`

    gateway.run(gateway.load_config(args.config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aletheia", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks 01_curate … 08_evaluate with papermill")
    run.add_argument("--params", required=True, help="YAML params file, e.g. params/default.yaml")
    run.add_argument("--run-name", help="folder name under run.runs_dir (default: run.name)")
    run.add_argument("--from", dest="from_stage", help="first stage (e.g. 02_sft, 02 or sft)")
    run.add_argument("--to", dest="to_stage", help="last stage")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a param, e.g. sft.max_steps=5")
    run.add_argument("--force", action="store_true", help="rerun stages already complete for these params")
    run.add_argument("--notebooks", default=str(pipeline.NOTEBOOKS_DIR), help=argparse.SUPPRESS)
    run.add_argument("--log-output", action="store_true", help="stream the notebooks' output")
    run.set_defaults(func=_run)
    val = sub.add_parser("validate-data", help="check JSONL files row by row (exit 2 with FILE:LINE: field: reason)")
    val.add_argument("files", nargs="+", metavar="FILE")
    val.add_argument("--kind", required=True, choices=list(data.KINDS), help="what each row must be")
    val.set_defaults(func=_validate_data)
    scale = sub.add_parser("curate-at-scale", help="01's per-row steps and dedup as a datatrove pipeline "
                                                   "(local, Ray or Slurm: data.executor)")
    scale.add_argument("--params", required=True, help="YAML params file: data.* thresholds and data.executor")
    scale.add_argument("--input", help="glob of raw JSONL files (default: data.raw_glob)")
    scale.add_argument("--output", required=True, help="folder for kept/, removed/, rejected/, logs/, summary.json")
    scale.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a param, e.g. "
                                                                           "data.executor.tasks=8")
    scale.add_argument("--fresh", action="store_true", help="start over instead of resuming completed tasks")
    scale.set_defaults(func=_curate_at_scale)
    setup = sub.add_parser("setup-llama-cpp", help="unpack llama.cpp's converter; build llama-server, llama-imatrix "
                                                   "and llama-quantize (cached)")
    setup.set_defaults(func=_setup_llama_cpp)
    gw = sub.add_parser("gateway", help="serve the OpenAI-compatible gateway (auth, rate limit, filter, fail-over)")
    gw.add_argument("--config", required=True, help="gateway YAML file, e.g. params/gateway.yaml")
    gw.set_defaults(func=_gateway)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (config.ConfigError, llamacpp.SetupMissing, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
