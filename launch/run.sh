#!/usr/bin/env bash
# Start embed2 jobs: on this machine, as several processes here, on a TPU pod, on SLURM, or a sweep.
#
#   launch/run.sh local CONFIG WORKDIR [overrides...]
#   launch/run.sh multiprocess N CONFIG WORKDIR [overrides...]    (a log per process; Ctrl-C stops all)
#   launch/run.sh multiprocess stop WORKDIR
#   launch/run.sh tpu TPU_NAME ZONE CONFIG WORKDIR [overrides...]  (ship, set up, start detached)
#   launch/run.sh tpu status|stop TPU_NAME ZONE
#   launch/run.sh tpu logs|ssh TPU_NAME ZONE [WORKER]              (WORKER: default 0)
#   launch/run.sh slurm NODES CONFIG WORKDIR [overrides...]
#   launch/run.sh slurm stop WORKDIR
#   launch/run.sh sweep CONFIG WORKDIR
#
# Overrides are passed to the job as they are: --config.seed=1 "--config.stages[1].steps=500".
# --dry-run (anywhere) prints the commands (tpu: each with the script it runs on the workers) or the
# sbatch script (slurm) instead of running them.
# Environment: PYTHON (default python3), PORT (multiprocess coordinator port, default 12355),
#   DEVICES_PER_PROCESS (multiprocess on CPU: simulated devices per process; replaces any device
#   count in an inherited XLA_FLAGS, whose other flags are kept), LOG_DIR (multiprocess: the logs,
#   default WORKDIR/logs), TPU_PYTHON (tpu: the workers' Python, default 3.12, installed by uv),
#   TPU_SETUP (tpu: replaces the install commands run on every worker), LOG_MIRROR_S (tpu: copy
#   each worker's log to WORKDIR/logs every so many seconds, default 60, 0 = off), LOG_LINES
#   (tpu logs / status: lines shown), STOP_WAIT_S (tpu stop: seconds before SIGKILL, default 300),
#   SLURM_GPUS_PER_NODE, SLURM_EXTRA (slurm).
set -euo pipefail

PYTHON=${PYTHON:-python3}
DRY_RUN=0
ARGS=()
for a in "$@"; do
  if [[ "$a" == "--dry-run" ]]; then DRY_RUN=1; else ARGS+=("$a"); fi
done
set -- "${ARGS[@]+"${ARGS[@]}"}"
ROOT=$(cd "$(dirname "$0")/.." && pwd)

usage() {
  sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

die() {
  echo "launch/run.sh: $*" >&2
  echo >&2
  usage
}

warn() {
  echo "launch/run.sh: warning: $*" >&2
}

need() {  # need COUNT "$@": at least COUNT positional arguments
  local n=$1
  shift
  (($# >= n)) || die "'$MODE' needs $n more argument(s), got $#"
}

check_config() {
  local cfg=${1%%:*}
  [[ -f "$cfg" ]] || die "config file '$cfg' does not exist"
}

show() {  # print a command, shell-quoted
  printf '%q ' "$@"
  printf '\n'
}

run() {  # run a command, or print it under --dry-run
  if ((DRY_RUN)); then show "$@"; else "$@"; fi
}

without_device_count() {  # XLA flags ($1) less every --xla_force_host_platform_device_count, trimmed
  local flags=$1 re='(^|[[:space:]])--xla_force_host_platform_device_count(=[^[:space:]]*)?([[:space:]]|$)'
  while [[ "$flags" =~ $re ]]; do
    flags=${flags/"${BASH_REMATCH[0]}"/ }
  done
  flags=${flags#"${flags%%[![:space:]]*}"}
  printf '%s' "${flags%"${flags##*[![:space:]]}"}"
}

is_url() {  # gs://, s3://, ...: not a local path
  [[ "$1" == *://* ]]
}

mp_logs() {  # multiprocess: where the logs and the pid file of WORKDIR ($1) go
  if [[ -n "${LOG_DIR:-}" ]]; then echo "$LOG_DIR"; elif is_url "$1"; then echo embed2_logs; else echo "$1/logs"; fi
}

# ------------------------------------------------------------------------------------------------ tpu
# Each worker keeps the code in ~/embed2 (replaced at every start), a virtualenv per Python version in
# ~/embed2_venv_<version>, and ~/embed2_logs/: worker_<N>.log (appended; N is the worker's number from
# the TPU metadata) and job.pid. The scripts below run on the workers, after a prelude that sets their
# variables (and "$@", the job's command line).

# shellcheck disable=SC2016  # single quotes on purpose: these run on the workers
TPU_WORKER_ID='w=$(curl -sf -m 5 -H Metadata-Flavor:Google '\
'http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'
# shellcheck disable=SC2016
TPU_RUNNING='pid=$(cat "$HOME/embed2_logs/job.pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null && '\
'grep -q embed2.main "/proc/$pid/cmdline"'

tpu_setup_script() {  # unpack the code (refused while a job runs) and install it in the venv
  cat <<EOF
set -eu
if $TPU_RUNNING; then
  echo "\$(hostname): a job is running (pid \$pid); stop it first: launch/run.sh tpu stop \$tpu \$zone" >&2
  exit 1
fi
rm -rf "\$HOME/embed2" && mkdir -p "\$HOME/embed2" && tar -xzf "\$HOME/embed2_code.tgz" -C "\$HOME/embed2"
cd "\$HOME/embed2"
EOF
  if [[ -n "${TPU_SETUP:-}" ]]; then
    printf '%s\n' "$TPU_SETUP"
    return
  fi
  # The runtime images (tpu-ubuntu2204-base; v2-alpha-tpuv5 / -tpuv5-lite / -tpuv6e) carry their Ubuntu's
  # python3, 3.10 on 22.04, and embed2 needs >= 3.11: uv installs a standalone CPython for the venv.
  cat <<'EOF'
export PATH="$HOME/.local/bin:$PATH"
command -v uv >/dev/null || python3 -m pip install --user -q uv || curl -LsSf https://astral.sh/uv/install.sh | sh
uv python install "$py"
uv venv -q --allow-existing --python "$py" "$HOME/embed2_venv_$py"
uv pip install -q --python "$HOME/embed2_venv_$py/bin/python" -e "$HOME/embed2" "jax[tpu]"
"$HOME/embed2_venv_$py/bin/python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version'
EOF
}

tpu_start_script() {  # PYTHON: start the job detached (nohup, no terminal): a dropped ssh leaves it running
  cat <<EOF
set -eu
set -- "$1" "\$@"
if $TPU_RUNNING; then
  echo "\$(hostname): a job is already running (pid \$pid); launch/run.sh tpu stop \$tpu \$zone" >&2
  exit 1
fi
$TPU_WORKER_ID
EOF
  cat <<'EOF'
mkdir -p "$HOME/embed2_logs"
log="$HOME/embed2_logs/worker_$w.log"
echo "=== $(date -u +%FT%TZ) worker $w ($(hostname)) starts commit $commit: $*" >>"$log"
cd "$HOME/embed2"
# The wrapper records the job's pid (status, stop) and, in the log, its exit status.
nohup sh -c '"$@" & echo $! >"$HOME/embed2_logs/job.pid"; wait $!; rc=$?; echo "=== $(date -u +%FT%TZ) exit $rc"' \
  job "$@" >>"$log" 2>&1 </dev/null &
wrapper=$!
echo "worker $w ($(hostname)): started; log $log"
if [ -n "$mirror" ]; then  # a copy of the log in the workdir, refreshed every $mirror_s seconds
  case "$mirror" in
    gs://*) copy="gcloud storage cp" ;;
    *) mkdir -p "$mirror" && copy="cp" ;;
  esac
  nohup sh -c 'while kill -0 "$1" 2>/dev/null; do sleep "$4"; $5 "$2" "$3"; done; $5 "$2" "$3"' \
    mirror "$wrapper" "$log" "$mirror/worker_$w.log" "$mirror_s" "$copy" >/dev/null 2>&1 </dev/null &
fi
EOF
}

tpu_status_script() {
  printf '%s\n' "$TPU_WORKER_ID"
  cat <<EOF
if $TPU_RUNNING; then state="running (pid \$pid)"; else state="not running"; fi
EOF
  cat <<'EOF'
echo "worker $w ($(hostname)): $state"
log="$HOME/embed2_logs/worker_$w.log"
if [ -f "$log" ]; then tail -n "$lines" "$log" | sed 's/^/  /'; else echo "  no log yet"; fi
EOF
}

tpu_logs_script() {  # follows the log until Ctrl-C (the job goes on)
  printf '%s\n' "$TPU_WORKER_ID"
  # shellcheck disable=SC2016
  printf '%s\n' 'tail -n "$lines" -F "$HOME/embed2_logs/worker_$w.log"'
}

tpu_stop_script() {  # SIGTERM: the job saves a checkpoint and exits (every worker agrees on the step)
  printf '%s\n' "$TPU_WORKER_ID"
  cat <<EOF
if ! { $TPU_RUNNING; }; then echo "worker \$w (\$(hostname)): not running"; exit 0; fi
EOF
  cat <<'EOF'
kill -TERM "$pid"
echo "worker $w ($(hostname)): SIGTERM sent to $pid; waiting up to ${wait_s}s for its checkpoint"
i=0
while kill -0 "$pid" 2>/dev/null && [ "$i" -lt "$wait_s" ]; do sleep 1; i=$((i + 1)); done
if kill -0 "$pid" 2>/dev/null; then
  kill -KILL "$pid"
  echo "worker $w ($(hostname)): still running after ${wait_s}s: killed (the last finished checkpoint is kept)"
else
  echo "worker $w ($(hostname)): stopped"
fi
EOF
}

prelude() {  # prelude NAME=VALUE... [-- ARGS...]: the workers' variables and "$@", shell-quoted
  local kv
  while (($#)) && [[ "$1" != "--" ]]; do
    kv=$1
    printf '%s=%q\n' "${kv%%=*}" "${kv#*=}"
    shift
  done
  if (($#)); then
    shift
    printf 'set --'
    printf ' %q' "$@"
    printf '\n'
  fi
}

tpu_ssh() {  # tpu_ssh WORKER SCRIPT: run SCRIPT on the worker(s) (all, or a number)
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE" "--worker=$1")
  if ((DRY_RUN)); then  # the script as a quoted here-document: readable, and the line runs as printed
    # shellcheck disable=SC2016  # the $( ) is printed, not run
    printf '%s--command="$(cat <<'"'"'WORKER_SCRIPT'"'"'\n%s\nWORKER_SCRIPT\n)"\n' "$(show "${cmd[@]}")" "$2"
  else
    "${cmd[@]}" "--command=$2"
  fi
}

tpu_start() {  # CONFIG WORKDIR [overrides...]
  local config=$1 workdir=$2
  shift 2
  check_config "$config"
  git -C "$ROOT" rev-parse --verify -q HEAD >/dev/null ||
    die "tpu mode ships the repository's tracked files (git archive HEAD): $ROOT is not a git checkout"
  # The workers run the config from the shipped tree: it must be a file of HEAD.
  local cfg=${config%%:*} args=${config#"${config%%:*}"} rel
  rel="$(cd "$(dirname "$cfg")" && pwd)/$(basename "$cfg")"
  [[ "$rel" == "$ROOT/"* ]] || die "config '$cfg' is outside the repository $ROOT: the workers get its files only"
  rel=${rel#"$ROOT/"}
  git -C "$ROOT" cat-file -e "HEAD:$rel" 2>/dev/null ||
    die "config '$cfg' is not committed in $ROOT: the workers get the files of HEAD (git archive); commit it"
  git -C "$ROOT" diff --quiet HEAD -- "$rel" ||
    warn "config '$cfg' has uncommitted changes: the workers run HEAD's version"
  [[ -z "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ]] ||
    warn "uncommitted changes in $ROOT are not shipped: the workers run HEAD ($(git -C "$ROOT" rev-parse --short HEAD))"
  local commit py=${TPU_PYTHON:-3.12} mirror="" mirror_s=${LOG_MIRROR_S:-60}
  commit=$(git -C "$ROOT" rev-parse HEAD)
  if ! [[ "$py" =~ ^3\.[0-9]+$ ]] || ((${py#3.} < 11)); then
    die "TPU_PYTHON must be 3.11 or newer (3.N), got '$py'"
  fi
  [[ "$mirror_s" =~ ^[0-9]+$ ]] || die "LOG_MIRROR_S must be a number of seconds (0 = off), got '$mirror_s'"
  if ((mirror_s > 0)) && { [[ "$workdir" == gs://* ]] || ! is_url "$workdir"; }; then
    mirror="${workdir%/}/logs"
  fi
  local tarball=${TMPDIR:-/tmp}/embed2_code_$$.tgz
  # Tracked files only, as committed: no virtualenv, build output or data lying in the checkout.
  run git -C "$ROOT" archive --format=tar.gz -o "$tarball" HEAD
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:embed2_code.tgz" "--zone=$ZONE" --worker=all
  ((DRY_RUN)) || rm -f "$tarball"
  tpu_ssh all "$(prelude "tpu=$TPU_NAME" "zone=$ZONE" "py=$py"; tpu_setup_script)"
  # The venv's Python, or python3 where TPU_SETUP installs the code its own way.
  local python="\$HOME/embed2_venv_$py/bin/python"
  [[ -z "${TPU_SETUP:-}" ]] || python=python3
  tpu_ssh all "$(prelude "tpu=$TPU_NAME" "zone=$ZONE" "commit=$commit" "mirror=$mirror" "mirror_s=$mirror_s" \
    -- -m embed2.main "--config=$rel$args" "--workdir=$workdir" "$@"; tpu_start_script "$python")"
  ((DRY_RUN)) || echo "started on every worker of $TPU_NAME; follow with: launch/run.sh tpu status|logs|stop $TPU_NAME $ZONE"
}

# --------------------------------------------------------------------------------------------- modes

(($# >= 1)) || usage
MODE=$1
shift

case "$MODE" in
  local)
    need 2 "$@"
    CONFIG=$1 WORKDIR=$2
    shift 2
    check_config "$CONFIG"
    cmd=("$PYTHON" -m embed2.main "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
    if ((DRY_RUN)); then show "${cmd[@]}"; else exec "${cmd[@]}"; fi
    ;;

  multiprocess)
    if [[ "${1:-}" == "stop" ]]; then
      MODE="multiprocess stop"
      shift
      need 1 "$@"
      pidfile=$(mp_logs "$1")/pids
      if ((DRY_RUN)); then
        echo "kill -TERM \$(cat $(printf '%q' "$pidfile"))"
        exit 0
      fi
      [[ -s "$pidfile" ]] || die "no $pidfile: no multiprocess job was started with this WORKDIR (or LOG_DIR)"
      # shellcheck disable=SC2046  # one pid a word
      kill -TERM $(cat "$pidfile") 2>/dev/null || true
      echo "SIGTERM sent to $(wc -w <"$pidfile") processes (each saves a checkpoint and exits)"
      exit 0
    fi
    need 3 "$@"
    N=$1 CONFIG=$2 WORKDIR=$3
    shift 3
    [[ "$N" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$N'"
    check_config "$CONFIG"
    PORT=${PORT:-12355}
    LOGS=$(mp_logs "$WORKDIR")
    xla_env=()
    if [[ -n "${DEVICES_PER_PROCESS:-}" ]]; then
      [[ "$DEVICES_PER_PROCESS" =~ ^[1-9][0-9]*$ ]] ||
        die "DEVICES_PER_PROCESS must be a positive integer, got '$DEVICES_PER_PROCESS'"
      # XLA keeps a flag's last occurrence, so an inherited device count would win over ours if it
      # stayed: drop it, keep the other inherited flags, and put ours last.
      flags=$(without_device_count "${XLA_FLAGS:-}")
      xla_env=(env "XLA_FLAGS=${flags:+$flags }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
    fi
    ((DRY_RUN)) || mkdir -p "$LOGS"
    pids=()
    for ((i = 0; i < N; i++)); do
      cmd=("${xla_env[@]+"${xla_env[@]}"}" "$PYTHON" -m embed2.main "--config=$CONFIG"
        "--workdir=$WORKDIR" "--coordinator=127.0.0.1:$PORT" "--num_processes=$N" "--process_id=$i"
        "$@")
      log=$LOGS/process_$i.log
      if ((DRY_RUN)); then
        printf '%s>%q 2>&1 &\n' "$(show "${cmd[@]}")" "$log"
        continue
      fi
      if ((i == 0)); then  # process 0 also on the terminal: its progress, evaluations and tables
        "${cmd[@]}" > >(tee "$log") 2>&1 &
      else
        "${cmd[@]}" >"$log" 2>&1 &
      fi
      pids+=("$!")
    done
    ((DRY_RUN)) && exit 0
    echo "${pids[*]}" >"$LOGS/pids"
    echo "$N processes, logs in $LOGS/process_*.log; stop: Ctrl-C or launch/run.sh multiprocess stop $WORKDIR" >&2
    # Ctrl-C / SIGTERM: every process saves a checkpoint and exits (they agree on the step).
    trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
    status=0
    for pid in "${pids[@]}"; do
      while true; do
        wait "$pid" && break
        rc=$?
        kill -0 "$pid" 2>/dev/null && continue  # wait was interrupted by the trap: the process lives on
        status=1
        echo "launch/run.sh: a process exited with status $rc; stopping the others (logs: $LOGS)" >&2
        # One process failed: the others would wait for it forever.
        kill "${pids[@]}" 2>/dev/null || true
        break
      done
    done
    rm -f "$LOGS/pids"
    exit "$status"
    ;;

  tpu)
    SUB=start
    case "${1:-}" in status | logs | stop | ssh | start) SUB=$1 && shift ;; esac
    MODE="tpu $SUB"
    if [[ "$SUB" == "start" ]]; then need 4 "$@"; else need 2 "$@"; fi
    TPU_NAME=$1 ZONE=$2
    shift 2
    LINES_SHOWN=${LOG_LINES:-$([[ "$SUB" == logs ]] && echo 200 || echo 5)}
    [[ "$LINES_SHOWN" =~ ^[0-9]+$ ]] || die "LOG_LINES must be a number, got '$LINES_SHOWN'"
    WORKER=${1:-0}
    if [[ "$SUB" == logs || "$SUB" == ssh ]]; then
      [[ "$WORKER" =~ ^[0-9]+$ ]] || die "WORKER must be a worker number (0, 1, ...), got '$WORKER'"
    fi
    case "$SUB" in
      start) tpu_start "$@" ;;
      status) tpu_ssh all "$(prelude "lines=$LINES_SHOWN"; tpu_status_script)" ;;
      logs) tpu_ssh "$WORKER" "$(prelude "lines=$LINES_SHOWN"; tpu_logs_script)" ;;
      stop)
        WAIT_S=${STOP_WAIT_S:-300}
        [[ "$WAIT_S" =~ ^[0-9]+$ ]] || die "STOP_WAIT_S must be a number of seconds, got '$WAIT_S'"
        tpu_ssh all "$(prelude "wait_s=$WAIT_S"; tpu_stop_script)"
        ;;
      ssh) run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE" "--worker=$WORKER" ;;
    esac
    ;;

  slurm)
    if [[ "${1:-}" == "stop" ]]; then
      MODE="slurm stop"
      shift
      need 1 "$@"
      idfile=$1/slurm_job_id
      if ((DRY_RUN)); then
        echo "scancel --signal=TERM \$(cat $(printf '%q' "$idfile"))"
        exit 0
      fi
      [[ -s "$idfile" ]] || die "no $idfile: no job was submitted with this WORKDIR"
      # TERM to every task: each saves a checkpoint and exits (they agree on the step).
      scancel --signal=TERM "$(cat "$idfile")"
      exit 0
    fi
    need 3 "$@"
    NODES=$1 CONFIG=$2 WORKDIR=$3
    shift 3
    [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "NODES must be a positive integer, got '$NODES'"
    check_config "$CONFIG"
    job=$(printf '%q ' "$PYTHON" -m embed2.main "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
    script=$(cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=embed2
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=${SLURM_GPUS_PER_NODE:-8}
#SBATCH --output=$WORKDIR/logs/slurm-%j.out
${SLURM_EXTRA:-}
set -euo pipefail
cd $(printf '%q' "$(pwd)")
# One process per node, each with its own log; jax.distributed finds the coordinator from SLURM's
# environment. Stop: launch/run.sh slurm stop $WORKDIR
srun --output=$WORKDIR/logs/%j_process_%t.log $job
EOF
)
    if ((DRY_RUN)); then
      echo "$script"
    else
      mkdir -p "$WORKDIR/logs"
      path="$WORKDIR/embed2.sbatch"
      echo "$script" >"$path"
      id=$(sbatch --parsable "$path")
      echo "${id%%;*}" >"$WORKDIR/slurm_job_id"
      echo "submitted job ${id%%;*}; logs in $WORKDIR/logs; stop: launch/run.sh slurm stop $WORKDIR"
    fi
    ;;

  sweep)
    need 2 "$@"
    CONFIG=$1 WORKDIR=$2
    shift 2
    check_config "$CONFIG"
    # One line per member: NAME<TAB>OVERRIDE<TAB>OVERRIDE...
    members=$("$PYTHON" -m embed2.sweep "--config=$CONFIG")
    while IFS=$'\t' read -r -a fields; do
      name=${fields[0]}
      overrides=("${fields[@]:1}")
      cmd=("$PYTHON" -m embed2.main "--config=$CONFIG" "--workdir=$WORKDIR/$name"
        "${overrides[@]+"${overrides[@]}"}" "$@")
      if ((DRY_RUN)); then show "${cmd[@]}"; else "${cmd[@]}"; fi
    done <<<"$members"
    ;;

  -h | --help | help)
    usage
    ;;

  *)
    die "unknown mode '$MODE'"
    ;;
esac
