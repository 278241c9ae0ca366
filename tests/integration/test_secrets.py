"""No secret value bertray is given reaches Ray's logs: credentials and API keys are never put in a runtime env
(Ray writes those, values and all, to logs every user of the node can read); workers get them by inheritance."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PLANTED = {"AWS_SECRET_ACCESS_KEY": "planted-aws-7c1e", "HF_TOKEN": "planted-hf-93ab",
           "MY_API_KEY": "planted-api-5d20", "AWS_SESSION_TOKEN": "planted-session-e4f8"}

SCRIPT = """
import json, os, ray
from bertray import runtime
runtime.init_ray()
@ray.remote
def read():
    return {k: os.environ.get(k) for k in %r}
print("SEEN " + json.dumps(ray.get(read.remote())))
ray.shutdown()
"""


def test_secrets_reach_local_workers_but_no_ray_log():
    # A short folder of its own: Ray's socket paths must fit in 107 bytes, and only this cluster's logs are read.
    root = tempfile.mkdtemp(prefix="br-sec-", dir="/tmp")
    try:
        env = {**os.environ, **PLANTED, "RAY_TMPDIR": root, "AWS_ACCESS_KEY_ID": "public-half"}
        env.pop("RAY_ADDRESS", None)
        out = subprocess.run([sys.executable, "-c", SCRIPT % list(PLANTED)], env=env, capture_output=True,
                             text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
        seen = json.loads(out.stdout.split("SEEN ", 1)[1].splitlines()[0])
        assert seen == PLANTED  # the workers of a local cluster inherit them
        leaks = []
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_socket():
                data = path.read_bytes()
                leaks += [f"{path.relative_to(root)}: {k}" for k, v in PLANTED.items() if v.encode() in data]
        assert not leaks, leaks
        logs = list(Path(root).rglob("runtime_env*.log"))
        assert logs, "Ray wrote no runtime-env log here: the check above looked in the wrong place"
    finally:
        shutil.rmtree(root, ignore_errors=True)
