"""`ModelConfig`: the whole model's typed config, from Hydra to `RankingModel` (DESIGN s3).

    model.arch            which dense arch (a key of DENSE_ARCHS)
    model.sequence        how the behaviour sequence enters: none | mean_pool | longer (models/ranking.py)
    model.longer          LONGER's options (sequence=longer)
    model.dense_proj_dim  width of each semantic group's projection of its dense float features
    model.wide            a first-order term: per-id, per-task biases added to the logits
    model.dense           the dense arch's own config dataclass (RankMixerConfig, DLRMConfig, ...)

Each arch has a typed variant, `model_config_class(arch)`, whose `dense` field is that arch's config
dataclass: Hydra presets extend it (`conf/model/<preset>.yaml`), so `model.dense.dim=128` is checked
against RankMixerConfig before anything runs, and `OmegaConf.to_object` hands over the typed objects.
The schema-derived fields of an arch config (`group_dims`, `num_tasks`) are filled in by the model.

The registry holds import paths, imported on first use, and every config dataclass imports no TorchRec: the
dense-arch benchmark composes a preset on a GPU box that has torch but no TorchRec (the baselines'
modules import it).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from models.choice import Choice
from models.longer import LongerConfig


class SequenceMode(Choice):
    none = "none"  # the behaviour sequence is left out
    mean_pool = "mean_pool"  # pooled as bags, like any multi-hot feature
    longer = "longer"  # looked up unpooled and run through LONGER (models/longer.py)


class TableDtype(Choice):
    """How the embedding tables are stored and trained (FBGEMM's weights precision); lookups come out fp32."""

    fp32 = "fp32"
    fp16 = "fp16"  # half the table memory, for tables that would not fit otherwise


class ArchSpec(NamedTuple):
    config: str  # "module:Class" of its config dataclass
    arch: str  # "module:Class" of its DenseArch
    scale_field: str  # the width field launch/experiment.py solves for a dense-parameter budget
    scale_step: str | None = None  # the field the width must be a multiple of (heads), if any


_B, _BC = "models.baselines", "models.baseline_configs"  # the baselines import TorchRec, their configs not
DENSE_ARCHS: dict[str, ArchSpec] = {
    "rankmixer": ArchSpec(
        "models.rankmixer:RankMixerConfig", "models.rankmixer:RankMixer", "dim", "num_tokens"
    ),
    "dlrm": ArchSpec(f"{_BC}:DLRMConfig", f"{_B}:DLRM", "mlp_width"),
    "dcnv2": ArchSpec(f"{_BC}:DCNv2Config", f"{_B}:DCNv2", "deep_width"),
    "autoint": ArchSpec(f"{_BC}:AutoIntConfig", f"{_B}:AutoInt", "dim", "num_heads"),
    "wukong": ArchSpec(f"{_BC}:WukongConfig", f"{_B}:Wukong", "dim"),
    "mmoe": ArchSpec(f"{_BC}:MMoEConfig", f"{_B}:MMoE", "expert_hidden"),
}


def arch_spec(arch: str) -> ArchSpec:
    if arch not in DENSE_ARCHS:
        raise ValueError(f"model.arch: unknown arch {arch!r} (known: {', '.join(sorted(DENSE_ARCHS))})")
    return DENSE_ARCHS[arch]


def _load(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def arch_config_class(arch: str) -> type:
    """The config dataclass of an arch (imports no TorchRec)."""
    return _load(arch_spec(arch).config)


def arch_classes(arch: str) -> tuple[type, type]:
    """(config dataclass, DenseArch class) of an arch."""
    return arch_config_class(arch), _load(arch_spec(arch).arch)


@dataclass
class ModelConfig:
    arch: str = "rankmixer"
    sequence: SequenceMode = SequenceMode.mean_pool
    longer: LongerConfig = field(default_factory=LongerConfig)
    dense_proj_dim: int = 16  # width of each group's projection of its dense features (FeatureGroups)
    table_dtype: TableDtype = TableDtype.fp32
    # the first-order term: a learned bias per id and task, summed into each task's logit (sparse_arch.py)
    wide: bool = False
    dense: Any = None  # the arch's config dataclass; None: its defaults

    def __post_init__(self) -> None:
        self.sequence = SequenceMode.parse(self.sequence, "model.sequence")
        self.table_dtype = TableDtype.parse(self.table_dtype, "model.table_dtype")

    def dense_config(self, group_dims: list[int], num_tasks: int) -> Any:
        """The dense arch's typed config with the schema-derived fields set."""
        config_cls = arch_config_class(self.arch)
        dense = config_cls() if self.dense is None else self.dense
        if not isinstance(dense, config_cls):
            raise ValueError(
                f"model.dense is a {type(dense).__name__}, but model.arch={self.arch!r} takes a "
                f"{config_cls.__name__}"
            )
        return dataclasses.replace(dense, group_dims=list(group_dims), num_tasks=num_tasks)

    def build_dense_arch(self, group_dims: list[int], num_tasks: int) -> Any:
        """The DenseArch this config names, for semantic groups of these widths."""
        _, arch_cls = arch_classes(self.arch)
        return arch_cls(self.dense_config(group_dims, num_tasks))


@functools.cache
def model_config_class(arch: str) -> type[ModelConfig]:
    """ModelConfig with `arch` defaulting to `arch` and `dense` typed as that arch's config dataclass."""
    config_cls = arch_config_class(arch)
    fields = [
        ("arch", str, field(default=arch)),
        ("dense", config_cls, field(default_factory=config_cls)),
    ]
    name = f"{config_cls.__name__.removesuffix('Config')}ModelConfig"
    return dataclasses.make_dataclass(name, fields, bases=(ModelConfig,))
