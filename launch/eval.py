"""Eval entry point: `torchrun --nproc_per_node N launch/eval.py checkpoint=<dir> [data.split=test]`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.cli import exit_on_user_error, prepare_launch
from launch.report import print_report
from pipeline.config import EvalConfig, reject_unknown_keys
from pipeline.eval_job import run_eval


@hydra.main(version_base=None, config_path="../conf", config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    reject_unknown_keys(cfg)
    config: EvalConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    result = run_eval(config)
    print_report(result, result["data_root"], title=f"eval of {result['checkpoint']} on {config.data.split}")


if __name__ == "__main__":
    prepare_launch()
    main()
