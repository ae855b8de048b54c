"""The demo-world study: TRD against OPD, OPSD and two token-level fixes, over several seeds.

    python benchmarks/study.py --seeds 0 1 2 --steps 200 --val-every 25 --samples 4 --out benchmarks/results

Each (method, seed) is a real ``trd fit`` of a demo config with a few overrides: the seed (data order and
rollouts), the step count, and validation with ``--samples`` sampled responses per problem at temperature 1,
so every validation logs ``val/avg@k`` and ``val/pass@k``. Runs go to separate processes (``--workers``, one
thread each) and each writes its curve to ``OUT/curves/<method>_seed<s>.json`` when it ends; a rerun skips the
finished ones. The script then prints a Markdown table (mean and sample standard deviation over seeds) and writes
it with PNG plots of the curves to OUT. Each curve also keeps its run's wall seconds (a loaded machine inflates
them; they are not in the table).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parent.parent

OPD, OPSD, TRD = ["configs/demo.yaml"], ["configs/demo_opsd.yaml"], ["configs/trd.yaml"]
# name -> (configs, extra CLI overrides). The two token-level fixes are the TRD authors' baselines: per-token
# loss truncation at 0.1 and the OPSD authors' per-vocabulary-entry clip at 0.05, both on OPD.
METHODS: dict[str, tuple[list[str], list[str]]] = {
    "OPD": (OPD, []),
    "OPSD": (OPSD, []),
    "TRD-OPD": (OPD + TRD, []),
    "TRD-OPSD": (OPSD + TRD, []),
    "OPD + token clip": (OPD, ["--model.token_clip", "0.1"]),
    "OPD + pointwise clip": (OPD, ["--model.loss", "pointwise_clip", "--model.pointwise_clip", "0.05"]),
}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


class Curve(L.Callback):
    """Keeps every validation's val/* metrics with the step they were taken at."""

    def __init__(self) -> None:
        self.points: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.points.append({"step": trainer.global_step, **metrics})


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict:
    """One fit in this process; returns (and writes) its curve."""
    import torch

    from trd_lightning.cli import cli_main

    torch.set_num_threads(args.threads)
    configs, extra = METHODS[method]
    argv = [
        *(arg for config in configs for arg in ("--config", str(ROOT / config))), *extra,
        "--seed_everything", str(seed),
        "--data.seed", str(seed),
        "--trainer.max_steps", str(args.steps),
        "--trainer.val_check_interval", str(args.val_every),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(Path(args.runs)),
        "--trainer.logger.init_args.name", slug(method),
        "--trainer.logger.init_args.version", f"seed{seed}",
        "--data.validation.samples", str(args.samples),
        "--data.validation.temperature", "1.0",
    ]  # fmt: skip
    start = time.perf_counter()
    cli = cli_main(argv, run=False)
    curve = Curve()
    cli.trainer.callbacks.append(curve)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    result = {"method": method, "seed": seed, "seconds": time.perf_counter() - start, "curve": curve.points}
    path = Path(args.out) / "curves" / f"{slug(method)}_seed{seed}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


def spread(values: list[float]) -> str:
    """Mean ± sample standard deviation, in percent."""
    mean = 100 * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def first_step_at(curve: list[dict], key: str, level: float) -> float:
    return next((p["step"] for p in curve if p[key] >= level), math.inf)


def table(results: list[dict], k: int, level: float) -> str:
    """Markdown table: final avg@k and pass@k, the mean avg@k over the curve, and the first step at avg@k >= level."""
    avg, pas = f"val/avg@{k}", f"val/pass@{k}"
    lines = [
        f"| method | seeds | final avg@{k} (%) | final pass@{k} (%) | mean avg@{k} over the run (%) "
        f"| first step at avg@{k} ≥ {level:.0%} |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        final_avg = [r["curve"][-1][avg] for r in runs]
        final_pass = [r["curve"][-1][pas] for r in runs]
        area = [statistics.fmean(p[avg] for p in r["curve"]) for r in runs]
        reach = [first_step_at(r["curve"], avg, level) for r in runs]
        reached = [s for s in reach if s != math.inf]
        reach_text = (
            f"{statistics.fmean(reached):.0f} ({len(reached)}/{len(runs)} seeds)"
            if reached
            else f"never (0/{len(runs)})"
        )
        lines.append(
            f"| {method} | {len(runs)} | {spread(final_avg)} | {spread(final_pass)} | {spread(area)} | {reach_text} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], k: int, out: Path) -> list[Path]:
    """One PNG per metric: the mean over seeds as a line, the range over seeds as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, label in ((f"val/avg@{k}", f"avg@{k}"), (f"val/pass@{k}", f"pass@{k}")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for method in METHODS:
            runs = [r for r in results if r["method"] == method]
            if not runs:
                continue
            steps = [p["step"] for p in runs[0]["curve"]]
            values = [[p[key] for p in r["curve"]] for r in runs]
            mean = [statistics.fmean(v) for v in zip(*values)]
            ax.plot(steps, mean, marker="o", markersize=3, label=method)
            ax.fill_between(steps, [min(v) for v in zip(*values)], [max(v) for v in zip(*values)], alpha=0.15)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"validation {label} (T=1, 128 problems)")
        ax.set_title(f"Demo world: {label}, mean over seeds (band: min to max)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out / f"study_{label.replace('@', '_at_')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--samples", type=int, default=4, help="k: sampled responses per validation problem")
    parser.add_argument("--level", type=float, default=0.5, help="the table's avg@k level to reach")
    parser.add_argument("--workers", type=int, default=2, help="runs at once (separate processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default="benchmarks/results", help="curves, table and plots")
    parser.add_argument("--runs", default="runs/study", help="TensorBoard logs and checkpoints of each run")
    args = parser.parse_args()

    out = Path(args.out)
    (out / "curves").mkdir(parents=True, exist_ok=True)
    todo = [
        (m, s) for m in args.methods for s in args.seeds if not (out / "curves" / f"{slug(m)}_seed{s}.json").exists()
    ]
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_one, m, s, args): (m, s) for m, s in todo}
        for future in futures:
            result = future.result()
            last = result["curve"][-1]
            print(
                f"{result['method']} seed {result['seed']}: avg@{args.samples} {last[f'val/avg@{args.samples}']:.3f} "
                f"in {result['seconds'] / 60:.1f} min",
                flush=True,
            )

    results = [
        json.loads((out / "curves" / f"{slug(m)}_seed{s}.json").read_text()) for m in args.methods for s in args.seeds
    ]
    text = table(results, args.samples, args.level)
    command = (
        f"python benchmarks/study.py --seeds {' '.join(map(str, args.seeds))} --steps {args.steps} "
        f"--val-every {args.val_every} --samples {args.samples} --out {args.out}"
    )
    (out / "study.md").write_text(f"{text}\n\nProduced by `{command}`.\n")
    print(text)
    for path in plot(results, args.samples, out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
