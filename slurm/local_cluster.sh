#!/usr/bin/env bash
# A SLURM cluster on this machine, to run slurm/runjob_SLURM.sh for real (tests/slurm, .ci/run): one node, or several
# nodes that are network namespaces of this machine, each with its own address and hostname.
#
#   slurm/local_cluster.sh up [--nodes N] [DIR]
#       install Debian's slurmctld/slurmd/slurm-client if missing, write DIR/slurm.conf (DIR defaults to a new
#       temporary directory), start slurmctld and the slurmd(s), wait until every node is idle. The last line printed
#       is SLURM_CONF=DIR/slurm.conf — export it for every SLURM command. With N >= 2 the line before it is
#       SLURM_NETNS=NAME: run every SLURM client command inside that network namespace, where the controller listens
#       (`nsenter --net=/run/netns/NAME sbatch ...`).
#   slurm/local_cluster.sh down DIR   cancel its jobs, `scontrol shutdown`, wait for the daemons to exit, remove the
#                                     namespaces and DIR.
#
# One node: slurmctld and `slurmd -N localhost` on 127.0.0.1, ports picked free so the cluster never collides with
# another. N nodes: Debian builds slurmd without --enable-multiple-slurmd, so two slurmd cannot share one network
# stack. Instead node k is a network namespace (`ip netns`) with address 10.213.7.k, linked to a bridge in node 1's
# namespace; each daemon runs under `unshare --uts` with hostname nK, as on a real cluster, and node 1 also runs the
# controller. The namespaces reach nothing but each other. Every node's link is named sd3link, so
# GLOO_SOCKET_IFNAME=sd3link (or NCCL_SOCKET_IFNAME) selects it. `nsenter --net`, not `ip netns exec`: the latter
# mounts a fresh /sys without the cgroup hierarchy, and slurmd does not start without it.
#
# No munge: AuthType=auth/none with CredType=cred/none. Daemons run as root; state, spool, pid and log files all live
# in DIR. Exit code 77 means SLURM cannot be started on this machine at all (not root, the packages cannot be
# installed, or — for N >= 2 — network namespaces cannot be made).
set -euo pipefail

CANNOT_START=77
WAIT_SECONDS=${SD3_SLURM_WAIT_SECONDS:-60}
MARKER="# written by sd3 slurm/local_cluster.sh"
SUBNET=10.213.7  # node k is $SUBNET.k, inside namespaces only this script makes

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

nodes_of() { cat "$1/nodes" 2>/dev/null || echo 1; }

netns_prefix() {  # one prefix per cluster directory, so clusters in other directories never share a namespace
    echo "sd3-$(echo "$1" | md5sum | cut -c1-8)"
}

write_conf() {
    local dir=$1 nodes=$2 cpus mem_mb host ctld_port slurmd_port node_names k suffix=""
    local nodelines=""
    cpus=$(nproc)
    # A little under the real total: slurmd drains a node whose RealMemory is above what it finds.
    mem_mb=$(awk '/MemTotal/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
    mkdir -p "$dir/state" "$dir/spool"
    if [ "$nodes" = 1 ]; then
        host=localhost ctld_port=$(free_port) slurmd_port=$(free_port) node_names=localhost
        nodelines="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    else
        # Each namespace has its own ports, so the default ones are free; every node claims all cores (the tests'
        # ranks are small) and an equal part of the memory. Per-node spool, pid and log files (%n: the node name).
        host="n1($SUBNET.1)" ctld_port=6817 slurmd_port=6818 node_names="n[1-$nodes]" suffix="-%n"
        for k in $(seq 1 "$nodes"); do
            mkdir -p "$dir/spool-n$k"
            nodelines+="NodeName=n$k NodeAddr=$SUBNET.$k CPUs=$cpus RealMemory=$((mem_mb / nodes)) State=UNKNOWN"$'\n'
        done
    fi
    cat >"$dir/slurm.conf" <<EOF
$MARKER
ClusterName=sd3test
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
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
SlurmdSpoolDir=$dir/spool$suffix
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd$suffix.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd$suffix.log
SlurmctldDebug=info
SlurmdDebug=info
$nodelines
PartitionName=debug Nodes=$node_names Default=YES MaxTime=INFINITE State=UP
EOF
    echo "$nodes" >"$dir/nodes"
    { echo "127.0.0.1 localhost"; for k in $(seq 1 "$nodes"); do echo "$SUBNET.$k n$k"; done; } >"$dir/hosts"
}

# The namespaces of an N-node cluster: node 1 holds a bridge named sd3link with address $SUBNET.1; node k >= 2 has a
# veth named sd3link with address $SUBNET.k whose peer is a port of that bridge.
make_namespaces() {
    local prefix=$1 nodes=$2 k
    for k in $(seq 1 "$nodes"); do
        ip netns add "$prefix-n$k"
        ip -n "$prefix-n$k" link set lo up
    done
    ip -n "$prefix-n1" link add sd3link type bridge
    ip -n "$prefix-n1" addr add "$SUBNET.1/24" dev sd3link
    ip -n "$prefix-n1" link set sd3link up
    for k in $(seq 2 "$nodes"); do
        ip link add "sd3port$k" netns "$prefix-n1" type veth peer name sd3link netns "$prefix-n$k"
        ip -n "$prefix-n1" link set "sd3port$k" master sd3link up
        ip -n "$prefix-n$k" addr add "$SUBNET.$k/24" dev sd3link
        ip -n "$prefix-n$k" link set sd3link up
    done
}

remove_namespaces() {
    local prefix=$1 ns
    for ns in $(ip netns list 2>/dev/null | awk '{ print $1 }' | grep "^$prefix-n" || true); do
        ip netns del "$ns" 2>/dev/null || true
    done
}

# Run a command as node k: in its network namespace, with hostname nK and an /etc/hosts that names every node, as DNS
# would on a real cluster (torchrun's rendezvous resolves its own hostname). A single node: as it is.
as_node() {
    local dir=$1 k=$2
    shift 2
    if [ "$(nodes_of "$dir")" = 1 ]; then
        "$@"
    else
        nsenter --net="/run/netns/$(netns_prefix "$dir")-n$k" unshare --uts --mount \
            sh -c 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"' "n$k" "$dir/hosts" "$@"
    fi
}

# A SLURM client command, where the controller can be reached (node 1's namespace when there are several nodes).
client() {
    local dir=$1
    shift
    if [ "$(nodes_of "$dir")" = 1 ]; then
        "$@"
    else
        nsenter --net="/run/netns/$(netns_prefix "$dir")-n1" "$@"
    fi
}

show_logs() {
    local dir=$1 log
    for log in "$dir/slurmctld.log" "$dir"/slurmd*.log; do
        [ -f "$log" ] && { echo "---- $log (last 40 lines)"; tail -n 40 "$log"; } >&2
    done
    return 0
}

up() {
    local nodes=1 dir=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) nodes=${2:?--nodes needs a number}; shift 2 ;;
            --nodes=*) nodes=${1#--nodes=}; shift ;;
            *) dir=$1; shift ;;
        esac
    done
    [[ "$nodes" =~ ^[1-9][0-9]?$ ]] || die "--nodes must be a number from 1 to 99, got '$nodes'"
    if [ -z "$dir" ]; then
        dir=$(mktemp -d -t sd3-slurm.XXXXXX)
    fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    ensure_can_run
    if [ "$nodes" -gt 1 ]; then
        local prefix
        prefix=$(netns_prefix "$dir")
        if ! command -v ip >/dev/null || ! command -v nsenter >/dev/null || ! command -v unshare >/dev/null; then
            echo "local_cluster: cannot start $nodes nodes: they need ip (iproute2), nsenter and unshare" >&2
            exit $CANNOT_START
        fi
        remove_namespaces "$prefix"
        if ! make_namespaces "$prefix" "$nodes"; then
            remove_namespaces "$prefix"
            echo "local_cluster: cannot start $nodes nodes: network namespaces cannot be made here" >&2
            exit $CANNOT_START
        fi
    fi
    write_conf "$dir" "$nodes"
    export SLURM_CONF="$dir/slurm.conf"
    local k names=()
    if [ "$nodes" = 1 ]; then
        names=(localhost)
        slurmctld -c || { show_logs "$dir"; down "$dir"; die "slurmctld did not start (logs above)"; }
        slurmd -N localhost || { show_logs "$dir"; down "$dir"; die "slurmd did not start (logs above)"; }
    else
        as_node "$dir" 1 slurmctld -c || { show_logs "$dir"; down "$dir"; die "slurmctld did not start (logs above)"; }
        for k in $(seq 1 "$nodes"); do
            names+=("n$k")
            as_node "$dir" "$k" slurmd -N "n$k" || { show_logs "$dir"; down "$dir"; die "slurmd n$k did not start"; }
        done
    fi
    local waited=0 states=""
    while [ "$waited" -lt "$WAIT_SECONDS" ]; do
        states=$(client "$dir" sinfo -h -N -o %T 2>/dev/null | sort | uniq -c | xargs || true)
        if [ "$states" = "$nodes idle" ]; then
            [ "$nodes" = 1 ] || echo "SLURM_NETNS=$(netns_prefix "$dir")-n1"
            echo "SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 1
        waited=$((waited + 1))
    done
    show_logs "$dir"
    down "$dir"
    die "nodes ${names[*]} not all idle after ${WAIT_SECONDS}s (sinfo: '${states:-nothing}'; logs above)"
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
    client "$dir" scancel --quiet --partition=debug 2>/dev/null || true
    local waited=0 pidfile
    while [ -n "$(client "$dir" squeue -h -o %i 2>/dev/null)" ] && [ "$waited" -lt 30 ]; do
        sleep 1
        waited=$((waited + 1))
    done
    client "$dir" scontrol shutdown >/dev/null 2>&1 || true
    for pidfile in "$dir/slurmctld.pid" "$dir"/slurmd*.pid; do
        stop_daemon "$pidfile"
    done
    remove_namespaces "$(netns_prefix "$dir")"
    rm -rf "$dir"
}

case "${1:-}" in
    up) shift; up "$@" ;;
    down) down "${2:-}" ;;
    *) echo "usage: $0 up [--nodes N] [DIR] | down DIR" >&2; exit 2 ;;
esac
