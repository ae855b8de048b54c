"""Memory bounds of the rollout side, side by side in one run: padding in the loss's forward passes, and the peak
memory of generation with and without a cap on the rows generated at once.

    OMP_NUM_THREADS=2 python benchmarks/memory_bounds.py

1. Padding. The demo world's student samples natural-length rollouts (it ends them itself) for ``--steps`` steps of
   ``--prompts`` prompts x ``--generations`` rollouts, the demo config's way. Each step's batch is split into
   micro-batches two ways: consecutive groups of ``--micro-batch`` rows (``model.micro_batch_size``), and by a token
   budget (``model.micro_batch_tokens``) equal to the fixed rows' worst case, ``--micro-batch`` x the longest row, so
   both bound the forward pass the same way. The padded share is the share of positions in the student's and the
   teacher's forward passes (rows x width, after each micro-batch's padding columns are trimmed) that are padding.

2. Generation memory. A random Qwen3 (``--hidden``, ``--layers``) generates ``--rows`` rows of exactly
   ``--new-tokens`` tokens (the end token held back), once with every row at once and once in chunks of ``--cap`` rows
   (``data.rollout.max_generation_rows``), each in a fresh process. Peak memory is the growth of the process's peak
   resident set (VmHWM) over generation; the script also checks that both runs drew the same rollouts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from trd_lightning.objective import micro_batches


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def padding(args) -> None:
    from trd_lightning import DistillationModule, OnPolicyDataModule
    from trd_lightning.data.options import PromptOptions, RolloutOptions, ValidationOptions
    from trd_lightning.rollout.batch import StepInfo

    data = OnPolicyDataModule(
        batch_size=args.prompts,
        prompt=PromptOptions(student_template="{problem}", max_prompt_length=64, max_teacher_prompt_length=160),
        rollout=RolloutOptions(num_generations=args.generations, max_new_tokens=48),
        validation=ValidationOptions(split=None),
    )
    data.setup("fit")
    module = DistillationModule()
    module.configure_model()
    loader = iter(data.train_dataloader())
    totals = {"rows": [0, 0], "tokens": [0, 0]}
    parts = {"rows": 0, "tokens": 0}
    for step in range(args.steps):
        seqs = data.produce(next(loader), module.rollout_models(), StepInfo(step)).train
        lengths = seqs.student_mask.sum(-1)
        budget = args.micro_batch * int(max(lengths.max(), seqs.teacher_mask.sum(-1).max()))
        for name, groups in (
            ("rows", micro_batches(seqs, args.micro_batch)),
            ("tokens", micro_batches(seqs, args.micro_batch, budget)),
        ):
            parts[name] += len(groups)
            for rows in groups:
                part = seqs.rows(rows)
                for mask in (part.student_mask, part.teacher_mask):
                    totals[name][0] += mask.numel()
                    totals[name][1] += int(mask.sum())
    print(
        f"1. padding: demo student, {args.steps} steps x {args.prompts} prompts x {args.generations} rollouts, "
        f"natural lengths; micro-batches of {args.micro_batch} rows against a budget of {args.micro_batch} x the "
        "step's longest row"
    )
    print(f"{'micro-batches':<24}{'forward positions':>18}{'padded share':>14}{'micro-batches':>15}")
    for name, label in (("rows", "fixed rows"), ("tokens", "token budget")):
        positions, real = totals[name]
        print(f"{label:<24}{positions:>18}{1 - real / positions:>14.1%}{parts[name]:>15}")
    ratio = (1 - totals["tokens"][1] / totals["tokens"][0]) / (1 - totals["rows"][1] / totals["rows"][0])
    print(f"padded share, token budget / fixed rows: {ratio:.2f}")


def generation_child(spec: dict) -> dict:
    from trd_lightning.hf import load_causal_lm, load_tokenizer
    from trd_lightning.rollout.batch import Prompts
    from trd_lightning.rollout.engines import EngineOptions, LocalEngine, end_token_ids
    from trd_lightning.rollout.sampling import SamplingConfig
    from trd_lightning.rollout.seeds import row_seeds

    torch.set_num_threads(1)
    tok = load_tokenizer(spec["model"])
    model = load_causal_lm(spec["model"]).eval()
    model.generation_config.min_new_tokens = spec["new_tokens"]  # every row runs to full length
    prompts = Prompts.from_lists([tok(f"{i} + {i % 7} =")["input_ids"] for i in range(spec["rows"])], tok.pad_token_id)
    engine = LocalEngine(model, end_token_ids(model, tok), tok.pad_token_id, EngineOptions(max_rows=spec["cap"]))
    before = peak_rss_mib()
    start = time.perf_counter()
    out = engine.generate(
        prompts, SamplingConfig(spec["new_tokens"], 1.0), row_seeds(0, 0, "rollout", range(spec["rows"]))
    )
    return {
        "seconds": time.perf_counter() - start,
        "peak_growth_mib": peak_rss_mib() - before,
        "rollouts": hashlib.sha256(out.ids.numpy().tobytes()).hexdigest(),
        "tokens": int(out.mask.sum()),
    }


def generation(args) -> None:
    from trd_lightning.data.demo.random_model import random_qwen3
    from trd_lightning.data.demo.tokenizer import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model = random_qwen3(tmp, build_tokenizer(), args.hidden, args.layers, 0, max_positions=args.new_tokens + 64)
        results = {}
        for cap in (None, args.cap):
            spec = json.dumps({"model": model, "rows": args.rows, "new_tokens": args.new_tokens, "cap": cap})
            done = subprocess.run(
                [sys.executable, __file__, "--child", spec],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            results[cap] = json.loads(done.stdout.strip().splitlines()[-1])
    kv = 2 * 2 * (args.hidden // 4) * 4 * args.layers  # bytes per token: keys and values, 2 heads, float32
    print(
        f"\n2. generation memory: random Qwen3 (hidden {args.hidden}, {args.layers} layers; key/value cache "
        f"{kv / 1024:.0f} KiB per token), {args.rows} rows x {args.new_tokens} new tokens, one thread, a fresh "
        "process each"
    )
    print(f"{'rows at once':<16}{'peak growth MiB':>16}{'seconds':>10}{'tokens':>9}")
    for cap, result in results.items():
        label = "all" if cap is None else str(cap)
        print(f"{label:<16}{result['peak_growth_mib']:>16.0f}{result['seconds']:>10.1f}{result['tokens']:>9}")
    whole, capped = results[None], results[args.cap]
    print(
        f"peak growth, capped / all at once: {capped['peak_growth_mib'] / whole['peak_growth_mib']:.2f}; time "
        f"{capped['seconds'] / whole['seconds']:.2f}; same rollouts: {capped['rollouts'] == whole['rollouts']}"
    )
    print(f"the whole cache alone: {args.rows * args.new_tokens * kv / 2**20:.0f} MiB for all rows at once")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--cap", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(generation_child(json.loads(args.child))))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    padding(args)
    generation(args)


if __name__ == "__main__":
    main()
