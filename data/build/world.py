"""The synthetic world: generator parameters (`GenParams`) and the probability model behind the labels.

`World` holds users, items, authors and the truth's parameter tables; `World.rows` draws impressions with
their features, true probabilities (`_p_<task>`) and Bernoulli labels. data.build.generate writes them to
files.

How the truth is built (all terms times `logit_scale`), and why:
- Latent factors: user u = A_seg[segment] + .5 A_city[city] + .5 A_age[age]; item
  v = B_cat[category] + .6 B_author[author] (no per-ID noise: see "Reachable" below). finish gets <u, v>;
  skip gets a differently weighted product. Factors are functions of mid-cardinality observable features
  (segments, cities, categories, authors seen hundreds of times each), so a small model can learn them,
  while a linear model on one-hots cannot represent a product.
- Feature crosses across groups: segment x category table, hour x category family, user activity x
  item duration (a dense x dense product).
- Set membership: item category in the user's interests (shared `category` table), item author in the
  user's follows (shared `author_id` table).
- Sequence: the fraction of the user's history items sharing the target's category / author (mean-pooling
  friendly on purpose: the baseline sequence arch is a mean pool).
- Biases by user device / activity and item duration bucket, also echoed (noisily, partly missing) by the
  dense "history" features.
- Reachable: every term is a function of features in the row whose values are each seen hundreds of times
  or more, so a model trained on the train split can approach the oracle. Per-ID noise terms (a bias per
  user or item) would not be estimable from ~30-50 impressions per ID and would cap any model well below
  the oracle.
- skip shares the finish interaction terms with a negative weight (the tasks are correlated) plus its
  own terms; labels are Bernoulli draws, so the oracle AUC is well below 1.

Determinism: the world (users, items, authors, factor tables) comes from rng(seed) alone; `World.rows`
draws only from the rng it is given.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

_U48 = (1 << 48) - 1


@dataclass(frozen=True)
class GenParams:
    rows_train: int = 1_500_000
    rows_valid: int = 200_000
    rows_test: int = 200_000
    files_train: int = 8
    files_valid: int = 4
    files_test: int = 4
    row_groups_per_file: int = 4
    seed: int = 0
    n_users: int = 20_000
    n_items: int = 50_000
    n_authors: int = 1_000
    n_categories: int = 200
    n_tags: int = 1_000
    n_segments: int = 50
    n_cities: int = 100
    latent_dim: int = 4
    seq_max_len: int = 256
    seq_len_log_mean: float = 2.7
    logit_scale: float = 1.25
    # Daily mode (days > 0): `days` date partitions dt=<start_date + d> of rows_train rows (files_train
    # files) each, instead of train/valid/test. The world drifts from day to day (World.advance):
    days: int = 0
    start_date: str = "2026-01-01"
    new_item_share: float = 0.3  # items launched after day 0, spread over the later days
    new_author_share: float = 0.15  # authors (and all their items) launched after day 0
    taste_drift: float = 0.35  # per-day innovation of the segment x category taste table (a random walk)
    interest_drift: float = 0.15  # share of users who swap one interest category per day

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> GenParams:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"generator: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**d)

    def scaled(self, rows_train: int) -> GenParams:
        """All splits scaled so that train has `rows_train` rows."""
        f = rows_train / self.rows_train
        kw = asdict(self)
        kw.update(
            rows_train=rows_train,
            rows_valid=max(1, round(self.rows_valid * f)),
            rows_test=max(1, round(self.rows_test * f)),
        )
        return GenParams(**kw)


# ------------------------------------------------------------------------ the world
class World:
    """Users, items, authors and the truth's parameter tables, all drawn from rng(seed)."""

    def __init__(self, p: GenParams) -> None:
        self.p = p
        rng = np.random.default_rng([p.seed, 12345])
        k, nc = p.latent_dim, p.n_categories
        self.cat_p = _zipf(nc, 0.8, rng)  # category popularity
        # authors: a main category, a level, a region, a latent vector
        self.author_cat = rng.choice(nc, size=p.n_authors, p=self.cat_p)
        self.author_level = rng.integers(0, 10, p.n_authors)
        self.author_region = rng.integers(0, 50, p.n_authors)
        # items: every author owns >= 1 item; category mostly the author's main category
        author = np.concatenate(
            [rng.permutation(p.n_authors), rng.integers(0, p.n_authors, p.n_items - p.n_authors)]
        )
        self.item_author = author[rng.permutation(p.n_items)]
        own = rng.random(p.n_items) < 0.8
        other = rng.choice(nc, p.n_items, p=self.cat_p)
        self.item_cat = np.where(own, self.author_cat[self.item_author], other)
        self.item_dur = np.clip((self.item_cat % 7) * 2 + rng.integers(0, 8, p.n_items), 0, 19)
        self.item_age = rng.integers(0, 10, p.n_items)
        self.item_tags_off, self.item_tags = self._item_tags(rng)
        self.cat_items, self.cat_start = _group_index(self.item_cat, nc)  # items by category
        self.author_items, self.author_start = _group_index(self.item_author, p.n_authors)
        # item popularity within its category: items are drawn as start + floor(count * U^2)
        rank_in_cat = np.empty(p.n_items)
        counts = np.diff(self.cat_start)
        rank_in_cat[self.cat_items] = np.arange(p.n_items) - np.repeat(self.cat_start[:-1], counts)
        self.item_pop = 1.0 - np.sqrt((rank_in_cat + 0.5) / counts[self.item_cat])  # in (0, 1)
        # users
        nu = p.n_users
        self.user_raw = (((np.arange(nu, dtype=np.int64) + 1) * 1_000_000_007) & _U48).astype(np.int64)
        self.user_seg = rng.integers(0, p.n_segments, nu)
        self.user_city = rng.choice(p.n_cities, nu, p=_zipf(p.n_cities, 0.7, rng))
        self.user_age = rng.integers(0, 8, nu)
        self.user_gender = rng.integers(0, 3, nu)
        self.user_device = rng.integers(0, 6, nu)
        self.user_activity = rng.integers(0, 5, nu)
        self.user_active_days = np.clip((self.user_activity + rng.random(nu)) / 5.0, 0, 1)
        self.user_weight = _zipf(nu, 0.6, rng)  # impressions per user
        n_int = rng.integers(1, 6, nu)
        self.int_off = np.concatenate([[0], np.cumsum(n_int)])
        self.int_cat = rng.choice(nc, int(n_int.sum()), p=self.cat_p)
        self.interest = np.zeros((nu, nc), dtype=bool)
        self.interest[np.repeat(np.arange(nu), n_int), self.int_cat] = True
        # follows: authors of popular items in the user's interest categories
        n_fol = rng.integers(0, 11, nu)
        self.fol_off = np.concatenate([[0], np.cumsum(n_fol)])
        owner = np.repeat(np.arange(nu), n_fol)
        fcat = self._pick_interest(owner, rng)
        self.fol_author = self.item_author[self._pick_item(fcat, rng)]
        self.follow_keys = np.unique(owner.astype(np.int64) * p.n_authors + self.fol_author)
        # truth parameters
        g = rng.standard_normal
        self.user_vec = (
            g((p.n_segments, k))[self.user_seg]
            + 0.5 * g((p.n_cities, k))[self.user_city]
            + 0.5 * g((8, k))[self.user_age]
        )
        self.item_vec = g((nc, k))[self.item_cat] + 0.6 * g((p.n_authors, k))[self.item_author]
        self.w_skip = g(k)
        self.seg_cat = 0.3 * g((p.n_segments, nc))
        self.hour_fam = 0.25 * g((6, 8))
        # Biases are functions of observed features (device, activity, duration bucket), not per-ID noise:
        # a per-ID bias seen ~30-50 times cannot be estimated from 1.5M rows, and would put the oracle
        # out of reach of any model (it cost a bias-blind oracle 0.02 AUC).
        self.user_bias = 0.3 * g(6)[self.user_device] + 0.15 * (self.user_activity - 2.0)
        self.item_bias = 0.3 * g(20)[self.item_dur]
        self.user_bias_skip = 0.3 * g(6)[self.user_device]
        self.today = 0
        if p.days > 0:
            self._plan_launches(np.random.default_rng([p.seed, 4242]))
            self._index_catalogue()

    # ------------------------------------------------------------------ daily drift
    def _plan_launches(self, rng: np.random.Generator) -> None:
        """Launch day of every author and item: new authors bring new items; other items launch late too."""
        p = self.p
        later = max(p.days - 1, 1)
        author_day = np.where(
            rng.random(p.n_authors) < p.new_author_share, rng.integers(1, later + 1, p.n_authors), 0
        )
        item_day = np.where(
            rng.random(p.n_items) < p.new_item_share, rng.integers(1, later + 1, p.n_items), 0
        )
        self.item_launch = np.maximum(item_day, author_day[self.item_author])
        self.item_launch[self.cat_items[self.cat_start[:-1][np.diff(self.cat_start) > 0]]] = 0  # none empty
        self.author_launch = author_day

    def _index_catalogue(self) -> None:
        """The items on offer today, newest first within each category (so the newest are drawn most: the
        draw is start + floor(count * U^2)), with popularity and age from that order."""
        p, d = self.p, self.today
        live = np.flatnonzero(self.item_launch <= d)
        order = live[np.lexsort((live, self.item_launch[live] * -1, self.item_cat[live]))]
        counts = np.bincount(self.item_cat[order], minlength=p.n_categories)
        self.cat_items, self.cat_start = order, np.concatenate([[0], np.cumsum(counts)])
        rank = np.arange(len(order)) - np.repeat(self.cat_start[:-1], counts)
        self.item_pop = np.zeros(p.n_items)
        self.item_pop[order] = 1.0 - np.sqrt((rank + 0.5) / counts[self.item_cat[order]])
        self.item_age = np.clip(d - self.item_launch, 0, 9)
        by_author = live[np.argsort(self.item_author[live], kind="stable")]
        self.author_items = by_author
        self.author_start = np.concatenate(
            [[0], np.cumsum(np.bincount(self.item_author[live], minlength=p.n_authors))]
        )

    def advance(self, day: int) -> None:
        """Move the world to `day` (days > 0 only; forward only), one day at a time: the taste table walks
        (x sqrt(1 - tau^2), + tau * fresh noise), a share of users swap an interest, and the catalogue
        takes in the day's launches."""
        p = self.p
        if day < self.today:
            raise ValueError(f"world: cannot go back from day {self.today} to day {day}")
        while self.today < day:
            self.today += 1
            rng = np.random.default_rng([p.seed, 777, self.today])
            tau = p.taste_drift
            self.seg_cat = math.sqrt(1 - tau**2) * self.seg_cat + tau * 0.3 * rng.standard_normal(
                self.seg_cat.shape
            )
            movers = np.flatnonzero(rng.random(p.n_users) < p.interest_drift)
            slot = self.int_off[movers] + (rng.random(len(movers)) * np.diff(self.int_off)[movers]).astype(
                np.int64
            )
            self.int_cat[slot] = rng.choice(p.n_categories, len(movers), p=self.cat_p)
            self.interest[:] = False
            self.interest[np.repeat(np.arange(p.n_users), np.diff(self.int_off)), self.int_cat] = True
        self._index_catalogue()

    def _item_tags(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n = rng.integers(1, 5, self.p.n_items)
        owner = np.repeat(np.arange(self.p.n_items), n)
        per_cat = max(1, self.p.n_tags // self.p.n_categories)
        tags = np.where(
            rng.random(len(owner)) < 0.8,
            (self.item_cat[owner] * per_cat + rng.integers(0, per_cat, len(owner))) % self.p.n_tags,
            rng.integers(0, self.p.n_tags, len(owner)),
        )
        return np.concatenate([[0], np.cumsum(n)]), tags

    def _pick_interest(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        cnt = self.int_off[users + 1] - self.int_off[users]
        return self.int_cat[self.int_off[users] + (rng.random(len(users)) * cnt).astype(np.int64)]

    def _pick_item(self, cats: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A popularity-skewed item of each category."""
        cnt = self.cat_start[cats + 1] - self.cat_start[cats]
        return self.cat_items[self.cat_start[cats] + (cnt * rng.random(len(cats)) ** 2).astype(np.int64)]

    def _pick_followed_item(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """An item by an author the user follows (users must follow someone)."""
        cnt = self.fol_off[users + 1] - self.fol_off[users]
        a = self.fol_author[self.fol_off[users] + (rng.random(len(users)) * cnt).astype(np.int64)]
        n = self.author_start[a + 1] - self.author_start[a]
        pick = self.author_start[a] + (rng.random(len(a)) * n).astype(np.int64)
        return np.where(n > 0, self.author_items[np.minimum(pick, len(self.author_items) - 1)], -1)

    # ------------------------------------------------------------------ rows
    def rows(self, n: int, rng: np.random.Generator, row_id_start: int) -> dict[str, Any]:
        """n impressions: feature arrays keyed by canonical feature name, plus labels and truths."""
        p = self.p
        user = rng.choice(p.n_users, n, p=self.user_weight)
        # candidate: 45% from an interest category, 15% by a followed author, 40% from the whole catalogue
        mode = rng.random(n)
        cat = np.where(
            mode < 0.45, self._pick_interest(user, rng), rng.choice(p.n_categories, n, p=self.cat_p)
        )
        item = self._pick_item(cat, rng)
        fol = (mode >= 0.45) & (mode < 0.60) & (self.fol_off[user + 1] > self.fol_off[user])
        followed = self._pick_followed_item(user[fol], rng)  # -1: the author has nothing on offer yet
        item[fol] = np.where(followed >= 0, followed, item[fol])
        cat = self.item_cat[item]
        author = self.item_author[item]
        hour = rng.choice(24, n, p=_hour_p())
        weekday = rng.integers(0, 7, n)
        network = rng.choice(4, n, p=[0.1, 0.3, 0.4, 0.2])
        surface = rng.choice(5, n, p=[0.6, 0.15, 0.1, 0.1, 0.05])

        # behaviour sequence: 70% of positions from the user's interests, most recent last
        seq_len = np.minimum(np.floor(rng.lognormal(p.seq_len_log_mean, 1.0, n)), p.seq_max_len)
        seq_len = seq_len.astype(np.int64)
        seq_off = np.concatenate([[0], np.cumsum(seq_len)])
        seq_row = np.repeat(np.arange(n), seq_len)
        scat = np.where(
            rng.random(len(seq_row)) < 0.7,
            self._pick_interest(user[seq_row], rng),
            rng.choice(p.n_categories, len(seq_row), p=self.cat_p),
        )
        seq_item = self._pick_item(scat, rng)
        seq_author = self.item_author[seq_item]
        seq_cat = self.item_cat[seq_item]
        seq_action = rng.choice(4, len(seq_row), p=[0.6, 0.2, 0.15, 0.05])
        denom = np.maximum(seq_len, 1)
        frac_cat = np.bincount(seq_row, seq_cat == cat[seq_row], minlength=n) / denom
        frac_author = np.bincount(seq_row, seq_author == author[seq_row], minlength=n) / denom

        # truth
        k = p.latent_dim
        uv = self.user_vec[user] * self.item_vec[item]  # (n, k)
        interest = self.interest[user, cat]
        follows = np.isin(user.astype(np.int64) * p.n_authors + author, self.follow_keys)
        dur = (self.item_dur[item] + rng.random(n)) / 20.0
        active = self.user_active_days[user]
        shared = (
            0.6 * uv.sum(1) / math.sqrt(k)
            + self.seg_cat[self.user_seg[user], cat]
            + 0.7 * interest
            + 0.6 * follows
            + 1.0 * frac_cat
            + 0.8 * frac_author
        )
        logit_f = (
            -1.0
            + shared
            + self.hour_fam[hour // 4, cat % 8]
            + 0.4 * self.item_pop[item]
            - 1.2 * dur * (1.0 - active)
            + 0.2 * (self.item_age[item] < 2)
            + self.user_bias[user]
            + self.item_bias[item]
        )
        logit_s = (
            -1.3
            - 0.6 * shared
            + 0.8 * (uv @ self.w_skip) / math.sqrt(k)
            + 0.6 * dur
            + 0.5 * (network == 0)
            + self.user_bias_skip[user]
        )
        p_f = _sigmoid(p.logit_scale * logit_f).astype(np.float32)
        p_s = _sigmoid(p.logit_scale * logit_s).astype(np.float32)
        finish = (rng.random(n) < p_f).astype(np.int8)
        skip = (rng.random(n) < p_s).astype(np.int8)

        def missing(x: np.ndarray, rate: float) -> np.ndarray:
            return np.where(rng.random(n) < rate, np.nan, x)

        tags_lo, tags_hi = self.item_tags_off[item], self.item_tags_off[item + 1]
        return {
            "_row_id": np.arange(row_id_start, row_id_start + n, dtype=np.int64),
            "finish": finish,
            "skip": skip,
            "_p_finish": p_f,
            "_p_skip": p_s,
            # dense
            "user_active_days": active,
            "user_hist_finish": missing(self.user_bias[user] + 0.3 * rng.standard_normal(n), 0.1),
            "item_popularity": self.item_pop[item],
            "item_duration": dur,
            "item_hist_finish": missing(self.item_bias[item] + 0.3 * rng.standard_normal(n), 0.15),
            "author_followers": (self.author_level[author] + rng.random(n)) / 10.0,
            "ctx_since_last": rng.exponential(1.0, n),
            "seq_len_log": np.log1p(seq_len) / math.log1p(p.seq_max_len),
            # sparse (ints, or (offsets, values) for lists)
            "user_id": self.user_raw[user],
            "user_segment": self.user_seg[user],
            "user_city": self.user_city[user],
            "user_age": self.user_age[user],
            "user_gender": self.user_gender[user],
            "user_device": self.user_device[user],
            "user_activity": self.user_activity[user],
            "user_interests": _gather_lists(self.int_off[user], self.int_off[user + 1], self.int_cat),
            "item_id": item,
            "item_category": cat,
            "item_tags": _gather_lists(tags_lo, tags_hi, self.item_tags),
            "item_duration_bucket": self.item_dur[item],
            "item_age_bucket": self.item_age[item],
            "author_id": author,
            "author_level": self.author_level[author],
            "author_region": self.author_region[author],
            "user_follows": _gather_lists(self.fol_off[user], self.fol_off[user + 1], self.fol_author),
            "ctx_hour": hour,
            "ctx_weekday": weekday,
            "ctx_network": network,
            "ctx_surface": surface,
            "cross_segment_category": self.user_seg[user].astype(np.int64) * p.n_categories + cat,
            "cross_age_duration": self.user_age[user] * 20 + self.item_dur[item],
            # sequence
            "seq_item_id": (seq_off, seq_item),
            "seq_author_id": (seq_off, seq_author),
            "seq_category": (seq_off, seq_cat),
            "seq_action": (seq_off, seq_action),
        }


def _zipf(n: int, a: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / (np.arange(n) + 5.0) ** a
    return (w / w.sum())[rng.permutation(n)]


def _hour_p() -> np.ndarray:
    w = 1.0 + np.sin((np.arange(24) - 6) / 24 * 2 * np.pi) + 0.3
    return w / w.sum()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _group_index(key: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by key and the start of each key's range (n + 1,)."""
    order = np.argsort(key, kind="stable")
    return order, np.concatenate([[0], np.cumsum(np.bincount(key, minlength=n))])


def _gather_lists(lo: np.ndarray, hi: np.ndarray, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lens = hi - lo
    off = np.concatenate([[0], np.cumsum(lens)])
    idx = np.repeat(lo - off[:-1], lens) + np.arange(off[-1])
    return off, flat[idx]
