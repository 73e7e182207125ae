"""`Choice`: the base of every string-valued config option. Each option is a `StrEnum`, so OmegaConf checks
a Hydra value against its members before anything runs (`Invalid value 'cosin', expected one of [constant,
cosine, step]`), a saved config.yaml reads back the same, and a member still compares equal to its string.
`Choice.parse` gives the same one-line error for a config built in Python.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self


class Choice(StrEnum):
    @classmethod
    def parse(cls, value: str, key: str) -> Self:
        """`value` as a member; else a ValueError naming `key` and the allowed values."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{key}: {value!r} is not one of {', '.join(cls)}") from None
