"""The ``trd`` command: LightningCLI over DistillationModule and OnPolicyDataModule.

trd fit --config configs/demo.yaml
trd validate --config configs/demo.yaml --ckpt_path runs/.../last.ckpt
trd fit --config configs/demo.yaml --print_config
trd refine --config configs/demo_trd.yaml --output runs/refined
"""

from __future__ import annotations

import argparse
import sys

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from trd_lightning.data.datamodule import OnPolicyDataModule
from trd_lightning.module import DistillationModule
from trd_lightning.offline import write_refinement_round


class SaveConfigToLogger(SaveConfigCallback):
    """Save the resolved config beside the run (``config.yaml``) and show it in TensorBoard's text tab."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_text"):
                logger.experiment.add_text("config", f"<pre>{text}</pre>", global_step=0)


class TRDCLI(LightningCLI):
    """LightningCLI with the tokenizer tied to the student."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.student", "data.tokenizer", apply_on="parse")


def main() -> None:
    """Entry point of ``trd`` and ``python -m trd_lightning``."""
    cli_main()


def cli_main(args=None, run: bool = True):
    """Run the CLI on ``args`` (the command line when None) and return it; ``run=False`` only instantiates.

    ``trd refine`` writes an offline refinement round (see ``trd_lightning.offline``); every other subcommand
    is LightningCLI's.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["refine"]:
        return refine(argv[1:])
    return TRDCLI(
        DistillationModule,
        OnPolicyDataModule,
        save_config_callback=SaveConfigToLogger,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def refine(argv: list[str]):
    """``trd refine --config ... --output DIR [--device cuda]``: the other arguments are the usual config options."""
    parser = argparse.ArgumentParser(prog="trd refine", description="Write one offline TRD refinement round.")
    parser.add_argument("--output", required=True, help="folder of the refined dataset (parquet shards)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    known, rest = parser.parse_known_args(argv)
    cli = cli_main(rest, run=False)
    return write_refinement_round(cli.model, cli.datamodule, known.output, known.device)


if __name__ == "__main__":
    main()
