"""Build the demo world: its tokenizer, a competent tiny teacher and a clearly weaker tiny student.

Both models are trained from scratch on the task in every prompt format the library uses: the student
prompt, the OPSD privileged prompt (reference solution shown) and the two refine prompts (a flawed or a
correct initial solution to rewrite). The loss is on the solution tokens only. The shipped weights come
from ``python -m trd_lightning.data.demo.build OUT_DIR``; with the same seed and torch build it gives the
same models again.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, Qwen3Config

from trd_lightning import prompts
from trd_lightning.data.demo.task import TEMPLATES, Problem, flawed_solution, sample_problem
from trd_lightning.data.demo.tokenizer import build_tokenizer


@dataclass
class ModelSpec:
    """Size and training budget of one demo model."""

    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    intermediate_size: int
    steps: int
    lr: float
    formats: tuple[tuple[str, float], ...] = ()
    batch_size: int = 64


# The teacher scores student rollouts (OPD) and refines them (TRD-OPD); the student answers, and as its own
# teacher (OPSD) reads a reference solution or refines its rollout with one (TRD-OPSD).
TEACHER = ModelSpec(
    hidden_size=128,
    layers=4,
    heads=4,
    kv_heads=2,
    intermediate_size=384,
    steps=1000,
    lr=3e-3,
    formats=(("student", 0.6), ("refine_opd", 0.4)),
)
STUDENT = ModelSpec(
    hidden_size=128,
    layers=2,
    heads=4,
    kv_heads=2,
    intermediate_size=384,
    steps=600,
    lr=3e-3,
    formats=(("student", 0.3), ("privileged", 0.35), ("refine_opsd", 0.35)),
)
MAX_POSITIONS = 512


def format_prompt(fmt: str, problem: Problem, rng: random.Random) -> str:
    """The user text of one training example in format ``fmt``."""
    solution = problem.solution()
    # Refiners see flawed and correct initial solutions alike, as TRD refines every rollout.
    initial = flawed_solution(problem, rng) if rng.random() < 0.7 else solution
    return prompts.render(TEMPLATES[fmt], problem=problem.text, solution=solution, initial=initial)


def make_batch(tokenizer, rng: random.Random, size: int, fmt: str) -> dict[str, torch.Tensor]:
    """A right-padded batch of prompt + solution with labels on the solution and its end token only.

    One format per batch keeps padding (and so CPU time) low.
    """
    rows = []
    for _ in range(size):
        problem = sample_problem(rng)
        prompt = prompts.to_prompt_ids(format_prompt(fmt, problem, rng), tokenizer, True)
        target = tokenizer(problem.solution(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt, target))
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((size, width), tokenizer.pad_token_id)
    labels = torch.full((size, width), -100)
    mask = torch.zeros((size, width), dtype=torch.long)
    for i, (p, t) in enumerate(rows):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t)
        labels[i, len(p) : n] = torch.tensor(t)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def new_model(spec: ModelSpec, tokenizer) -> torch.nn.Module:
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden_size // spec.heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(config)


def train(spec: ModelSpec, tokenizer, seed: int, desc: str) -> torch.nn.Module:
    """Train one model from scratch with AdamW, linear warmup and cosine decay."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = new_model(spec, tokenizer)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.steps))),
    )
    names, weights = zip(*spec.formats)
    bar = tqdm(range(spec.steps), desc=desc, unit="step")
    for _ in bar:
        fmt = rng.choices(names, weights)[0]
        loss = model(**make_batch(tokenizer, rng, spec.batch_size, fmt)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def accuracy(model, tokenizer, fmt: str, n: int = 256, seed: int = 12345) -> float:
    """Greedy accuracy on ``n`` fresh problems asked in format ``fmt``."""
    rng = random.Random(seed)
    problems = [sample_problem(rng) for _ in range(n)]
    texts = [format_prompt(fmt, p, rng) for p in problems]
    batch = tokenizer.pad(
        {"input_ids": [prompts.to_prompt_ids(t, tokenizer, True) for t in texts]}, return_tensors="pt"
    )
    out = model.generate(**batch, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    replies = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(r.strip() == p.solution() for r, p in zip(replies, problems)) / n


def build(out_dir: str | Path, seed: int = 0) -> dict:
    """Write ``tokenizer/``, ``teacher/``, ``student/`` and ``world.json`` (measured accuracies) to ``out_dir``."""
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    report: dict = {"seed": seed, "teacher": asdict(TEACHER), "student": asdict(STUDENT)}
    for name, spec, offset in (("teacher", TEACHER, 1), ("student", STUDENT, 2)):
        model = train(spec, tokenizer, seed + offset, desc=f"demo world: training the {name}")
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        report[f"{name}_accuracy"] = {fmt: accuracy(model, tokenizer, fmt) for fmt, _ in spec.formats}
    (out / "world.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(build(args.out_dir, args.seed), indent=2))


if __name__ == "__main__":
    main()
