"""LoRA fine-tuning (model.adapter) on the shared local Ray cluster with a tiny random BERT: 2 DDP workers, a
worker killed and the run resumed, small adapter checkpoints, the merged export in plain transformers, a sweep of
the rank, and the one-line error for an adapter the model cannot take."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bertray import config as C
from bertray import finetune, modeling
from bertray import tune as sweep
from bertray.predictor import Predictor
from test_finetune import tiny_cfg

TEXTS = ["a gorgeous, witty film", "dull and overlong", "not bad at all", "the plot makes no sense whatsoever"]
LORA = {"model.adapter.kind": "lora", "model.adapter.r": 4, "model.adapter.alpha": 8}


@pytest.fixture(scope="module")
def lora_run(ray_cluster, tiny_bert, sst2_small, killing_a_worker, tmp_path_factory):
    """A 2-worker LoRA fine-tune whose second worker is SIGKILLed once a checkpoint is registered: the fine-tuning
    stage's worker-loss test (the loop, its checkpoints and Ray Train's restart are those of a full fine-tune; the
    full model's checkpoint is resumed by test_finetune's driver-kill test). Returns (summary, run folder)."""
    runs = tmp_path_factory.mktemp("lora") / "runs"
    cfg = tiny_cfg(tiny_bert, sst2_small, str(runs), "lora", **LORA, **{"train.max_steps": 40, "train.eval_every": 10})
    run_dir = runs / "lora"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    result = killing_a_worker(lambda: finetune.run(cfg), lambda: snapshot.exists() and snapshot.read_text())
    return result, run_dir


def test_lora_run_resumes_at_the_same_step_after_a_worker_is_killed(lora_run):
    s, run_dir = lora_run
    assert s["final_step"] == 40 and len(s["worker_nodes"]) == 2
    assert s["resumed_at"] and s["resumed_at"][0] > 0 and s["resumed_at"][0] % 10 == 0
    assert s["model"] == str(run_dir / "model") and s["adapter"] == str(run_dir / "adapter")


def test_checkpoints_hold_the_adapter_and_head_not_the_model(lora_run, tiny_bert):
    _, run_dir = lora_run
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert checkpoints
    full_weights = (run_dir / "model" / "model.safetensors").stat().st_size
    for ckpt in checkpoints:
        names = {p.name for p in ckpt.iterdir()}
        assert "adapter_model.safetensors" in names and "model.safetensors" not in names, names
        meta = json.loads((ckpt / "bertray.json").read_text())
        assert meta["adapter"]["kind"] == "lora" and meta["adapter"]["base_model"] == tiny_bert
        assert meta["adapter"]["r"] == 4 and meta["adapter"]["alpha"] == 8
        # The trained weights and their optimizer state, against the model's weights alone (a full checkpoint
        # holds those and twice their size in optimizer state).
        trained = sum((ckpt / f).stat().st_size for f in ("adapter_model.safetensors", "train_state.pt"))
        assert trained * 20 < full_weights, (trained, full_weights)
    adapter = {p.name for p in (run_dir / "adapter").iterdir()}
    assert "adapter_model.safetensors" in adapter and "train_state.pt" not in adapter
    # A reader of models is told what the adapter folder is, in one line.
    with pytest.raises(modeling.ModelError, match="adapter and head, not a whole model"):
        Predictor(str(run_dir / "adapter"))


def test_merged_export_loads_in_plain_transformers_and_predicts_as_the_adapter_model(lora_run, tiny_bert):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    _, run_dir = lora_run
    model_dir, adapter_dir = str(run_dir / "model"), str(run_dir / "adapter")
    meta = json.loads((run_dir / "model" / "bertray.json").read_text())
    assert meta["adapter"]["merged"] is True and meta["adapter"]["adapter"] == adapter_dir
    code = ("import json, sys, torch; from transformers import AutoModelForSequenceClassification as M, "
            "AutoTokenizer as T;"
            f"m = M.from_pretrained({model_dir!r}).eval(); t = T.from_pretrained({model_dir!r});"
            f"x = t({TEXTS!r}, return_tensors='pt', padding=True);"
            "print(json.dumps(torch.softmax(m(**x).logits, -1).tolist()));"
            "assert 'peft' not in sys.modules and 'bertray' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    merged = np.array(json.loads(r.stdout.strip().splitlines()[-1]))

    # The adapter alone, put on its base with PEFT as anyone would, scores the same.
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, config=AutoConfig.from_pretrained(adapter_dir))
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    tok = AutoTokenizer.from_pretrained(adapter_dir)
    with torch.no_grad():
        adapted = torch.softmax(peft_model(**tok(TEXTS, return_tensors="pt", padding=True)).logits, -1).numpy()
    np.testing.assert_allclose(merged, adapted, atol=1e-5)
    # So does bertray's own reader (what label, serve, evaluate and predict load).
    np.testing.assert_allclose(Predictor(model_dir).predict(TEXTS).probs, adapted, atol=1e-5)


def test_sweep_varies_the_adapter_rank_and_exports_the_winner_merged(ray_cluster, tiny_bert, sst2_small, tmp_path):
    cfg = C.load(C.TuneConfig, data={
        "model": {"base": tiny_bert, "max_length": 48, "adapter": {"kind": "lora"}},
        "data": {"train": str(sst2_small / "train.parquet"), "validation": str(sst2_small / "validation.parquet"),
                 "max_train_rows": 160, "max_validation_rows": 64},
        "optim": {"lr": 1e-3},
        "train": {"max_steps": 4, "eval_every": 2, "log_every": 2, "batch_size": 16},
        "run": {"name": "lora-sweep", "storage": str(tmp_path / "runs"), "max_failures": 0},
        "search": {"algorithm": "grid", "max_concurrent_trials": 2,
                   "space": {"model.adapter.r": {"grid": [2, 4]}, "model.adapter.alpha": {"grid": [4]}}},
    })
    summary = sweep.run(cfg)
    assert summary["status_counts"] == {"finished": 2}
    best = Predictor(summary["model"])
    assert best.meta["adapter"]["merged"] is True
    assert best.meta["adapter"]["r"] == best.meta["config"]["model"]["adapter"]["r"] == summary["best"]["config"][
        "model.adapter.r"]
    assert best.predict(TEXTS).probs.shape == (4, 2)


def test_an_adapter_on_modules_the_model_lacks_fails_in_one_line_before_training(ray_cluster, tiny_bert, sst2_small,
                                                                                  tmp_path):
    cfg = tiny_cfg(tiny_bert, sst2_small, str(tmp_path / "runs"), "bad-target", **LORA,
                   **{"model.adapter.target": "[q_lin, value]"})
    with pytest.raises(modeling.ModelError) as err:
        finetune.run(cfg)
    assert "\n" not in str(err.value)
    assert "q_lin names no module" in str(err.value) and "query" in str(err.value) and "dense" in str(err.value)
    assert not (tmp_path / "runs" / "bad-target").exists()
