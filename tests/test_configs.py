"""Every config in every group composes through Hydra into the typed objects the job runs on, and a run's
saved config.yaml reads back into the same typed config (lightning-hydra-template's "instantiate every
config" test)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launch.configs import CONF_DIR, register_configs
from models.config import DENSE_ARCHS, ModelConfig, arch_config_class
from pipeline.config import (
    DataConfig,
    EvalConfig,
    ScoreDataConfig,
    TrainConfig,
    load_train_config,
    reject_unknown_keys,
)

MODEL_PRESETS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
DATA_CONFIGS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))


def compose_train(*overrides: str) -> TrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="train", overrides=list(overrides))
    reject_unknown_keys(cfg)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_every_model_preset_composes_to_its_arch_typed_config(preset: str):
    cfg = compose_train(f"model={preset}")
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.model, ModelConfig)
    assert isinstance(cfg.model.dense, arch_config_class(cfg.model.arch))
    assert cfg.model.arch in DENSE_ARCHS


@pytest.mark.parametrize("data", DATA_CONFIGS)
def test_every_data_config_composes_with_a_schema(data: str):
    cfg = compose_train(f"data={data}")
    assert cfg.data.schema["labels"] and cfg.data.root


def test_eval_config_composes():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="eval", overrides=["checkpoint=some/run"])
    assert isinstance(OmegaConf.to_object(cfg), EvalConfig)


def test_overrides_are_type_checked_and_unknown_keys_are_named():
    cfg = compose_train("model=rankmixer_small_smoe", "model.dense.dim=128", "model.sequence=none")
    assert (cfg.model.dense.dim, cfg.model.dense.ffn, cfg.model.sequence) == (128, "smoe", "none")
    with pytest.raises(Exception, match="dmi"):
        compose_train("model.dense.dmi=3")
    with pytest.raises(ValueError, match=r"model\.dense: unknown key\(s\) \['dmi'\]"):
        compose_train("+model.dense.dmi=3")  # `+` appends to a typed node: caught by reject_unknown_keys
    with pytest.raises(Exception, match="many"):
        compose_train("model.dense.moe.num_experts=many")


def test_saved_config_yaml_reads_back_typed_and_equal(tmp_path: Path):
    cfg = compose_train("model=dlrm", "model.dense.mlp_width=96", "optim.dense.lr=0.003")
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))  # as the train job writes it
    loaded = load_train_config(path)
    assert loaded == cfg and type(loaded.model) is type(cfg.model)
    path.write_text(path.read_text().replace("mlp_width: 96", "mlp_widht: 96"))
    with pytest.raises(ValueError, match="mlp_widht"):
        load_train_config(path)


def test_a_wrong_choice_is_refused_listing_the_allowed_values_before_anything_runs():
    for override, allowed in [
        ("optim.dense.schedule=cosin", "constant, cosine, step"),
        ("optim.dense.name=adamw", "rmsprop, adam, adagrad, sgd"),
        ("trainer.autocast=bf32", "auto, bf16, fp16, off"),
        ("model.sequence=pooled", "none, mean_pool, longer"),
        ("model.dense.ffn=moe", "per_token, shared, smoe"),
        ("model.dense.token_mixing=mixer", "multi_head, none, self_attention, all_concat_mlp, all_share"),
        ("model.dense.moe.router=top1", "relu_dtsi, topk, topk_balanced"),
        ("model.longer.merge_mode=mean", "concat, inner"),
    ]:
        with pytest.raises(Exception, match=re.escape(override)) as error:  # Hydra names the override
            compose_train(override)
        assert f"expected one of [{allowed}]" in str(error.value.__cause__), override
    with pytest.raises(ValueError, match="model.sequence: 'pooled' is not one of none, mean_pool, longer"):
        ModelConfig(sequence="pooled")  # built in Python: the same check, one line
    with pytest.raises(ValueError, match="model.arch: unknown arch 'dlrn'"):
        arch_config_class("dlrn")


@pytest.mark.parametrize("recipe", sorted((CONF_DIR / "recipe").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_composes_for_its_dataset(recipe: Path):
    # conf/recipe/<data>.yaml: the Makefile passes its "- key=value" lines as overrides (make train DATA=...)
    overrides = [line[2:] for line in recipe.read_text().splitlines() if line.startswith("- ")]
    assert overrides, recipe
    data = [] if recipe.stem == "synthetic" else [f"data={recipe.stem}"]
    cfg = compose_train(*data, *overrides)
    assert cfg.data.schema["name"] == recipe.stem


def test_eval_and_predict_score_the_checkpoints_own_data_unless_told_otherwise():
    trained = DataConfig(root="datasets/ml100k", split="valid", eval_batch_size=4096, prefetch=3)
    assert ScoreDataConfig().over(trained) == dataclasses.replace(trained, split="test")
    mine = ScoreDataConfig(root="/copy/ml100k", split="valid", eval_batch_size=128).over(trained)
    assert (mine.root, mine.split, mine.eval_batch_size, mine.prefetch) == ("/copy/ml100k", "valid", 128, 3)
