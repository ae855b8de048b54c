"""The ``trd`` command: LightningCLI over DistillationModule and OnPolicyDataModule.

trd fit --config configs/demo.yaml
trd validate --config configs/demo.yaml --ckpt_path runs/.../last.ckpt
trd fit --config configs/demo.yaml --print_config
trd refine --config configs/demo.yaml --config configs/trd.yaml --output runs/refined
"""

from __future__ import annotations

import argparse
import html
import importlib
import logging
import re
import shlex
import sys
import warnings
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from trd_lightning.callbacks.empty_run import DropEmptyRun
from trd_lightning.callbacks.progress import StepProgressBar
from trd_lightning.callbacks.validate_start import ValidateAtEnd
from trd_lightning.data.datamodule import OnPolicyDataModule
from trd_lightning.media import log_text
from trd_lightning.module import DistillationModule
from trd_lightning.offline import write_refinement_round
from trd_lightning.usage import (
    UsageError,
    check_not_only_overlays,
    debugging,
    explain_parse_error,
    is_mistake,
    one_line,
    parser_options,
)

DESCRIPTION = (
    "On-policy distillation of Hugging Face causal LMs (OPD, OPSD) and Trajectory-Refined Distillation. "
    "Every option of a subcommand is in `trd SUBCOMMAND --help`; a config sets them in YAML (--config). "
    "A mistake is reported on one line; --debug (or TRD_DEBUG=1) shows its traceback."
)

# LightningCLI's subcommands that ``trd`` offers, with their help (``predict`` has nothing to predict here).
SUBCOMMANDS = {
    "fit": "Train the student: rollouts, the teacher's scores, one optimizer step per batch of prompts.",
    "validate": "Sample answers to the validation split and log val/accuracy, val/avg@k and val/pass@k.",
    "test": "The validation metrics on the test split.",
}

# Subcommands that are not LightningCLI's: name -> ("module:function" called with the arguments after the name,
# help). Adding one is one line here.
EXTRA_SUBCOMMANDS = {
    "refine": ("trd_lightning.cli:refine", "Write one offline TRD refinement round (parquet shards) from a config."),
    "serve": ("trd_lightning.serve.cli:main", "Serve a frozen teacher or refiner (vLLM's completions API subset)."),
}

# Lightning 2.6.6 builds torch's LeafSpec, which torch 2.13 deprecates, each time a loop wraps its DataLoader:
# nothing a user of this command can act on.
warnings.filterwarnings(
    "ignore",
    message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    category=FutureWarning,
    module="lightning.pytorch.utilities._pytree",
)

# `trd refine` hands LightningCLI the arguments after its own options while sys.argv still holds the whole command
# line, which is what this warning is about: the arguments given are the ones meant.
warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")


class _DropTip(logging.Filter):
    """Lightning's advertisement for its hosted logger says nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_DropTip())


class SaveConfigToLogger(SaveConfigCallback):
    """Save the resolved config beside the run (``config.yaml``) and send it to the loggers as text."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        log_text(trainer, "config", f"<pre>{html.escape(text)}</pre>", 0)


class TRDCLI(LightningCLI):
    """LightningCLI with the tokenizer tied to the student, a step-counting progress bar by default, a validation at
    the end of every fit, a resumed run logging into the folder of the run it resumes, and validation and test runs
    logging into folders of their own."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in SUBCOMMANDS}

    def _add_subcommands(self, parser, **kwargs) -> None:
        # LightningCLI's own loop, with our help lines, and the extra subcommands listed beside them.
        self._subcommand_parsers = {}
        subcommands = parser.add_subcommands()
        for name, help in SUBCOMMANDS.items():
            sub = self._prepare_subcommand_parser(
                self.trainer_class, name, **{"description": help, **kwargs.get(name, {})}
            )
            self._subcommand_parsers[name] = sub
            subcommands.add_subcommand(name, sub, help=help)
        for name, (_, help) in EXTRA_SUBCOMMANDS.items():
            # Listed for --help only: cli_main runs these before LightningCLI parses anything.
            subcommands.add_subcommand(name, ArgumentParser(description=help), help=help)

    def parse_arguments(self, parser, args) -> None:
        """LightningCLI's parsing; a refused command line or config becomes a ``UsageError`` with one line, an unknown
        option's nearest valid name in it."""
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            argv = list(sys.argv[1:] if args is None else args)
            subparsers = getattr(self, "_subcommand_parsers", None) or {}
            sub = next((a for a in argv if a in subparsers), None)
            options = parser_options(subparsers[sub] if sub else parser)
            raise UsageError(explain_parse_error(one_line(err), options)) from err

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.student", "data.tokenizer", apply_on="parse")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_checkpoint(config.get("ckpt_path"))
        name_the_variant(config)
        if self.subcommand in ("validate", "test"):
            own_folder(config.trainer, config.get("ckpt_path"), self.subcommand)
        elif config.get("ckpt_path"):
            continue_run(config.trainer, config.ckpt_path)

    def instantiate_trainer(self, **kwargs):
        trainer = self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"]
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        wants_bar = trainer.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks) and "callbacks" not in kwargs:
            kwargs["callbacks"] = [*callbacks, StepProgressBar()]
        dropper = DropEmptyRun()
        extra = [dropper] + ([] if any(isinstance(c, ValidateAtEnd) for c in callbacks) else [ValidateAtEnd()])
        kwargs["callbacks"] = [*kwargs.get("callbacks", callbacks), *extra]
        built = super().instantiate_trainer(**kwargs)
        dropper.note(built)
        return built


# The method in a run's name: ``demo_opd``, ``qwen3_opsd_fsdp``, and the variants it may already carry.
METHOD_IN_NAME = re.compile(r"(?<![a-z0-9])(?:trd_)?(?:opd|opsd)(?:_offline)?(?:_served)?(?:_overlap)?(?![a-z0-9])")


def variant(config) -> str:
    """The method a config runs: ``opd`` or ``opsd``, ``trd_`` before it when rollouts are refined, ``_offline``
    after it for a written round, ``_served`` when a service refines, teaches or samples the student's rollouts,
    ``_overlap`` when the next step's rollouts are made while a step trains."""
    model, refine, rollout = config.model, config.data.refine, config.data.rollout
    tag = ("trd_" if refine.enabled else "") + ("opsd" if model.teacher_kind == "shared" else "opd")
    if refine.enabled and refine.offline_round:
        tag += "_offline"
    if (refine.enabled and refine.url and not refine.offline_round) or model.teacher_url or rollout.url:
        tag += "_served"
    if rollout.max_staleness:
        tag += "_overlap"
    return tag


def name_the_variant(config) -> None:
    """Put the variant in the run's name, so that variants of one config do not share a folder: the shipped configs
    name their runs after the method (``demo_opd``), and stacking ``configs/trd.yaml`` makes it ``demo_trd_opd``
    (``demo_trd_opd_offline`` on a written round, ``demo_trd_opd_served`` with a served refiner). A name without
    ``opd`` or ``opsd`` in it is left as it is."""
    tag = variant(config)
    for _, args, _ in _folder_loggers(config.trainer):
        if args.get("name"):
            args.name = METHOD_IN_NAME.sub(tag, args.name, count=1)


def check_checkpoint(ckpt_path: str | None) -> None:
    """A ``--ckpt_path`` that names no file or folder fails here, before any weights load (Lightning's own names for
    a checkpoint, such as ``last``, and remote addresses are left to it)."""
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry") or "://" in ckpt_path:
        return
    if not Path(ckpt_path).expanduser().exists():
        raise FileNotFoundError(
            f"--ckpt_path {ckpt_path} does not exist: name a checkpoint file (or folder of shards)."
        )


def _folder_loggers(trainer_config):
    """The logger configs that write into ``<save_dir>/<name>/<version>`` (TensorBoard, CSV), with their folder."""
    loggers = trainer_config.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if hasattr(logger, "class_path") and logger.class_path.endswith(("TensorBoardLogger", "CSVLogger")):
            args = logger.init_args
            yield logger, args, Path(args.save_dir).expanduser().resolve() / (args.get("name") or "")


def _run_of(ckpt_path: str | None) -> Path | None:
    """The version folder that holds ``ckpt_path`` (``<run>/checkpoints/x.ckpt``), or None."""
    if not ckpt_path:
        return None
    ckpt = Path(ckpt_path).expanduser().resolve()
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def own_folder(trainer_config, ckpt_path: str | None, subcommand: str) -> None:
    """Give a ``validate`` or ``test`` run its own version folder, so that it never writes into a training run's.

    With a checkpoint of a run (``<save_dir>/<name>/version_0/checkpoints/last.ckpt``) the folder lies next to that
    run and is named after it: ``version_0-validate``, then ``version_0-validate-1``, ...; otherwise it is
    ``validate_0``, ``validate_1``, ... in the logger's folder. A logger that names its own version keeps it.
    """
    run = _run_of(ckpt_path)
    for _, args, folder in _folder_loggers(trainer_config):
        if args.get("version") is not None:
            continue
        if run is not None and run.parent == folder:
            base, n = f"{run.name}-{subcommand}", 0
            while (folder / (base if n == 0 else f"{base}-{n}")).exists():
                n += 1
            args.version = base if n == 0 else f"{base}-{n}"
        else:
            n = 0
            while (folder / f"{subcommand}_{n}").exists():
                n += 1
            args.version = f"{subcommand}_{n}"


def continue_run(trainer_config, ckpt_path: str) -> None:
    """Point a TensorBoard logger at the version folder that holds ``ckpt_path`` (``<save_dir>/<name>/<version>/
    checkpoints/x.ckpt``), so that a resumed run's curves continue that run's.

    The resumed run writes a new event file beside the old ones, whose start (``purge_step``: the checkpoint's step,
    the first step the resumed run logs) tells TensorBoard to drop the old events from that step on. Nothing
    changes when the checkpoint lies elsewhere, when the logger names its own version, or for other loggers
    (CSVLogger would delete the run's metrics.csv).
    """
    ckpt = Path(ckpt_path).expanduser().resolve()
    run = _run_of(ckpt_path)
    if run is None:
        return
    for logger, args, folder in _folder_loggers(trainer_config):
        if not logger.class_path.endswith("TensorBoardLogger"):
            continue
        if args.get("version") is None and run.parent == folder:
            args.version = run.name
            if ckpt.is_file():
                # Only the step is read: the weights stay on disk (memory-mapped load).
                args.purge_step = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=False)["global_step"]
            # The checkpoint folder is this run's own, full on purpose.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``trd`` and ``python -m trd_lightning``: a user's mistake ends in one line on stderr,
    ``trd: error: ...``, and exit code 2 (``--debug`` or ``TRD_DEBUG=1``: the traceback; ``trd_lightning.usage``)."""
    debug, given = debugging(list(sys.argv[1:] if argv is None else argv))
    args = given
    if argv is None:  # the command line itself, without --debug (LightningCLI reads sys.argv when args is None)
        sys.argv[1:], args = given, None
    try:
        check_not_only_overlays(given)
        cli_main(args)
    except Exception as err:
        if debug or not is_mistake(err):
            raise
        print(f"trd: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def cli_main(args=None, run: bool = True):
    """Run the CLI on ``args`` (the command line when None) and return it; ``run=False`` only instantiates.

    The extra subcommands (``trd refine``: see ``trd_lightning.offline``) run their own function; every other
    subcommand is LightningCLI's.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] and argv[0] in EXTRA_SUBCOMMANDS:
        module, function = EXTRA_SUBCOMMANDS[argv[0]][0].split(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    return TRDCLI(
        DistillationModule,
        OnPolicyDataModule,
        save_config_callback=SaveConfigToLogger,
        save_config_kwargs={"overwrite": True},
        # The optimizer is the module's own (model.lr and its siblings): LightningCLI's --optimizer would be ignored.
        auto_configure_optimizers=False,
        # Parse errors are raised (and reported on one line by ``main``), not printed after the whole usage.
        parser_kwargs={"description": DESCRIPTION, "exit_on_error": False}
        | {name: {"exit_on_error": False} for name in SUBCOMMANDS},
        args=args,
        run=run,
    )


def refine(argv: list[str]):
    """``trd refine --config ... --output DIR [--device cuda]``: the other arguments are the usual config options."""
    parser = argparse.ArgumentParser(
        prog="trd refine",
        description=EXTRA_SUBCOMMANDS["refine"][1] + " The other arguments are those of `trd fit` (--config ...).",
    )
    parser.add_argument("--output", required=True, help="folder of the refined dataset (parquet shards)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    known, rest = parser.parse_known_args(argv)
    cli = cli_main(rest, run=False)
    command = shlex.join(["trd", "refine", *argv])
    return write_refinement_round(cli.model, cli.datamodule, known.output, known.device, command)


if __name__ == "__main__":
    main()
