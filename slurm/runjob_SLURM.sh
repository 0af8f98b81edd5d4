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
# A new stage (e.g. 512 px from the 256 px run) starts from another run's weights and EMA with train.init_from:
#   sbatch slurm/runjob_SLURM.sh --train.init_from=runs/sd3-1b-256 --train.save_dir=runs/sd3-1b-512
#   SD3_INIT_FROM=runs/sd3-1b-256 sbatch slurm/runjob_SLURM.sh --train.save_dir=runs/sd3-1b-512
# init_from is used only while the new save_dir has no checkpoint of its own; after a requeue the job resumes its
# own. --train.resume=PATH is refused: every requeue would go back to PATH's weights at step 0.
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

# The script passes --train.resume=auto so that a requeued job continues its own save_dir. A user's resume=PATH would
# come after it and win: each requeue would restart from PATH. Refuse before anything is allocated or started.
for arg in "$@"; do
    case "$arg" in --train.resume=auto|train.resume=auto) ;; --train.resume=*|train.resume=*)
        echo "runjob_SLURM: $arg: this script always resumes its own save_dir (--train.resume=auto), and on every" \
            "requeue resume=PATH would restart from PATH; start a new stage with --train.init_from=${arg#*=} instead" >&2
        exit 2 ;;
    esac
done

# ---- knobs (environment variables; sbatch passes the submitting shell's environment to the job) ----
CONFIG=${SD3_CONFIG:-sd3-1b-256}              # preset name in sd3/configs or a path to a .toml file
INIT_FROM=${SD3_INIT_FROM:-}                  # a new stage from this run's checkpoint (train.init_from); "" = none
NNODES=${SLURM_JOB_NUM_NODES:?run this script with sbatch}
NPROC=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}   # processes per node: one per GPU (loader ranks included)
# Rendezvous port: below Linux's ephemeral range (32768+, where outgoing connections take their local ports), so
# another process cannot already hold it by chance; spread by job id so jobs sharing a head node do not collide.
PORT=${SD3_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
# Seconds torchrun waits for ranks to checkpoint and exit after a signal; must end before SLURM's kill, which
# comes 90 s after the --signal=B:USR1@90 notice below.
SHUTDOWN_TIMEOUT=${SD3_SHUTDOWN_TIMEOUT:-75}
# How the head node's address is found: scontrol (the NodeAddr SLURM itself uses to reach it), hostname-I (its
# first address, or the one on SD3_IFNAME), or hostname (what its name resolves to). SD3_HEAD_ADDR sets it outright.
HEAD_ADDR_FROM=${SD3_HEAD_ADDR_FROM:-scontrol}
# SD3_IFNAME (e.g. ib0, eth1): the interface for the rendezvous address and, unless already set, for NCCL and gloo.
IFNAME=${SD3_IFNAME:-}
if [ -n "${SD3_VENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$SD3_VENV/bin/activate"
fi
PYTHON=${SD3_PYTHON:-python3}

# ---- NCCL: every network setting in one place; a value already in the environment wins ----
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead rank ends the job, not a hang
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# NCCL's and gloo's bootstrap sockets pick an interface by themselves and may pick one other nodes cannot reach.
# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (and NCCL_IB_HCA) set before sbatch pass through; SD3_IFNAME sets both.
if [ -n "$IFNAME" ]; then
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$IFNAME}
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$IFNAME}
fi

# torchrun must pass SIGUSR1 on to its ranks instead of dying of it (newer torchrun reads PET_*, older TORCHELASTIC_*),
# and give them time to write their checkpoint before it kills them.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCHELASTIC_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT

if [ -z "$NPROC" ]; then
    echo "runjob_SLURM: no GPUs allocated: request them (--gres=gpu:N) or set NPROC_PER_NODE" >&2
    exit 2
fi
if ! [[ "$PORT" =~ ^[0-9]+$ ]] || [ "$PORT" -lt 1024 ] || [ "$PORT" -ge 32768 ]; then
    echo "runjob_SLURM: SD3_RDZV_PORT=$PORT: use a port in 1024..32767 (32768 and up is the ephemeral range)" >&2
    exit 2
fi
case "$HEAD_ADDR_FROM" in scontrol|hostname-I|hostname) ;; *)
    echo "runjob_SLURM: SD3_HEAD_ADDR_FROM=$HEAD_ADDR_FROM: use scontrol, hostname-I or hostname" >&2
    exit 2 ;;
esac
if [ "$SHUTDOWN_TIMEOUT" -ge 90 ]; then
    echo "runjob_SLURM: warning: SD3_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT s is not below the 90 s between SLURM's" \
        "USR1 notice and its kill: a checkpoint still being written then is lost" >&2
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
on_head() { srun --nodes=1 --ntasks=1 -w "$head_node" "$@"; }
if [ -n "${SD3_HEAD_ADDR:-}" ]; then
    head_ip=$SD3_HEAD_ADDR
elif [ -n "$IFNAME" ]; then
    head_ip=$(on_head ip -4 -o addr show dev "$IFNAME" | awk '{ sub("/.*", "", $4); print $4; exit }')
elif [ "$HEAD_ADDR_FROM" = scontrol ]; then
    head_ip=$(scontrol show node "$head_node" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n1)
elif [ "$HEAD_ADDR_FROM" = hostname-I ]; then
    head_ip=$(on_head hostname -I | awk '{ print $1 }')
else
    head_ip=$(on_head hostname --ip-address | awk '{ print $1 }')
fi
# torchrun on the head node hosts the rendezvous only if this address is one its own hostname resolves to, so it
# must be that one; but other nodes cannot reach a loopback address (Debian maps a host's name to 127.0.1.1).
if [ -z "$head_ip" ] || { [ "$NNODES" -gt 1 ] && [[ "$head_ip" == 127.* ]]; }; then
    echo "runjob_SLURM: head node '$head_node' resolves its own name to '$head_ip', which other nodes cannot reach;" \
        "map its hostname to a routable address (/etc/hosts or DNS)" >&2
    exit 1
fi
[ "$preempted" = 1 ] && requeue "SIGUSR1 before training started"
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $NPROC process(es), head $head_node ($head_ip:$PORT), config $CONFIG"

# CPUs per task (one task per node): SLURM_CPUS_ON_NODE is the batch node's count only, and nodes may differ, so
# take the smallest of the allocation's per-node counts (SLURM_JOB_CPUS_PER_NODE, e.g. "96(x2),64") and say so.
cpus=$(echo "${SLURM_JOB_CPUS_PER_NODE:-$SLURM_CPUS_ON_NODE}" | tr ',' '\n' | sed 's/(x[0-9]*)//' | sort -n | head -n1)
if [ "$(echo "${SLURM_JOB_CPUS_PER_NODE:-}" | tr ',' '\n' | sed 's/(x[0-9]*)//' | sort -u | wc -l)" -gt 1 ]; then
    log "nodes have different CPU counts ($SLURM_JOB_CPUS_PER_NODE): every node's torchrun gets $cpus"
fi
# `--no-python ... sd3 train`: the installed console script, not `-m sd3`, which would put the working directory
# first on sys.path and import a checkout named sd3/ there instead of the installed package.
SD3=${SD3_ENTRY:-$(dirname "$(command -v "$PYTHON")")/sd3}
# In the background so the trap runs as soon as the signal arrives (bash defers traps until a foreground child exits).
srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$cpus" --kill-on-bad-exit=1 \
    "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc_per_node "$NPROC" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head_ip:$PORT" \
    --no-python "$SD3" train --config "$CONFIG" --train.resume=auto ${INIT_FROM:+"--train.init_from=$INIT_FROM"} "$@" &
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
