"""The prefix-failure monitors (GradientFragmentationMonitor, PrefixFailureMonitor): on a toy module that is not
ours, through their protocols, and on DistillationModule with TensorBoard."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import KeepBatch
from torch.utils.data import DataLoader

from trd_lightning import GradientFragmentationMonitor, PrefixFailureMonitor
from trd_lightning.callbacks.fragmentation import probe_parameters


# ---------------------------------------------------------- the monitor, not on our module
class TokenLinear(L.LightningModule):
    """Not a distillation module: token t of sequence b has loss w . x[b, t]; only the monitor protocol is added."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.rows_asked: list[tuple[int, int]] = []

    def sequence_token_losses(self, batch, rows: slice):
        x, mask = batch["x"][rows], batch["mask"][rows]
        self.rows_asked.append((self.trainer.global_step, rows.start))
        return (x @ self.w) * mask, mask

    def training_step(self, batch, batch_idx):
        losses, _ = self.sequence_token_losses(batch, slice(None))
        return losses.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the weights stay put, so every step measures the same


def fit_toy(sequences: torch.Tensor, mask: torch.Tensor, callbacks, steps: int = 1) -> TokenLinear:
    module = TokenLinear()
    data = [{"x": x, "mask": m} for x, m in zip(sequences, mask)]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, DataLoader(data, batch_size=len(data)))
    return module


def only_metrics(monitor) -> dict:
    """What the monitor measured in a one-step run."""
    assert list(monitor.history) == [0]
    return monitor.history[0]


def test_two_identical_sequences_give_cosine_one_and_coherence_one():
    seq = torch.tensor([[0.5, 1.0], [2.0, -1.0], [0.3, 0.3]])
    monitor = GradientFragmentationMonitor(1, 2)
    fit_toy(torch.stack([seq, seq]), torch.ones(2, 3, dtype=torch.bool), [monitor])
    metrics = only_metrics(monitor)
    assert metrics["frag/grad_cosine"] == pytest.approx(1.0)
    assert metrics["frag/coherence"] == pytest.approx(1.0)


def test_constructed_opposite_gradients_give_minus_one():
    seq = torch.tensor([[0.5, 1.0], [2.0, -1.0], [0.3, 0.3]])
    monitor = GradientFragmentationMonitor(1, 2)
    fit_toy(torch.stack([seq, -seq]), torch.ones(2, 3, dtype=torch.bool), [monitor])
    metrics = only_metrics(monitor)
    assert metrics["frag/grad_cosine"] == pytest.approx(-1.0)
    assert metrics["frag/coherence"] == pytest.approx(0.0, abs=1e-12)


def test_prefix_conflict_is_minus_one_when_the_tokens_after_the_divergence_pull_back():
    # Token losses w.x with w = (1, 1): -0.1, -0.1 then 2.0, 2.0; the first loss over 1.0 is at position 2.
    # The gradient before it is 2 * (-0.1, 0), after it 2 * (2, 0): opposite directions.
    seq = torch.tensor([[-0.1, 0.0], [-0.1, 0.0], [2.0, 0.0], [2.0, 0.0]])
    other = torch.tensor([[0.2, 0.1]] * 4)  # never over 1.0: no divergence, no conflict value
    monitor = GradientFragmentationMonitor(1, 2)
    fit_toy(torch.stack([seq, other]), torch.ones(2, 4, dtype=torch.bool), [monitor])
    assert only_metrics(monitor)["frag/prefix_conflict"] == pytest.approx(-1.0)


def test_frequency_and_number_of_sequences_are_honoured():
    x = torch.randn(6, 3, 2, generator=torch.Generator().manual_seed(0))
    monitor = GradientFragmentationMonitor(3, 4)
    module = fit_toy(x, torch.ones(6, 3, dtype=torch.bool), [monitor], steps=7)
    assert sorted(monitor.history) == [0, 3, 6]
    asked = [(step, start) for step, start in module.rows_asked if start is not None]
    assert asked == [(s, i) for s in (0, 3, 6) for i in range(4)]


def test_the_monitor_leaves_the_training_gradients_alone():
    x = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, 3, dtype=torch.bool)
    seen = []

    class Grads(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(pl_module.w.grad.clone())

    fit_toy(x, mask, [GradientFragmentationMonitor(1, 4), Grads()])
    assert torch.allclose(seen[0], x.sum((0, 1)))


def test_prefix_monitor_names_the_missing_method():
    with pytest.raises(TypeError, match="token_statistics"):
        fit_toy(torch.zeros(2, 2, 2), torch.ones(2, 2, dtype=torch.bool), [PrefixFailureMonitor(1)])


def test_gradient_monitor_refuses_sharded_strategies():
    from trd_lightning import FSDP2Strategy

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=FSDP2Strategy(), logger=False)
    with pytest.raises(ValueError, match="unsharded"):
        GradientFragmentationMonitor().setup(trainer, None, "fit")
    GradientFragmentationMonitor().setup(L.Trainer(accelerator="cpu", devices=1, logger=False), None, "fit")


def test_probe_parameters_prefer_lora_then_last_block_and_head(tiny):
    from transformers import AutoModelForCausalLM

    from trd_lightning.lora import LoraOptions, apply_lora

    model = AutoModelForCausalLM.from_pretrained(tiny["student"])
    last = model.model.layers[-1]
    chosen = {id(p) for p in probe_parameters(model)}
    expected = {id(p) for p in last.parameters()} | {id(model.get_output_embeddings().weight)}
    assert chosen == expected
    lora = apply_lora(model, LoraOptions(r=2, alpha=4))
    names = {n for n, p in lora.named_parameters() if id(p) in {id(q) for q in probe_parameters(lora)}}
    assert names and all("lora_" in n for n in names)


# ------------------------------------------------------------ on DistillationModule
def tensorboard_run(make_run, root, data: dict, callbacks, steps: int = 2):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(root), name="tb")
    trainer, module, dm = make_run(root=root, data=data, callbacks=callbacks, logger=logger, max_steps=steps)
    trainer.fit(module, dm)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    return events


@pytest.mark.parametrize("refine", [False, True], ids=["opd", "trd"])
def test_monitors_log_per_view_to_tensorboard(make_run, tiny, tmp_path, refine):
    monitors = [GradientFragmentationMonitor(2, 3), PrefixFailureMonitor(2, 4, figure_every_n_steps=2)]
    events = tensorboard_run(make_run, tmp_path, {"refine": {"enabled": refine}}, monitors, steps=3)
    views = ["y_o", "y_r"] if refine else ["y_o"]
    scalars = set(events.Tags()["scalars"])
    for view in views:
        assert {f"frag/grad_cosine/{view}", f"frag/coherence/{view}", f"teacher/bimodal_frac/{view}"} <= scalars
        assert {f"teacher/entropy/{view}", f"prefix/diverged_frac/{view}"} <= scalars
        assert f"teacher/token_kl/{view}" in events.Tags()["histograms"]
        # Logged where measured (steps 0 and 2 of 0, 1, 2) and nowhere else, with the values measured there.
        for tag in (f"frag/coherence/{view}", f"teacher/entropy/{view}", f"prefix/diverged_frac/{view}"):
            points = {e.step: e.value for e in events.Scalars(tag)}
            assert sorted(points) == [0, 2]
            owner = monitors[0] if tag.startswith("frag/") else monitors[1]
            assert points == pytest.approx({s: owner.history[s][tag] for s in (0, 2)})
        for e in events.Scalars(f"frag/coherence/{view}"):
            assert 0.0 <= e.value <= 1.0 + 1e-9
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2]
    assert not any(tag.endswith("/y_r") for tag in scalars) or refine
    assert "prefix/rollout" in events.Tags()["images"]


def test_token_statistics_match_the_models_full_logits(make_run, tiny, tmp_path):
    keep = KeepBatch()
    trainer, module, dm = make_run(callbacks=[keep], max_steps=1)
    trainer.fit(module, dm)
    seqs = keep.batches[0].produced.train
    grids, mask = module.token_statistics(seqs, slice(0, 3))
    part = seqs.rows(slice(0, 3))
    width = mask.shape[1]
    assert width == part.response_ids.shape[1]

    def logits(model, ids, attention):
        position = (attention.cumsum(-1) - 1).clamp(min=0)
        return model(ids, attention_mask=attention, position_ids=position).logits.double()

    with torch.no_grad():
        s = logits(module.student, part.student_ids, part.student_mask)
        t = logits(module.teacher, part.teacher_ids, part.teacher_mask)
    # The logits at the position before each response token predict it.
    s_logp = s[:, -width - 1 : -1].log_softmax(-1)
    t_logp = t[:, -width - 1 : -1].log_softmax(-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    top2 = t_logp.exp().topk(2, -1).values
    token = t_logp.gather(-1, part.response_ids[:, :, None]).squeeze(-1)
    assert torch.allclose(grids["kl"][mask].double(), kl[mask], atol=1e-4)
    assert torch.allclose(grids["teacher_top2"][mask].double(), top2[..., 1][mask], atol=1e-5)
    assert torch.allclose(grids["teacher_token_logprob"][mask].double(), token[mask], atol=1e-4)
    losses, loss_mask = module.sequence_token_losses(seqs, slice(0, 3))
    assert torch.equal(loss_mask, mask)
    assert torch.allclose(losses[mask].double(), kl[mask], atol=1e-4)  # the demo loss is forward KL (beta 0)


def test_views_pair_each_refined_rollout_with_its_original(make_run, tiny, tmp_path):
    from trd_lightning import RefinementScheduler

    keep = KeepBatch()
    scheduler = RefinementScheduler(p_start=0.5, p_end=0.5)
    data = {"refine": {"enabled": True}, "batch_size": 8}
    trainer, module, dm = make_run(data=data, callbacks=[scheduler, keep], max_steps=2)
    trainer.fit(module, dm)
    tok = dm.tokenizer
    counts = []
    for batch in keep.batches:
        produced = batch.produced
        refined = produced.refined
        views = module.diagnostic_views(batch)
        n = int(refined.sum())
        counts.append(n)
        if n == 0:
            assert set(views) == {"y_o"}
            continue
        y_o, y_r = views["y_o"], views["y_r"]
        assert len(y_o) == 8 and len(y_r) == n
        rows = refined.nonzero()[:, 0].tolist()
        for j, row in enumerate(rows):
            # Row j of each view is the same rollout: its prompt, its y_o, and the rewrite of that y_o.
            prompt = batch.prompts.lists()[row]
            assert y_o.student_ids[j][y_o.student_mask[j].bool()].tolist()[: len(prompt)] == prompt
            assert y_r.student_ids[j][y_r.student_mask[j].bool()].tolist()[: len(prompt)] == prompt
            y_o_text = tok.decode(y_o.response_ids[j][y_o.response_mask[j]], skip_special_tokens=True)
            assert y_o_text == produced.rollout_text[row]
            y_r_text = tok.decode(y_r.response_ids[j][y_r.response_mask[j]], skip_special_tokens=True)
            assert y_r_text == produced.refined_text[row]
    assert any(0 < n < 8 for n in counts)  # the pairing is exercised with refined and unrefined rows mixed
