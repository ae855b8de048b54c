"""Step time of TRD-OPD with the refiner served (``trd serve`` on loopback) against in-process refinement.

    OMP_NUM_THREADS=1 python benchmarks/served_refiner.py                 # the demo world, 4 steps, 2 rounds
    OMP_NUM_THREADS=1 python benchmarks/served_refiner.py --refine-temperature 0.6     # sampled rewrites

The script starts ``trd serve --model trd-demo/teacher`` on a free loopback port, then trains TRD-OPD on the demo
world with the demo config's settings (``configs/demo.yaml`` + ``configs/trd.yaml``: 32 prompts a step, 48-token
rollouts, greedy rewrites of every rollout, or sampled ones with ``--refine-temperature``) twice per round:
refining in-process, then with ``data.refine.url`` pointing at the service (``configs/demo_trd_served.yaml``).
Greedy rows share requests (``rows_per_request``); a sampled row goes in its own request, with its seed. Rounds
alternate the two ways, so a change in the machine's load affects both alike. A step is timed from
``on_train_batch_start`` to ``on_train_batch_end`` (rollouts, rewrites, the loss and the optimizer step); each run's
first step is a warm-up and is left out. The refine time is the DataModule's ``perf/refine_seconds``. The script
also checks that both ways wrote the same rewrites.

On one machine the service shares the trainer's cores, and every rewrite crosses HTTP and JSON: the ratio prices
that overhead. The point of serving is elsewhere: the refiner on other GPUs, and no refiner weights in the trainer.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import lightning as L

from trd_lightning import DistillationModule, OnPolicyDataModule, RefinementScheduler
from trd_lightning.data.options import PromptOptions, RefineOptions, RolloutOptions, ValidationOptions


class StepTimer(L.Callback):
    """Seconds of every step and its refine time; keeps the rewrites for the equality check."""

    def __init__(self) -> None:
        self.seconds, self.refine, self.rewrites = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        self.refine.append(batch.produced.stats["perf/refine_seconds"])
        self.rewrites.append(batch.produced.refined_text)


def run(url: str | None, steps: int, root: str, temperature: float) -> StepTimer:
    data = OnPolicyDataModule(
        train_data="trd-demo",
        batch_size=32,
        prompt=PromptOptions(student_template="{problem}", max_prompt_length=64, max_teacher_prompt_length=160),
        rollout=RolloutOptions(max_new_tokens=48),
        refine=RefineOptions(
            enabled=True,
            template="{problem}\nDraft:\n{initial}\nFix the draft.",
            teacher_context="original",
            max_prompt_length=160,
            temperature=temperature,
            url=url,
        ),
        validation=ValidationOptions(split=None),
    )
    module = DistillationModule(micro_batch_size=32, lr=1e-3, warmup_ratio=0.0)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[timer, RefinementScheduler()],
    )
    trainer.fit(module, data)
    return timer


def start_server(log: Path, wait_ms: float) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "trd_lightning", "serve", "--model", "trd-demo/teacher", "--port", str(port)]
    command += ["--batch-wait-ms", str(wait_ms)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"trd serve exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("trd serve did not come up within 600 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is a warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="in-process then served runs, alternating")
    parser.add_argument(
        "--refine-temperature",
        type=float,
        default=0.0,
        help="0: the demo's greedy rewrites (rows share requests); "
        "above 0 sampled ones (one request per row, with its seed)",
    )
    parser.add_argument("--batch-wait-ms", type=float, default=50.0, help="trd serve's --batch-wait-ms")
    args = parser.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2: the first step of each run is a warm-up.")
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_server(Path(tmp) / "serve.log", args.batch_wait_ms)
        try:
            timers = {"in-process": [], "served": []}
            for r in range(args.rounds):
                timers["in-process"].append(run(None, args.steps, f"{tmp}/local{r}", args.refine_temperature))
                timers["served"].append(run(url, args.steps, f"{tmp}/served{r}", args.refine_temperature))
        finally:
            process.terminate()
            process.wait(timeout=60)
    same = all(a.rewrites == b.rewrites for a, b in zip(timers["in-process"], timers["served"]))
    mean = {}
    print(
        f"TRD-OPD on the demo world, refine temperature {args.refine_temperature:g}, "
        f"{args.rounds} rounds x {args.steps - 1} timed steps per way"
    )
    for name, runs in timers.items():
        step = [s for t in runs for s in t.seconds[1:]]
        refine = [s for t in runs for s in t.refine[1:]]
        mean[name] = (sum(step) / len(step), sum(refine) / len(refine))
        print(f"  {name:>10}: step {mean[name][0]:.3f} s, of which refine {mean[name][1]:.3f} s")
    print(f"  served / in-process step time: {mean['served'][0] / mean['in-process'][0]:.2f}x")
    print(f"  served / in-process refine time: {mean['served'][1] / mean['in-process'][1]:.2f}x")
    print(f"  same rewrites both ways: {same}")


if __name__ == "__main__":
    main()
