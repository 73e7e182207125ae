"""Hashing raw int64 IDs into an embedding table's range.

The hash is the splitmix64 output function (Steele et al. 2014): add the golden gamma, then the
xor-shift-multiply finaliser, all on uint64 with wrap-around; the result is taken mod n. It is stateless,
vectorised, identical on every machine, and mixes well enough that `mod n` is close to uniform even for
sequential or strided raw IDs. No per-feature salt: features that share a table must map the same raw ID
to the same row (e.g. sequence item ids and the candidate item_id).
"""

from __future__ import annotations

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """uint64 splitmix64 of each element (int64 input is reinterpreted bit-for-bit)."""
    z = np.asarray(x).astype(np.int64, copy=False).view(np.uint64) + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_ids(ids: np.ndarray, num_embeddings: int) -> np.ndarray:
    """Raw int64 ids (any value, negative included) -> int64 rows in [0, num_embeddings)."""
    return (splitmix64(ids) % np.uint64(num_embeddings)).astype(np.int64)
