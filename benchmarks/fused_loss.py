"""Peak memory of the chunked losses against full logits, from hidden states to gradients, measured side by side.

    OMP_NUM_THREADS=1 python benchmarks/fused_loss.py --tokens 1024            # real run: RSS and tensor bytes
    OMP_NUM_THREADS=1 python benchmarks/fused_loss.py --fake                   # naive on fake tensors, any size

The variants compute the same thing in fp32 on CPU: student and teacher output heads (``[V, H]`` linear layers,
V = 151,936 by default, Qwen3's vocabulary) on ``N`` response hidden states, the per-token generalized JSD
(``--beta``; 0 is forward KL), its sum, and backward into the student hidden states and the student head weight.
``naive`` materialises the full ``[N, V]`` logits of both models and calls ``generalized_jsd`` on them;
``checkpointed`` is the path of ``loss_implementation: checkpointed`` (``chunked_token_loss``, ``--chunk-size``
rows per chunk: today's path before chunks were sized by memory); ``default`` is ``losses.token_losses`` with the
default ``LossSpec`` (closed form, fused, chunks of ``--chunk-mib`` MiB).

Each variant runs in a fresh subprocess, after its inputs and weights exist, and two peaks are taken over its
forward and backward, both as the increase over the memory held before it started:

* tensor bytes: a dispatcher-level mode sees every tensor an operator returns (forward, backward and the
  checkpoint's recomputation alike) and adds its storage's size once while that storage is alive (a weak
  reference subtracts it when freed), so the peak is the most tensor memory alive at once, the same quantity
  as ``torch.cuda.max_memory_allocated``. Scratch memory inside kernels is not a tensor and not counted.
* RSS (real runs only): the process's resident set size before, and its high-water mark (``VmHWM``, reset
  through ``/proc/self/clear_refs`` just before the loss) after. This counts everything the process touched,
  BLAS scratch and allocator overhead included. PyTorch's CPU allocator does not cache freed blocks and glibc
  returns large (mmap) blocks to the kernel on free, so resident memory follows live tensors.

``--fake`` runs the naive variant on fake tensors (``FakeTensorMode``): shapes, operators and tensor lifetimes are
those of the real run, but no memory is allocated and nothing is computed, so sizes whose naive variant does
not fit in this machine's memory can be measured; only its tensor bytes are reported. (The default path's backward
reads its upstream gradient's values, which fake tensors do not have: it always runs for real.) The real variants'
loss and gradient norms are printed and checked to agree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trd_lightning.losses import LossSpec, chunked_token_loss, generalized_jsd, token_losses

MIB = 2**20
VARIANTS = ("naive", "checkpointed", "default")


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive at once: the running total and its peak since the mode was entered."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # A view or in-place result shares an input's storage: counted when it was made, or made before the
        # mode was entered (weights, inputs) and then not part of the increase.
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self._add(t.untyped_storage())
        return out

    def _add(self, storage) -> None:
        key = storage._cdata
        if key in self._alive:
            return
        self._alive.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._alive.discard(key)
        self.live -= size


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(args: argparse.Namespace) -> dict:
    """Build the inputs, then run one variant's forward and backward; return its peaks (and, when real, values)."""
    fake = args.fake and args.child == "naive"
    with FakeTensorMode() if fake else contextlib.nullcontext():
        torch.manual_seed(0)
        n, h, v = args.tokens, args.hidden, args.vocab
        student_hidden = torch.randn(n, h).requires_grad_()
        teacher_hidden = torch.randn(n, h)
        student_head = torch.nn.Linear(h, v, bias=False)
        teacher_head = torch.nn.Linear(h, v, bias=False).requires_grad_(False)

        def loss_fn(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return generalized_jsd(s, t, beta=args.beta)

        rss_before = status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = time.perf_counter()
        with LiveTensorBytes() as tracker:
            if args.child == "naive":
                per_token = loss_fn(student_head(student_hidden), teacher_head(teacher_hidden))
            elif args.child == "checkpointed":
                per_token = chunked_token_loss(
                    student_hidden, teacher_hidden, student_head, teacher_head, loss_fn, args.chunk_size
                )
            else:
                spec = LossSpec(beta=args.beta, chunk_mib=args.chunk_mib)
                per_token = token_losses(student_hidden, teacher_hidden, student_head, teacher_head, spec)
            loss = per_token.sum()
            loss.backward()
        result = {"tensor_mib": tracker.peak / MIB, "seconds": time.perf_counter() - start, "fake": fake}
        if not fake:
            result |= {
                "rss_mib": (status_kib("VmHWM") - rss_before) / 1024,
                "loss": loss.item(),
                "hidden_grad_norm": student_hidden.grad.norm().item(),
                "head_grad_norm": student_head.weight.grad.norm().item(),
            }
    return result


def run_child(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant] + [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("vocab", "tokens", "hidden", "chunk_size", "chunk_mib", "beta")
    ]
    if args.fake:
        cmd.append("--fake")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        # A child killed by the kernel (out of memory) leaves no traceback, only its signal.
        raise SystemExit(
            f"the {variant} run failed (exit status {proc.returncode}; -9 is usually out of memory: try --fake or "
            f"fewer --tokens):\n{proc.stderr[-2000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--tokens", type=int, default=4096, help="response tokens N (rows of hidden states)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk of the checkpointed variant")
    parser.add_argument("--chunk-mib", type=float, default=128.0, help="MiB per logits tensor of the default's chunks")
    parser.add_argument("--beta", type=float, default=0.0, help="0 forward KL, 1 reverse KL, between: JSD")
    parser.add_argument("--fake", action="store_true", help="the naive variant on fake tensors: tensor bytes only")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    logits_mib = args.tokens * args.vocab * 4 / MIB
    print(
        f"N={args.tokens} tokens, V={args.vocab}, H={args.hidden}, beta={args.beta}, fp32 on CPU, "
        f"{torch.get_num_threads()} thread(s); checkpointed: {args.chunk_size} rows per chunk, default: "
        f"{args.chunk_mib:g} MiB chunks; one [N, V] tensor = {logits_mib:.0f} MiB, one [V, H] = "
        f"{args.vocab * args.hidden * 4 / MIB:.0f} MiB"
    )
    results = {variant: run_child(args, variant) for variant in VARIANTS}
    naive = results["naive"]
    columns = ["tensor_mib", "rss_mib", "seconds"]
    print(f"{'':<14}" + "".join(f"{c:>14}" for c in columns) + f"{'/ naive':>10}")
    for variant, r in results.items():
        cells = "".join(f"{r[c]:>14.1f}" if c in r else f"{'(fake)':>14}" for c in columns)
        print(f"{variant:<14}{cells}{r['tensor_mib'] / naive['tensor_mib']:>10.3f}")
    real = {v: r for v, r in results.items() if not r["fake"]}
    keys = ("loss", "hidden_grad_norm", "head_grad_norm")
    for k in keys:
        print(f"{k:<18} " + "  ".join(f"{v} {r[k]:.8g}" for v, r in real.items()))
    first = next(iter(real.values()))
    agree = all(abs(r[k] - first[k]) <= 1e-5 * abs(first[k]) for r in real.values() for k in keys)
    print(f"loss and gradient norms of {', '.join(real)} agree to 1e-5 relative: {agree}")


if __name__ == "__main__":
    main()
