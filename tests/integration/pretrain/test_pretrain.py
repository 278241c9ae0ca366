"""`bertray pretrain` end to end on a real local Ray cluster: 2 DDP workers streaming Parquet from the loopback
S3 server, a worker killed mid-run and the run resumed from its S3 checkpoint, perplexity falling, and fine-tuning
from the export."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from bertray import checkpoint, modeling, pretrain, storage
from bertray.token_stages import STAGE_COUNTS
from bertray.config import ModelConfig

QUERY = "encoder.layer.0.attention.self.query.weight"


@pytest.mark.s3
def test_two_workers_stream_from_s3_resume_after_a_worker_is_killed_and_perplexity_drops(s3_pretrained):
    data, summary = s3_pretrained
    assert summary["final_step"] == summary["total_steps"] == 40
    assert len(summary["worker_nodes"]) == 2
    resumed = summary["resumed_at"]
    assert len(resumed) == 1 and resumed[0] in (10, 20, 30), resumed
    meta = checkpoint.read_meta(summary["model"])
    losses = [h["step"] for h in meta["history"] if "train_loss" in h]
    assert losses == list(range(5, 41, 5))  # every step exactly once after the resume
    before, after = summary["initial_metrics"]["perplexity"], summary["metrics"]["perplexity"]
    evals = [h["perplexity"] for h in meta["history"] if "perplexity" in h]
    assert len(evals) == 4 and evals[0] < before and evals[-1] < evals[0]
    assert 10_000 < before < 100_000  # a random head over a 30,522-token vocabulary: about uniform
    assert after < before / 20, (before, evals)

    assert meta["kind"] == "mlm" and meta["head_initialised"] and meta["base_model"] == data["model"]["base"]
    assert meta["initial_metrics"] == summary["initial_metrics"]
    stream = meta["data_report"]["train"]["stream"]
    assert meta["data_report"]["train"]["files"] == 3
    assert stream["null_text"] > 0 and stream["empty_text"] > 0 and stream["held_out"] == 0
    # Packed: all full but the last of each batch of texts the tokenize stage packs (its remainder). Counted where
    # trained on, carried through the restart in the checkpoint: each step's sequences exactly once.
    assert stream["sequences"] == 40 * 2 * 16 and 0.99 * stream["sequences"] * 32 < stream["tokens"] < stream["sequences"] * 32
    saved = json.loads(storage.read_text(summary["run_dir"] + "/metrics.json"))
    assert saved["initial_metrics"]["perplexity"] == before
    assert storage.exists(summary["run_dir"] + "/curves.png")


@pytest.mark.s3
def test_finetune_starts_from_the_pretrained_encoder(s3_pretrained, tiny_bert):
    """What each fine-tuning worker builds from `model.base: <the export>` (a run from an S3 base is shown by the
    fine-tune tests): the further-pretrained encoder's weights, a new classifier layer, and no predictor."""
    from bertray.predictor import Predictor

    _, summary = s3_pretrained
    export = summary["model"]
    pretrained = load_file(str(storage.local_dir(export) / "model.safetensors"))
    original = load_file(os.path.join(tiny_bert, "model.safetensors"))
    clf = modeling.build_classifier(ModelConfig(base=export), ["negative", "positive"])
    start = dict(clf.named_parameters())
    assert torch.equal(start["bert." + QUERY], pretrained["bert." + QUERY])
    assert not torch.allclose(start["bert." + QUERY], original[QUERY])
    # The pooler was carried through pretraining untouched, so only the classifier layer is new.
    assert torch.equal(start["bert.pooler.dense.weight"], original["pooler.dense.weight"])
    assert {n for n in start if not n.startswith("bert.")} == {"classifier.weight", "classifier.bias"}

    with pytest.raises(modeling.ModelError, match="'mlm' checkpoint, not a classifier"):
        Predictor(export)


def test_a_hugging_face_dataset_streams_the_sequences_its_parquet_copy_does(ray_cluster, tiny_bert, pretrain_config,
                                                                           tmp_path):
    """The same texts as a save_to_disk folder, as a Parquet file and as plain text read by the `text` file builder:
    the Ray Data stream gives the same token sequences and the same counts, in tasks over the cluster."""
    import random

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(7)
    words = "the a cat dog sat ran on under mat log quickly slowly red blue".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)] + ["", None]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hf"))
    pq.write_table(pa.table({"text": texts}), tmp_path / "corpus.parquet")
    (tmp_path / "corpus.txt").write_text("\n".join(t if t is not None else "" for t in texts) + "\n")
    streams = {}
    for name, source in {"hf": str(tmp_path / "hf"), "parquet": str(tmp_path / "corpus.parquet"),
                         "text": f"hf://text?data_files={tmp_path}/corpus.txt"}.items():
        cfg = pretrain_config(tiny_bert, source, str(tmp_path / "runs"), name)
        rows = pretrain.read_stream(pretrain.train_source(cfg.data), cfg).take_all()
        streams[name] = (sorted(tuple(r["input_ids"]) for r in rows if len(r["input_ids"])),
                         {k: sum(int(r[k]) for r in rows) for k in STAGE_COUNTS})
    assert streams["hf"] == streams["parquet"] and streams["text"][0] == streams["parquet"][0]
    counts = streams["hf"][1]
    assert counts["texts_read"] == len(texts) and counts["null_text"] == counts["empty_text"] == 1
    # Plain text has no nulls: the None is an empty line there.
    assert streams["text"][1] == {**counts, "null_text": 0, "empty_text": 2}
