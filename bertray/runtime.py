"""Process-level setup that only entry points (CLI, jobs/) call: never on import."""
from __future__ import annotations

import json
import logging
import os
import random
import re
import socket

log = logging.getLogger(__name__)

# Passed to every Ray worker so S3 settings, offline model loading and the MLflow server (models:/ URIs) hold on
# all nodes.
_PROPAGATE = ("AWS_", "HF_", "BERTRAY_", "TRANSFORMERS_", "MLFLOW_", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")
# Never passed that way: Ray writes a runtime env, values and all, to its logs (runtime_env_agent.log, readable
# by every user of the node). A local cluster started here inherits them with the rest of this process's
# environment; on a running cluster they come from the nodes' own (an IAM role, a Kubernetes Secret).
# Whole words of the name, so TOKENIZERS_PARALLELISM (a setting) is forwarded while HF_TOKEN is not.
_SECRET = re.compile(r"(?:^|_)(?:SECRETS?|TOKENS?|PASSWORD|PASSWD|CREDENTIALS?|KEY|APIKEY)(?:_|$)", re.IGNORECASE)
_NOT_SECRET = ("AWS_ACCESS_KEY_ID",)  # the key's public half; S3 needs it beside the secret one


# Where free_ports looks. A port found by binding port 0 comes from the kernel's ephemeral range (32768-60999 on
# Linux), which every outgoing connection also draws from: in CI one took HAProxy's exporter port in the seconds
# between the pick and HAProxy's bind, and HAProxy would not start. This range lies below the ephemeral one, above
# Ray's worker ports (10002-19999) and below Ray Serve's replica ports (30000-31000).
_FREE_PORT_RANGE = range(20000, 30000)


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on every interface of this machine now, from _FREE_PORT_RANGE in random order
    (so that two callers rarely pick alike); all are held open until the last is found, so none repeats."""
    socks: list[socket.socket] = []
    try:
        for port in random.sample(_FREE_PORT_RANGE, len(_FREE_PORT_RANGE)):
            s = socket.socket()
            try:
                s.bind(("", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            if len(socks) == n:
                return [s.getsockname()[1] for s in socks]
        raise RuntimeError(f"fewer than {n} free TCP ports in {_FREE_PORT_RANGE.start}-{_FREE_PORT_RANGE.stop - 1} "
                           "on this machine")
    finally:
        for s in socks:
            s.close()


def is_secret(name: str) -> bool:
    return bool(_SECRET.search(name)) and name not in _NOT_SECRET


def worker_env() -> dict[str, str]:
    """What every Ray worker gets through the runtime env: settings, never secrets (is_secret)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(_PROPAGATE) and not is_secret(k)}
    # Per-worker weight-loading bars and load reports drown the training progress lines.
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose():  # the job's workers (a sweep's trials that run Ray Train, say) print Ray's lines too
        env["BERTRAY_VERBOSE"] = "1"
    return env


def verbose() -> bool:
    """Whether the user asked to see Ray's own progress lines too: `bertray -v` (which logs at debug level) in the
    driver, BERTRAY_VERBOSE=1 in the workers it starts."""
    return logging.getLogger().isEnabledFor(logging.DEBUG) or os.environ.get("BERTRAY_VERBOSE") == "1"


def quiet_ray_data() -> None:
    """Ray Data prints each pipeline's start, plan and end on the console; bertray prints its own progress, so unless
    -v those lines go only to Ray Data's log file (ray-data.log in Ray's session folder), which keeps them all.
    Called where bertray builds a pipeline (importing Ray Data sets up its loggers), not at start-up: importing it
    would cost every stage, serving included, most of a second."""
    if verbose():
        return
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.WARNING)


def init_ray(address: str | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS), else start a local cluster; idempotent."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    address = address or os.environ.get("RAY_ADDRESS")
    env = worker_env()
    # Inside a Ray job the job's runtime env already reaches every worker, and Ray refuses a variable set in both.
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    for key in (job.get("runtime_env") or {}).get("env_vars", {}):
        env.pop(key, None)
    if not address:
        # One machine has no node to pre-empt: Ray Train's preemption watcher (an actor per worker group, which only
        # logs drain notices) would add nothing but an error-level line about its arguments (ray-project/ray#53727).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    held = sorted(k for k in os.environ if k.startswith(_PROPAGATE) and is_secret(k))
    if address and held:
        log.info("not forwarding %s to the cluster's workers (Ray would log the values); they use the nodes' own",
                 ", ".join(held))
    ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True,
             **({} if address else {"include_dashboard": False}))
    res = ray.cluster_resources()
    log.info("Ray %s: %d node(s), %s CPUs, %s GPUs", "cluster at " + address if address else "local",
             len([n for n in ray.nodes() if n["Alive"]]), res.get("CPU", 0), res.get("GPU", 0))


def alive_nodes() -> int:
    import ray

    return len([n for n in ray.nodes() if n["Alive"]])


def check_shared_storage(uri: str, what: str) -> None:
    """A local path on a multi-node cluster would scatter checkpoints and outputs across machines."""
    from bertray import storage

    if storage.is_remote(uri) or os.environ.get("BERTRAY_ALLOW_LOCAL_STORAGE") == "1":
        return
    if alive_nodes() > 1:
        raise storage.StorageError(
            f"{what}={uri!r} is a local path but the Ray cluster has {alive_nodes()} nodes; use shared storage "
            "(s3://bucket/prefix, or an NFS mount with BERTRAY_ALLOW_LOCAL_STORAGE=1)")
