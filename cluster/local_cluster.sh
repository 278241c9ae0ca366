#!/usr/bin/env bash
# Launch: cluster/local_cluster.sh start [WORKERS]   (then: cluster/local_cluster.sh status | stop)
#
# A real multi-node Ray cluster on one machine, for development: a head node that runs no work
# (--num-cpus=0, like the KubeRay head in cluster/raycluster.yaml) plus WORKERS worker nodes, each its own
# `ray start --block` process with its own raylet, object store and temp dir, and a custom resource
# `worker_<i>` so work can be pinned to one node. Everything binds to 127.0.0.1.
#
# It never runs `ray stop`: that kills every Ray process on the machine, other people's clusters included.
# `stop` signals only the process trees this script started (their pids are in $BERTRAY_CLUSTER_DIR).
#
# Settings (environment):
#   BERTRAY_CLUSTER_DIR  state, logs and temp dirs (default /tmp/bertray-cluster; keep it short: Ray's unix
#                        socket paths live under it and must stay under 107 characters)
#   CPUS_PER_WORKER      logical CPUs per worker node (default 2)
#   OBJECT_STORE_BYTES   object store per node (default 200000000)
#   START_ATTEMPTS       tries per node before giving up (default 3): a raylet on a loaded machine can miss its agents' start-up window
#   AWS_*, HF_*          inherited by every node, so tasks and jobs reach S3 (e.g. a loopback moto_server)
#
# Ray 2.60 turns on token authentication for local clusters; this script makes that explicit
# (RAY_AUTH_MODE=token, token in ~/.ray/auth_token, created if missing). Clients need the same setting:
#   source "$BERTRAY_CLUSTER_DIR/cluster.env"     # RAY_AUTH_MODE, RAY_API_SERVER_ADDRESS, RAY_GCS_ADDRESS
#   ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \
#     -- python jobs/finetune.py --config jobs/configs/sst2-finetune-local.yaml --storage s3://bucket/runs
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${BERTRAY_CLUSTER_DIR:-/tmp/bertray-cluster}"
CPUS_PER_WORKER="${CPUS_PER_WORKER:-2}"
OBJECT_STORE_BYTES="${OBJECT_STORE_BYTES:-200000000}"
if [[ -x "$REPO/.venv/bin/ray" ]]; then
  RAY="$REPO/.venv/bin/ray"; PY="$REPO/.venv/bin/python"
  # Job entrypoints say `python ...`: on these nodes that must be the venv's, as on a cluster it is the image's.
  export PATH="$REPO/.venv/bin:$PATH"
else
  RAY="$(command -v ray)"; PY="$(command -v python3)"
fi
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

die() { echo "local_cluster: $*" >&2; exit 1; }

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Ray's default ports (10001 client, 52365 agent, 10002-19999 workers) would collide with any other Ray on
# this machine, so every node gets free ports of its own and OS-chosen worker ports.
node_flags() {
  echo --block --node-ip-address=127.0.0.1 --disable-usage-stats --num-gpus=0 \
    --dashboard-agent-listen-port="$(free_port)" --dashboard-agent-grpc-port="$(free_port)" \
    --metrics-export-port="$(free_port)" --runtime-env-agent-port="$(free_port)" \
    --min-worker-port=0 --max-worker-port=0 --object-store-memory="$OBJECT_STORE_BYTES"
}

# wait_nodes N DASHBOARD_PORT PID: exit 0 once the cluster reports N alive nodes; 1 if the node process PID
# dies first or 120 s pass.
WAIT_NODES_PY='
import os, sys, time
from ray.util.state import list_nodes

want, address, pid = int(sys.argv[1]), f"http://127.0.0.1:{sys.argv[2]}", int(sys.argv[3])
deadline = time.time() + 120
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(1)
    try:
        if sum(n.state == "ALIVE" for n in list_nodes(address=address, raise_on_missing_output=False)) >= want:
            sys.exit(0)
    except Exception:  # the dashboard is still starting: poll again until the deadline
        pass
    time.sleep(1)
sys.exit(1)
'
wait_nodes() { "$PY" -c "$WAIT_NODES_PY" "$@"; }

# descendants PID: PID and every process below it (Ray workers start process groups of their own, so a
# group kill would miss them).
descendants() {
  ps -eo pid=,ppid= | awk -v root="$1" '
    { parent[$1] = $2 }
    END { for (p in parent) { q = p; while (q != root && (q in parent) && q > 1) q = parent[q]; if (q == root) print p } }'
}

# stop_node PIDFILE: SIGTERM `ray start --block` (it stops its raylet and workers), SIGKILL what is left after 20 s.
stop_node() {
  local pidfile="$1" pid tree
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  tree="$(descendants "$pid")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  # shellcheck disable=SC2086
  [[ -n "$tree" ]] && kill -KILL $tree 2>/dev/null || true
  rm -f "$pidfile"
}

# start_node NAME NODES_EXPECTED DASHBOARD_PORT -- RAY_START_ARGS...: start one node in a session of its own
# and wait until it has joined. A raylet aborts when its agents miss a fixed ~15 s start-up window, which
# happens on a loaded machine, so a node gets START_ATTEMPTS tries (default 3).
start_node() {
  local name="$1" want="$2" dash="$3" pid
  shift 4
  for attempt in $(seq 1 "${START_ATTEMPTS:-3}"); do
    # 9>&-: the node must not inherit the lock (it would hold it for as long as it lives).
    setsid "$RAY" start "$@" >>"$STATE/$name.log" 2>&1 </dev/null 9>&- &
    pid=$!
    echo "$pid" >"$STATE/$name.pid"
    wait_nodes "$want" "$dash" "$pid" && return 0
    echo "local_cluster: $name did not come up (attempt $attempt of ${START_ATTEMPTS:-3})" >&2
    stop_node "$STATE/$name.pid"
  done
  tail -n 5 "$STATE/$name.log" >&2 || true
  # The raylet's own last words (a failed check says what it waited for).
  grep -h " C \| F " "$STATE"/*/session_*/logs/raylet.out 2>/dev/null | tail -n 3 | cut -c1-400 >&2 || true
  die "$name did not come up; logs in $STATE/$name.log and $STATE/*/session_latest/logs"
}

start() {
  local workers="${1:-2}" gcs dash client
  [[ "$workers" =~ ^[0-9]+$ ]] || die "WORKERS must be a number, got '$workers'"
  alive "$STATE/head.pid" && die "already running (state in $STATE); run '$0 stop' first"
  rm -rf "$STATE"; mkdir -p "$STATE"
  if [[ "$RAY_AUTH_MODE" == token ]]; then "$RAY" get-auth-token --generate >/dev/null; fi
  gcs="$(free_port)"; dash="$(free_port)"; client="$(free_port)"

  # shellcheck disable=SC2046  # node_flags is a list of flags
  start_node head 1 "$dash" -- --head --num-cpus=0 --port="$gcs" --ray-client-server-port="$client" \
    --dashboard-host=127.0.0.1 --dashboard-port="$dash" --temp-dir="$STATE/head" $(node_flags)
  for i in $(seq 1 "$workers"); do
    # shellcheck disable=SC2046
    start_node "worker-$i" $((i + 1)) "$dash" -- --address="127.0.0.1:$gcs" --num-cpus="$CPUS_PER_WORKER" \
      --resources="{\"worker_$i\": 1}" --temp-dir="$STATE/w$i" $(node_flags)
  done

  cat >"$STATE/cluster.env" <<EOF
export RAY_AUTH_MODE=$RAY_AUTH_MODE
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dash
export RAY_GCS_ADDRESS=127.0.0.1:$gcs
EOF
  echo "Ray cluster up: head (no work) + $workers worker node(s) x $CPUS_PER_WORKER CPUs"
  echo "  source $STATE/cluster.env"
  echo "  jobs:    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/<stage>.py ..."
  echo "  drivers: bertray <stage> --address 127.0.0.1:$gcs ..."
  echo "  logs:    $STATE/*.log and $STATE/*/session_latest/logs"
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
    if alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"; else echo "$(basename "$f" .pid): dead"; fi
  done
  # shellcheck disable=SC1091
  source "$STATE/cluster.env"
  "$RAY" status --address="$RAY_GCS_ADDRESS"
}

# One start or stop at a time per state dir: two of them would overwrite each other's pid files.
lock() {
  mkdir -p "$(dirname "$STATE")"
  exec 9>"$STATE.lock"
  flock -w 300 9 || die "another local_cluster.sh holds $STATE.lock"
}

case "${1:-}" in
  start) lock; start "${2:-2}" ;;
  stop) lock; stop ;;
  status) status ;;
  *) echo "usage: $0 start [WORKERS] | stop | status" >&2; exit 2 ;;
esac
