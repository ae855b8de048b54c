"""The ``trd`` command: LightningCLI over DistillationModule and OnPolicyDataModule.

    trd fit --config configs/demo.yaml
    trd validate --config configs/demo.yaml --ckpt_path runs/.../last.ckpt
    trd fit --config configs/demo.yaml --print_config
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from trd_lightning.data.datamodule import OnPolicyDataModule
from trd_lightning.module import DistillationModule


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


def main(args=None, run: bool = True) -> TRDCLI:
    """Entry point of ``trd`` and ``python -m trd_lightning``; ``run=False`` only parses and instantiates."""
    return TRDCLI(
        DistillationModule,
        OnPolicyDataModule,
        save_config_callback=SaveConfigToLogger,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
