"""Rollout speed of the generation options, side by side: response tokens per second.

    OMP_NUM_THREADS=2 python benchmarks/rollout_speed.py                          # the demo world's student
    OMP_NUM_THREADS=2 python benchmarks/rollout_speed.py --hidden 512 --layers 8  # a random Qwen3 of that size

Four paths, each through ``LocalEngine.generate`` (the training rollout's own call) with the same prompt
batches (``batch_size`` demo problems each, as the DataModule batches them) and the same per-row seeds, all drawing
tokens by inverse CDF:

* ``default``: the native decoding loop (``data.rollout.decoder: native``, a dynamic cache);
* ``generate``: Hugging Face ``generate`` (``decoder: generate``) with its growing cache;
* ``static``: ``generate`` with ``generation_cache: static`` (a preallocated cache with fixed shapes);
* ``static+compile``: ``generate`` with the static cache and ``compile_generation: true`` (decoding steps
  compiled).

Each path gets its own copy of the model, loaded from the same weights, because compiled code and the static
cache's length are kept on the model. The first round of every path is a warm-up (for ``static+compile`` it
includes the compilation) and is reported on its own; the timed rounds then interleave the paths, so a change in
the machine's load during the run affects all four alike. Tokens are response tokens (the end-of-sequence token
included, nothing after it); tokens per second is their total over the timed rounds divided by the total seconds.
The script also checks that every path produced the same rollouts as ``default``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from trd_lightning.data.datamodule import OnPolicyDataModule
from trd_lightning.data.demo.random_model import random_qwen3
from trd_lightning.data.demo.world import resolve
from trd_lightning.data.options import ValidationOptions
from trd_lightning.hf import load_causal_lm, load_tokenizer
from trd_lightning.rollout.engines import EngineOptions, LocalEngine, end_token_ids
from trd_lightning.rollout.sampling import SamplingConfig
from trd_lightning.rollout.seeds import row_seeds

PATHS = {
    "default": EngineOptions(),
    "generate": EngineOptions(decoder="generate"),
    "static": EngineOptions(decoder="generate", cache="static"),
    "static+compile": EngineOptions(decoder="generate", cache="static", compile=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="trd-demo/student", help="name or path (ignored with --hidden)")
    parser.add_argument("--hidden", type=int, help="benchmark a random Qwen3 of this hidden size instead")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random Qwen3")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per rollout (data.batch_size)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (0 is greedy)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rollouts per path, after one warm-up")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(resolve("trd-demo/tokenizer"))
        name = random_qwen3(tmp, tokenizer, args.hidden, args.layers, 0) if args.hidden else resolve(args.model)
        data = OnPolicyDataModule(
            tokenizer=name, train_data="trd-demo", validation=ValidationOptions(split=None), batch_size=args.batch_size
        )
        data.setup("fit")
        loader = iter(data.train_dataloader())
        batches = [next(loader) for _ in range(args.rounds + 1)]
        models = {path: load_causal_lm(name) for path in PATHS}
        sampling = SamplingConfig(args.max_new_tokens, args.temperature)
        engines = {
            path: LocalEngine(models[path], end_token_ids(models[path], tokenizer), tokenizer.pad_token_id, options)
            for path, options in PATHS.items()
        }
        size = sum(p.numel() for p in models["default"].parameters())
        print(
            f"model {args.model if not args.hidden else f'random Qwen3 hidden {args.hidden}, {args.layers} layers'} "
            f"({size / 1e6:.2f}M parameters), batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, "
            f"temperature {args.temperature}, {args.rounds} timed rounds, CPU, {torch.get_num_threads()} threads"
        )

        def rollout(path: str, round_: int) -> tuple[torch.Tensor, float]:
            batch = batches[round_]
            seeds = row_seeds(0, round_, "rollout", batch.index)
            start = time.perf_counter()
            out = engines[path].generate(batch.prompts, sampling, seeds)
            return out.ids.masked_fill(~out.mask, -1), time.perf_counter() - start

        warmup = {path: rollout(path, 0)[1] for path in PATHS}
        tokens = dict.fromkeys(PATHS, 0)
        seconds = dict.fromkeys(PATHS, 0.0)
        same = dict.fromkeys(PATHS, True)
        for round_ in range(1, args.rounds + 1):
            reference = None
            for path in PATHS:
                ids, took = rollout(path, round_)
                reference = ids if reference is None else reference
                tokens[path] += int((ids >= 0).sum())
                seconds[path] += took
                same[path] &= torch.equal(ids, reference)

    base = tokens["default"] / seconds["default"]
    print(f"{'path':<16}{'warm-up s':>11}{'tokens':>9}{'seconds':>10}{'tokens/s':>11}{'x default':>11}  same rollouts")
    for path in PATHS:
        rate = tokens[path] / seconds[path]
        print(
            f"{path:<16}{warmup[path]:>11.2f}{tokens[path]:>9}{seconds[path]:>10.2f}{rate:>11.1f}{rate / base:>11.2f}"
            f"  {same[path]}"
        )


if __name__ == "__main__":
    main()
