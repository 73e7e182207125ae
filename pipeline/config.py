"""Typed configs of a training / eval job. Hydra composes YAML from `conf/` over these dataclasses
(registered by `launch/configs.py`), so a misspelt override or a wrong type fails before anything runs.

`model` is the typed `ModelConfig` (models/config.py); each preset in conf/model/ extends the variant of
it whose `dense` field is its arch's config dataclass. A run's saved `config.yaml` is read back typed the
same way (`load_train_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.choice import Choice
from models.config import ModelConfig, model_config_class


def reject_unknown_keys(cfg: Any, path: str = "") -> None:
    """Raise naming every key that a typed (dataclass) node does not declare. Hydra's `+key=value` appends
    to a typed node, and `OmegaConf.to_object` then drops the key without a word: a typo'd
    `+model.num_tokenz=4` would train a different model than asked for."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        return
    node_type = OmegaConf.get_type(cfg)
    if dataclasses.is_dataclass(node_type):
        unknown = sorted(set(cfg.keys()) - {f.name for f in dataclasses.fields(node_type)})
        if unknown:
            raise ValueError(f"{path or 'config'}: unknown key(s) {unknown} for {node_type.__name__}")
    for key in cfg.keys():
        # _get_node, not cfg[key]: reading a mandatory "???" value (eval's checkpoint) would raise here
        reject_unknown_keys(cfg._get_node(key), f"{path}.{key}" if path else str(key))


class DenseOptimizer(Choice):
    rmsprop = "rmsprop"  # the paper (s4.1)
    adam = "adam"
    adagrad = "adagrad"
    sgd = "sgd"


class LrSchedule(Choice):
    """The dense lr after warmup (pipeline/optim.py `lr_multiplier`)."""

    constant = "constant"
    cosine = "cosine"  # to min_lr_ratio * lr at decay_steps, then flat
    step = "step"  # times step_gamma every step_size steps


class Autocast(Choice):
    auto = "auto"  # bf16 on CUDA, off on CPU (CPU bf16 matmul is orders of magnitude slower than fp32)
    bf16 = "bf16"
    fp16 = "fp16"
    off = "off"


class Device(Choice):
    """Where a job runs (pipeline/stack.py `resolve_device`)."""

    auto = "auto"  # this rank's GPU when the stack can use one, else the CPU (warning if a GPU is there)
    cuda = "cuda"  # this rank's GPU, or fail in one line naming what is missing (CUDA build, driver, GPU)
    cpu = "cpu"


class SparseOptimizer(Choice):
    """FBGEMM's fused optimizer of the embedding tables."""

    adagrad = "adagrad"  # exact Adagrad (the paper): one accumulator per element, table memory x2
    rowwise_adagrad = "rowwise_adagrad"  # one accumulator per row (the mean of the row's squared grads)


class Quantize(Choice):
    """How an exported artifact stores embedding rows (pipeline/predictor.py `quantize_rows`)."""

    none = "none"  # fp32
    fp16 = "fp16"
    int8 = "int8"  # row-wise: uint8 codes + a per-row fp32 scale and bias


@dataclass
class DataConfig:
    # a path (relative: to the project root) or a URI (s3://, gs://, hdfs://, file://; data/storage.py)
    root: str = "datasets/synthetic"
    # Splits: a directory under root (<root>/<split>/*.parquet), or Hive partitions selected by conditions,
    # e.g. 'dt>=2026-01-01,dt<=2026-01-07' (data/partitions.py)
    schema: Any = None  # the schema mapping (data/schema.py); conf/data/<name>.yaml
    generator: Any = None  # defaults for `python -m data.build.generate`
    train_split: str = "train"
    valid_split: str = "valid"  # none: no validation, the final state is the model
    split: str = "test"  # what launch/eval.py evaluates (and train's final evaluation)
    batch_size: int = 512
    eval_batch_size: int = 2048
    shuffle_buffer: int = 16384
    prefetch: int = 8
    # Decoding processes per rank (data/workers.py): each decodes Parquet and builds whole batches, so the
    # training process only receives them; 0: one thread of the training process does it (it shares the GIL
    # with the training loop). The batches are the same either way.
    workers: int = 0
    # Negative down-sampling of the training split: keep this fraction of the rows whose labels are all 0
    # (seeded by trainer.seed, the same rows every epoch; data/reader.py). Evaluation and serving correct
    # the predictions back, p / (p + (1 - p) / r) (models/ranking.py). 1: every row.
    negative_rate: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.negative_rate <= 1:
            raise ValueError(f"data.negative_rate must be in (0, 1], got {self.negative_rate}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")


@dataclass
class ScoreDataConfig:
    """What an eval or predict job scores. Unset (None) fields come from the checkpoint's own data config,
    so a checkpoint scores the data it was trained on (an ML-100K run its ML-100K splits) unless told
    otherwise; a value set here wins."""

    root: str | None = None
    split: str = "test"
    eval_batch_size: int | None = None
    prefetch: int | None = None
    workers: int | None = None

    def over(self, trained: DataConfig) -> DataConfig:
        """The training run's data config with this job's fields where set."""
        return dataclasses.replace(
            trained,
            root=trained.root if self.root is None else self.root,
            split=self.split,
            eval_batch_size=trained.eval_batch_size if self.eval_batch_size is None else self.eval_batch_size,
            prefetch=trained.prefetch if self.prefetch is None else self.prefetch,
            workers=trained.workers if self.workers is None else self.workers,
        )


@dataclass
class SparseOptimConfig:
    """Fused Adagrad on the embedding tables, applied inside the backward (TorchRec / FBGEMM)."""

    type: SparseOptimizer = SparseOptimizer.adagrad
    lr: float = 0.1
    eps: float = 1e-8
    initial_accumulator_value: float = 0.0
    # L2 penalty on the embeddings each batch looks up, added to the loss: l2 * mean over rows of the sum
    # of squares of the sparse arch's outputs. Embedding weight decay, applied lazily to the rows in use
    # (as CTR libraries regularise embeddings): FBGEMM's fused exact Adagrad has no weight decay, and its
    # row-wise Adagrad's CPU kernel ignores the one it takes (measured), so the loss is where it works.
    l2: float = 0.0


@dataclass
class DenseOptimConfig:
    """Optimizer of everything outside the embedding tables (DDP-replicated). Paper s4.1: RMSProp, lr 0.01."""

    name: DenseOptimizer = DenseOptimizer.rmsprop
    lr: float = 0.01
    alpha: float = 0.99  # rmsprop smoothing
    eps: float = 1e-8
    momentum: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int = 200  # linear warmup of the dense lr from lr / warmup_steps
    schedule: LrSchedule = LrSchedule.constant  # after warmup
    decay_steps: int = -1  # cosine: steps from the end of warmup to the floor; -1: the run's last step
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    step_size: int = 1000  # step schedule: steps between decays
    step_gamma: float = 0.5  # step schedule: lr multiplier per decay
    grad_clip_norm: float = 1.0  # clip the dense grads' global 2-norm; <= 0 disables
    # Parameter groups that step at a multiple of `lr` are the model's to name (`RankingModel.lr_scales`,
    # set by model.* fields).


@dataclass
class OptimConfig:
    sparse: SparseOptimConfig = field(default_factory=SparseOptimConfig)
    dense: DenseOptimConfig = field(default_factory=DenseOptimConfig)


@dataclass
class ShardingConfig:
    # Sharding types the planner may choose from (TorchRec names): table_wise, row_wise, column_wise,
    # table_row_wise, data_parallel. Per-table overrides: {table_name: [types]}.
    types: list[str] = field(default_factory=lambda: ["table_wise", "row_wise", "column_wise"])
    per_table: dict[str, list[str]] = field(default_factory=dict)
    # Compute kernels the planner may choose from (TorchRec names): fused (the table in HBM, or host RAM on
    # CPU), fused_uvm_caching (the table in host memory behind an HBM cache of `cache_load_factor` of its
    # rows: tables larger than HBM), fused_uvm (host memory, no cache). Empty: fused only.
    compute_kernels: list[str] = field(default_factory=list)
    cache_load_factor: float = 0.2  # fused_uvm_caching: the share of a table's rows cached in HBM
    # The memory the planner may fill per rank, GiB; None: the device's (HBM: the GPU's total memory; host
    # RAM: the machine's divided by the ranks on it). Set them to plan for another topology
    # (launch/plan.py) or to leave room for something else on the device.
    hbm_gib: float | None = None
    ddr_gib: float | None = None


@dataclass
class EarlyStopConfig:
    """Model selection on the validation split (evaluated every `trainer.eval_every` steps or epoch)."""

    metric: str = "mean_auc"  # a validation metric key: mean_auc / mean_uauc (over tasks), "<task>/auc"...
    patience: int = 0  # stop after this many validations without improvement; 0: never stop early
    min_delta: float = 0.0  # an improvement must exceed this
    # keep the checkpoint of the best validation step (besides the last keep_last) and evaluate the test
    # split with it; false: the final state is evaluated
    select_best: bool = True


@dataclass
class TrainerConfig:
    run_dir: str | None = None  # None: outputs/train/<timestamp>
    epochs: int = 1
    max_steps: int = -1  # stop after this many steps in total (-1: run all epochs)
    seed: int = 0
    log_every: int = 100
    eval_every: int = 0  # steps between validations; 0: at the end of every epoch
    eval_max_batches: int = -1  # cap on periodic validation batches per rank (-1: whole split)
    checkpoint_every: int = 0  # steps between checkpoints; 0: end of every epoch
    keep_last: int = 2
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    resume: str = "none"  # none | auto (latest complete checkpoint under run_dir) | a checkpoint path
    # Warm start: the model (and with init_optimizer the optimizer state, schedule restarted) of another
    # run's checkpoint or run dir (its selected step); never its step, data position or metrics. A resume
    # of this run wins over it.
    init_from: str | None = None
    init_optimizer: bool = False
    device: Device = Device.auto
    autocast: Autocast = Autocast.auto
    progress_bar: bool = True  # tqdm on rank 0, only when stderr is a TTY
    final_eval: bool = True  # evaluate data.split after training and write metrics.json
    # [start, end): profile these steps with torch.profiler on rank 0 -> <run_dir>/profile/ (chrome trace)
    profile_steps: list[int] = field(default_factory=list)
    # [start, end): CUDA host syncs in these steps raise (pipeline/profiler.py SyncDebugWindow)
    sync_debug_steps: list[int] = field(default_factory=list)
    save_predictions: bool = False
    # Each task's weight in the loss, {task: weight}; a task not named weighs 1 (pipeline/job.py)
    task_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class EvalConfig:
    checkpoint: str = "???"  # a checkpoint dir (run_dir/checkpoints/step_N) or a run dir (its latest)
    data: ScoreDataConfig = field(default_factory=ScoreDataConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    device: Device = Device.auto
    output: str | None = None  # where metrics.json goes; None: <checkpoint>/eval_<split>/
    save_predictions: bool = False
    max_batches: int = -1


@dataclass
class PredictConfig:
    """launch/predict.py: score `data.root/data.split` with a checkpoint (pipeline/predict_job.py)."""

    checkpoint: str = "???"  # a checkpoint dir or a run dir (its selected / latest checkpoint)
    out: str = "???"  # the output directory of Parquet parts (written atomically)
    data: ScoreDataConfig = field(default_factory=ScoreDataConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    device: Device = Device.auto
    passthrough: list[str] = field(default_factory=list)  # input columns copied next to the scores
    overwrite: bool = False  # replace an existing `out`


@dataclass
class ExportConfig:
    """launch/export.py: a checkpoint -> a self-contained inference artifact (pipeline/export.py)."""

    checkpoint: str = "???"  # a checkpoint dir or a run dir (its selected / latest checkpoint)
    out: str = "???"  # the artifact directory (written atomically)
    quantize: Quantize = Quantize.none  # how the artifact stores embedding rows
    data_root: str | None = None  # rows for the parity check; None: the run's data.root
    split: str = "test"
    parity_rows: int = 2048
    overwrite: bool = False


def load_train_config(source: Path | str, where: str | None = None) -> TrainConfig:
    """A run's saved `config.yaml` (in its run dir and in each checkpoint), typed and validated like the
    Hydra config it was written from. `source`: the file, or its text (then `where` names it)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    saved = OmegaConf.load(source) if isinstance(source, Path) else OmegaConf.create(source)
    path = source if isinstance(source, Path) else where
    arch = OmegaConf.select(saved, "model.arch", default="rankmixer")
    schema = OmegaConf.structured(TrainConfig(model=model_config_class(arch)()))
    try:
        merged = OmegaConf.merge(schema, saved)
    except OmegaConfBaseException as e:  # a key or type the config does not have: say which, where
        raise ValueError(f"{path}: {str(e).splitlines()[0]} (full key: {e.full_key})") from None
    reject_unknown_keys(merged)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
