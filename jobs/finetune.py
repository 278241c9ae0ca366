# Launch: ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/finetune.py --config jobs/configs/sst2-finetune.yaml
"""Fine-tuning a text classifier on Ray Train as a Ray job: the code and flags of `bertray finetune`.

Inside a Ray job RAY_ADDRESS is set, so the CLI connects to the job's cluster instead of starting one.
"""
import sys
from pathlib import Path

# `python jobs/finetune.py` puts jobs/ on sys.path, not the repo root. In a Ray job the working_dir is on
# PYTHONPATH anyway; this makes the file run from a checkout without installing bertray too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bertray import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.main(["finetune", *sys.argv[1:]]))
