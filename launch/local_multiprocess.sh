#!/usr/bin/env bash
# Run llava_jax.main as N CPU processes on this machine, joined through
# jax.distributed (gloo collectives): the multi-host code path of a pod, on a laptop.
set -euo pipefail

PROG=$(basename "$0")

usage() {
  cat <<EOF
usage: $PROG NUM_PROCESSES DEVICES_PER_PROCESS -- <llava_jax.main arguments>

Starts NUM_PROCESSES processes of \`python -m llava_jax.main\` on localhost, each with
DEVICES_PER_PROCESS fake CPU devices, joined through a coordinator on a free local port.
Process 0 writes to this terminal, the others to LOG_DIR/process_<i>.log. Exits 0 only
if every process succeeds; when one fails, the others are stopped and its exit code is
returned. SIGINT/SIGTERM are passed on to the processes as SIGTERM (the trainer saves a
checkpoint and exits); a second one kills them.

Each process gets JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=D,
LLAVA_COORDINATOR_ADDRESS=127.0.0.1:PORT, LLAVA_NUM_PROCESSES=N, LLAVA_PROCESS_ID=i,
LLAVA_CPU_COLLECTIVES=gloo.

Environment:
  LOG_DIR         directory for the logs of processes 1..N-1 (default: a new temp dir)
  PORT            coordinator port (default: a free one)
  PYTHON          Python interpreter (default: python)
  LLAVA_MAIN_MODULE  module to run (default: llava_jax.main)
  STOP_TIMEOUT    seconds between SIGTERM and SIGKILL when stopping (default: 60)

Example:
  $PROG 2 4 -- --config=configs/tiny.py --workdir=/tmp/llava_mp --config.train.num_steps=5
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  echo "Try '$PROG --help'." >&2
  exit 2
}

for a in "$@"; do
  [[ "$a" == -- ]] && break
  if [[ "$a" == -h || "$a" == --help ]]; then
    usage
    exit 0
  fi
done

[[ $# -ge 1 ]] || die "missing NUM_PROCESSES, DEVICES_PER_PROCESS and -- <main args>"
num=$1
[[ "$num" =~ ^[0-9]+$ && "$num" -ge 1 ]] ||
  die "bad NUM_PROCESSES '$num' (expected an integer >= 1)"
[[ $# -ge 2 ]] || die "missing DEVICES_PER_PROCESS"
devices=$2
[[ "$devices" =~ ^[0-9]+$ && "$devices" -ge 1 ]] ||
  die "bad DEVICES_PER_PROCESS '$devices' (expected an integer >= 1)"
[[ $# -ge 3 ]] || die "missing -- before the llava_jax.main arguments"
[[ "$3" == -- ]] || die "unexpected argument '$3' (expected -- before the llava_jax.main arguments)"
shift 3
[[ $# -ge 1 ]] || die "no llava_jax.main arguments after -- (need at least --config and --workdir)"
# Remove leading zeros so "08" is not read as octal below.
num=$((10#$num))
devices=$((10#$devices))

PYTHON=${PYTHON:-python}
module=${LLAVA_MAIN_MODULE:-llava_jax.main}
stop_timeout=${STOP_TIMEOUT:-60}
[[ "$stop_timeout" =~ ^[0-9]+$ ]] || die "bad STOP_TIMEOUT '$stop_timeout' (expected seconds)"
command -v "$PYTHON" >/dev/null || die "PYTHON '$PYTHON' not found"

if [[ -n "${PORT:-}" ]]; then
  [[ "$PORT" =~ ^[0-9]+$ && "$PORT" -ge 1 && "$PORT" -le 65535 ]] ||
    die "bad PORT '$PORT' (expected 1..65535)"
  port=$PORT
else
  port=$("$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
fi

if [[ -n "${LOG_DIR:-}" ]]; then
  log_dir=$LOG_DIR
  mkdir -p "$log_dir"
else
  log_dir=$(mktemp -d "${TMPDIR:-/tmp}/llava_mp.XXXXXX")
fi

# Keep the caller's XLA flags except a device count, which is ours.
xla_flags=""
for f in ${XLA_FLAGS:-}; do
  [[ "$f" == --xla_force_host_platform_device_count=* ]] || xla_flags+="$f "
done
xla_flags+="--xla_force_host_platform_device_count=$devices"

pids=()
finished=()
stopping=0
stop_deadline=0
signal=""

# Pids of the processes still running.
alive() {
  local i
  for i in "${!pids[@]}"; do
    if [[ "${finished[$i]}" == 0 ]] && kill -0 "${pids[$i]}" 2>/dev/null; then
      echo "${pids[$i]}"
    fi
  done
}

# Send a signal to every process still running.
signal_all() {
  local running
  running=$(alive)
  # shellcheck disable=SC2086  # a list of pids
  [[ -z "$running" ]] || kill "-$1" $running 2>/dev/null || true
}

# SIGTERM now, SIGKILL once STOP_TIMEOUT seconds have passed (see the loop below).
begin_stop() {
  if [[ "$stopping" == 0 ]]; then
    stopping=1
    stop_deadline=$((SECONDS + stop_timeout))
    signal_all TERM
  fi
}

# shellcheck disable=SC2317  # trap handlers
on_signal() {
  if [[ -n "$signal" ]]; then
    echo "$PROG: SIG$1 again; killing the processes" >&2
    signal_all KILL
    exit $((128 + $(kill -l "$1")))
  fi
  signal=$1
  echo "$PROG: SIG$1; sending SIGTERM to the processes" >&2
  begin_stop
}

# Leaving early (an error in this script): take the processes down with us.
# shellcheck disable=SC2317  # trap handler
on_exit() {
  local rc=$? waited=0
  trap - EXIT INT TERM
  signal_all TERM
  while [[ -n "$(alive)" ]] && ((waited < stop_timeout * 10)); do
    sleep 0.1
    waited=$((waited + 1))
  done
  signal_all KILL
  exit "$rc"
}

trap on_exit EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

echo "$PROG: $num processes x $devices CPU devices, coordinator 127.0.0.1:$port;" \
  "logs of processes 1..$((num - 1)) in $log_dir" >&2

for ((i = 0; i < num; i++)); do
  env_vars=(
    JAX_PLATFORMS=cpu
    "XLA_FLAGS=$xla_flags"
    "LLAVA_COORDINATOR_ADDRESS=127.0.0.1:$port"
    "LLAVA_NUM_PROCESSES=$num"
    "LLAVA_PROCESS_ID=$i"
    LLAVA_CPU_COLLECTIVES=gloo
  )
  if ((i == 0)); then
    env "${env_vars[@]}" "$PYTHON" -m "$module" "$@" &
  else
    env "${env_vars[@]}" "$PYTHON" -m "$module" "$@" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
  finished+=(0)
done

# Collect exit codes as the processes finish; the first failure stops the others.
rc=0
remaining=$num
while ((remaining > 0)); do
  for i in "${!pids[@]}"; do
    [[ "${finished[$i]}" == 0 ]] || continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    code=0
    wait "${pids[$i]}" || code=$?
    finished[i]=1
    remaining=$((remaining - 1))
    if ((code != 0 && rc == 0)); then
      rc=$code
      if [[ "$stopping" == 0 ]]; then
        echo "$PROG: process $i failed with exit code $code; stopping the others" >&2
        if ((i > 0)); then
          echo "$PROG: last lines of $log_dir/process_$i.log:" >&2
          tail -n 20 "$log_dir/process_$i.log" >&2 || true
        fi
        begin_stop
      fi
    fi
  done
  if ((remaining > 0)); then
    if [[ "$stopping" == 1 ]] && ((SECONDS >= stop_deadline)) && [[ -n "$(alive)" ]]; then
      echo "$PROG: processes still running ${stop_timeout}s after SIGTERM; killing them" >&2
      signal_all KILL
    fi
    sleep 0.1
  fi
done
trap - EXIT INT TERM

if [[ "$signal" == INT ]]; then
  exit 130
fi
if [[ -n "$signal" ]]; then
  echo "$PROG: stopped on SIG$signal (exit code $rc)" >&2
elif ((rc == 0)); then
  echo "$PROG: all $num processes finished" >&2
fi
exit "$rc"
