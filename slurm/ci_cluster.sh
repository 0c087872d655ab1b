#!/usr/bin/env bash
# A throw-away two-node SLURM cluster on one Debian machine for tests/training/test_slurm_cluster.py; needs root.
#   ci_cluster.sh install   Debian's slurm-wlm, munge, Open MPI and PMIx (for srun --mpi=pmix)
#   ci_cluster.sh up        munged, slurmctld, and one slurmd per node n1/n2, each in its own network and UTS
#                           namespace (own address on a private bridge, own hostname); waits until both are idle
#   ci_cluster.sh down      cancels jobs, stops the daemons it started (by recorded PID, if it still runs that
#                           daemon), removes namespaces, bridge, /etc/hosts lines and the /etc/slurm/slurm.conf link
# Knobs: HOPE_SLURM_DIR (state, logs; default /tmp/hope-slurm), HOPE_SLURM_NET (a private /24 prefix, default
# 172.30.214). `nsenter --net` (not `ip netns exec`, whose fresh /sys hides the cgroup fs slurmd probes) enters
# the node's namespace; TmpFS is per node because srun --mpi=pmix creates the same directory on each node.
set -Eeuo pipefail
DIR=${HOPE_SLURM_DIR:-/tmp/hope-slurm}
NET=${HOPE_SLURM_NET:-172.30.214}
CONF=$DIR/slurm.conf
LINK=/etc/slurm/slurm.conf
BRIDGE=hopeslurm0
MARK="# hope-slurm-ci"
NODES=(n1 n2)

say() { echo "[ci_cluster] $*" >&2; }
fail() { say "error: $*"; exit 1; }
poll() { # SECONDS COMMAND... : until the command succeeds
    local until=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do ((SECONDS < until)) || return 1; sleep 0.2; done
}

install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge openmpi-bin libopenmpi-dev libpmix-dev >/dev/null
}

config() {
    mkdir -p "$DIR"/{state,log,pid,spool/n1,spool/n2,tmp/n1,tmp/n2}
    cat >"$CONF" <<CONF
ClusterName=hopeci
SlurmctldHost=$(hostname -s)($NET.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/usr/bin/true
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
TmpFS=$DIR/tmp/%n
SlurmctldPidFile=$DIR/pid/slurmctld.pidfile
SlurmdPidFile=$DIR/pid/slurmd-%n.pidfile
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
NodeName=n1 NodeAddr=$NET.11 CPUs=2 State=UNKNOWN
NodeName=n2 NodeAddr=$NET.12 CPUs=2 State=UNKNOWN
PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    [[ -e $LINK && ! -L $LINK ]] && fail "$LINK exists and is not this script's link; move it away"
    mkdir -p /etc/slurm && ln -sfn "$CONF" "$LINK"
}

network() {
    ip link add "$BRIDGE" type bridge && ip addr add "$NET.1/24" dev "$BRIDGE" && ip link set "$BRIDGE" up
    local i=11 node
    for node in "${NODES[@]}"; do
        ip netns add "hope-$node"
        ip link add "vh-$node" type veth peer name eth0 netns "hope-$node"
        ip link set "vh-$node" master "$BRIDGE" up
        ip -n "hope-$node" link set lo up
        ip -n "hope-$node" addr add "$NET.$i/24" dev eth0
        ip -n "hope-$node" link set eth0 up
        echo "$NET.$i $node $MARK" >>/etc/hosts
        i=$((i + 1))
    done
}

start() { # NAME COMMAND... : in the background, its PID recorded
    "${@:2}" >>"$DIR/log/$1.out" 2>&1 </dev/null &
    echo $! >"$DIR/pid/$1"
}

munge_up() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi  # one is running: reuse it
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    start munged setpriv --reuid=munge --regid=munge --clear-groups /usr/sbin/munged -F
    poll 15 sh -c 'munge -n </dev/null | unmunge' || fail "munged did not start ($DIR/log/munged.out)"
}

up() {
    command -v slurmctld >/dev/null || fail "slurm is not installed: run '$0 install'"
    down >/dev/null 2>&1 || true  # leftovers of a killed run
    rm -rf "$DIR" && mkdir -p "$DIR"
    trap 'say "bring-up failed"; down' ERR
    config
    network
    munge_up
    start slurmctld /usr/sbin/slurmctld -D -f "$CONF"
    poll 30 sh -c 'scontrol ping | grep -q UP' || fail "slurmctld did not answer ($DIR/log/slurmctld.log)"
    local node
    for node in "${NODES[@]}"; do
        start "slurmd-$node" nsenter --net="/var/run/netns/hope-$node" unshare --uts \
            sh -c 'hostname "$1" && exec /usr/sbin/slurmd -D -f "$2" -N "$1"' sh "$node" "$CONF"
    done
    poll 60 sh -c '[ "$(sinfo -h -N -o %T | sort -u)" = idle ]' || fail "nodes not idle: $(sinfo -N 2>&1)"
    trap - ERR
    say "up: nodes ${NODES[*]} idle"
}

recorded() { # PIDFILE: the PID it records while that process still runs the daemon the file is named after
    [[ -s $1 ]] || return 1
    local pid name; pid=$(<"$1"); name=$(basename "$1")
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "${name%%-*}" ]] && echo "$pid"  # a PID may have been reused
}

gone() { # PID...: none of them runs
    local pid
    for pid; do kill -0 "$pid" 2>/dev/null && return 1; done
    return 0
}

stop() { # PIDFILE...: TERM to the daemons they record, together; KILL to any left after 10 s
    local f pid pids=()
    for f; do
        if pid=$(recorded "$f"); then pids+=("$pid"); fi
        rm -f "$f"
    done
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    poll 10 gone "${pids[@]}" || kill -KILL "${pids[@]}" 2>/dev/null || true
}

down() {
    if [[ -s $DIR/pid/slurmctld ]]; then
        scancel --full $(squeue -h -o %A 2>/dev/null) 2>/dev/null || true
        poll 30 sh -c '[ -z "$(squeue -h -o %A)" ]' || true
    fi
    stop "${NODES[@]/#/$DIR/pid/slurmd-}" "$DIR/pid/slurmctld" "$DIR/pid/munged"  # each takes ~2 s to exit
    local node
    for node in "${NODES[@]}"; do
        ip netns del "hope-$node" 2>/dev/null || true
        ip link del "vh-$node" 2>/dev/null || true  # the kernel may keep a deleted namespace, and its veth, a while
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    if grep -q -- "$MARK" /etc/hosts; then
        local kept; kept=$(grep -v -- "$MARK" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts  # rewritten in place: /etc/hosts may be a bind mount
    fi
    [[ -L $LINK && $(readlink "$LINK") == "$CONF" ]] && rm -f "$LINK"
    say "down"
}

case ${1:-} in
install | up | down) "$1" ;;
*) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
