"""Code tasks through the DataModule and the CLI: each code config maps its hub columns (local files with those
columns, no downloads), and a scripted student's programs are checked for rollout/accuracy, the scheduler's
``incorrect`` mode and validation's pass@k, against hand-worked values."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from helpers import KeepBatch
from test_cli import CONFIGS, demo_on_tiny, validate_with_eval_config
from test_code_rows import HUMANEVAL, LCB_CALL, LCB_STDIO, MBPP, TACO_CALL, TACO_STDIO

from trd_lightning import RefinementScheduler
from trd_lightning.cli import cli_main
from trd_lightning.data.code_rows import code_row
from trd_lightning.rollout.batch import Rollouts
from trd_lightning.rollout.engines import LocalEngine
from trd_lightning.verify import CodeVerifier

ON_CPU_TRAINER = ["--trainer.val_check_interval=1", "--trainer.limit_val_batches=0"]
EVAL = {
    "humanevalplus.yaml": ("humaneval", [HUMANEVAL]),
    "mbppplus.yaml": ("mbpp", [MBPP]),
    "livecodebench.yaml": ("livecodebench", [LCB_STDIO, LCB_CALL]),
}


@pytest.mark.parametrize("name", sorted(EVAL))
def test_code_eval_configs_map_their_columns(name, tiny, tmp_path):
    code_format, rows = EVAL[name]
    cli = validate_with_eval_config(
        tiny,
        tmp_path,
        name,
        rows,
        "--data.validation.subset=null",
        "--data.validation.samples=2",
        "--data.prompt.max_prompt_length=400",
    )
    data = cli.datamodule
    assert isinstance(data.val_verifier, CodeVerifier) and data.verifier is not data.val_verifier
    assert [r["answer"] for r in data.val_rows] == [code_row(r, code_format)["answer"] for r in rows]
    assert [r["problem"] for r in data.val_rows] == [code_row(r, code_format)["problem"] for r in rows]
    assert {"val/avg@2", "val/pass@2"} <= set(cli.trainer.callback_metrics)


def test_the_taco_config_trains_on_taco_columns(tiny, tmp_path):
    local = tmp_path / "taco.parquet"
    Dataset.from_list([TACO_STDIO, TACO_CALL, {**TACO_STDIO, "input_output": ""}] * 2).to_parquet(str(local))
    cli = cli_main(
        [
            "fit",
            *demo_on_tiny(tiny),
            "--config",
            str(CONFIGS[0].parent / "qwen3_trd_code.yaml"),
            *ON_CPU_TRAINER,
            f"--data.train_data={local}",
            "--data.prompt.max_prompt_length=400",
            "--data.validation.split=null",
            "--data.rollout.max_new_tokens=6",
            "--data.refine.max_prompt_length=400",
            "--data.refine.template=null",  # the demo base config's own refine prompt gives way to the code default
            "--data.refine.max_new_tokens=6",
            "--trainer.max_steps=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    data = cli.datamodule
    # The rows without tests are dropped; y* is TACO's first solution; the refine prompt is the code one.
    assert len(data.train_rows) == 4
    assert [data.train_rows[i]["solution"] for i in range(2)] == [
        json.loads(r["solutions"])[0] for r in (TACO_STDIO, TACO_CALL)
    ]
    assert "programming problem" in data.refine_template and data.refine.enabled
    metrics = cli.trainer.callback_metrics
    assert float(metrics["rollout/accuracy"]) == 0.0  # a random tiny model writes no passing program
    assert "refine/accuracy_after" in metrics


# Two problems with a right and a wrong program each, so every verdict below can be worked out by hand.
PROBLEMS = [
    {
        "question": "Print the sum of two integers.",
        "solutions": json.dumps(["a, b = map(int, input().split())\nprint(a + b)"]),
        "input_output": json.dumps({"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]}),
    },
    {
        "question": "Return twice n.",
        "solutions": json.dumps(["def double(n):\n    return 2 * n"]),
        "starter_code": "def double(n):\n    ",
        "input_output": json.dumps({"fn_name": "double", "inputs": [[1], [4]], "outputs": [[2], [8]]}),
    },
]
RIGHT = [
    "```python\na, b = map(int, input().split())\nprint(a + b)\n```",
    "```python\ndef double(n):\n    return n + n\n```",
]
WRONG = ["```python\nprint(0)\n```", "```python\ndef double(n):\n    return n\n```"]


@pytest.fixture
def scripted(monkeypatch, tiny):
    """The student and the refiner write what ``script(problem, nth)`` says: the nth response to a prompt of that
    problem in the call (row order). The checking, selection and assembly stay real."""
    calls = {"script": None}

    def generate(self, prompts, sampling, seeds):
        tok = self.tokenizer
        texts, counts = [], {}
        for prompt in tok.batch_decode(prompts.ids, skip_special_tokens=True):
            problem = next(i for i, p in enumerate(PROBLEMS) if p["question"] in prompt)
            counts[problem] = counts.get(problem, 0) + 1
            texts.append(calls["script"](problem, counts[problem] - 1, "Draft:" in prompt))
        return Rollouts.from_texts(texts, tok, sampling.max_new_tokens, self.eos_ids[0], prompts.ids.device)

    from trd_lightning.hf import load_tokenizer

    monkeypatch.setattr(LocalEngine, "tokenizer", load_tokenizer(tiny["student"]), raising=False)
    monkeypatch.setattr(LocalEngine, "generate", generate)
    return calls


def code_run(make_run, tmp_path, callbacks=(), data=None, **trainer):
    local = tmp_path / "taco.jsonl"
    local.write_text("\n".join(json.dumps({**p, "starter_code": p.get("starter_code", "")}) for p in PROBLEMS))
    options = {
        "train_data": str(local),
        "task": "code",
        "code_format": "taco",
        "batch_size": 2,
        "rollout": {"num_generations": 2, "max_new_tokens": 64},
        "refine": {"enabled": True, "template": "{problem}\nDraft:\n{initial}", "max_new_tokens": 64},
        **(data or {}),
    }
    return make_run(data=options, callbacks=callbacks, model={"micro_batch_size": 4}, **trainer)


def test_code_rollouts_are_checked_and_incorrect_mode_refines_the_wrong_ones(make_run, tiny, tmp_path, scripted):
    # Rollout g of problem p is right when g == p: problem 0's first and problem 1's second; rewrites are right.
    scripted["script"] = lambda p, g, rewrite: RIGHT[p] if rewrite or g == p else WRONG[p]
    keep = KeepBatch()
    trainer, module, dm = code_run(make_run, tmp_path, [RefinementScheduler(mode="incorrect"), keep], max_steps=1)
    trainer.fit(module, dm)
    batch = keep.batches[0]
    order = [next(i for i, p in enumerate(PROBLEMS) if p["question"] in q) for q in batch.problem]
    expected_right = [g == order[i // 2] for i in range(4) for g in [i % 2]]
    produced = batch.produced
    assert [text is None for text in produced.refined_text] == expected_right  # only the wrong ones rewritten
    metrics = trainer.callback_metrics
    assert float(metrics["rollout/accuracy"]) == pytest.approx(0.5)
    assert float(metrics["refine/accuracy_before"]) == 0.0 and float(metrics["refine/accuracy_after"]) == 1.0


def test_validation_pass_at_k_on_code_by_hand(make_run, tiny, tmp_path, scripted):
    """k = 4 samples: problem 0 gets 2 right, problem 1 none. By hand: avg@4 = (2/4 + 0) / 2 = 0.25; pass@4 is 1 for
    problem 0 (some sample passes) and 0 for problem 1, so 0.5; accuracy over the 8 answers is 2/8."""
    scripted["script"] = lambda p, g, rewrite: RIGHT[p] if p == 0 and g < 2 else WRONG[p]
    local = tmp_path / "taco.jsonl"
    validation = {"data": str(local), "split": "train", "samples": 4, "temperature": 1.0, "batch_size": 2}
    trainer, module, dm = code_run(make_run, tmp_path, data={"validation": validation}, max_steps=1)
    trainer.validate(module, dm)
    metrics = trainer.callback_metrics
    assert float(metrics["val/avg@4"]) == pytest.approx(0.25)
    assert float(metrics["val/pass@4"]) == pytest.approx(0.5)
    assert float(metrics["val/accuracy"]) == pytest.approx(2 / 8)
