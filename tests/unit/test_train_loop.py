"""bertray.train_loop's pieces that run without Ray Train: loading a checkpoint's weights (whole model or adapter),
the sweep of scratch folders left by killed workers, and the train state a resume reads back."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from bertray import checkpoint
from bertray import config as C
from bertray import modeling
from bertray.train_loop import _load_weights


def test_a_full_checkpoint_is_not_loaded_into_an_adapter_model_or_the_reverse(tiny_bert, tmp_path, lora_model_cfg):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    full = modeling.build_classifier(C.ModelConfig(base=tiny_bert), ["a", "b"])
    adapted = modeling.build_classifier(lora_model_cfg(tiny_bert), ["a", "b"])
    checkpoint.save(tmp_path / "full", full, tok, {"kind": "classifier"})
    checkpoint.save(tmp_path / "adapter", adapted, tok, {"kind": "classifier"})
    with pytest.raises(RuntimeError, match="does not match the model"):
        _load_weights(adapted, str(tmp_path / "full"))
    with pytest.raises(RuntimeError, match="holds an adapter, and the model has none"):
        _load_weights(full, str(tmp_path / "adapter"))


def test_scratch_left_by_killed_processes_is_removed_and_nothing_else(tmp_path, monkeypatch):
    """A SIGKILLed worker leaves its checkpoint scratch copy in /tmp; the next worker on the node deletes it, but
    never a live process's, a young one, or anything not ours."""
    import os
    import subprocess
    import sys
    import tempfile
    import time

    from bertray import train_loop

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process now
    old = time.time() - 2 * train_loop._ORPHAN_MIN_AGE_S

    def make(name, age=old):
        d = tmp_path / name
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "model.safetensors").write_bytes(b"x" * 10)
        os.utime(d, (age, age))
        return d

    orphans = [make(f"bertray-ckpt-{gone.pid}-ab12"), make(f"bertray-restore-{gone.pid}-cd34")]
    kept = [make(f"bertray-ckpt-{os.getpid()}-ef56"),              # live process
            make(f"bertray-ckpt-{gone.pid}-young", time.time()),  # may belong to another pid namespace's writer
            make(f"bertray-export-{gone.pid}-gh78"),              # not a loop scratch directory
            make("bertray-ckpt-notapid-ij90")]
    train_loop._remove_orphaned_scratch()
    assert [d.exists() for d in orphans] == [False, False]
    assert all(d.exists() for d in kept)
    with train_loop._scratch_dir("ckpt") as live:  # what the loop creates carries its pid, so the sweep knows it
        assert train_loop._SCRATCH_NAME.fullmatch(Path(live).name).group(2) == str(os.getpid())


class _Payload:
    """Stands in for what a hostile train_state.pt could unpickle: any importable callable."""

    def __reduce__(self):
        return (print, ("unpickled",))


def test_train_state_with_more_than_tensors_is_refused_not_run(tmp_path, capsys):
    import torch

    from bertray import checkpoint
    from bertray.train_loop import Loop

    torch.save({"optimizer": _Payload()}, tmp_path / checkpoint.TRAIN_STATE)
    with pytest.raises(RuntimeError, match="holds more than tensors and plain values"):
        Loop.__new__(Loop)._restore_state(str(tmp_path))
    assert "unpickled" not in capsys.readouterr().out


def test_numpy_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import torch

    from bertray.train_loop import _numpy_rng_state, _set_numpy_rng_state

    np.random.seed(7)
    np.random.normal()  # leaves a cached gaussian in the state
    torch.save({"numpy": _numpy_rng_state()}, tmp_path / "s.pt")
    expected = np.random.random(5)
    _set_numpy_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["numpy"])
    np.testing.assert_array_equal(np.random.random(5), expected)
