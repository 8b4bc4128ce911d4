#!/usr/bin/env bash
# Start embed2 jobs: on this machine, as several processes here, on a TPU pod, on SLURM, or a sweep.
#
#   launch/run.sh local CONFIG WORKDIR [overrides...]
#   launch/run.sh multiprocess N CONFIG WORKDIR [overrides...]
#   launch/run.sh tpu TPU_NAME ZONE CONFIG WORKDIR [overrides...]
#   launch/run.sh slurm NODES CONFIG WORKDIR [overrides...]
#   launch/run.sh sweep CONFIG WORKDIR
#
# Overrides are passed to the job as they are: --config.seed=1 "--config.stages[1].steps=500".
# --dry-run (anywhere) prints the commands (tpu) or the sbatch script (slurm) instead of running them.
# Environment: PYTHON (default python3), PORT (multiprocess coordinator port, default 12355),
#   DEVICES_PER_PROCESS (multiprocess on CPU: simulated devices per process; replaces any device
#   count in an inherited XLA_FLAGS, whose other flags are kept),
#   TPU_SETUP (tpu: the install command run on every worker), SLURM_GPUS_PER_NODE, SLURM_EXTRA (slurm).
set -euo pipefail

PYTHON=${PYTHON:-python3}
DRY_RUN=0
ARGS=()
for a in "$@"; do
  if [[ "$a" == "--dry-run" ]]; then DRY_RUN=1; else ARGS+=("$a"); fi
done
set -- "${ARGS[@]+"${ARGS[@]}"}"

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

die() {
  echo "launch/run.sh: $*" >&2
  echo >&2
  usage
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

without_device_count() {  # XLA flags ($1) less every --xla_force_host_platform_device_count, trimmed
  local flags=$1 re='(^|[[:space:]])--xla_force_host_platform_device_count(=[^[:space:]]*)?([[:space:]]|$)'
  while [[ "$flags" =~ $re ]]; do
    flags=${flags/"${BASH_REMATCH[0]}"/ }
  done
  flags=${flags#"${flags%%[![:space:]]*}"}
  printf '%s' "${flags%"${flags##*[![:space:]]}"}"
}

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
    need 3 "$@"
    N=$1 CONFIG=$2 WORKDIR=$3
    shift 3
    [[ "$N" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$N'"
    check_config "$CONFIG"
    PORT=${PORT:-12355}
    xla_env=()
    if [[ -n "${DEVICES_PER_PROCESS:-}" ]]; then
      [[ "$DEVICES_PER_PROCESS" =~ ^[1-9][0-9]*$ ]] ||
        die "DEVICES_PER_PROCESS must be a positive integer, got '$DEVICES_PER_PROCESS'"
      # XLA keeps a flag's last occurrence, so an inherited device count would win over ours if it
      # stayed: drop it, keep the other inherited flags, and put ours last.
      flags=$(without_device_count "${XLA_FLAGS:-}")
      xla_env=(env "XLA_FLAGS=${flags:+$flags }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
    fi
    pids=()
    for ((i = 0; i < N; i++)); do
      cmd=("${xla_env[@]+"${xla_env[@]}"}" "$PYTHON" -m embed2.main "--config=$CONFIG"
        "--workdir=$WORKDIR" "--coordinator=127.0.0.1:$PORT" "--num_processes=$N" "--process_id=$i"
        "$@")
      if ((DRY_RUN)); then
        show "${cmd[@]}"
        continue
      fi
      "${cmd[@]}" &
      pids+=("$!")
    done
    ((DRY_RUN)) && exit 0
    status=0
    for pid in "${pids[@]}"; do
      if ! wait "$pid"; then
        status=1
        # One process failed: the others would wait for it forever.
        kill "${pids[@]}" 2>/dev/null || true
      fi
    done
    exit "$status"
    ;;

  tpu)
    need 4 "$@"
    TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
    shift 4
    check_config "$CONFIG"
    ROOT=$(cd "$(dirname "$0")/.." && pwd)
    TARBALL=${TMPDIR:-/tmp}/embed2_code.tgz
    SETUP=${TPU_SETUP:-"pip install -q -U 'jax[tpu]' && pip install -q -e ~/embed2"}
    job=$(printf '%q ' python3 -m embed2.main "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
    cmds=(
      "tar -czf $(printf '%q' "$TARBALL") -C $(printf '%q' "$ROOT") --exclude=.git --exclude=__pycache__ ."
      "gcloud compute tpus tpu-vm scp $(printf '%q' "$TARBALL") $(printf '%q' "$TPU_NAME"):~/embed2_code.tgz --zone=$(printf '%q' "$ZONE") --worker=all"
      "gcloud compute tpus tpu-vm ssh $(printf '%q' "$TPU_NAME") --zone=$(printf '%q' "$ZONE") --worker=all --command=$(printf '%q' "mkdir -p ~/embed2 && tar -xzf ~/embed2_code.tgz -C ~/embed2 && $SETUP")"
      "gcloud compute tpus tpu-vm ssh $(printf '%q' "$TPU_NAME") --zone=$(printf '%q' "$ZONE") --worker=all --command=$(printf '%q' "cd ~/embed2 && $job")"
    )
    for c in "${cmds[@]}"; do
      if ((DRY_RUN)); then echo "$c"; else bash -c "$c"; fi
    done
    ;;

  slurm)
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
#SBATCH --output=$WORKDIR/slurm-%j.out
${SLURM_EXTRA:-}
set -euo pipefail
cd $(printf '%q' "$(pwd)")
# One process per node; jax.distributed finds the coordinator from SLURM's environment.
srun $job
EOF
)
    if ((DRY_RUN)); then
      echo "$script"
    else
      mkdir -p "$WORKDIR"
      path="$WORKDIR/embed2.sbatch"
      echo "$script" >"$path"
      sbatch "$path"
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
