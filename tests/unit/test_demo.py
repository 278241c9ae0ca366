"""`make demo` (bertray.demo) runs for minutes, so these check only what it relies on: its config validates, and
the files it names are in the repository and fit what it does with them. The run itself is left to `make demo`."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bertray import cli, demo, label
from bertray import config as C
from bertray import data as D

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("demo-*.yaml")), ids=lambda p: p.name)
def test_demo_configs_validate(path):
    assert cli.main(["validate", str(path)]) == 0


def test_the_demo_names_this_repositorys_config_and_data():
    assert demo.REPO == REPO and demo.CONFIG.is_file() and demo.CONFIG.parent == REPO / "jobs" / "configs"
    assert {p.name for p in demo.DEMO_DATA.iterdir()} >= {"train.parquet", "validation.parquet", "corpus.parquet",
                                                          "labels.json"}


def test_its_config_trains_on_the_bundled_data_and_its_run_folder_stays_in_the_repository():
    """main() runs from the repository and deletes the run folder before starting: that folder must be the
    demo's own, under the repository's runs/."""
    cfg = C.load(C.FinetuneConfig, demo.CONFIG)
    assert (REPO / cfg.data.train).resolve() == demo.DEMO_DATA / "train.parquet"
    assert (REPO / cfg.data.validation).resolve() == demo.DEMO_DATA / "validation.parquet"
    run_dir = (REPO / cfg.run.storage / cfg.run.name).resolve()
    assert run_dir.parent == REPO / "runs" and run_dir != REPO / "runs"


@pytest.mark.parametrize("split", ["train", "validation"])
def test_the_bundled_splits_are_labeled_with_both_classes_and_drop_nothing(split):
    path = str(demo.DEMO_DATA / f"{split}.parquet")
    labeled = D.load_labeled(path, C.DataConfig(train=path))
    assert labeled.label_names == ["negative", "positive"]  # from labels.json beside the data
    assert labeled.report["dropped"] == {} and set(labeled.labels.tolist()) == {0, 1}


def test_the_corpus_is_what_the_demo_labels_by_id(tiny_classifier_dir, tmp_path):
    """The label call main() makes, with a tiny model in place of the one it trains: the corpus passes every check
    the label stage makes before any work, and its ids are unique."""
    corpus = demo.DEMO_DATA / "corpus.parquet"
    cfg = C.load(C.LabelConfig, data={"model": tiny_classifier_dir, "input": str(corpus),
                                      "output": str(tmp_path / "labeled"), "id_column": "id", "overwrite": True})
    plan = label.make_plan(cfg)
    rows = pq.read_metadata(corpus).num_rows
    assert sum(f["rows"] for f in plan.files) == rows and plan.schema.names[0] == "id"
    ids = pq.read_table(corpus, columns=["id"]).column("id").to_pylist()
    assert len(set(ids)) == rows
