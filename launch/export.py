"""Export: `python launch/export.py checkpoint=<run dir or checkpoint> out=<dir> [quantize=int8]`.

Writes a self-contained inference artifact (pipeline/export.py) and prints its parity against the
training model and its size; `pipeline.predictor.Predictor(out)` scores with it.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from data.storage import display, total_size
from launch.cli import exit_on_user_error, prepare_launch
from pipeline.checkpoint import resolve_checkpoint
from pipeline.config import ExportConfig, reject_unknown_keys
from pipeline.export import export
from pipeline.run_log import setup_logging


@hydra.main(version_base=None, config_path="../conf", config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    reject_unknown_keys(cfg)
    c: ExportConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    setup_logging(0)
    manifest = export(
        resolve_checkpoint(c.checkpoint), c.out, c.quantize, c.data_root, c.split, c.parity_rows, c.overwrite
    )
    size = total_size(c.out)
    out = display(c.out)
    parity = manifest["parity"]
    print(
        f"export: {out} ({size / 2**20:.1f} MiB, embeddings {c.quantize}, programs "
        f"{', '.join(manifest['programs'])}); parity on {parity['rows']} {parity['split']} rows: "
        f"max |logit - training model's| = {parity['max_abs_logit_diff']:.2e}"
    )


if __name__ == "__main__":
    prepare_launch()
    main()
