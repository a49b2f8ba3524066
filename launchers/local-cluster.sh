#!/usr/bin/env bash
# A throw-away SLURM cluster on this one host: munged + slurmctld + N slurmd ("nodes" n1..nN),
# for trying the launchers and for the SLURM tests. Debian 12, run as root, no systemd needed.
#   launchers/local-cluster.sh up [N]   install packages if missing, start, wait until idle
#   launchers/local-cluster.sh down     cancel jobs, stop only the daemons `up` started, undo /etc
# State, config and logs live in $TFX_SLURM_DIR (default /tmp/tfx-slurm); afterwards
# `export SLURM_CONF=$TFX_SLURM_DIR/slurm.conf` (up prints it). Ports: $TFX_SLURM_PORT (6817)
# for slurmctld, $TFX_SLURMD_PORT (17001) and up for the slurmd.
set -euo pipefail
D=${TFX_SLURM_DIR:-/tmp/tfx-slurm}
CONF=$D/slurm.conf
export SLURM_CONF=$CONF

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pids() {  # SIGTERM the PIDs in the given pid files, SIGKILL what is left after 15 s
  local pids="" f p
  for f in "$@"; do [ -f "$f" ] && pids="$pids $(cat "$f")" && rm -f "$f"; done
  for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 75); do
    local left=""; for p in $pids; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
    [ -z "$left" ] && return 0; sleep 0.2
  done
  for p in $left; do kill -KILL "$p" 2>/dev/null || true; done
}

up() {
  local n=${1:-2} host nodes cpus mem
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
      || ! command -v munged >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null
  fi
  if running "$D/slurmctld.pid.bg"; then echo "cluster in $D already up; run down first"; exit 1; fi
  rm -rf "$D/state" "$D/spool" "$D/log"; mkdir -p "$D/state" "$D/spool" "$D/log"
  # munged must run as the munge user (as root it refuses its seed directory)
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    setsid setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F \
      >"$D/log/munged.out" 2>&1 </dev/null &
    echo $! >"$D/munged.pid.bg"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  nodes=$(seq -s ' ' -f 'n%g' 1 "$n")
  # MASTER_ADDR comes from `scontrol show hostnames`: the virtual node names must resolve
  for node in $nodes; do
    if ! getent hosts "$node" >/dev/null; then
      [ -f "$D/hosts.orig" ] || cp /etc/hosts "$D/hosts.orig"
      echo "127.0.0.1 $node" >>/etc/hosts
    fi
  done
  host=$(hostname -s)
  local P0=${TFX_SLURMD_PORT:-17001}
  cpus=${TFX_SLURM_CPUS:-$(nproc)}
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
  cat >"$CONF" <<CONF
ClusterName=tfx
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
SlurmctldPort=${TFX_SLURM_PORT:-6817}
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/slurmd-%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
EnforcePartLimits=ALL
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
NodeName=n[1-$n] NodeHostname=$host NodeAddr=127.0.0.1 Port=$P0-$((P0 + n - 1)) CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  setsid slurmctld -D -f "$CONF" >"$D/log/slurmctld.out" 2>&1 </dev/null &
  echo $! >"$D/slurmctld.pid.bg"
  for node in $nodes; do
    mkdir -p "$D/spool/slurmd-$node"
    setsid slurmd -D -N "$node" -f "$CONF" >"$D/log/slurmd-$node.out" 2>&1 </dev/null &
    echo $! >"$D/slurmd-$node.pid.bg"
  done
  for _ in $(seq 120); do
    [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -c '^idle$')" -eq "$n" ] && break; sleep 0.25
  done
  if [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -c '^idle$')" -ne "$n" ]; then
    echo "cluster did not come up; logs in $D/log"; tail -n 20 "$D"/log/*.out; exit 1
  fi
  echo "SLURM up: $n nodes x $cpus CPUs. export SLURM_CONF=$CONF"
}

down() {
  if running "$D/slurmctld.pid.bg"; then
    local jobs; jobs=$(squeue -h -o %i 2>/dev/null || true)
    [ -n "$jobs" ] && scancel $jobs || true
    for _ in $(seq 120); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.25; done
  fi
  stop_pids "$D"/slurmd-*.pid.bg
  stop_pids "$D/slurmctld.pid.bg" "$D/munged.pid.bg"
  if [ -f "$D/hosts.orig" ]; then cat "$D/hosts.orig" >/etc/hosts; rm -f "$D/hosts.orig"; fi
}

case "${1:-}" in
  up) up "${2:-2}" ;;
  down) down ;;
  *) echo "usage: $0 up [NODES] | down"; exit 2 ;;
esac
