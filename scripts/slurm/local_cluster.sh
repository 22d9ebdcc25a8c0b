#!/usr/bin/env bash
# A two-node Slurm cluster on this one machine, for tests/integration/test_slurm.py and for trying the sbatch
# scripts: Debian's slurmctld + slurmd + munge, nodes node1 and node2 (both 127.0.0.1), partition `debug`.
#
#   sudo bash scripts/slurm/local_cluster.sh          # install if needed, configure, start; wait until both idle
#   sudo bash scripts/slurm/local_cluster.sh --stop   # stop the daemons (config and packages stay)
#
# Idempotent: when everything is already up it only checks (well under a second). Needs root and apt-get.
# It rewrites /etc/slurm/slurm.conf and adds node1/node2 to /etc/hosts: for throwaway machines (CI, containers).
set -euo pipefail

NODES=(node1 node2)
FIRST_SLURMD_PORT=6818 # node1 listens here, node2 on the next port: two slurmd on one host need their own
CONF=/etc/slurm/slurm.conf
RUN=/run/slurm
SPOOL=/var/spool/slurm
LOGS=/var/log/slurm
HOSTS_TAG="# vlmtune local Slurm cluster"

die() {
  echo "local_cluster: $*" >&2
  exit 1
}
say() { echo "local_cluster: $*"; }

# Live pid from a pid file, else nothing.
pid_of() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null && cat "$1"; }

stop_daemon() {
  local pid
  pid=$(pid_of "$1") || return 0
  kill "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

stop_all() {
  for node in "${NODES[@]}"; do stop_daemon "$RUN/slurmd-$node.pid"; done
  stop_daemon "$RUN/slurmctld.pid"
  stop_daemon /run/munge/munged.pid
  say "stopped"
}

write_conf() {
  local cpus host conf node i=0
  cpus=$(nproc)
  host=$(hostname -s)
  conf=$(
    cat <<EOF
# Written by scripts/slurm/local_cluster.sh: two slurmd on this host (node1, node2), for tests.
ClusterName=vlmtune-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# Requeued jobs wait cred_expire seconds before they start again (default 120): short, so tests stay quick.
AuthInfo=cred_expire=10
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
# No cgroups in containers: track a step's processes through /proc, and do not bind tasks to cores.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# Look at pending jobs (a requeued job whose begin time came) every 2 s, not every 60 s.
SchedulerParameters=sched_interval=2
# sbatch --wait polls every 2 s only while MinJobAge < 6 (else its sleeps grow to 32 s); records of finished
# jobs are dropped after MinJobAge seconds.
MinJobAge=4
ReturnToService=2
MailProg=/bin/true
EOF
    for node in "${NODES[@]}"; do
      echo "NodeName=$node NodeAddr=127.0.0.1 Port=$((FIRST_SLURMD_PORT + i)) CPUs=$cpus State=UNKNOWN"
      i=$((i + 1))
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
  )
  mkdir -p "$(dirname "$CONF")"
  if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$conf" ]; then
    return 1
  fi
  echo "$conf" >"$CONF"
  say "wrote $CONF"
}

# Both slurmd alive and both nodes idle, or busy with jobs when the cluster was already up (an unresponsive
# node shows as `idle*`, a drained one as `drain`).
nodes_up() {
  local states
  states=$(sinfo -h -N -o "%N %t" 2>/dev/null | sort -u) || return 1
  for node in "${NODES[@]}"; do
    pid_of "$RUN/slurmd-$node.pid" >/dev/null && grep -qxE "$node (idle|mix|alloc|comp)" <<<"$states" || return 1
  done
}

[ "${1:-}" = "--stop" ] || [ $# -eq 0 ] || die "usage: $0 [--stop]"
[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages, writes /etc and starts daemons)"
if [ "${1:-}" = "--stop" ]; then
  stop_all
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || die "slurmctld, slurmd and munge are not installed and there is no apt-get"
  say "installing slurmctld slurmd munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed"
  apt-get install -y -qq slurmctld slurmd munge >/dev/null || die "apt-get install slurmctld slurmd munge failed"
fi

grep -q "$HOSTS_TAG" /etc/hosts || echo "127.0.0.1 ${NODES[*]} $HOSTS_TAG" >>/etc/hosts
mkdir -p "$RUN" "$SPOOL/ctld" "$LOGS" /run/munge /var/log/munge /var/lib/munge
for node in "${NODES[@]}"; do mkdir -p "$SPOOL/d-$node"; done

if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile /etc/munge/munge.key
fi
chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
chmod 0400 /etc/munge/munge.key
if ! pid_of /run/munge/munged.pid >/dev/null; then
  runuser -u munge -- munged || die "munged did not start (see /var/log/munge/munged.log)"
fi

if write_conf; then
  # A new configuration: restart whatever runs with the old one.
  for node in "${NODES[@]}"; do stop_daemon "$RUN/slurmd-$node.pid"; done
  stop_daemon "$RUN/slurmctld.pid"
fi
if ! pid_of "$RUN/slurmctld.pid" >/dev/null; then
  slurmctld || die "slurmctld did not start (see $LOGS/slurmctld.log)"
fi
for node in "${NODES[@]}"; do
  if ! pid_of "$RUN/slurmd-$node.pid" >/dev/null; then
    slurmd -N "$node" || die "slurmd -N $node did not start (see $LOGS/slurmd-$node.log)"
  fi
done

for i in $(seq 120); do
  if nodes_up; then
    say "up: $(sinfo -h -N -o '%N %t' | sort -u | paste -sd ' ')"
    exit 0
  fi
  # A node left down or drained by an earlier unclean stop comes back on request.
  if [ $((i % 10)) -eq 5 ]; then
    scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME 2>/dev/null || true
  fi
  sleep 0.5
done
sinfo -N >&2 || true
die "nodes not up after 60 s; see $LOGS/slurmctld.log and $LOGS/slurmd-node*.log"
