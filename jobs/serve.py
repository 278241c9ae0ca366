# Launch: ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/serve.py --config jobs/configs/serve.yaml
"""An HTTP classifier on Ray Serve as a Ray job: the code and flags of `bertray serve`.

Inside a Ray job RAY_ADDRESS is set, so the CLI connects to the job's cluster instead of starting one.
"""
import sys
from pathlib import Path

# `python jobs/serve.py` puts jobs/ on sys.path, not the repo root. In a Ray job the working_dir is on
# PYTHONPATH anyway; this makes the file run from a checkout without installing bertray too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bertray import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.main(["serve", *sys.argv[1:]]))
