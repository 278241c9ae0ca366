"""`make demo`: the main job on embedded defaults, start to finish on one machine.

Starts a local Ray, fine-tunes the embedded MiniLM on the bundled SST-2 slice (jobs/data/sst2-demo), evaluates
on SST-2 validation, labels the bundled 1,821-sentence corpus with the model it just trained, and prints
accuracy, wall time and where every output is.

The bundled slice was made with:
    tr = pq.read_table("shared/data/sst2/train.parquet")
    pq.write_table(tr.take(np.sort(np.random.default_rng(0).choice(tr.num_rows, 4000, replace=False))), ...)
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "jobs" / "data" / "sst2-demo"
CONFIG = REPO / "jobs" / "configs" / "demo-finetune.yaml"


def main() -> int:
    os.chdir(REPO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never needs the network
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from bertray import config, evaluate, finetune, label, runtime

    cfg = config.load(config.FinetuneConfig, CONFIG)
    run_dir = Path(cfg.run.storage) / cfg.run.name
    if run_dir.exists():
        print(f"removing the previous demo run at {run_dir} (the demo always starts fresh)")
        shutil.rmtree(run_dir)
    start = time.perf_counter()
    runtime.init_ray()
    summary = finetune.run(cfg)
    train_s = time.perf_counter() - start

    ev = evaluate.evaluate(summary["model"], str(DEMO_DATA / "validation.parquet"), str(run_dir / "evaluation"))

    out = run_dir / "labeled-corpus"
    lcfg = config.load(config.LabelConfig, data={"model": summary["model"], "input": str(DEMO_DATA / "corpus.parquet"),
                                                 "output": str(out), "id_column": "id", "overwrite": True})
    ls = label.run(lcfg)
    label_line = (f"labeled {ls['rows_labeled']:,} of {ls['rows_read']:,} corpus rows -> {out} "
                  f"(label counts: {ls['label_counts']})")
    total_s = time.perf_counter() - start
    print("\n" + "=" * 72)
    print(f"demo finished in {total_s / 60:.1f} min (training {train_s / 60:.1f} min)")
    print(f"SST-2 validation: accuracy {ev['accuracy']:.4f}, macro-F1 {ev['macro_f1']:.4f} on {ev['n']} sentences")
    print(f"model:            {summary['model']}  (plain transformers can load it)")
    print(f"training metrics: {run_dir / 'metrics.json'}, curves: {run_dir / 'curves.png'}")
    print(f"evaluation:       {run_dir / 'evaluation' / 'metrics.json'}, {run_dir / 'evaluation' / 'confusion_matrix.png'}")
    print(f"corpus:           {label_line}")
    print(f"try it:           .venv/bin/bertray predict {summary['model']} \"a gorgeous, witty film\"")
    print("=" * 72)
    return 0


if __name__ == "__main__":
    sys.exit(main())
