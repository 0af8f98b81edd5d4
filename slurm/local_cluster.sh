#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to run slurm/runjob_SLURM.sh for real (tests/slurm, .ci/run).
#
#   slurm/local_cluster.sh up [DIR]   install Debian's slurmctld/slurmd/slurm-client if missing, write DIR/slurm.conf
#                                     (DIR defaults to a new temporary directory), start slurmctld and
#                                     `slurmd -N localhost`, wait until the node is idle; the last line printed is
#                                     SLURM_CONF=DIR/slurm.conf — export it for every SLURM command.
#   slurm/local_cluster.sh down DIR   cancel its jobs, `scontrol shutdown`, wait for both daemons to exit, remove DIR.
#
# No munge: AuthType=auth/none with CredType=cred/none is enough for one node. Daemons run as root, state, spool,
# pid and log files all live in DIR, and the two ports are picked free so the cluster never collides with another.
# Exit code 77 means SLURM cannot be started on this machine at all (not root, or the packages cannot be installed).
set -euo pipefail

CANNOT_START=77
WAIT_SECONDS=${SD3_SLURM_WAIT_SECONDS:-60}
MARKER="# written by sd3 slurm/local_cluster.sh"

die() { echo "local_cluster: $*" >&2; exit 1; }

ensure_can_run() {
    if [ "$(id -u)" != 0 ]; then
        echo "local_cluster: cannot start SLURM: its daemons run as root here (SlurmUser=root) and this is uid $(id -u)" >&2
        exit $CANNOT_START
    fi
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
        return
    fi
    echo "local_cluster: installing slurmctld slurmd slurm-client (Debian packages)" >&2
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            slurmctld slurmd slurm-client; } >&2; then
        echo "local_cluster: cannot start SLURM: apt-get could not install slurmctld slurmd slurm-client" >&2
        exit $CANNOT_START
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
    local dir=$1 cpus mem_mb
    cpus=$(nproc)
    # A little under the real total: slurmd drains a node whose RealMemory is above what it finds.
    mem_mb=$(awk '/MemTotal/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
    mkdir -p "$dir/state" "$dir/spool"
    cat >"$dir/slurm.conf" <<EOF
$MARKER
ClusterName=sd3test
SlurmctldHost=localhost
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

show_logs() {
    local dir=$1 log
    for log in "$dir/slurmctld.log" "$dir/slurmd.log"; do
        [ -f "$log" ] && { echo "---- $log (last 40 lines)"; tail -n 40 "$log"; } >&2
    done
    return 0
}

up() {
    local dir=${1:-}
    if [ -z "$dir" ]; then
        dir=$(mktemp -d -t sd3-slurm.XXXXXX)
    fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    ensure_can_run
    write_conf "$dir"
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -c || { show_logs "$dir"; die "slurmctld did not start (logs above)"; }
    slurmd -N localhost || { show_logs "$dir"; down "$dir"; die "slurmd did not start (logs above)"; }
    local waited=0 state=""
    while [ "$waited" -lt "$WAIT_SECONDS" ]; do
        state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
        [ "$state" = idle ] && { echo "SLURM_CONF=$SLURM_CONF"; return 0; }
        sleep 1
        waited=$((waited + 1))
    done
    show_logs "$dir"
    down "$dir"
    die "node 'localhost' not idle after ${WAIT_SECONDS}s (sinfo state: '${state:-none}'; logs above)"
}

# Wait (bounded) for the daemon whose pid file is $1 to exit, then make sure it has.
stop_daemon() {
    local pidfile=$1 pid waited=0
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 30 ]; do
        sleep 1
        waited=$((waited + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "local_cluster: $(basename "$pidfile" .pid) (pid $pid) still running after scontrol shutdown; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
}

down() {
    local dir=${1:?usage: local_cluster.sh down DIR}
    dir=$(cd "$dir" && pwd)
    grep -qxF "$MARKER" "$dir/slurm.conf" 2>/dev/null || die "$dir/slurm.conf was not written by this script; not touching it"
    export SLURM_CONF="$dir/slurm.conf"
    # Jobs would outlive the daemons (slurmstepd keeps running): cancel them first and give them a moment.
    scancel --quiet --partition=debug 2>/dev/null || true
    local waited=0
    while [ -n "$(squeue -h -o %i 2>/dev/null)" ] && [ "$waited" -lt 30 ]; do
        sleep 1
        waited=$((waited + 1))
    done
    scontrol shutdown >/dev/null 2>&1 || true
    stop_daemon "$dir/slurmctld.pid"
    stop_daemon "$dir/slurmd.pid"
    rm -rf "$dir"
}

case "${1:-}" in
    up) up "${2:-}" ;;
    down) down "${2:-}" ;;
    *) echo "usage: $0 up [DIR] | down DIR" >&2; exit 2 ;;
esac
