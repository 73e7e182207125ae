"""From checkpoint to predictions through the real launchers: `launch/predict.py` (batch scoring on 2
gloo ranks), `launch/export.py` (inference artifact) and the TorchRec-free `Predictor`, for RankMixer,
Sparse-MoE (sparse inference) and LONGER with the first-order term (model.wide; incl. its KV cache)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.metrics.auc import binary_auc
from tests.test_train_e2e import LONGER, SMOE, TORCHRUN, ok, run, train_cmd

pytestmark = pytest.mark.slow

# LONGER with model.wide: the wide tables on both KJTs (the candidate item id is looked up unpooled)
MODELS = {"rankmixer": [], "smoe": SMOE, "longer": [*LONGER, "model.wide=true"]}


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-rank run of each model (16 steps: scoring only needs trained, non-trivial weights)."""
    runs = {}
    for name, overrides in MODELS.items():
        run_dir = tmp_path_factory.mktemp("runs") / name
        steps = ("trainer.max_steps=16", "trainer.eval_every=0", "trainer.final_eval=false")
        ok(run(train_cmd(dataset, run_dir, *overrides, *steps)))
        runs[name] = run_dir
    return runs


@pytest.fixture(scope="module")
def artifacts(dataset: Path, trained: dict, tmp_path_factory: pytest.TempPathFactory):
    """`artifacts(model, quantize)`: launch/export.py of a trained model, exported once per module (an
    export traces the programs with torch.export: tens of seconds on 2 cores); (dir, export stdout)."""
    done: dict[tuple[str, str], tuple[Path, str]] = {}

    def get(model: str, quantize: str = "none") -> tuple[Path, str]:
        if (model, quantize) not in done:
            art = tmp_path_factory.mktemp("art") / f"{model}-{quantize}"
            proc = ok(run(export_cmd(trained[model], dataset, art, f"quantize={quantize}")))
            done[model, quantize] = art, proc.stdout
        return done[model, quantize]

    return get


def predict_cmd(checkpoint: Path, dataset: Path, out: Path, *overrides: str, nproc: int = 2) -> list[str]:
    # one rank: a plain process (a 1-rank group, as under torchrun, without the agent's ~2 s)
    launcher = [*TORCHRUN, "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    return [
        *launcher,
        "launch/predict.py",
        f"checkpoint={checkpoint}",
        f"data.root={dataset}",
        "data.eval_batch_size=1024",
        f"out={out}",
        *overrides,
    ]


def export_cmd(checkpoint: Path, dataset: Path, out: Path, *overrides: str) -> list[str]:
    args = [f"checkpoint={checkpoint}", f"data_root={dataset}", f"out={out}"]
    return [sys.executable, "launch/export.py", *args, *overrides]


def scores(table: pa.Table, tasks: tuple[str, ...] = ("finish", "skip")) -> np.ndarray:
    return np.stack([table[f"score_{t}"].to_numpy() for t in tasks], axis=1)


def test_predict_on_two_ranks_scores_every_row_once_as_eval_does(
    dataset: Path, trained: dict, tmp_path: Path
):
    out = tmp_path / "pred"
    proc = ok(run(predict_cmd(trained["rankmixer"], dataset, out, "passthrough=[finish,item_id,user_id]")))
    assert "predict: 5333 rows" in proc.stdout
    source = pq.read_table(dataset / "test")
    pred = pq.read_table(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "_predict.json",
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert pred.column_names == ["row_id", "user_id", "score_finish", "score_skip", "finish", "item_id"]
    row_id = pred["row_id"].to_numpy()
    assert pred.num_rows == source.num_rows and np.array_equal(np.sort(row_id), np.arange(source.num_rows))
    for col in ("finish", "item_id", "user_id"):  # row_id addresses the input row: passthrough agrees
        assert np.array_equal(pred[col].to_numpy(), source[col].to_numpy()[row_id]), col
    assert json.loads((out / "_predict.json").read_text())["rows"] == source.num_rows

    # launch/eval.py on the same 2 ranks scores the same rows in the same order, per rank
    ev = tmp_path / "eval"
    eval_cmd = [*TORCHRUN, "--nproc_per_node", "2", "launch/eval.py", f"checkpoint={trained['rankmixer']}"]
    # no data.root: the checkpoint's own data (its run trained on `dataset`)
    eval_cmd += ["data.eval_batch_size=1024", f"output={ev}", "save_predictions=true"]
    ok(run(eval_cmd))
    for rank in (0, 1):
        mine = pq.read_table(out / f"part-0000{rank}.parquet")
        theirs = pq.read_table(ev / "predictions" / f"part-0000{rank}.parquet")
        assert np.array_equal(mine["user_id"].to_numpy(), theirs["user_id"].to_numpy())
        np.testing.assert_allclose(scores(mine), scores(theirs), atol=1e-6)


def test_predict_bad_input_is_one_line_and_leaves_no_output(dataset: Path, trained: dict, tmp_path: Path):
    # scoring data without a feature column the model needs
    bad = tmp_path / "bad" / "test"
    bad.mkdir(parents=True)
    part = pq.read_table(dataset / "test" / "part-00000.parquet")
    pq.write_table(part.drop_columns(["item_id"]), bad / "p.parquet")
    out = tmp_path / "pred"
    proc = run(predict_cmd(trained["rankmixer"], bad.parent, out, nproc=1))
    assert proc.returncode != 0  # the worker exits 2; torchrun reports 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    has = ", ".join(pq.read_schema(bad / "p.parquet").names)
    missing = f"{bad / 'p.parquet'}: column 'item_id' missing (row group: all); file has {has}"
    assert errors == [f"error [rank 0]: DataError: {missing}"]
    assert not out.exists() and not list(tmp_path.glob(".pred.tmp-*"))


def test_predict_refuses_data_of_another_schema_and_replaces_an_out_only_when_asked(
    dataset: Path, trained: dict, tmp_path: Path, predict_in_process
):
    # in this process (the launcher's one-line report of such an error: the test above)
    from data.decode import DataError

    def predict(root: Path, out: Path, overwrite: bool = False) -> dict:
        return predict_in_process(trained["rankmixer"], root, out, overwrite)

    part = pq.read_table(dataset / "test" / "part-00000.parquet")
    out = tmp_path / "pred"
    # ids of the wrong type, ids out of the table's range
    n = part.num_rows
    for name, column, expected in (
        ("float_ids", pa.array([1.5] * n), "'item_id' (row group: all) has type double, expected an integer"),
        ("big_ids", pa.array([10**7] * n), "column 'item_id': id 10000000 outside [0, 50000) (row 0)"),
    ):
        (tmp_path / name / "test").mkdir(parents=True)
        edited = part.set_column(part.column_names.index("item_id"), "item_id", column)
        pq.write_table(edited, tmp_path / name / "test" / "p.parquet")
        with pytest.raises(DataError) as err:
            predict(tmp_path / name, out)
        assert expected in str(err.value)
        assert not out.exists() and not list(tmp_path.glob(".pred.tmp-*"))

    # an existing `out` is never replaced unless asked
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="pass overwrite=true"):
        predict(dataset, out)
    assert (out / "keep.txt").read_text() == "mine"
    assert predict(dataset, out, overwrite=True)["rows"] == 5333
    assert not (out / "keep.txt").exists() and pq.read_table(out).num_rows == 5333


@pytest.mark.parametrize("model", list(MODELS))
def test_exported_fp32_model_scores_as_the_trained_model(
    dataset: Path, trained: dict, artifacts, tmp_path: Path, model: str, predict_in_process
):
    art, stdout = artifacts(model)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["parity"]["max_abs_logit_diff"] <= 1e-5, stdout
    wide = {table for _, table, _, _ in manifest["pooled"] if table.startswith("wide_")}
    assert (model == "longer") == ("wide_item_id" in wide and "wide_user_id_emb" in wide), wide
    if wide:  # trained on 2 ranks: the ids seen have biases, which the parity check above served
        tables = torch.load(art / "embeddings.pt", weights_only=True)
        assert float(tables["wide_item_id"]["weight"].abs().max()) > 1e-3
    assert "max |logit - training model's|" in stdout
    # the whole test split: the Predictor (no TorchRec) vs batch scoring of the sharded checkpoint
    pred = tmp_path / "pred"
    predict_in_process(trained[model], dataset, pred)  # launch/predict.py's job, in this process
    pred_table = pq.read_table(pred)
    check = f"""
import sys, numpy as np, pyarrow.parquet as pq
from pipeline.predictor import Predictor
p = Predictor({str(art)!r})
probs = p.predict(pq.read_table({str(dataset / "test")!r}))
batches = p.predict_parquet({str(dataset / "test" / "part-00000.parquet")!r}, batch_size=1000)
first = np.concatenate(list(batches))
np.testing.assert_allclose(first, probs[: len(first)], atol=1e-7)
np.save({str(tmp_path / "probs.npy")!r}, probs)
assert "torchrec" not in sys.modules, "the Predictor imported TorchRec"
"""
    ok(run([sys.executable, "-c", check]))
    probs = np.load(tmp_path / "probs.npy")
    np.testing.assert_allclose(probs[pred_table["row_id"].to_numpy()], scores(pred_table), atol=1e-5)
    if model == "smoe":  # the exported program calls the sparse-inference op, not a dense fallback
        import models.moe_sparse  # noqa: F401  registers the op the program calls

        assert "rankmixer.sparse_moe_ffn" in str(torch.export.load(str(art / "dense.pt2")).graph)


def test_longer_kv_cache_scores_many_candidates_per_user_as_the_full_forward(dataset: Path, artifacts):
    from pipeline.predictor import Predictor

    p = Predictor(artifacts("longer")[0])
    rows = pq.read_table(dataset / "test").slice(0, 64)
    seq_cols = [f.column for f in p.schema.sequence_features]
    cache = p.encode_users(rows.slice(0, 4).select(seq_cols))  # 4 users, their sequences only
    user_index = np.arange(64) % 4  # 64 candidates, 16 per user, without sequence columns
    kv = p.score_candidates(cache, user_index, rows.drop_columns(seq_cols))
    full_rows = rows.drop_columns(seq_cols)  # the same candidates with their user's sequence, full forward
    for c in seq_cols:
        values = [rows[c][int(u)].as_py() for u in user_index]
        full_rows = full_rows.append_column(c, pa.array(values, rows.schema.field(c).type))
    np.testing.assert_allclose(kv, p.predict(full_rows), atol=1e-6)
    assert np.abs(kv - p.predict(rows)).max() > 1e-4  # and it is the users' sequences that were used


def test_int8_artifact_is_smaller_and_stays_within_the_auc_tolerance(dataset: Path, artifacts):
    from pipeline.predictor import Predictor

    paths = {q: artifacts("rankmixer", q)[0] for q in ("none", "int8")}
    sizes = {q: (p / "embeddings.pt").stat().st_size for q, p in paths.items()}
    assert sizes["int8"] < 0.45 * sizes["none"], sizes  # 16-dim rows: 16 + 8 bytes vs 64 bytes
    test = pq.read_table(dataset / "test")
    labels = torch.from_numpy(test["finish"].to_numpy().astype(np.float32))
    aucs = {
        q: binary_auc(torch.from_numpy(Predictor(p).predict(test)[:, 0]), labels) for q, p in paths.items()
    }
    assert abs(aucs["int8"] - aucs["none"]) <= 1e-3, aucs  # the documented tolerance (reports/serving.md)
    # a request as a dict of feature lists scores like the same rows in a table
    p = Predictor(paths["none"])
    req = {c: test[c].slice(0, 3).to_pylist() for c in p.schema.columns(labels=False)}
    np.testing.assert_allclose(p.predict_features(req), p.predict(test.slice(0, 3)), atol=1e-7)


def test_export_refuses_an_existing_out_and_a_missing_checkpoint(
    dataset: Path, trained: dict, tmp_path: Path, launch_in_process
):
    from pipeline.export import export

    out = tmp_path / "art"
    out.mkdir()
    with pytest.raises(ValueError, match="pass overwrite=true"):  # checked before anything is loaded
        export(trained["rankmixer"], out, data_root=str(dataset))
    assert not list(out.iterdir())
    proc = launch_in_process(export_cmd(tmp_path / "nowhere", dataset, tmp_path / "art2"))
    assert proc.returncode == 2 and str(tmp_path / "nowhere") in proc.stderr
    assert not (tmp_path / "art2").exists()


def test_predictor_rejects_rows_the_model_cannot_score(dataset: Path, artifacts, tmp_path: Path):
    from data.decode import DataError
    from pipeline.predictor import ArtifactError, Predictor

    p = Predictor(artifacts("rankmixer")[0])
    rows = pq.read_table(dataset / "test").slice(0, 8)
    bad = rows.set_column(rows.column_names.index("item_id"), "item_id", pa.array([10**9] * 8, pa.int64()))
    with pytest.raises(DataError, match=r"input, column 'item_id': id 1000000000 outside \[0, 50000\)"):
        p.predict(bad)
    with pytest.raises(
        ArtifactError, match="caches per user; this artifact.s model has model.sequence=mean_pool"
    ):
        p.encode_users(rows)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Predictor(tmp_path)
