#!/usr/bin/env bash
# Launch: cluster/local_cluster.sh start [WORKERS]   (then: cluster/local_cluster.sh status | stop)
#
# A real multi-node Ray cluster on one machine, for development: a head node that runs no work
# (--num-cpus=0, like the KubeRay head in cluster/raycluster.yaml) plus WORKERS worker nodes, each a separate
# `ray start` process group with its own raylet, object store and temp dir, and a custom resource
# `worker_<i>` so work can be pinned to one node. Everything binds to 127.0.0.1.
#
# It never runs `ray stop`: that kills every Ray process on the machine, including other people's clusters.
# Each node is started with `setsid ... --block`, so stopping it means signalling its own process group.
#
# Settings (environment):
#   BERTRAY_CLUSTER_DIR  state, logs and temp dirs (default /tmp/bertray-cluster; keep it short: Ray's unix
#                        socket paths live under it and must stay under 107 characters)
#   CPUS_PER_WORKER      logical CPUs per worker node (default 2)
#   OBJECT_STORE_BYTES   object store per node (default 200000000)
#   AWS_*, HF_*          inherited by every node, so tasks and jobs reach S3 (e.g. a loopback moto_server)
#
# After `start`, submit jobs with the printed RAY_API_SERVER_ADDRESS, e.g.
#   ray job submit --address http://127.0.0.1:<port> --working-dir . --runtime-env jobs/runtime_env.yaml \
#     -- python jobs/finetune.py --config jobs/configs/sst2-finetune-local.yaml --num-workers 2 --storage s3://bucket/runs
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${BERTRAY_CLUSTER_DIR:-/tmp/bertray-cluster}"
CPUS_PER_WORKER="${CPUS_PER_WORKER:-2}"
OBJECT_STORE_BYTES="${OBJECT_STORE_BYTES:-200000000}"
if [[ -x "$REPO/.venv/bin/ray" ]]; then
  RAY="$REPO/.venv/bin/ray"; PY="$REPO/.venv/bin/python"
else
  RAY="$(command -v ray)"; PY="$(command -v python3)"
fi

die() { echo "local_cluster: $*" >&2; exit 1; }

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Node ports: Ray's defaults (10001 client, 52365 agent, 10002-19999 workers) would collide with any other
# Ray on this machine, so every node gets its own free ports and OS-chosen worker ports.
common_flags() {
  echo --block --node-ip-address=127.0.0.1 --disable-usage-stats \
    --dashboard-agent-listen-port="$(free_port)" --min-worker-port=0 --max-worker-port=0 \
    --object-store-memory="$OBJECT_STORE_BYTES"
}

# wait_nodes N: until the dashboard reports N alive nodes (or fail after 90 s with the logs' tail).
wait_nodes() {
  local want="$1" dash="$2"
  for _ in $(seq 1 180); do
    got="$("$PY" - "$dash" <<'EOF' 2>/dev/null || echo 0
import json, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/nodes?view=summary", timeout=2) as r:
    nodes = json.load(r)["data"]["summary"]
print(sum(1 for n in nodes if n["raylet"]["state"] == "ALIVE"))
EOF
)"
    [[ "$got" -ge "$want" ]] && return 0
    sleep 0.5
  done
  tail -n 20 "$STATE"/*.log >&2 || true
  die "only $got of $want nodes came up after 90 s; logs in $STATE"
}

start() {
  local workers="${1:-2}"
  [[ "$workers" =~ ^[0-9]+$ ]] || die "WORKERS must be a number, got '$workers'"
  alive "$STATE/head.pid" && die "already running (state in $STATE); run '$0 stop' first"
  rm -rf "$STATE"; mkdir -p "$STATE"
  local gcs dash client
  gcs="$(free_port)"; dash="$(free_port)"; client="$(free_port)"

  # shellcheck disable=SC2046  # common_flags is a list of flags
  setsid "$RAY" start --head --num-cpus=0 --num-gpus=0 --port="$gcs" --ray-client-server-port="$client" \
    --dashboard-host=127.0.0.1 --dashboard-port="$dash" --temp-dir="$STATE/head" $(common_flags) \
    >"$STATE/head.log" 2>&1 </dev/null &
  echo $! >"$STATE/head.pid"
  wait_nodes 1 "$dash"

  for i in $(seq 1 "$workers"); do
    # shellcheck disable=SC2046
    setsid "$RAY" start --address="127.0.0.1:$gcs" --num-cpus="$CPUS_PER_WORKER" --num-gpus=0 \
      --resources="{\"worker_$i\": 1}" --temp-dir="$STATE/w$i" $(common_flags) \
      >"$STATE/worker-$i.log" 2>&1 </dev/null &
    echo $! >"$STATE/worker-$i.pid"
    # One at a time: nodes joining at once race on the head's runtime-env and socket files.
    wait_nodes $((i + 1)) "$dash"
  done

  cat >"$STATE/cluster.env" <<EOF
RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dash
RAY_GCS_ADDRESS=127.0.0.1:$gcs
EOF
  echo "Ray cluster up: head (no work) + $workers worker node(s) x $CPUS_PER_WORKER CPUs"
  echo "  jobs:    ray job submit --address http://127.0.0.1:$dash --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/<stage>.py ..."
  echo "  drivers: bertray <stage> --address 127.0.0.1:$gcs ...   (or RAY_ADDRESS=127.0.0.1:$gcs)"
  echo "  state:   $STATE/cluster.env, logs in $STATE/*.log"
}

# stop_node PIDFILE: SIGTERM the node's process group (ray start, raylet, its workers), SIGKILL after 15 s.
stop_node() {
  local pidfile="$1" pid
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do
    pgrep -g "$pid" >/dev/null 2>&1 || break
    sleep 0.5
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

stop() {
  [[ -d "$STATE" ]] || { echo "no cluster state in $STATE"; return 0; }
  for f in "$STATE"/worker-*.pid; do [[ -e "$f" ]] && stop_node "$f"; done
  stop_node "$STATE/head.pid"
  echo "stopped the cluster in $STATE"
}

status() {
  [[ -f "$STATE/cluster.env" ]] || die "no cluster in $STATE (start one with '$0 start')"
  for f in "$STATE"/head.pid "$STATE"/worker-*.pid; do
    [[ -e "$f" ]] || continue
    if alive "$f"; then echo "$(basename "$f" .pid): running (pgid $(cat "$f"))"; else echo "$(basename "$f" .pid): dead"; fi
  done
  # shellcheck disable=SC1091
  source "$STATE/cluster.env"
  "$RAY" status --address="$RAY_GCS_ADDRESS"
}

case "${1:-}" in
  start) start "${2:-2}" ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start [WORKERS] | stop | status" >&2; exit 2 ;;
esac
