#!/usr/bin/env bash
# Create a Cloud TPU VM (single host or pod slice), copy this repository to every
# worker, install it, run the trainer on all workers at once, and delete the TPU.
# Run `launch/tpu_pod.sh --help` for the interface; DRY_RUN=1 prints the commands.
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
  cat <<EOF
usage: $PROG COMMAND --name NAME --zone ZONE [options] [-- --config.a.b=value ...]

Commands:
  create   create the TPU VM (gcloud compute tpus tpu-vm create)
  setup    copy the repository to every worker and install it into a virtual
           environment there (pip install -e . 'jax[tpu]'); installs --python with
           apt-get if the image lacks it
  run      start the trainer on every worker in the background, output to a log;
           arguments after -- are passed to llava_jax.main (config overrides)
  logs     follow the newest log of one worker (--worker, default 0)
  stop     send SIGTERM to the trainer on every worker (it saves a checkpoint and exits)
  delete   delete the TPU VM (--quiet)
  all      create, setup and run

Options:
  --name NAME          TPU name (required)
  --zone ZONE          zone, e.g. us-central2-b (required)
  --project PROJECT    Google Cloud project (default: gcloud's configured project)
  --accelerator TYPE   accelerator type for create, e.g. v4-32, v5p-64 (default: v4-32)
  --version VERSION    TPU software version for create (default: tpu-ubuntu2204-base)
  --spot               create a Spot TPU
  --repo-dir DIR       local checkout copied by setup (default: $(cd "$SCRIPT_DIR/.." && pwd))
  --remote-dir DIR     copy's location on the workers, relative to home (default: llava_jax)
  --python PYTHON      Python (>= 3.11) that makes the workers' virtual environment
                       (default: python3.11)
  --venv DIR           the virtual environment on the workers, relative to home
                       (default: llava_jax_venv)
  --config CONFIG      run: config file relative to the repository, configs/<name>.py[:arg]
  --workdir DIR        run: gs://bucket/path (recommended) or a path on the workers
  --log-dir DIR        run/logs/stop: log directory on the workers, relative to home
                       (default: llava_jax_logs)
  --worker N           logs: which worker's log to follow (default: 0)
  -h, --help           show this help

Environment:
  DRY_RUN=1            print the commands instead of running them

Examples:
  $PROG all --name my-tpu --zone us-central2-b --accelerator v4-32 \\
      --config configs/llava_v15.py:7b,pretrain --workdir gs://my-bucket/llava/pretrain \\
      -- --config.train.num_steps=1000
  $PROG logs --name my-tpu --zone us-central2-b
  $PROG delete --name my-tpu --zone us-central2-b
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  echo "Try '$PROG --help'." >&2
  exit 2
}

# A command as one line of shell, words with special characters in single quotes.
quote_cmd() {
  local out="" w sq="'"
  for w in "$@"; do
    if [[ -n "$w" && "$w" =~ ^[-A-Za-z0-9_./:=@%+,]+$ ]]; then
      out+=" $w"
    else
      out+=" '${w//$sq/$sq\\$sq$sq}'"
    fi
  done
  echo "${out# }"
}

# Print a command, shell-quoted, and run it unless DRY_RUN=1.
run_cmd() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    quote_cmd "$@"
  else
    echo "+ $(quote_cmd "$@")" >&2
    "$@"
  fi
}

# One word, quoted for the remote bash.
q() { printf '%q' "$1"; }

# A path on the workers, quoted: relative paths are taken from the home directory.
rpath() {
  if [[ "$1" == /* ]]; then
    q "$1"
  else
    # shellcheck disable=SC2016  # $HOME is for the worker's shell
    printf '"$HOME"/%s' "$(q "$1")"
  fi
}

command=""
name=""
zone=""
project=""
accelerator="v4-32"
version="tpu-ubuntu2204-base"
spot=0
repo_dir="$SCRIPT_DIR/.."
remote_dir="llava_jax"
python="python3.11"
venv="llava_jax_venv"
config=""
workdir=""
log_dir="llava_jax_logs"
worker="0"
extra=()

# Value of an option given as `--opt value` or `--opt=value`; sets `shift_by`.
take_value() {
  local opt=$1 arg=$2
  shift 2
  if [[ "$arg" == *=* ]]; then
    value=${arg#*=}
    shift_by=1
  elif [[ $# -ge 1 ]]; then
    value=$1
    shift_by=2
  else
    die "option $opt needs a value"
  fi
  [[ -n "$value" ]] || die "option $opt needs a non-empty value"
}

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
    --spot)
      spot=1
      shift
      ;;
    --*)
      opt=${arg%%=*}
      case "$opt" in
        --name | --zone | --project | --accelerator | --version | --repo-dir | --remote-dir | \
          --python | --venv | --config | --workdir | --log-dir | --worker) ;;
        *) die "unknown option '$arg'" ;;
      esac
      take_value "$opt" "$@"
      case "$opt" in
        --name) name=$value ;;
        --zone) zone=$value ;;
        --project) project=$value ;;
        --accelerator) accelerator=$value ;;
        --version) version=$value ;;
        --repo-dir) repo_dir=$value ;;
        --remote-dir) remote_dir=$value ;;
        --python) python=$value ;;
        --venv) venv=$value ;;
        --config) config=$value ;;
        --workdir) workdir=$value ;;
        --log-dir) log_dir=$value ;;
        --worker) worker=$value ;;
      esac
      shift "$shift_by"
      ;;
    -*)
      die "unknown option '$arg'"
      ;;
    *)
      [[ -z "$command" ]] || die "unexpected argument '$arg' (command is already '$command')"
      command=$arg
      shift
      ;;
  esac
done

case "$command" in
  create | setup | run | logs | stop | delete | all) ;;
  "") die "missing COMMAND (create, setup, run, logs, stop, delete or all)" ;;
  *) die "unknown command '$command' (expected create, setup, run, logs, stop, delete or all)" ;;
esac
[[ -n "$name" ]] || die "missing --name (the TPU name)"
[[ -n "$zone" ]] || die "missing --zone"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "bad --name '$name' (lowercase letters, digits and hyphens, starting with a letter)"
[[ "$worker" =~ ^[0-9]+$ ]] || die "bad --worker '$worker' (expected a worker index: 0, 1, ...)"
if [[ "$command" == run || "$command" == all ]]; then
  [[ -n "$config" ]] || die "$command needs --config (e.g. configs/tiny.py)"
  [[ -n "$workdir" ]] || die "$command needs --workdir (e.g. gs://my-bucket/run1)"
elif [[ ${#extra[@]} -gt 0 ]]; then
  die "arguments after -- are only for run and all, not for $command"
fi
if [[ "$command" == setup || "$command" == all ]]; then
  [[ -d "$repo_dir" ]] || die "bad --repo-dir '$repo_dir' (not a directory)"
  repo_dir=$(cd "$repo_dir" && pwd)
  [[ -f "$repo_dir/llava_jax/main.py" ]] ||
    die "bad --repo-dir '$repo_dir' (no llava_jax/main.py there)"
fi
if [[ "${DRY_RUN:-0}" != 1 ]]; then
  command -v gcloud >/dev/null || die "gcloud not found on PATH (install the Google Cloud SDK)"
fi

gcloud_flags=(--zone="$zone")
[[ -z "$project" ]] || gcloud_flags+=(--project="$project")
tpu_vm=(gcloud compute tpus tpu-vm)

# Run a shell command on every worker (or on the worker given as $2).
on_workers() {
  run_cmd "${tpu_vm[@]}" ssh "$name" "${gcloud_flags[@]}" --worker="${2:-all}" --command="$1"
}

do_create() {
  local cmd=("${tpu_vm[@]}" create "$name" "${gcloud_flags[@]}"
    --accelerator-type="$accelerator" --version="$version")
  [[ "$spot" == 0 ]] || cmd+=(--spot)
  run_cmd "${cmd[@]}"
}

do_setup() {
  local tmp archive remote_archive="llava_jax_repo.tar.gz" file
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064  # expand $tmp now
  trap "rm -rf '$tmp'" EXIT
  archive="$tmp/$remote_archive"
  # The working tree as it is (tracked and untracked files, not ignored ones); without
  # git, everything but the usual build and cache folders.
  if command -v git >/dev/null && git -C "$repo_dir" rev-parse --is-inside-work-tree \
    >/dev/null 2>&1; then
    git -C "$repo_dir" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' file; do
        [[ -e "$repo_dir/$file" ]] && printf '%s\0' "$file"
      done >"$tmp/files"
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
      echo >&2 "# archive of the files listed by: git -C $(q "$repo_dir") ls-files" \
        "--cached --others --exclude-standard"
    fi
    run_cmd tar -czf "$archive" -C "$repo_dir" --null -T "$tmp/files"
  else
    run_cmd tar -czf "$archive" -C "$repo_dir" --exclude=.git --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=.venv --exclude='workdir*' .
  fi
  run_cmd "${tpu_vm[@]}" scp "$archive" "$name:$remote_archive" "${gcloud_flags[@]}" \
    --worker=all
  # TPU images may ship an older Python than the project needs (>= 3.11): get it from
  # apt if missing, then install into a virtual environment.
  on_workers "set -e; mkdir -p $(rpath "$remote_dir");\
 tar -xzf $remote_archive -C $(rpath "$remote_dir"); rm -f $remote_archive;\
 if ! command -v $(q "$python") >/dev/null; then sudo apt-get update -qq;\
 sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(q "$python") $(q "$python")-venv; fi;\
 $(q "$python") -m venv $(rpath "$venv"); $(rpath "$venv/bin/python") -m pip install -q --upgrade pip;\
 cd $(rpath "$remote_dir"); $(rpath "$venv/bin/python") -m pip install -e . 'jax[tpu]'"
}

pidfile=$(rpath "$log_dir/train.pid")
latest=$(rpath "$log_dir/latest.log")

do_run() {
  local log args=() a py
  log=$(rpath "$log_dir/train-$(date +%Y%m%d-%H%M%S).log")
  py=$(rpath "$venv/bin/python")
  # --distributed: every worker joins the others (found from the TPU metadata).
  for a in "--distributed" "--config=$config" "--workdir=$workdir" "${extra[@]}"; do
    args+=("$(q "$a")")
  done
  # On each worker: refuse if setup has not run or a trainer still holds the TPU, then
  # start one detached from the ssh session, keep its pid and point latest.log at its log.
  on_workers "set -e; mkdir -p $(rpath "$log_dir");\
 if [ ! -x $py ]; then echo \"\$(hostname): no virtual environment; run setup first\" >&2;\
 exit 1; fi;\
 if [ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null; then\
 echo \"\$(hostname): llava_jax still running (pid \$(cat $pidfile)); stop it first\" >&2;\
 exit 1; fi;\
 (cd $(rpath "$remote_dir") && exec nohup $py -m llava_jax.main ${args[*]}) >$log 2>&1 </dev/null &\
 echo \$! >$pidfile; ln -sfn \"\$(basename $log)\" $latest;\
 echo \"\$(hostname): started pid \$!, log:\" $log"
  local id=(--name "$name" --zone "$zone")
  [[ -z "$project" ]] || id+=(--project "$project")
  [[ "$log_dir" == llava_jax_logs ]] || id+=(--log-dir "$log_dir")
  cat >&2 <<EOF

Started on every worker; each writes its own log, ~/$log_dir/latest.log. Follow worker 0:
  $(quote_cmd "$0" logs "${id[@]}")
Stop (SIGTERM: the trainer saves a checkpoint and exits):
  $(quote_cmd "$0" stop "${id[@]}")
EOF
}

do_logs() {
  on_workers "tail -n 100 -F $latest" "$worker"
}

do_stop() {
  on_workers "if [ -f $pidfile ] && kill -TERM \"\$(cat $pidfile)\" 2>/dev/null;\
 then echo \"\$(hostname): sent SIGTERM\"; else echo \"\$(hostname): not running\"; fi"
}

do_delete() {
  run_cmd "${tpu_vm[@]}" delete "$name" "${gcloud_flags[@]}" --quiet
}

case "$command" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  all)
    do_create
    do_setup
    do_run
    ;;
esac
