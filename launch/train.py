"""Training entry point: `torchrun --nproc_per_node N launch/train.py [hydra overrides]`.

Thin on purpose: Hydra composes and type-checks the config, `pipeline.train_loop.train` does the work.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.cli import exit_on_user_error, prepare_launch
from launch.report import print_report
from pipeline.config import TrainConfig, reject_unknown_keys
from pipeline.train_loop import train


@hydra.main(version_base=None, config_path="../conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    reject_unknown_keys(cfg)
    config: TrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    summary = train(config)
    if "test" in summary:
        print_report(summary, config.data.root)


if __name__ == "__main__":
    prepare_launch(train=True)
    main()
