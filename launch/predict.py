"""Batch scoring: `torchrun --nproc_per_node N launch/predict.py checkpoint=<dir> out=<dir> [data.split=...]`
(pipeline/predict_job.py)."""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.cli import exit_on_user_error, prepare_launch
from pipeline.config import PredictConfig, reject_unknown_keys
from pipeline.predict_job import run_predict


@hydra.main(version_base=None, config_path="../conf", config_name="predict")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    reject_unknown_keys(cfg)
    config: PredictConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    result = run_predict(config)
    if os.environ.get("RANK", "0") == "0":
        cols = ", ".join(result["columns"])
        print(f"predict: {result['rows']} rows of split {result['split']!r} -> {result['out']} ({cols})")


if __name__ == "__main__":
    prepare_launch()
    main()
