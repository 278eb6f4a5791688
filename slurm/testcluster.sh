#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for tests: slurmctld and two slurmd "nodes" (n1, n2).
#
#   slurm/testcluster.sh up DIR      install slurm-wlm if missing (Debian, root), write DIR/slurm.conf, start daemons
#   slurm/testcluster.sh down DIR    stop them
#
# Clients and daemons read DIR/slurm.conf through SLURM_CONF (export SLURM_CONF=DIR/slurm.conf); nothing in
# /etc/slurm is touched. No munge: auth/none. Requeued jobs start again after ~10 s (cred_expire, scheduler
# intervals). The node names do not resolve: jobs must rendezvous on 127.0.0.1 (cluster.master_addr=127.0.0.1).
# Exits non-zero with the reason on stderr when the cluster cannot be brought up.
set -euo pipefail

cmd=${1:?usage: testcluster.sh up|down DIR}
dir=$(realpath -m "${2:?usage: testcluster.sh up|down DIR}")

stop() {
    for pidfile in "$dir"/slurmctld.pid "$dir"/slurmd-n1.pid "$dir"/slurmd-n2.pid; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    sleep 1
}

# Everything this cluster started (slurmctld, slurmd, their step daemons and the jobs' processes) carries its
# SLURM_CONF in its environment: after the daemons are asked to stop, whatever is left of it is killed, so a job
# that was still running (or a slurmd that ignored SIGTERM) cannot outlive the cluster and hold its ports.
kill_leftovers() {
    local mark="SLURM_CONF=$dir/slurm.conf" env pid ancestors=" " p=$$
    while [ "$p" -gt 1 ] 2>/dev/null; do  # this script and the shells above it may carry SLURM_CONF too
        ancestors="$ancestors$p "
        p=$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null || echo 1)
    done
    for env in /proc/[0-9]*/environ; do
        pid=${env#/proc/}
        pid=${pid%/environ}
        case "$ancestors" in *" $pid "*) continue ;; esac
        if grep -qxzF "$mark" "$env" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
}

if [ "$cmd" = down ]; then
    stop
    kill_leftovers
    exit 0
fi
[ "$cmd" = up ] || { echo "usage: testcluster.sh up|down DIR" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "slurm-wlm is not installed and installing needs root" >&2; exit 3; }
    command -v apt-get >/dev/null || { echo "slurm-wlm is not installed and there is no apt-get" >&2; exit 3; }
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm) \
        >"$dir.apt.log" 2>&1 || { echo "apt-get install slurm-wlm failed (log: $dir.apt.log)" >&2; exit 3; }
fi
[ "$(id -u)" = 0 ] || { echo "the test cluster runs its daemons as root" >&2; exit 3; }

mkdir -p "$dir"/state "$dir"/spool-n1 "$dir"/spool-n2 "$dir"/log
cpus=2
ctld=$((16817 + RANDOM % 100)); p1=$((17001 + RANDOM % 500)); p2=$((p1 + 1))  # each slurmd its own port
cat >"$dir/slurm.conf" <<EOF
ClusterName=dsv4test
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=$ctld
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=5,bf_interval=5
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
KillWait=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$p1 CPUs=$cpus RealMemory=4096
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$p2 CPUs=$cpus RealMemory=4096
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
echo "CgroupPlugin=cgroup/v1" >"$dir/cgroup.conf"

export SLURM_CONF=$dir/slurm.conf
stop
slurmctld -c -f "$SLURM_CONF" || { echo "slurmctld did not start (log: $dir/log/slurmctld.log)" >&2; exit 4; }
slurmd -N n1 -f "$SLURM_CONF" || { echo "slurmd n1 did not start (log: $dir/log/slurmd-n1.log)" >&2; exit 4; }
slurmd -N n2 -f "$SLURM_CONF" || { echo "slurmd n2 did not start (log: $dir/log/slurmd-n2.log)" >&2; exit 4; }
for _ in $(seq 60); do
    if [ "$(sinfo -h -o '%T' 2>/dev/null | sort -u | tr '\n' ' ')" = "idle " ]; then
        echo "SLURM test cluster up: SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "the nodes did not become idle: $(sinfo 2>&1 | tail -n +2) (logs: $dir/log)" >&2
exit 4
