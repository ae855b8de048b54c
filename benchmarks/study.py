"""The demo-world study: TRD against OPD, OPSD and token-level fixes, over several seeds, by steps and by compute.

    python benchmarks/study.py --seeds 0 1 2 --steps 200 --val-every 25 --samples 4 --out benchmarks/results

Each (method, seed) is a real ``trd fit`` of the demo configs with a few overrides: the seed (data order and
rollouts), the step count, and validation with ``--samples`` sampled responses per problem at temperature 1, so
every validation logs ``val/avg@k`` and ``val/pass@k``. Runs go to separate processes (``--workers``, one thread
each) and each writes its curve to ``OUT/curves/<method>_seed<s>.json`` when it ends; a rerun skips the finished
ones made on the same demo world (its weights and ``world.json``) with the same steps, validation interval and k,
and runs the others again. Each curve point keeps the run's training seconds so far (every step's rollouts,
refinement, loss and monitors; validation excluded), so methods compare by compute as well as by steps, and the demo
configs' monitors' readings.

The script then writes ``OUT/study.md``: the table (mean and sample standard deviation over seeds) of final avg@k and
pass@k, avg@k at OPD's training time (compute-matched: each run's curve read at the mean seconds OPD's runs took,
linearly between validations), the seconds per step; and the monitors' table (y_o against y_r). PNG plots of the
curves by step and by seconds go beside it. Runs on a loaded machine take longer: the seconds compare runs of one
study, which shared the machine alike.
"""

from __future__ import annotations

import argparse
import hashlib
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
REFINE_CONTEXT = ["--data.refine.teacher_context", "refine"]  # the authors' teacher context (the demo uses original)


def scheduled(mode: str) -> list[str]:
    """TRD-OPD refining only the rollouts of ``mode`` (the overlay's scheduler, told which)."""
    return ["--trainer.callbacks.mode", mode]


# name -> (configs, extra CLI overrides). The token-level fixes are the TRD authors' baselines (per-token loss
# truncation at 0.1, the OPSD authors' per-vocabulary-entry clip at 0.05, reverse KL on the teacher's renormalised
# top-32) and our reading of TOPD, all on OPD. The last two ask whether TRD's gain survives at a fraction of its
# generation cost.
METHODS: dict[str, tuple[list[str], list[str]]] = {
    "OPD": (OPD, []),
    "OPSD": (OPSD, []),
    "TRD-OPD": (OPD + TRD, []),
    "TRD-OPD, refine context": (OPD + TRD, REFINE_CONTEXT),
    "TRD-OPSD": (OPSD + TRD, []),
    "TRD-OPSD, refine context": (OPSD + TRD, REFINE_CONTEXT),
    "OPD + token clip": (OPD, ["--model.token_clip", "0.1"]),
    "OPD + pointwise clip": (OPD, ["--model.loss", "pointwise_clip", "--model.pointwise_clip", "0.05"]),
    "OPD + top-k reverse KL": (
        OPD,
        ["--model.loss", "topk", "--model.beta", "1.0", "--model.loss_top_k", "32", "--model.loss_top_k_tail", "false"],
    ),
    "OPD + TOPD": (OPD, ["--model.topd", "true"]),
    "TRD-OPD, incorrect only": (OPD + TRD, scheduled("incorrect")),
    "TRD-OPD, divergent only": (OPD + TRD, scheduled("divergent")),
}
MONITORED = (
    "teacher/bimodal_frac",
    "teacher/entropy",
    "frag/coherence",
    "frag/prefix_conflict",
    "prefix/diverged_frac",
)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


class Curve(L.Callback):
    """Keeps every validation's val/* metrics with its step and the training seconds so far, and the monitors'
    readings of the steps they measured."""

    def __init__(self) -> None:
        self.points: list[dict[str, float]] = []
        self.monitors: list[dict[str, float]] = []
        self.seconds, self._start = 0.0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds += time.perf_counter() - self._start
        step = trainer.global_step - 1
        measured = [c.history.get(step, {}) for c in trainer.callbacks if hasattr(c, "history")]
        readings = {k: v for m in measured for k, v in m.items() if k.startswith(MONITORED)}
        if readings and (not self.monitors or self.monitors[-1]["step"] != step) and step % 50 == 0:
            self.monitors.append({"step": step, **readings})

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.points.append({"step": trainer.global_step, "seconds": self.seconds, **metrics})


def fingerprint(args: argparse.Namespace) -> dict:
    """What a finished curve must have been made with to be reused: the demo world and the run settings."""
    from trd_lightning.data.demo import world

    folder, digest = world.world_dir(), hashlib.sha256()
    for name in ("world.json", "teacher/model.safetensors", "student/model.safetensors"):
        digest.update((folder / name).read_bytes())
    return {"world": digest.hexdigest()[:16], "steps": args.steps, "val_every": args.val_every, "samples": args.samples}


def finished(path: Path, made_with: dict) -> bool:
    """Whether ``path`` holds a curve made with ``made_with`` (a curve of another world or settings is stale)."""
    return path.exists() and json.loads(path.read_text()).get("made_with") == made_with


def run_one(method: str, seed: int, args: argparse.Namespace, made_with: dict) -> dict:
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
    result = {
        "method": method,
        "seed": seed,
        "made_with": made_with,
        "seconds": time.perf_counter() - start,
        "train_seconds": curve.seconds,
        "curve": curve.points,
        "monitors": curve.monitors,
    }
    path = Path(args.out) / "curves" / f"{slug(method)}_seed{seed}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


def spread(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """Mean ± sample standard deviation (in percent by default)."""
    mean = scale * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def at_seconds(curve: list[dict], key: str, seconds: float) -> float:
    """The curve's ``key`` at ``seconds`` of training, linearly between validations (its last value past its end)."""
    for before, after in zip(curve, curve[1:]):
        if after["seconds"] >= seconds:
            share = (seconds - before["seconds"]) / max(after["seconds"] - before["seconds"], 1e-9)
            return before[key] + share * (after[key] - before[key])
    return curve[-1][key]


def table(results: list[dict], k: int) -> str:
    """Markdown table: final avg@k and pass@k, avg@k at OPD's training seconds, and the seconds per step."""
    avg, pas = f"val/avg@{k}", f"val/pass@{k}"
    budget = statistics.fmean(r["train_seconds"] for r in results if r["method"] == "OPD")
    lines = [
        f"| method | seeds | final avg@{k} (%) | final pass@{k} (%) | avg@{k} at OPD's {budget:.0f} s (%) "
        "| training s / step |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        matched = [at_seconds(r["curve"], avg, budget) for r in runs]
        per_step = [r["train_seconds"] / r["curve"][-1]["step"] for r in runs]
        lines.append(
            f"| {method} | {len(runs)} | {spread([r['curve'][-1][avg] for r in runs])} "
            f"| {spread([r['curve'][-1][pas] for r in runs])} | {spread(matched)} | {spread(per_step, 1, 2)} |"
        )
    return "\n".join(lines)


def monitor_table(results: list[dict]) -> str:
    """The monitors' readings of the TRD methods, y_o / y_r, mean over seeds at each measured step."""
    lines = [
        "| method | step | " + " | ".join(f"`{m}` y_o / y_r" for m in MONITORED) + " |",
        "|---|---|" + "---|" * len(MONITORED),
    ]
    for method in METHODS:
        runs = [r for r in results if r["method"] == method and r.get("monitors")]
        if not runs or not method.startswith("TRD"):
            continue
        for step in sorted({p["step"] for r in runs for p in r["monitors"]}):
            cells = []
            for metric in MONITORED:
                pair = []
                for view in ("y_o", "y_r"):
                    values = [p[f"{metric}/{view}"] for r in runs for p in r["monitors"] if p["step"] == step]
                    values = [v for v in values if not math.isnan(v)]
                    pair.append(f"{statistics.fmean(values):.3f}" if values else "-")
                cells.append(" / ".join(pair))
            lines.append(f"| {method} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], k: int, out: Path) -> list[Path]:
    """avg@k and pass@k, by step and by training seconds: the mean over seeds, the range over seeds as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis in ("step", "seconds"):
        for key, label in ((f"val/avg@{k}", f"avg@{k}"), (f"val/pass@{k}", f"pass@{k}")):
            fig, ax = plt.subplots(figsize=(8, 4.8))
            for method in METHODS:
                runs = [r for r in results if r["method"] == method]
                if not runs:
                    continue
                xs = [statistics.fmean(p) for p in zip(*[[q[axis] for q in r["curve"]] for r in runs])]
                values = [[p[key] for p in r["curve"]] for r in runs]
                ax.plot(xs, [statistics.fmean(v) for v in zip(*values)], marker="o", markersize=3, label=method)
                ax.fill_between(xs, [min(v) for v in zip(*values)], [max(v) for v in zip(*values)], alpha=0.12)
            ax.set_xlabel("optimizer step" if axis == "step" else "training seconds (rollouts, refinement, loss)")
            ax.set_ylabel(f"validation {label} (T=1, 128 problems)")
            ax.set_title(f"Demo world: {label} by {axis}, mean over seeds (band: min to max)")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
            fig.tight_layout()
            path = out / f"study_{label.replace('@', '_at_')}_by_{axis}.png"
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
    parser.add_argument("--workers", type=int, default=2, help="runs at once (separate processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default="benchmarks/results", help="curves, tables and plots")
    parser.add_argument("--runs", default="runs/study", help="TensorBoard logs and checkpoints of each run")
    args = parser.parse_args()

    out = Path(args.out)
    (out / "curves").mkdir(parents=True, exist_ok=True)
    made_with = fingerprint(args)
    todo = [
        (m, s)
        for m in args.methods
        for s in args.seeds
        if not finished(out / "curves" / f"{slug(m)}_seed{s}.json", made_with)
    ]
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_one, m, s, args, made_with): (m, s) for m, s in todo}
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
    command = (
        f"python benchmarks/study.py --seeds {' '.join(map(str, args.seeds))} --steps {args.steps} "
        f"--val-every {args.val_every} --samples {args.samples} --out {args.out}"
    )
    text = f"{table(results, args.samples)}\n\n{monitor_table(results)}\n\nProduced by `{command}`.\n"
    (out / "study.md").write_text(text)
    print(text)
    for path in plot(results, args.samples, out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
