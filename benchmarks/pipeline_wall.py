"""The main job's wall time per stage: `aletheia run` on params/default.yaml from scratch, all eight stages.

    .venv/bin/python benchmarks/pipeline_wall.py [--run-name bench-default] [--params params/default.yaml]
    .venv/bin/python benchmarks/pipeline_wall.py --existing runs/quiet-base   # tabulate a finished run instead

Also records the run's headline results, so the time is read next to what it bought: SFT and DPO held-out losses
and 08_evaluate's verdicts with the paired differences they rest on, and its implicit reward on the held-out
preference pairs. Writes
benchmarks/results/pipeline_wall.{json,png}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common

import aletheia_utils as au


def headline(run: Path) -> dict:
    """What the run produced, from its metrics files (missing ones are left out)."""
    metrics = {}
    for stage in au.pipeline.STAGES:
        path = run / "metrics" / f"{stage}.json"
        if path.is_file():
            metrics[stage] = json.loads(path.read_text())
    out = {}
    for stage, keys in {"02_sft": ("steps", "train_loss", "val_loss_before", "val_loss_after", "tokens_per_s"),
                        "03_dpo": ("steps", "train_loss", "pairs_per_s")}.items():
        out[stage] = {k: metrics.get(stage, {}).get(k) for k in keys}
    dpo_eval = metrics.get("03_dpo", {}).get("eval", {})
    out["03_dpo"] |= {k: dpo_eval.get(k) for k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")}
    ev = metrics.get("08_evaluate", {})
    out["comparisons"] = {pair: {"verdict": c.get("verdict"),
                                 **{k: c.get("differences", {}).get(k) for k in au.evaluate.VERDICT_METRICS}}
                          for pair, c in ev.get("comparisons", {}).items()}
    out["preference"] = ev.get("preference", {})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(common.ROOT / "params" / "default.yaml"))
    parser.add_argument("--run-name", default="bench-default")
    parser.add_argument("--existing", default=None, help="a finished run folder to tabulate instead of running")
    args = parser.parse_args()
    machine = common.machine()
    if args.existing:
        run = Path(args.existing).resolve()
    else:
        cfg = au.config.load(args.params, {"run.name": args.run_name})
        au.pipeline.run(cfg, force=True)
        run = cfg.runs_dir / args.run_name
    manifest = json.loads((run / "manifest.json").read_text())
    stages = {s: e.get("wall_time_s") for s, e in manifest["stages"].items()}
    done = [s for s, e in manifest["stages"].items() if e.get("status") == "complete"]
    if len(done) != len(au.pipeline.STAGES):
        raise SystemExit(f"{run}: not every stage is complete: {stages}")
    total = sum(stages.values())
    print({"stages_s": stages, "total_min": round(total / 60, 1)})
    common.write("pipeline_wall", {"machine": machine, "run": common.relative(run),
                                   "params": manifest.get("params") and common.relative(manifest["params"]),
                                   "stages_s": stages, "total_s": total, "target_s": 35 * 60,
                                   "results": headline(run)}, {}, "", figure=figure(stages))


def figure(stages: dict[str, float]):
    """Wall minutes per stage, the stage names slanted so they stay readable."""
    fig = au.plots.bars({s: round(t / 60, 1) for s, t in stages.items()},
                        f"default.yaml, all stages: {sum(stages.values()) / 60:.1f} min", "wall minutes")
    fig.axes[0].tick_params(axis="x", labelrotation=30)
    return fig


if __name__ == "__main__":
    main()
