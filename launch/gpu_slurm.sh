#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per node, each driving all GPUs of its node,
# joined through jax.distributed with the first node of the allocation as coordinator.
#
#   sbatch [--nodes=4 --gpus-per-node=8 ...] launch/gpu_slurm.sh \
#       --config=configs/llava_v15.py:7b,pretrain --workdir=/shared/llava/pretrain \
#       -- --config.train.num_steps=1000
#
# or, inside an allocation (salloc), `bash launch/gpu_slurm.sh ...` with the same arguments.
# sbatch options on its command line override the defaults below.
#SBATCH --job-name=llava_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --signal=TERM@300
set -euo pipefail

# Under sbatch this file runs from a copy in SLURM's spool directory: name it plainly.
PROG=gpu_slurm.sh

usage() {
  cat <<EOF
usage: sbatch [sbatch options] launch/$PROG --config CONFIG --workdir DIR [options] \\
           [-- --config.a.b=value ...]
       bash launch/$PROG ... (inside an allocation made with salloc)

Runs \`python -m llava_jax.main\` once per node of the allocation (srun, one task per
node) with LLAVA_COORDINATOR_ADDRESS=<first node>:PORT, LLAVA_NUM_PROCESSES=<tasks> and
LLAVA_PROCESS_ID=<the task's SLURM_PROCID>. Arguments after -- go to llava_jax.main
unchanged (config overrides). Relative paths are taken from the directory sbatch was
run in. If one task fails, srun stops the others. SLURM sends SIGTERM 300 s before the
time limit (--signal=TERM@300): the trainer saves a checkpoint and exits; submit the
same command again to resume.

Options:
  --config CONFIG   configs/<name>.py[:arg] (required)
  --workdir DIR     checkpoints, metrics and results, on a file system all nodes share
                    (required)
  --port PORT       coordinator port (default: 20000 + SLURM_JOB_ID % 20000)
  -h, --help        show this help

Environment:
  PYTHON            Python interpreter on the nodes (default: python)
  LLAVA_MAIN_MODULE module to run (default: llava_jax.main)
  DRY_RUN=1         print the srun command instead of running it (works outside SLURM)
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  echo "Try '$PROG --help'." >&2
  exit 2
}

config=""
workdir=""
port=""
extra=()

while [[ $# -gt 0 ]]; do
  arg=$1
  case "$arg" in
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      extra=("$@")
      break
      ;;
    --config | --config=* | --workdir | --workdir=* | --port | --port=*)
      opt=${arg%%=*}
      if [[ "$arg" == *=* ]]; then
        value=${arg#*=}
        shift
      else
        [[ $# -ge 2 ]] || die "option $opt needs a value"
        value=$2
        shift 2
      fi
      [[ -n "$value" ]] || die "option $opt needs a non-empty value"
      case "$opt" in
        --config) config=$value ;;
        --workdir) workdir=$value ;;
        --port) port=$value ;;
      esac
      ;;
    --config.*)
      die "unexpected argument '$arg' (config overrides go after --)"
      ;;
    *)
      die "unknown argument '$arg'"
      ;;
  esac
done

[[ -n "$config" ]] || die "missing --config (e.g. configs/llava_v15.py:7b,pretrain)"
[[ -n "$workdir" ]] || die "missing --workdir"
if [[ -n "$port" ]]; then
  if ! [[ "$port" =~ ^[0-9]+$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
    die "bad --port '$port' (expected 1..65535)"
  fi
fi

dry_run=${DRY_RUN:-0}
PYTHON=${PYTHON:-python}
module=${LLAVA_MAIN_MODULE:-llava_jax.main}

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  [[ "$dry_run" == 1 ]] ||
    die "not inside a SLURM allocation (SLURM_JOB_ID is not set): submit with sbatch, or run inside salloc"
  echo "$PROG: not inside a SLURM allocation; showing the command with placeholders" >&2
  coordinator_host="FIRST_NODE"
  nnodes=${SLURM_NNODES:-NNODES}
  job_id=0
else
  for tool in srun scontrol; do
    command -v "$tool" >/dev/null || die "$tool not found on PATH (is this a SLURM node?)"
  done
  [[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "SLURM_JOB_NODELIST is not set"
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") ||
    die "scontrol show hostnames '$SLURM_JOB_NODELIST' failed"
  coordinator_host=${hosts%%$'\n'*}
  [[ -n "$coordinator_host" ]] || die "no hosts in SLURM_JOB_NODELIST '$SLURM_JOB_NODELIST'"
  nnodes=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-}}
  [[ "$nnodes" =~ ^[0-9]+$ ]] || die "SLURM_NNODES is not set or not a number: '$nnodes'"
  job_id=$SLURM_JOB_ID
fi
[[ -n "$port" ]] || port=$((20000 + 10#${job_id//[^0-9]/0} % 20000))

export LLAVA_COORDINATOR_ADDRESS="$coordinator_host:$port"

# Each task learns its own id: SLURM_PROCID and SLURM_NTASKS are read inside the task.
# shellcheck disable=SC2016  # expanded by each task's bash
task_script='export LLAVA_PROCESS_ID="$SLURM_PROCID" LLAVA_NUM_PROCESSES="$SLURM_NTASKS"; exec "$@"'
cmd=(srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1
  --label bash -c "$task_script" llava_task
  "$PYTHON" -m "$module" "--config=$config" "--workdir=$workdir" "${extra[@]}")

echo "$PROG: $nnodes node(s), coordinator $LLAVA_COORDINATOR_ADDRESS" >&2
if [[ "$dry_run" == 1 ]]; then
  printf 'LLAVA_COORDINATOR_ADDRESS=%q ' "$LLAVA_COORDINATOR_ADDRESS"
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
exec "${cmd[@]}"
