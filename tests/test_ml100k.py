"""data/build/ml100k.py on small RecBole-format files in a fake wheel (no network): split, history, output."""

from __future__ import annotations

import datetime as dt
import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.build import ml100k
from data.build.ml100k_tables import age_bucket, split_bounds, year_bucket
from data.build.ml100k_wheel import MEMBER
from data.dataset_dir import SPLITS
from data.schema import Schema

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "conf" / "data" / "ml100k.yaml"
T0 = 880_000_000


def _interactions(rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """(user, item, rating, timestamp): per-user counts covering the rounding cases, one user past the
    sequence cap, and many same-second ties (broken by item)."""
    counts = {1: 20, 2: 25, 3: 5, 4: 1, 5: 2, 6: 70, 7: 10, 8: 33, 9: 12, 10: 40}
    rows = []
    for u, n in counts.items():
        items = rng.choice(np.arange(1, 121), size=n, replace=False)
        ts = T0 + np.sort(rng.integers(0, 3 * 86400, size=n)) // 600 * 600  # 10-minute grid: ties
        rows += [(u, int(i), int(rng.integers(1, 6)), int(t)) for i, t in zip(items, ts)]
    rng.shuffle(rows)
    return rows


def _fake_wheel(directory: Path, seed: int = 0, inter_fields: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    inter += [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in _interactions(rng)]
    if inter_fields is not None:
        inter[0] = inter_fields
    user = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    user += [
        f"{u}\t{17 + 5 * u}\t{'MF'[u % 2]}\t{['writer', 'other', 'artist'][u % 3]}\t{9000 + u}1"
        for u in range(1, 11)
    ]
    item = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    genres = ["Action", "Children's", "Drama"]
    for i in range(1, 121):
        year = "unkonwn" if i == 7 else str(1920 + (i * 7) % 80)
        item.append(f"{i}\tMovie {i}\t{year}\t{' '.join(genres[: 1 + i % 3])}")
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for kind, lines in (("inter", inter), ("user", user), ("item", item)):
            # a fixed entry date: the wheel's sha256 (recorded in dataset.json) must not depend on the clock
            entry = zipfile.ZipInfo(MEMBER.format(kind), date_time=(2024, 1, 1, 0, 0, 0))
            z.writestr(entry, "\n".join(lines) + "\n")
    return wheel


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load(CONFIG)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, schema: Schema) -> Path:
    tmp = tmp_path_factory.mktemp("ml100k")
    _fake_wheel(tmp / "wheels")
    ml100k.convert(tmp / "out", tmp / "wheels", schema)
    return tmp / "out"


def _split(root: Path, split: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((root / split).glob("*.parquet")))


def _all_rows(root: Path) -> list[dict]:
    rows = []
    for split in SPLITS:
        rows += [{**r, "split": split} for r in _split(root, split).to_pylist()]
    return sorted(rows, key=lambda r: (r["user_id"], r["timestamp"], r["item_id"]))


def test_split_bounds_rounding() -> None:
    n = np.array([1, 2, 5, 10, 20, 25, 33])
    a, b = split_bounds(n)
    sizes = list(zip(a.tolist(), (b - a).tolist(), (n - b).tolist()))
    assert sizes == [(1, 0, 0), (2, 0, 0), (4, 1, 0), (8, 1, 1), (16, 2, 2), (20, 3, 2), (26, 4, 3)]


def test_deterministic_and_replaces_atomically(tmp_path: Path, dataset: Path, schema: Schema) -> None:
    _fake_wheel(tmp_path / "wheels")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old dataset")  # a complete old dataset is replaced as a whole
    ml100k.convert(out, tmp_path / "wheels", schema)
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for f in files:
        assert (dataset / f).read_bytes() == (out / f).read_bytes(), f
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left


def test_missing_or_broken_wheel_names_pip_command(tmp_path: Path, schema: Schema) -> None:
    with pytest.raises(ml100k.SourceError, match=r"pip download --no-deps recbole==1\.2\.1 -d"):
        ml100k.convert(tmp_path / "out", tmp_path / "nowhere", schema)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "recbole-1.2.1-py3-none-any.whl").write_bytes(b"truncated")
    with pytest.raises(ml100k.SourceError, match="not a readable wheel.*pip download"):
        ml100k.convert(tmp_path / "out", tmp_path / "w", schema)
    _fake_wheel(tmp_path / "h", inter_fields="user_id:token\titem_id:token\ttimestamp:float\tx:float")
    with pytest.raises(ml100k.SourceError, match=r"missing field\(s\) \['rating'\]"):
        ml100k.convert(tmp_path / "out", tmp_path / "h", schema)
    assert not (tmp_path / "out").exists()


def test_per_user_time_split_and_proportions(dataset: Path) -> None:
    rows = _all_rows(dataset)
    by_user: dict[int, list[dict]] = {}
    for r in rows:
        by_user.setdefault(r["user_id"], []).append(r)
    sizes = {}
    for rs in by_user.values():
        ts = {s: [r["timestamp"] for r in rs if r["split"] == s] for s in SPLITS}
        if ts["valid"]:
            assert max(ts["train"]) <= min(ts["valid"])
        if ts["test"]:
            assert max(ts["train"] + ts["valid"]) <= min(ts["test"])
        # in the (timestamp, item) order the splits are contiguous: train, then valid, then test
        order = [r["split"] for r in rs]
        assert order == sorted(order, key=SPLITS.index)
        sizes[len(rs)] = tuple(len(ts[s]) for s in SPLITS)
    assert sizes == {
        20: (16, 2, 2),
        25: (20, 3, 2),
        5: (4, 1, 0),
        1: (1, 0, 0),
        2: (2, 0, 0),
        70: (56, 7, 7),
        10: (8, 1, 1),
        33: (26, 4, 3),
        12: (10, 1, 1),
        40: (32, 4, 4),
    }
    info = json.loads((dataset / "dataset.json").read_text())
    assert {s: info["splits"][s]["rows"] for s in SPLITS} == {
        "train": 175,
        "valid": 23,
        "test": 20,
    }
    assert info["interactions"] == 218 and info["users"] == 10


def test_sequence_is_the_previous_items_with_labels(dataset: Path) -> None:
    rows = _all_rows(dataset)
    capped = 0
    for u in {r["user_id"] for r in rows}:
        rs = [r for r in rows if r["user_id"] == u]
        for k, r in enumerate(rs):
            past = rs[max(0, k - ml100k.MAX_SEQ_LEN) : k]
            assert r["seq_item"] == [p["item_id"] for p in past]
            assert r["seq_label"] == [p["like"] for p in past]
            assert r["item_id"] not in r["seq_item"]  # (user, item) pairs are unique in the source
            assert r["like"] == int(r["rating"] >= 4)
            assert r["hist_len_log"] == pytest.approx(np.log1p(k))
            if k == 0:
                assert r["hist_like_rate"] is None
            else:
                assert r["hist_like_rate"] == pytest.approx(np.mean([p["like"] for p in rs[:k]]))
            capped += len(r["seq_item"]) == ml100k.MAX_SEQ_LEN
    assert capped == 70 - ml100k.MAX_SEQ_LEN  # user 6: the last 20 rows see exactly 50 items


def test_features(dataset: Path) -> None:
    rows = _all_rows(dataset)
    for r in rows[:50]:
        t = dt.datetime.fromtimestamp(r["timestamp"], dt.UTC)
        assert (r["ctx_hour"], r["ctx_weekday"]) == (t.hour, t.weekday())
    # the fake items are 1..120, so dense item index == raw id; genre vocab: Action 1, Children's 2, Drama 3
    for r in rows:
        i = r["item_id"]
        assert r["item_year"] == (0 if i == 7 else year_bucket(str(1920 + (i * 7) % 80)))
        assert r["item_genres"] == [1, 2, 3][: 1 + i % 3]
    assert year_bucket("1925") == 1 and year_bucket("1995") == 13
    assert [age_bucket(a) for a in ("7", "18", "24", "25", "56", "x")] == [1, 2, 2, 3, 7, 0]


def test_output_passes_schema_and_reader(dataset: Path, schema: Schema) -> None:
    from data.reader import ParquetReader

    pf = pq.ParquetFile(next((dataset / "train").glob("*.parquet")))
    assert pf.metadata.num_row_groups > 1
    for split in SPLITS:
        policy = "drop_last" if split == "train" else "pad"
        seen = 0
        for rank in range(2):
            reader = ParquetReader(
                dataset / split, schema, 8, rank=rank, world_size=2, policy=policy, prefetch=0
            )
            assert reader.num_rows > 0  # both ranks get data
            batches = list(reader)
            assert len(batches) == len(reader) > 0
            seen += sum(int(b.mask.sum()) for b in batches)
            b = batches[0]
            assert b.labels.shape == (8, 1) and b.dense.shape == (8, schema.dense_dim)
            assert set(b.sparse.keys()) == set(schema.sparse_keys)
        if policy == "pad":
            assert seen == _split(dataset, split).num_rows
