"""What the prefix-failure monitors cost, and what they show on the demo world: y_o against y_r.

    python benchmarks/diagnostics.py --config configs/demo.yaml configs/trd.yaml --steps 200

Runs the configs (stacked) twice in this process, from the same seed: without GradientFragmentationMonitor and
PrefixFailureMonitor, then with both at their default settings (every 50 steps). Prints the training-step time of
each run (rollout, refinement, loss and monitors; validation excluded) and their ratio, the monitors' own share
of the monitored run, and, per measured step, the monitors' y_o and y_r values side by side.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L

from trd_lightning import GradientFragmentationMonitor, PrefixFailureMonitor
from trd_lightning.cli import cli_main

KEYS = (
    "teacher/bimodal_frac",
    "teacher/entropy",
    "frag/coherence",
    "frag/grad_cosine",
    "frag/prefix_conflict",
    "prefix/diverged_frac",
    "prefix/first_divergence",
    "prefix/kl_before",
    "prefix/kl_after",
)


class StepClock(L.Callback):
    """Wall time of every training step (on_train_batch_start to on_train_batch_end), and the monitors' values
    on the steps they measure (every ``every`` steps)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.seconds: list[float] = []
        self.values: dict[int, dict[str, float]] = {}
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        step = trainer.global_step - 1  # the optimizer has stepped
        if step % self.every == 0:
            measured = [c.history.get(step, {}) for c in trainer.callbacks if hasattr(c, "history")]
            self.values[step] = {
                k: v for m in measured for k, v in m.items() if k.startswith(("frag/", "teacher/", "prefix/"))
            }


class Timed:
    """Wraps a monitor's ``measure`` to add up the seconds it takes."""

    def __init__(self, monitor) -> None:
        self.seconds = 0.0
        measure = monitor.measure

        def timed(*args):
            start = time.perf_counter()
            measure(*args)
            self.seconds += time.perf_counter() - start

        monitor.measure = timed


def run(configs: list[str], steps: int, monitored: bool, root: Path) -> tuple[StepClock, float]:
    argv = [
        *(arg for config in configs for arg in ("--config", config)),
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.logger.init_args.name", "monitored" if monitored else "plain",
    ]  # fmt: skip
    cli = cli_main(argv, run=False)
    monitors = (GradientFragmentationMonitor, PrefixFailureMonitor)
    callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, monitors)]
    timers = []
    if monitored:
        added = [GradientFragmentationMonitor(), PrefixFailureMonitor()]
        timers = [Timed(m) for m in added]
        callbacks += added
    clock = StepClock(GradientFragmentationMonitor().every_n_steps)
    cli.trainer.callbacks[:] = [*callbacks, clock]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return clock, sum(t.seconds for t in timers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=["configs/demo.yaml", "configs/trd.yaml"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runs", default="runs/diagnostics", help="TensorBoard logs of the two runs")
    args = parser.parse_args()

    plain, _ = run(args.config, args.steps, False, Path(args.runs))
    monitored, monitor_seconds = run(args.config, args.steps, True, Path(args.runs))
    base, with_monitors = sum(plain.seconds), sum(monitored.seconds)
    print(f"\n{' + '.join(args.config)}, {args.steps} steps, monitors at their defaults (every 50 steps)")
    print(f"training-step time without monitors: {base:.1f} s ({base / args.steps * 1000:.0f} ms/step)")
    print(
        f"training-step time with monitors:    {with_monitors:.1f} s ({with_monitors / args.steps * 1000:.0f} ms/step)"
    )
    print(f"ratio: {with_monitors / base:.3f}; the monitors' own time: {monitor_seconds:.1f} s "
          f"= {monitor_seconds / with_monitors:.1%} of the monitored run")  # fmt: skip

    print("\n| step | metric | y_o | y_r |\n|---|---|---|---|")
    for step, values in sorted(monitored.values.items()):
        for key in KEYS:
            o, r = values.get(f"{key}/y_o"), values.get(f"{key}/y_r")
            if o is None and r is None:
                continue
            show = [f"{v:.3f}" if v is not None else "-" for v in (o, r)]
            print(f"| {step} | {key} | {show[0]} | {show[1]} |")


if __name__ == "__main__":
    main()
