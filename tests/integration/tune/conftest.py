"""Fixtures for sweeps: a tiny-BERT sweep config builder (very few steps, small SST-2 slice)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml


@pytest.fixture()
def sweep_config(tiny_bert, sst2_small, tmp_path):
    """`sweep_config(search=..., **section overrides) -> dict`: a TuneConfig mapping for a tiny sweep whose
    trials train 4 steps (evaluating every 2) on 160 SST-2 rows, with storage in this test's tmp folder."""

    def make(search: dict, **sections) -> dict:
        cfg = {
            "model": {"base": tiny_bert, "max_length": 48},
            "data": {"train": str(sst2_small / "train.parquet"), "validation": str(sst2_small / "validation.parquet"),
                     "max_train_rows": 160, "max_validation_rows": 64},
            "train": {"max_steps": 4, "eval_every": 2, "log_every": 2, "batch_size": 16},
            "run": {"name": "sweep", "storage": str(tmp_path / "runs"), "max_failures": 0},
            # Two trials at a time: each trial process imports torch once and is then reused (2 shared cores).
            "search": {"max_concurrent_trials": 2, **search},
        }
        for section, values in sections.items():
            cfg[section] = {**cfg.get(section, {}), **values}
        return cfg

    return make


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path
