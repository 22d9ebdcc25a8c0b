# shellcheck shell=bash
# Shared by multinode.sbatch and single_node.sbatch (sourced, not run): the environment, one `vlmtune launch`
# per node, and preemption (a signal becomes a checkpoint, exit 75, then a requeue that resumes).
#
# Knobs (environment variables, set before sbatch; sbatch passes the environment on):
#   VLMTUNE_VENV            virtual environment to activate (default: .venv of this checkout)
#   VLMTUNE_PROCS_PER_NODE  processes per node (default: the GPUs Slurm gave the node, else all GPUs, else 1)
#   VLMTUNE_MAIN_PORT       rendezvous port on the first node (default: 20000 + job id % 20000)

# The software environment of every node. Edit here for your cluster, e.g. `module load cuda/12.4` or
# `conda activate vlmtune` instead of the virtual environment.
vlmtune_activate() {
  local venv=${VLMTUNE_VENV:-$VLMTUNE_HOME/.venv}
  if [ -f "$venv/bin/activate" ]; then
    # shellcheck source=/dev/null
    . "$venv/bin/activate"
  fi
  if ! command -v vlmtune >/dev/null; then
    echo "vlmtune is not on PATH: set VLMTUNE_VENV or edit vlmtune_activate in ${BASH_SOURCE[0]}" >&2
    exit 2
  fi
}

vlmtune_procs_per_node() {
  local gpus
  if [ -n "${VLMTUNE_PROCS_PER_NODE:-}" ]; then
    echo "$VLMTUNE_PROCS_PER_NODE"
  elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') && [ "$gpus" -gt 0 ]; then
    echo "$gpus"
  else
    echo 1 # a CPU node
  fi
}

# Runs in the job step on every node: this node's launcher, which starts the node's worker processes.
vlmtune_node_launch() {
  exec vlmtune launch "$@" --nodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" --main-ip "$VLMTUNE_MAIN_IP" \
    --main-port "$VLMTUNE_MAIN_PORT" --procs-per-node "$(vlmtune_procs_per_node)"
}

# Slurm signals only the batch shell (--signal=B:USR1@..., scancel --batch). srun relays SIGUSR1 to its tasks,
# and each `vlmtune launch` turns it into a STOP file: all ranks checkpoint at the next step and exit 75. srun
# answers SIGTERM by killing the step at once, so a SIGTERM goes on as SIGUSR1 too.
vlmtune_forward() {
  echo "vlmtune: $(date -Is) SIG$1, asking the run to checkpoint and stop"
  VLMTUNE_SIGNALLED=1
  kill -USR1 "$VLMTUNE_STEP" 2>/dev/null || true
}

# The body of a batch script: RECIPE [key=value ...]. Exits with the run's exit code.
vlmtune_slurm_main() {
  if [ $# -lt 1 ]; then
    echo "usage: sbatch [--nodes N] SCRIPT RECIPE [key=value ...]" >&2
    exit 2
  fi
  vlmtune_activate
  VLMTUNE_MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  # From the job id: jobs sharing a node do not collide, and a requeued job (same id) reuses its port.
  VLMTUNE_MAIN_PORT=${VLMTUNE_MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  export VLMTUNE_MAIN_IP VLMTUNE_MAIN_PORT
  echo "vlmtune: $(date -Is) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s)" \
    "$SLURM_JOB_NODELIST, rendezvous $VLMTUNE_MAIN_IP:$VLMTUNE_MAIN_PORT"

  # One task per node with all the node's CPUs (a step gets one CPU per task unless asked).
  # shellcheck disable=SC2016 # the task's own shell expands $0 and $@
  srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
    bash -c '. "$0" && vlmtune_node_launch "$@"' "${BASH_SOURCE[0]}" "$@" &
  VLMTUNE_STEP=$!
  trap 'vlmtune_forward USR1' USR1
  trap 'vlmtune_forward TERM' TERM
  local rc
  while :; do
    VLMTUNE_SIGNALLED=0
    wait "$VLMTUNE_STEP" && rc=0 || rc=$?
    [ "$VLMTUNE_SIGNALLED" = 1 ] || break # else a trapped signal cut `wait` short while the step runs on
  done
  trap - USR1 TERM

  if [ "$rc" -eq 75 ]; then
    echo "vlmtune: stopped after a checkpoint (exit 75); requeueing job $SLURM_JOB_ID, which resumes by itself"
    scontrol requeue "$SLURM_JOB_ID" || echo "vlmtune: requeue failed; submit the job again to resume" >&2
  fi
  echo "vlmtune: $(date -Is) step exited with $rc"
  exit "$rc"
}
