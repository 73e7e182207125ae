"""Shared fixtures: the real synthetic schema and one small generated dataset per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from data.generate import GenParams, generate
from data.schema import Schema

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_CONFIG = ROOT / "conf" / "data" / "synthetic.yaml"
SMALL_ROWS = 20_000


@pytest.fixture(scope="session")
def synthetic_schema() -> Schema:
    return Schema.load(SYNTHETIC_CONFIG)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory, synthetic_schema: Schema) -> Path:
    """~20k train rows (8 files x 4 row groups), valid/test scaled alike; returns the dataset root."""
    import yaml

    cfg = yaml.safe_load(SYNTHETIC_CONFIG.read_text())
    params = GenParams.from_dict(cfg["generator"]).scaled(SMALL_ROWS)
    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate(synthetic_schema, params, root)
    return root
