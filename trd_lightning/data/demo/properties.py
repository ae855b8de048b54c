"""The demo world's properties, measured on its models before any distillation (recorded in ``world.json``).

Everything is sampled at temperature 1 (refiners also greedily, as the demo configs refine) on fresh problems
from a fixed seed, through the library's own pieces: the native decoder, the trainer's way of scoring a
response after a context, ``trd_lightning.diagnostics`` for per-token statistics and first divergence, and
``trd_lightning.verify`` for answers. A rollout's first divergence is its first token the teacher gives less
than 0.05; a position is bimodal when the teacher's top-2 probabilities both exceed 0.2.

- ``teacher_uncertain``: on the teacher's own sampled solutions, the share of response positions whose entropy
  is at least 0.5 nats (between 5% and 40%), the rest near-deterministic.
- ``teacher_torn``: on the student's wrong rollouts, the share of bimodal positions from the first divergence on
  (at least 5%), against the share on its correct rollouts, all positions (at least 3 times it).
- ``kl_shape``: on the student's rollouts, the median per-token KL(teacher || student) (below 0.1) and the share
  of tokens above 0.1 (10% to 50%).
- ``refiners_repair``: the share of the student's wrong rollouts that each refiner, greedy, rewrites into a
  correct solution (at least half): the teacher on the OPD refine prompt, the student shown the reference on the
  OPSD refine prompt.
"""

from __future__ import annotations

import json
import math
import os
import random

import torch

from trd_lightning import prompts
from trd_lightning.data.demo import world
from trd_lightning.data.demo.decode import response_logits, sample
from trd_lightning.data.demo.task import TEMPLATES, Problem, sample_problem
from trd_lightning.diagnostics import first_divergence, token_distribution_stats
from trd_lightning.hf import load_causal_lm, load_tokenizer
from trd_lightning.verify import is_correct

DIVERGENCE_PROB = 0.05
TAU = 0.2
ENTROPY_NATS = 0.5
KL_TOKEN = 0.1


def prompt_ids(tokenizer, fmt: str, problems: list[Problem], drafts: list[str] | None = None) -> list[list[int]]:
    drafts = drafts or [""] * len(problems)
    texts = [
        prompts.render(TEMPLATES[fmt], problem=p.text, solution=p.solution(), initial=d)
        for p, d in zip(problems, drafts)
    ]
    return [prompts.to_prompt_ids(t, tokenizer, True) for t in texts]


def token_stats(teacher, student, tokenizer, contexts, responses, batch: int = 128) -> list[torch.Tensor]:
    """Per response, its [len, 5] ``trd_lightning.diagnostics.STAT_COLUMNS`` (teacher and student after the same
    context, as in OPD with the teacher shown the prompt)."""
    out = []
    for i in range(0, len(contexts), batch):
        c, r = contexts[i : i + batch], responses[i : i + batch]
        t_logits = response_logits(teacher, tokenizer, c, r)
        # The teacher on its own samples (the entropy share) is scored once, not twice.
        s_logits = t_logits if student is teacher else response_logits(student, tokenizer, c, r)
        out += [token_distribution_stats(s, t, torch.tensor(y)) for s, t, y in zip(s_logits, t_logits, r)]
    return out


def share(flags: list[torch.Tensor]) -> float | None:
    """The share of True among all ``flags`` pooled (None when there are none: JSON has no NaN)."""
    pooled = torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)
    return pooled.double().mean().item() if pooled.numel() else None


def accuracy(texts: list[str], problems: list[Problem]) -> float:
    return sum(is_correct(t, p.answer) for t, p in zip(texts, problems)) / len(problems)


def measure_world(teacher, student, tokenizer, n: int = 512, seed: int = 2024, max_new_tokens: int = 48) -> dict:
    """Measure every property of the world on ``n`` fresh problems (seeded by ``seed``).

    Args:
        teacher: the frozen teacher (also the OPD refiner).
        student: the initial student (also the OPSD refiner, shown the reference).
        tokenizer: their shared tokenizer.
        n: problems, one student rollout and one teacher sample each.
        seed: seeds the problems and every sample.
        max_new_tokens: the student's rollout budget (the demo configs' ``data.rollout.max_new_tokens``).
    """
    teacher.eval(), student.eval()
    rng = random.Random(seed)
    problems = [sample_problem(rng) for _ in range(n)]
    plain = prompt_ids(tokenizer, "student", problems)
    report: dict = {"measured_on": f"{n} fresh problems (seed {seed}); each draw seeded per row from seed {seed}"}
    acc = {}
    for name, model, fmt in (
        ("teacher", teacher, "student"),
        ("student", student, "student"),
        ("student_with_reference", student, "privileged"),
    ):
        contexts = prompt_ids(tokenizer, fmt, problems)
        texts = sample(model, tokenizer, contexts, 0.0, 2 * max_new_tokens, seed, "greedy").texts
        acc[f"{name}_greedy"] = accuracy(texts, problems)

    own = sample(teacher, tokenizer, plain, 1.0, 2 * max_new_tokens, seed, "teacher")
    acc["teacher_sampled"] = accuracy(own.texts, problems)
    entropy = torch.cat([s[:, 1] for s in token_stats(teacher, teacher, tokenizer, plain, own.ids)])
    high = entropy >= ENTROPY_NATS
    uncertain = high.double().mean().item()
    report["teacher_uncertain"] = {
        "value": uncertain,
        "threshold": "0.05 <= value <= 0.40",
        "holds": 0.05 <= uncertain <= 0.40,
        "what": "share of the teacher's own sampled response positions with entropy >= 0.5 nats",
        "rest_share_below_0.1_nats": share([entropy[~high] < 0.1]),
        "positions": int(entropy.numel()),
        "samples_truncated": sum(own.truncated),
    }

    rollouts = sample(student, tokenizer, plain, 1.0, max_new_tokens, seed, "student")
    right = [is_correct(t, p.answer) for t, p in zip(rollouts.texts, problems)]
    acc["student_sampled"] = sum(right) / n
    stats = token_stats(teacher, student, tokenizer, plain, rollouts.ids)
    after_wrong, diverged_wrong, control = [], 0, []
    threshold = math.log(DIVERGENCE_PROB)
    for st, ok in zip(stats, right):
        bimodal = st[:, 3] > TAU
        if ok:
            control.append(bimodal)
            continue
        first = int(first_divergence(st[None, :, 4], torch.ones(1, len(st), dtype=torch.bool), threshold)[0])
        if first >= 0:
            diverged_wrong += 1
            after_wrong.append(bimodal[first:])
    torn, calm = share(after_wrong), share(control)
    report["teacher_torn"] = {
        "value": torn,
        "control": calm,
        "ratio": torn / calm if torn is not None and calm else None,
        "threshold": "value >= 0.05 and value >= 3 x control",
        "holds": torn is not None and calm is not None and torn >= 0.05 and torn >= 3 * calm,
        "what": "share of bimodal positions (teacher top-2 both > 0.2) on the student's wrong rollouts from their "
        "first divergence (first token the teacher gives < 0.05) on; control: on its correct rollouts, all positions",
        "wrong_rollouts": n - sum(right),
        "wrong_rollouts_diverging": diverged_wrong,
        "positions_after_divergence": int(sum(len(a) for a in after_wrong)),
        "correct_rollouts": sum(right),
    }

    kl = torch.cat([st[:, 0] for st in stats])
    above = kl > KL_TOKEN
    token_p = torch.cat([st[:, 4] for st in stats]).exp()
    median = kl.median().item()
    share_above = above.double().mean().item()
    report["kl_shape"] = {
        "median": median,
        "share_above_0.1": share_above,
        "threshold": "median < 0.1 and 0.10 <= share_above_0.1 <= 0.50",
        "holds": median < 0.1 and 0.10 <= share_above <= 0.50,
        "what": "per-token KL(teacher || student) on the student's sampled rollouts (teacher shown the prompt)",
        "above_0.1_with_teacher_prob_at_least_0.05": share([token_p[above] >= DIVERGENCE_PROB]),
        "tokens": int(kl.numel()),
        "rollouts_truncated": sum(rollouts.truncated),
    }

    wrong = [i for i, ok in enumerate(right) if not ok]
    repair = {}
    for name, model, fmt in (("opd", teacher, "refine_opd"), ("opsd", student, "refine_opsd")):
        ps = [problems[i] for i in wrong]
        ctx = prompt_ids(tokenizer, fmt, ps, [rollouts.texts[i] for i in wrong])
        for temperature in (0.0, 1.0):
            texts = sample(model, tokenizer, ctx, temperature, 2 * max_new_tokens, seed, f"refine-{name}").texts
            repair[f"{name}_{'greedy' if temperature == 0 else 'sampled'}"] = accuracy(texts, ps) if ps else 0.0
    report["refiners_repair"] = {
        **repair,
        "threshold": "opd_greedy >= 0.5 and opsd_greedy >= 0.5",
        "holds": repair["opd_greedy"] >= 0.5 and repair["opsd_greedy"] >= 0.5,
        "what": "share of the student's wrong rollouts each refiner rewrites into a correct solution",
        "wrong_rollouts": len(wrong),
    }
    report["accuracy"] = acc
    return report


def main() -> None:
    """Measure the demo world in use (shipped, or built into the cache) and record it in its ``world.json``."""
    tokenizer = load_tokenizer(world.resolve("trd-demo/tokenizer"))
    teacher, student = (load_causal_lm(world.resolve(f"trd-demo/{name}")) for name in ("teacher", "student"))
    path = world.world_dir() / "world.json"
    report = json.loads(path.read_text())
    report["properties"] = measure_world(teacher, student, tokenizer)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)  # never a half-written world.json
    print(json.dumps(report["properties"], indent=2))


if __name__ == "__main__":
    main()
