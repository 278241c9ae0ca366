"""A real three-node Ray cluster on this machine (cluster/local_cluster.sh: a head that runs no work plus two
worker nodes, each its own raylet), the loopback S3 server, and helpers to submit bertray jobs to it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "cluster" / "local_cluster.sh"
RAY = REPO / ".venv" / "bin" / "ray"
START_TIMEOUT_S = 600  # three nodes, each given up to 5 tries by the script; a loaded 2-core machine is slow


@dataclass
class Cluster:
    state: Path
    env: dict[str, str]  # for `ray` CLI clients: dashboard address and auth mode
    runtime_env_file: Path

    def node_pid(self, name: str) -> int:
        return int((self.state / f"{name}.pid").read_text())

    def submit(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        """`ray job submit` (waits for the job, exit code 1 if it failed) with `args` after `--`."""
        return subprocess.run(self.submit_cmd(args), env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    def submit_cmd(self, args: list[str]) -> list[str]:
        return [str(RAY), "job", "submit", "--working-dir", str(REPO), "--runtime-env", str(self.runtime_env_file),
                "--", "python", *args]

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL a node's whole process tree (ray start, raylet, agents, workers) at once: a lost machine."""
        root = psutil.Process(self.node_pid(name))
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        return [p.pid for p in procs]

    def node_ids(self) -> dict[str, str]:
        """{'head' | 'worker_1' | 'worker_2': node id} of the alive nodes, from `ray list nodes`."""
        out = subprocess.run([str(RAY), "list", "nodes", "--format", "json", "--detail"], env=self.env,
                             capture_output=True, text=True, timeout=120, check=True).stdout
        ids = {}
        for n in json.loads(out):
            if n["state"] != "ALIVE":
                continue
            custom = [r for r in n["resources_total"] if r.startswith("worker_")]
            ids["head" if n["is_head_node"] else custom[0]] = n["node_id"]
        return ids

    def logs_tail(self, lines: int = 40) -> str:
        out = []
        for log in sorted(self.state.glob("*.log")):
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)


def _node_processes(state: Path) -> list[psutil.Process]:
    """Every process of every node the script started (pid files hold the `ray start --block` pids)."""
    procs = []
    for f in state.glob("*.pid"):
        try:
            root = psutil.Process(int(f.read_text()))
            procs += [root, *root.children(recursive=True)]
        except (psutil.NoSuchProcess, ValueError):
            pass
    return procs


@pytest.fixture(scope="module")
def cluster(s3_server) -> Cluster:
    """Head (0 CPUs) + worker-1 and worker-2 (2 CPUs each, resources worker_1 / worker_2), all on 127.0.0.1.

    Started after the S3 server so every node, and so every job driver and worker, inherits its AWS_* settings.
    Killed by pid at the end (never `ray stop`, which would kill other Ray clusters on this machine), even on
    failure."""
    # Short: Ray's unix socket paths live under it and must stay under 107 characters.
    state = Path(tempfile.mkdtemp(prefix="brc-", dir="/tmp"))
    env = {**os.environ, "BERTRAY_CLUSTER_DIR": str(state), "CPUS_PER_WORKER": "2", "OBJECT_STORE_BYTES": "150000000",
           # A raylet gives its agents a fixed 15 s to start (ray-project/ray#65983); the other xdist worker's
           # jobs can make them miss it, and a retry costs ~50 s against a failed module.
           "START_ATTEMPTS": "5"}
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "start", "2"], env=env, capture_output=True, text=True,
                              timeout=START_TIMEOUT_S)
        if proc.returncode != 0:
            pytest.fail(f"local_cluster.sh start failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        client_env = dict(env)
        for line in (state / "cluster.env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            client_env[key] = value
        # The shipped runtime env minus `pip`: these nodes run in this repo's .venv, which holds exactly those
        # pins, and cloning it into a per-node virtualenv costs minutes on two cores (checked in unit tests).
        renv = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
        renv.pop("pip", None)
        renv_file = state / "runtime_env.yaml"
        renv_file.write_text(yaml.safe_dump(renv))
        yield Cluster(state, client_env, renv_file)
    finally:
        # SIGKILL every node's whole process tree at once, by pid (never `ray stop`, which would hit other clusters
        # on this machine). The script's graceful `stop` waits on the nodes one after another, about 20 s here, and
        # a throwaway test cluster has nothing to flush. psutil checks start times, so a reused pid is never hit.
        for p in _node_processes(state):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(state, ignore_errors=True)
        Path(f"{state}.lock").unlink(missing_ok=True)
