#!/usr/bin/env bash
# Train sd3 on SLURM: one torchrun per node, started by srun, meeting at the first node (c10d rendezvous).
#
#   sbatch slurm/runjob_SLURM.sh [--section.key=value ...]           (submit from the directory the preset's
#   SD3_CONFIG=sd3-1b-512 sbatch slurm/runjob_SLURM.sh --train.lr=5e-5  relative data/ and runs/ paths refer to)
#
# Nodes and GPUs per node come from the #SBATCH lines below (or sbatch's command line, which wins). Everything
# else a user changes is an environment variable read once in the block after the #SBATCH lines. The run always
# resumes from `<save_dir>/latest` when there is one, so a requeued or resubmitted job continues where it stopped.
#
# Pre-emption: SLURM sends SIGUSR1 to this batch shell 90 s before the time limit (`B:`; without it only the step's
# tasks would get it). The trap forwards it to the training step, whose ranks agree on a step, write that checkpoint
# and exit 0; then the job requeues itself and, when it runs again, resumes from that checkpoint.
#SBATCH --job-name=sd3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@90
#SBATCH --requeue
set -uo pipefail

# ---- knobs (environment variables; sbatch passes the submitting shell's environment to the job) ----
CONFIG=${SD3_CONFIG:-sd3-1b-256}              # preset name in sd3/configs or a path to a .toml file
NNODES=${SLURM_JOB_NUM_NODES:?run this script with sbatch}
NPROC=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}   # processes per node: one per GPU (loader ranks included)
PORT=${SD3_RDZV_PORT:-$((29500 + SLURM_JOB_ID % 10000))}
SHUTDOWN_TIMEOUT=${SD3_SHUTDOWN_TIMEOUT:-300}   # seconds torchrun waits for ranks to checkpoint and exit after a signal
if [ -n "${SD3_VENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$SD3_VENV/bin/activate"
fi
PYTHON=${SD3_PYTHON:-python3}

# ---- NCCL: every network setting in one place; a value already in the environment wins ----
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead rank ends the job, not a hang
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Set NCCL_SOCKET_IFNAME (e.g. ib0) and NCCL_IB_HCA before sbatch when your nodes need them; they pass through.

# torchrun must pass SIGUSR1 on to its ranks instead of dying of it (newer torchrun reads PET_*, older TORCHELASTIC_*),
# and give them time to write their checkpoint before it kills them.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCHELASTIC_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT

if [ -z "$NPROC" ]; then
    echo "runjob_SLURM: no GPUs allocated: request them (--gres=gpu:N) or set NPROC_PER_NODE" >&2
    exit 2
fi

log() { echo "[runjob_SLURM $(date -u +%H:%M:%S)] $*"; }

preempted=0
step_pid=""
on_usr1() {
    preempted=1
    log "SIGUSR1: asking the training step to checkpoint and stop"
    if [ -n "$step_pid" ]; then
        # srun forwards the signals it receives to its tasks (the torchruns), which pass them to their ranks.
        kill -USR1 "$step_pid" 2>/dev/null
    fi
}
trap on_usr1 USR1

requeue() {
    log "$1; requeueing job $SLURM_JOB_ID to resume from the latest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address | awk '{ print $1 }')
# torchrun on the head node hosts the rendezvous only if this address is one its own hostname resolves to, so it
# must be that one; but other nodes cannot reach a loopback address (Debian maps a host's name to 127.0.1.1).
if [ -z "$head_ip" ] || { [ "$NNODES" -gt 1 ] && [[ "$head_ip" == 127.* ]]; }; then
    echo "runjob_SLURM: head node '$head_node' resolves its own name to '$head_ip', which other nodes cannot reach;" \
        "map its hostname to a routable address (/etc/hosts or DNS)" >&2
    exit 1
fi
[ "$preempted" = 1 ] && requeue "SIGUSR1 before training started"
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $NPROC process(es), head $head_node ($head_ip:$PORT), config $CONFIG"

# In the background so the trap runs as soon as the signal arrives (bash defers traps until a foreground child exits).
srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" --kill-on-bad-exit=1 \
    "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc_per_node "$NPROC" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head_ip:$PORT" \
    -m sd3 train --config "$CONFIG" --train.resume=auto "$@" &
step_pid=$!

# `wait` returns early when a trapped signal arrives; keep waiting until the step itself has exited.
while true; do
    wait "$step_pid"
    status=$?
    kill -0 "$step_pid" 2>/dev/null || break
done

# torchrun exits non-zero after forwarding a signal even when every rank checkpointed and exited 0.
[ "$preempted" = 1 ] && requeue "training step exited ($status) after SIGUSR1"
log "training step exited with status $status"
exit "$status"
