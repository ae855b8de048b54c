"""Roofline of one distillation step: each phase's essential work, this machine's rates, and each phase's efficiency.

    OMP_NUM_THREADS=1 python benchmarks/roofline.py                       # vocabulary 151,936, 41M / 87M models
    OMP_NUM_THREADS=1 python benchmarks/roofline.py --no-fused --chunk-size 1024  # backward recomputes each chunk
    OMP_NUM_THREADS=1 python benchmarks/roofline.py --implementation checkpointed --chunk-size 1024  # autograd

The models are random Qwen3s built in-process (as ``vs_trl.py --models tiny`` builds them), float32, one thread.
One step is ``--batch-size`` prompts of ``--prompt-tokens`` random tokens, one response of exactly
``--max-new-tokens`` tokens each, and the default loss (forward KL; ``--beta`` and the loss options change it).
The phases are timed one by one with the library's own functions, each ``--repeats`` times (the fastest counts, as
for the rates):

* generation: ``rollout.generation.decode`` (the native decoder). Its essential work is, per decoding step, the
  bytes of the student's weights (the tied head once) and of its key/value cache read, and the FLOPs of one
  token per row; the bound of a step is the larger of bytes / bandwidth and FLOPs / matmul rate, plus the
  prefill's FLOPs.
* trunk forward: both models' decoder layers on prompt + response (``hf.last_hidden``; the student with grad).
  Work: 2 FLOPs per weight of the layers' linear maps per token, plus causal attention (2 T^2 d per row and layer).
* loss forward: ``losses.token_losses`` on the response positions' hidden states. Work: the two vocabulary
  projections, 2 N V (H_student + H_teacher) FLOPs.
* loss backward: its backward to the hidden states and the student's head. Work: 4 N V H_student FLOPs (the
  gradient of the hidden states and of the head's weight). With the fused loss (the default) this work is done
  during the loss forward, whose time then includes it: the two are reported apart by also timing the forward
  without autograd (values only), which is the forward's own time; the backward's time is the rest.
* trunk backward: the student's layers. Work: twice their forward FLOPs.

Rates: the matmul rate is the best of float32 matmuls of a square 2048 x 2048 x 2048 and of the step's two
vocabulary projections whole (``[N, H] @ [H, V]`` for each model, N the step's response positions: the shape the
loss's work is counted in, whatever its chunks); the memory bandwidth is the best read rate of a 1 GiB tensor
(``sum``). Efficiency = work / time / rate (for generation: bound / time). Every time is taken twice: wall time,
and the process's CPU time (one thread, so its own work: on a machine shared with other jobs, CPU time moves much
less than wall time; rates are measured on both clocks and each efficiency uses its own clock's).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers.utils import logging
from trd_lightning.rollout.generation import SamplingConfig, decode

from trd_lightning import losses
from trd_lightning.data.demo.random_model import random_qwen3
from trd_lightning.data.demo.tokenizer import build_tokenizer
from trd_lightning.hf import last_hidden, load_causal_lm, output_head

GIGA = 1e9


CLOCKS = ("wall", "CPU")


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def best_seconds(fn, repeats: int = 3) -> tuple[float, float]:
    """The fastest of ``repeats`` calls after a warm-up, on each clock."""
    fn()
    best = [float("inf")] * 2
    for _ in range(repeats):
        start = clock()
        fn()
        best = [min(b, e - s) for b, s, e in zip(best, start, clock())]
    return best[0], best[1]


def matmul_rates(shapes: list[tuple[int, int, int]]) -> dict[str, tuple[float, float]]:
    """FLOP/s of float32 ``[m, k] @ [k, n]`` for each shape (output preallocated), on each clock."""
    rates = {}
    for m, k, n in shapes:
        a, b, out = torch.randn(m, k), torch.randn(n, k), torch.empty(m, n)
        seconds = best_seconds(lambda a=a, b=b, out=out: torch.mm(a, b.T, out=out))
        rates[f"{m}x{k}x{n}"] = tuple(2 * m * k * n / s for s in seconds)
    return rates


def read_bandwidth() -> tuple[float, float]:
    big = torch.ones(2**28)  # 1 GiB
    return tuple(big.numel() * 4 / s for s in best_seconds(lambda: big.sum()))


class Phases:
    """Wall and CPU seconds of named blocks, over repeats."""

    def __init__(self) -> None:
        self.times: dict[str, list[tuple[float, float]]] = defaultdict(list)

    @contextmanager
    def __call__(self, name: str):
        start = clock()
        yield
        self.times[name].append(tuple(e - s for s, e in zip(start, clock())))

    def best(self, name: str, i: int) -> float:
        return min(t[i] for t in self.times[name])


def layer_work(model, tokens_per_row: int, rows: int) -> float:
    """Forward FLOPs of the decoder layers (linear maps and causal attention), without the output head."""
    cfg = model.config
    linear = sum(m.weight.numel() for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear))
    attention = cfg.num_hidden_layers * 2 * tokens_per_row**2 * cfg.num_attention_heads * cfg.head_dim
    return rows * (2 * linear * tokens_per_row + attention)


def generation_bound(model, rows: int, prompt: int, new: int, rate: float, bandwidth: float) -> tuple[float, float]:
    """(seconds, bytes read) the native decoder needs at least: prefill FLOPs, then each step's weights and cache."""
    cfg = model.config
    weights = sum(p.numel() for p in model.parameters()) * 4  # tied embeddings are one parameter, counted once
    linear = sum(m.weight.numel() for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear))
    head = cfg.vocab_size * cfg.hidden_size
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    seconds = (layer_work(model, prompt, rows) + 2 * head * rows) / rate
    total_bytes = 0.0
    for step in range(1, new):
        context = prompt + step
        step_bytes = weights + kv_per_token * context * rows
        attention = cfg.num_hidden_layers * 4 * context * cfg.num_attention_heads * cfg.head_dim
        step_flops = rows * (2 * (linear + head) + attention)
        seconds += max(step_bytes / bandwidth, step_flops / rate)
        total_bytes += step_bytes
    return seconds, total_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--implementation", choices=["auto", "checkpointed", "closed_form"], default="auto")
    parser.add_argument("--no-fused", action="store_true", help="loss_fused off: backward recomputes each chunk")
    parser.add_argument("--chunk-mib", type=float, default=128.0)
    parser.add_argument("--chunk-size", type=int, default=None)
    args = parser.parse_args()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renaming of past_key_values
    torch.manual_seed(0)
    spec = losses.LossSpec(
        beta=args.beta,
        implementation=args.implementation,
        fused=not args.no_fused,
        chunk_size=args.chunk_size,
        chunk_mib=args.chunk_mib,
    )
    b, p, r = args.batch_size, args.prompt_tokens, args.max_new_tokens
    n = b * r
    chunk = losses.chunk_rows(spec, args.vocab)
    shapes = [(2048, 2048, 2048), (n, args.student_hidden, args.vocab), (n, args.teacher_hidden, args.vocab)]
    rates = matmul_rates(shapes)
    bandwidth = read_bandwidth()
    rate = [max(r[i] for r in rates.values()) for i in (0, 1)]

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer()
        student = load_causal_lm(
            random_qwen3(Path(tmp) / "s", tokenizer, args.student_hidden, args.student_layers, 1, args.vocab)
        )
        teacher = load_causal_lm(
            random_qwen3(Path(tmp) / "t", tokenizer, args.teacher_hidden, args.teacher_layers, 2, args.vocab)
        ).requires_grad_(False)
    student.train()
    student.generation_config.min_new_tokens = r  # every response exactly max_new_tokens long
    prompts = torch.randint(len(tokenizer.all_special_ids), len(tokenizer), (b, p))
    prompt_mask = torch.ones_like(prompts)
    sampling = SamplingConfig(max_new_tokens=r)
    heads = output_head(student), output_head(teacher)
    params = {name: sum(x.numel() for x in m.parameters()) / 1e6 for name, m in (("s", student), ("t", teacher))}
    print(
        f"shape: vocabulary {args.vocab}, student {params['s']:.1f}M parameters (hidden {args.student_hidden}, "
        f"{args.student_layers} layers), teacher {params['t']:.1f}M (hidden {args.teacher_hidden}, "
        f"{args.teacher_layers} layers), {b} prompts x ({p} prompt + {r} response tokens), float32, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(
        f"loss: {spec.kind} beta {spec.beta}, path {losses.plan(spec, *heads)}, fused {spec.fused}, "
        f"{chunk} positions per chunk"
    )
    print(
        "matmul rate, GFLOP/s by wall | CPU time: "
        + ", ".join(f"{k} {w / GIGA:.1f} | {c / GIGA:.1f}" for k, (w, c) in rates.items())
    )
    print(f"memory read bandwidth, GB/s by wall | CPU time: {bandwidth[0] / GIGA:.1f} | {bandwidth[1] / GIGA:.1f}")

    timed = Phases()
    for _ in range(args.repeats):
        with timed("generate"):
            rollouts = decode(student, prompts, prompt_mask, sampling, [tokenizer.eos_token_id], tokenizer.pad_token_id)
        ids = torch.cat([prompts, rollouts.ids], 1)
        mask = torch.ones_like(ids)
        student.zero_grad(set_to_none=True)
        with timed("trunk_f"):
            hidden = last_hidden(student, ids, mask)
            with torch.no_grad():
                t_hidden = last_hidden(teacher, ids, mask)
        rows = hidden[:, p - 1 : p - 1 + r].reshape(n, -1)
        t_rows = t_hidden[:, p - 1 : p - 1 + r].reshape(n, -1)
        leaf = rows.detach().requires_grad_()
        with torch.no_grad(), timed("loss_values"):
            losses.token_losses(leaf, t_rows, *heads, spec)
        with timed("loss_f"):
            per_token = losses.token_losses(leaf, t_rows, *heads, spec)
        with timed("loss_b"):
            per_token.sum().backward()
        with timed("trunk_b"):
            rows.backward(leaf.grad)
        del hidden, t_hidden, rows, t_rows, leaf, per_token

    trunk_f = layer_work(student, p + r, b) + layer_work(teacher, p + r, b)
    loss_f = 2 * n * args.vocab * (args.student_hidden + args.teacher_hidden)
    loss_b = 4 * n * args.vocab * args.student_hidden
    trunk_b = 2 * layer_work(student, p + r, b)
    # The fused loss does its backward's work inside the forward: the forward's own time is that of the values
    # alone, and the backward's time is everything else the loss took.
    fused_inside = spec.fused and losses.plan(spec, *heads) != "checkpointed"
    table, efficiency = [], {}
    for i, name in enumerate(CLOCKS):
        gen_bound, gen_bytes = generation_bound(student, b, p, r, rate[i], bandwidth[i])
        loss_f_time = timed.best("loss_values" if fused_inside else "loss_f", i)
        loss_b_time = timed.best("loss_f", i) + timed.best("loss_b", i) - loss_f_time
        phases = [
            ("generation", f"{gen_bytes / GIGA:.1f} GB read in {r - 1} steps", gen_bound, timed.best("generate", i)),
            (
                "trunk forward (both models)",
                f"{trunk_f / GIGA:.1f} GFLOP",
                trunk_f / rate[i],
                timed.best("trunk_f", i),
            ),
            ("loss forward (projections)", f"{loss_f / GIGA:.1f} GFLOP", loss_f / rate[i], loss_f_time),
            ("loss backward (head gradients)", f"{loss_b / GIGA:.1f} GFLOP", loss_b / rate[i], loss_b_time),
            ("trunk backward (student)", f"{trunk_b / GIGA:.1f} GFLOP", trunk_b / rate[i], timed.best("trunk_b", i)),
        ]
        phases.append(("step", "", sum(x[2] for x in phases), sum(x[3] for x in phases)))
        table.append(phases)
        efficiency[name] = {"forward": phases[2][2] / phases[2][3], "backward": phases[3][2] / phases[3][3]}
    print(
        f"\n{'phase':32s}{'essential work':>28s}{'bound s':>9s}{'wall s':>9s}{'eff.':>6s}"
        f"{'bound s':>9s}{'CPU s':>9s}{'eff.':>6s}"
    )
    for (name, work, bw, tw), (_, _, bc, tc) in zip(*table):
        print(f"{name:32s}{work:>28s}{bw:9.2f}{tw:9.2f}{bw / tw:6.0%}{bc:9.2f}{tc:9.2f}{bc / tc:6.0%}")
    print(
        f"(fastest of {args.repeats}; wall | CPU seconds: the loss's values alone "
        + ", its forward with autograd ".join(
            f"{timed.best(k, 0):.2f} | {timed.best(k, 1):.2f}" for k in ("loss_values", "loss_f")
        )
        + f", its backward {timed.best('loss_b', 0):.2f} | {timed.best('loss_b', 1):.2f})"
    )
    for part in ("forward", "backward"):
        shares = [efficiency[name][part] for name in CLOCKS]
        verdict = ">= 60%" if min(shares) >= 0.6 else ">= 60% by CPU time only" if shares[1] >= 0.6 else "BELOW 60%"
        print(f"loss {part}: {shares[0]:.0%} (wall) | {shares[1]:.0%} (CPU) of the measured matmul rate: {verdict}")


if __name__ == "__main__":
    main()
