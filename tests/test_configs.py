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

from data.schema import Schema
from launch.configs import CONF_DIR, register_configs, with_recipe
from models.config import DENSE_ARCHS, ModelConfig, arch_config_class
from pipeline.config import (
    DataConfig,
    EvalConfig,
    ScoreDataConfig,
    TrainConfig,
    load_train_config,
    reject_unknown_keys,
)
from pipeline.job import loss_task_weights

MODEL_PRESETS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
SEARCH_RECIPES = CONF_DIR.parent / "reports" / "search_ml100k"
DATA_CONFIGS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))


def compose_train(*overrides: str) -> TrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="train", overrides=with_recipe(overrides))
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


def test_each_dataset_trains_with_its_own_recipe_unless_told_otherwise():
    built_in = compose_train()  # what `make train` and a plain `torchrun launch/train.py` run
    assert (built_in.trainer.epochs, built_in.optim.dense.lr, built_in.optim.dense.schedule) == (
        2,
        0.003,
        "cosine",
    )
    assert built_in.optim.sparse.l2 == 1e-5
    ml = compose_train("data=ml100k")
    assert (ml.trainer.epochs, ml.optim.dense.lr, ml.data.batch_size, ml.model.dense.dropout) == (
        5,
        0.002573,
        1024,
        0.2057,
    )
    paper = compose_train("recipe=paper", "optim.dense.lr=0.02")  # the library defaults; overrides still win
    assert (paper.trainer.epochs, paper.optim.dense.lr, paper.optim.dense.schedule) == (1, 0.02, "constant")


def test_a_dataset_without_a_recipe_of_its_own_gets_the_default_recipe(tmp_path: Path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text((CONF_DIR / "data" / "synthetic.yaml").read_text())
    assert with_recipe(["data=mine"], [tmp_path]) == ["data=mine", "recipe=default"]
    assert with_recipe(["data=mine", "recipe=paper"], [tmp_path]) == ["data=mine", "recipe=paper"]
    assert with_recipe(["data=ml100k"]) == ["data=ml100k"]  # conf/recipe/ml100k.yaml
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text("# @package _global_\ntrainer: {epochs: 3}\n")
    assert with_recipe(["data=mine"], [tmp_path]) == ["data=mine"]  # its own, in its --config-dir


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml")))
def test_every_recipe_composes(recipe: str):
    assert isinstance(compose_train(f"recipe={recipe}"), TrainConfig)


@pytest.mark.parametrize("arch", sorted(p.stem for p in (SEARCH_RECIPES / "recipe").glob("*.yaml")))
def test_a_searchs_recipes_compose_with_their_arch(arch: str):
    """reports/search_ml100k/recipe/<arch>.yaml, as `--config-dir reports/search_ml100k recipe=<arch>`."""
    cfg = compose_train("data=ml100k", f"recipe={arch}", f"hydra.searchpath=[file://{SEARCH_RECIPES}]")
    assert cfg.model.arch == ("rankmixer" if arch == "rankmixer" else arch) and cfg.data.batch_size == 1024


def test_eval_and_predict_score_the_checkpoints_own_data_unless_told_otherwise():
    trained = DataConfig(root="datasets/ml100k", split="valid", eval_batch_size=4096, prefetch=3)
    assert ScoreDataConfig().over(trained) == dataclasses.replace(trained, split="test")
    mine = ScoreDataConfig(root="/copy/ml100k", split="valid", eval_batch_size=128).over(trained)
    assert (mine.root, mine.split, mine.eval_batch_size, mine.prefetch) == ("/copy/ml100k", "valid", 128, 3)


def test_task_weights_and_negative_rate_are_checked_in_one_line_naming_the_key():
    cfg = compose_train("+trainer.task_weights={skip: 0.5}", "data.negative_rate=0.25")
    schema = Schema.from_dict(cfg.data.schema)
    assert (loss_task_weights(schema, cfg.trainer.task_weights), cfg.data.negative_rate) == ((1.0, 0.5), 0.25)
    with pytest.raises(
        ValueError, match=r"unknown task\(s\) \['click'\] \(the schema's labels: finish, skip\)"
    ):
        loss_task_weights(schema, {"click": 2.0})
    with pytest.raises(ValueError, match="must be >= 0 and not all 0"):
        loss_task_weights(schema, {"finish": 0.0, "skip": 0.0})
    with pytest.raises(Exception, match=r"data.negative_rate must be in \(0, 1\], got 1.5"):
        compose_train("data.negative_rate=1.5")
