"""Hydra's ConfigStore filled by a function, called by each entry point (never on import).

Nodes: `train_schema` (pipeline.config.TrainConfig), `eval_schema` (EvalConfig), `predict_schema`
(PredictConfig), `export_schema` (ExportConfig), and per dense arch
`model/<arch>_base`: the typed `ModelConfig` whose `dense` is that arch's config dataclass, which every
preset in conf/model/ extends through its defaults list.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from models.config import DENSE_ARCHS, ModelConfig, model_config_class

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def register_model_configs() -> None:
    """`model/<arch>_base` for every arch. Imports no TorchRec (models/config.py)."""
    store = ConfigStore.instance()
    for arch in DENSE_ARCHS:
        store.store(group="model", name=f"{arch}_base", node=model_config_class(arch))


def register_configs() -> None:
    """Every node the train, eval and predict configs (conf/{train,eval,predict}.yaml) compose from."""
    from pipeline.config import EvalConfig, ExportConfig, PredictConfig, TrainConfig

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    store.store(name="predict_schema", node=PredictConfig)
    store.store(name="export_schema", node=ExportConfig)
    register_model_configs()


def with_recipe(overrides: Sequence[str], config_dirs: Sequence[Path] = ()) -> list[str]:
    """A train job's overrides plus `recipe=default` where they name no recipe and the chosen dataset has
    none of its own. conf/train.yaml picks `recipe: ${data}`: a dataset with a conf/recipe/<data>.yaml (or
    one in a `--config-dir`) trains with it; Hydra's defaults list has no fallback for the others (a
    user's data from `data.infer_schema`), so this adds it."""
    import yaml

    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]
    if "recipe" in keys:
        return list(overrides)
    defaults = yaml.safe_load((CONF_DIR / "train.yaml").read_text())["defaults"]
    data = next(d["data"] for d in defaults if isinstance(d, dict) and "data" in d)
    for o in overrides:
        if o.startswith("data="):
            data = o.split("=", 1)[1]
    if any((d / "recipe" / f"{data}.yaml").is_file() for d in (CONF_DIR, *config_dirs)):
        return list(overrides)
    return [*overrides, "recipe=default"]


def compose_train(overrides: Sequence[str]) -> Any:
    """The train config (a typed DictConfig) launch/train.py would run with these overrides."""
    from hydra import compose, initialize_config_dir

    from pipeline.config import reject_unknown_keys

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="train", overrides=with_recipe(overrides))
    reject_unknown_keys(cfg)
    return cfg


def compose_model(preset: str, overrides: Sequence[str] = ()) -> ModelConfig:
    """The typed ModelConfig of `model=<preset>` (conf/model/<preset>.yaml) with `model.*`-relative
    overrides (e.g. `dense.dim=128`), composed by Hydra as a train job would. For tools that need the
    model alone (launch/bench.py); imports no TorchRec."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline.config import reject_unknown_keys

    register_model_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(overrides=[f"+model={preset}", *(f"model.{o}" for o in overrides)]).model
    reject_unknown_keys(cfg, "model")
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
