"""OPD and TRD-OPD on the demo world with the student's rollouts in-process, served, and served with overlap.

    python benchmarks/served_student.py                      # trd serve engines, 90 s of training per row
    python benchmarks/served_student.py --seconds 60 --rows OPD/in-process TRD-OPD/overlap
    python benchmarks/served_student.py --decode-speed       # vLLM against the native decoder, one thread each

One run per row, the demo config's settings (``configs/demo.yaml``, + ``configs/trd.yaml`` for TRD-OPD: 32 prompts a
step, 48-token rollouts, greedy rewrites of every rollout), full fine-tuning of the demo student:

- ``in-process``: today's synchronous step (the student and the refiner generate in the trainer);
- ``served``: the student's rollouts from ``trd serve --model trd-demo/student``, its weights synced after every
  optimizer step (``data.rollout.url``), the rewrites from ``trd serve --model trd-demo/teacher``
  (``data.refine.url``);
- ``overlap``: the same with ``data.rollout.max_staleness: 1``.

Each row trains for the same wall-clock budget (``--seconds``, Lightning's ``max_time``), then validates once on the
demo's validation split (greedy, 128 prompts): the accuracy at equal wall time. A step is timed from
``on_train_batch_start`` to ``on_train_batch_end``; the first two steps are warm-up and left out of the medians.
Generation is ``perf/rollout_seconds`` (+ ``perf/refine_seconds`` for TRD), the sync ``perf/sync_seconds``. On one
machine the engines share the trainer's cores: what overlap can win here is the time a core would idle.

``--decode-speed`` times vLLM's CPU build (``TRD_VLLM_PYTHON``, see ``.ci/vllm-env``) and the native decoder on the
same model (the demo student, or ``--model``) and thread count: 16 prompts x 128 new tokens, three rounds each.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import lightning as L
import torch

from trd_lightning import DistillationModule, OnPolicyDataModule, RefinementScheduler
from trd_lightning.data.options import PromptOptions, RefineOptions, RolloutOptions, ValidationOptions
from trd_lightning.hf import load_causal_lm, load_tokenizer, locate

ROWS = [f"{m}/{w}" for m in ("OPD", "TRD-OPD") for w in ("in-process", "served", "overlap")]


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.seconds, self.generation, self.sync = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        stats = batch.produced.stats
        self.generation.append(stats["perf/rollout_seconds"] + stats.get("perf/refine_seconds", 0.0))
        self.sync.append(stats.get("perf/sync_seconds", 0.0))


def start(model: str, log: Path, command: list[str] | None = None, env: dict | None = None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = command or [sys.executable, "-m", "trd_lightning", "serve", "--model", model]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command[0]} exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{model} did not come up within 900 s")


def run(row: str, seconds: float, root: str, urls: dict) -> dict:
    method, way = row.split("/")
    trd, served = method == "TRD-OPD", way != "in-process"
    data = OnPolicyDataModule(
        train_data="trd-demo",
        batch_size=32,
        prompt=PromptOptions(student_template="{problem}", max_prompt_length=64, max_teacher_prompt_length=160),
        rollout=RolloutOptions(
            max_new_tokens=48,
            url=urls["student"] if served else None,
            max_staleness=int(way == "overlap"),
        ),
        refine=RefineOptions(
            enabled=trd,
            template="{problem}\nDraft:\n{initial}\nFix the draft.",
            teacher_context="original",
            max_prompt_length=160,
            temperature=0.0,
            url=urls["teacher"] if trd and served else None,
        ),
        validation=ValidationOptions(split="validation", batch_size=128, temperature=0.0, max_prompts=128),
    )
    module = DistillationModule(micro_batch_size=32, lr=1e-3, warmup_ratio=0.05)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=300,
        max_time={"seconds": seconds},
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[timer, *([RefinementScheduler()] if trd else [])],
    )
    L.seed_everything(0)
    trainer.fit(module, data)
    evaluate = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    accuracy = evaluate.validate(module, data, verbose=False)[0]["val/accuracy"]
    timed = slice(2, None) if len(timer.seconds) > 2 else slice(None)
    return {
        "steps": trainer.global_step,
        "step": statistics.median(timer.seconds[timed]),
        "generation": statistics.median(timer.generation[timed]),
        "sync": statistics.median(timer.sync[timed]),
        "accuracy": accuracy,
    }


def decode_speed(model: str, threads: int, rounds: int) -> None:
    python = os.environ.get("TRD_VLLM_PYTHON", ".venv-vllm/bin/python")
    path = str(locate(model))
    tokenizer = load_tokenizer(path)
    prompts = [tokenizer(f"{i * 7 + 3} plus {i}")["input_ids"] for i in range(16)]
    body = {"model": path, "prompt": prompts, "max_tokens": 128, "min_tokens": 128, "temperature": 0.0}
    times = {"vLLM": [], "native": []}
    with tempfile.TemporaryDirectory() as tmp:
        command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--dtype", "float32"]
        command += ["--max-model-len", "512", "--host", "127.0.0.1"]
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
        process, url = start(path, Path(tmp) / "vllm.log", command, env)
        try:
            httpx.post(url + "/v1/completions", json=body, timeout=600)  # warm-up
            for _ in range(rounds):
                start_time = time.perf_counter()
                httpx.post(url + "/v1/completions", json=body, timeout=600).raise_for_status()
                times["vLLM"].append(time.perf_counter() - start_time)
        finally:
            process.terminate()
            process.wait(timeout=60)
    from trd_lightning.rollout.batch import Prompts
    from trd_lightning.rollout.engines import EngineOptions, LocalEngine
    from trd_lightning.rollout.sampling import SamplingConfig

    torch.set_num_threads(threads)
    lm = load_causal_lm(path).eval()
    lm.generation_config.min_new_tokens = 128  # every row decodes all 128 tokens, as vLLM's min_tokens makes it
    engine = LocalEngine(lm, [tokenizer.eos_token_id], tokenizer.pad_token_id, EngineOptions())
    batch = Prompts.from_lists(prompts, tokenizer.pad_token_id)
    sampling = SamplingConfig(max_new_tokens=128, temperature=0.0)
    engine.generate(batch, sampling, [0] * 16)
    for _ in range(rounds):
        start_time = time.perf_counter()
        engine.generate(batch, sampling, [0] * 16)
        times["native"].append(time.perf_counter() - start_time)
    tokens = 16 * 128
    print(f"{model}, {threads} thread(s), 16 prompts x 128 new tokens, {rounds} rounds (min / median / max tokens/s)")
    for name, values in times.items():
        rates = sorted(tokens / t for t in values)
        print(f"  {name:7s} {rates[0]:7.0f} / {statistics.median(rates):7.0f} / {rates[-1]:7.0f}")
    ratio = statistics.median(times["native"]) / statistics.median(times["vLLM"])
    print(f"  vLLM / native: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="training wall time per row")
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--decode-speed", action="store_true", help="vLLM against the native decoder instead")
    parser.add_argument("--model", default="trd-demo/student", help="the model of --decode-speed")
    parser.add_argument("--threads", type=int, default=1, help="threads of --decode-speed, both sides")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --decode-speed")
    args = parser.parse_args()
    if args.decode_speed:
        return decode_speed(args.model, args.threads, args.rounds)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {name: start(f"trd-demo/{name}", Path(tmp) / f"{name}.log") for name in ("student", "teacher")}
        urls = {name: url for name, (_, url) in servers.items()}
        try:
            for row in args.rows:
                results[row] = run(row, args.seconds, f"{tmp}/{row.replace('/', '_')}", urls)
                print(row, results[row], flush=True)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=60)
    base = results.get("OPD/in-process")
    print(f"\nDemo world, {args.seconds:g} s of training per row (medians over steps 3 on)")
    print("| row | steps | s/step | vs OPD in-process | generation s | sync s | val accuracy |")
    print("|---|---|---|---|---|---|---|")
    for row, r in results.items():
        ratio = f"{r['step'] / base['step']:.2f}x" if base else "-"
        print(
            f"| {row} | {r['steps']} | {r['step']:.2f} | {ratio} | {r['generation']:.2f} | {r['sync']:.3f} | "
            f"{r['accuracy']:.1%} |"
        )


if __name__ == "__main__":
    main()
