"""Reading an evaluation's metrics dict (`data.metrics.exact.ExactAUCEvaluator.compute`, plus the
evaluation loop's `mean_auc` / `mean_uauc`): the value a model is selected on, and the tasks whose
predictions collapsed to a constant. One home for both, so early stopping, the sweep reports and the
hyper-parameter search read a validation the same way.
"""

from __future__ import annotations


def metric_value(metrics: dict[str, float], metric: str, tasks: list[str] | None = None) -> float:
    """`metric` of a validation: a key of `metrics` (the evaluation reports mean_auc / mean_uauc over the
    tasks too), else mean_auc / mean_uauc computed from the per-task keys (of `tasks`; None: every task
    with a "<task>/auc" key)."""
    if metric in metrics:
        return metrics[metric]
    if metric in ("mean_auc", "mean_uauc", "mean_ne"):
        tasks = tasks if tasks is not None else [k[:-4] for k in metrics if k.endswith("/auc")]
        values = [metrics[f"{t}/{metric[5:]}"] for t in tasks if f"{t}/{metric[5:]}" in metrics]
        if values:
            return sum(values) / len(values)
    raise ValueError(
        f"trainer.early_stop.metric: {metric!r} is not a validation metric "
        f"(mean_auc, mean_uauc, mean_ne or one of {sorted(metrics)})"
    )


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of `metric` is the better model: the losses (NE, logloss); AUCs are
    higher-better. Calibration has no direction (1 is best) and is not a selection metric."""
    return metric.split("/")[-1] in ("mean_ne", "ne", "logloss")


def metric_value_or_none(record: dict, metric: str) -> float | None:
    """`metric_value` of any record (a validation record of metrics.jsonl, metrics.json's "valid"), or
    None where the record cannot give it (a train record, a run that never validated)."""
    try:
        return float(metric_value(record, metric))
    except ValueError:
        return None


# A task whose predicted probabilities vary less than this over a whole split predicts a constant: its AUC
# is 0.5 (or noise) because the model collapsed, not because the task is hard. Healthy models here spread
# their scores by 0.05-0.2.
COLLAPSE_STD = 1e-4


def collapsed_tasks(metrics: dict[str, float], task_names: list[str]) -> list[str]:
    """Tasks whose predictions are (near) constant over the evaluated split."""
    return [t for t in task_names if metrics.get(f"{t}/pred_std", 1.0) < COLLAPSE_STD]
