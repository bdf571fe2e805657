#!/usr/bin/env bash
# A real SLURM on this machine, for tests and CI: `slurm/local-cluster.sh up|down|status`.
#
#   up      start munged, slurmctld and one slurmd per emulated node (node1, node2, all on
#           127.0.0.1), with a fresh /etc/slurm/slurm.conf and wiped state; waits until every
#           node is idle. Does nothing (quickly) when the cluster is already up.
#   down    stop the daemons this script starts and remove their stale pid files.
#   status  print the nodes' states; exit 1 when the cluster is not up.
#
# Needs root and Debian's slurm-wlm and munge packages (apt-get install slurm-wlm munge).
# It writes /etc/slurm/slurm.conf and adds the node names to /etc/hosts: run it only on a
# machine (or container) that is a throwaway test host, never on a real cluster node.
#   LOCAL_SLURM_NODES  number of emulated nodes (default 2)
#   LOCAL_SLURM_GPUS   GPUs per node SLURM believes in (default 2): gres "gpu" backed by empty
#                      files, so jobs that ask for GPUs (--gpus-per-node) run and get
#                      SLURM_GPUS_ON_NODE, but no CUDA device (CUDA_VISIBLE_DEVICES stays unset)
set -euo pipefail

NODES="${LOCAL_SLURM_NODES:-2}"
GPUS="${LOCAL_SLURM_GPUS:-2}"
CONF=/etc/slurm/slurm.conf
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
CTLD_PID=/run/slurmctld.pid

die() { echo "local-cluster: $*" >&2; exit 1; }
alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "node$i"; done; }

is_up() {
  alive "$CTLD_PID" || return 1
  local n
  for n in $(node_names); do alive "/run/slurmd-$n.pid" || return 1; done
  # every node usable: IDLE+DRAIN would pass `sinfo -t idle`, so read the exact states
  local states
  states=$(sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
  [[ $(wc -l <<< "$states") -eq $NODES ]] || return 1
  ! awk '{print $2}' <<< "$states" | grep -qvxE 'idle|mixed|allocated|completing'
}

write_conf() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mkdir -p /etc/slurm
  cat > "$CONF" <<EOF
# Written by slurm/local-cluster.sh: $NODES emulated nodes on this machine (tests and CI only).
ClusterName=localci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire + 1 s before it may start again (default 120)
AuthInfo=cred_expire=5
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobContainerType=job_container/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# look at pending jobs every second (defaults: 60 s main loop, 30 s backfill), so a requeued
# job starts as soon as it is eligible again
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
MailProg=/bin/true
# jobs may be requeued (sbatch --requeue / scontrol requeue)
JobRequeue=1
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldPort=6817
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=30
MinJobAge=300
Waittime=0
EOF
  local i gres=
  if [[ "$GPUS" -gt 0 ]]; then
    echo "GresTypes=gpu" >> "$CONF"
    gres=" Gres=gpu:$GPUS"
    : > /etc/slurm/gres.conf
  fi
  for ((i = 1; i <= NODES; i++)); do
    echo "NodeName=node$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$cpus RealMemory=$mem$gres State=UNKNOWN" >> "$CONF"
    if [[ "$GPUS" -gt 0 ]]; then  # a gres.conf line with only Count= is dropped ("file-less GPU")
      mkdir -p "$SPOOL-gpus/node$i"
      touch $(seq -f "$SPOOL-gpus/node$i/gpu%g" 0 $((GPUS - 1)))
      echo "NodeName=node$i Name=gpu File=$SPOOL-gpus/node$i/gpu[0-$((GPUS - 1))]" >> /etc/slurm/gres.conf
    fi
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$CONF"
}

stop_daemons() {
  local f
  for f in /run/slurmd-*.pid "$CTLD_PID"; do
    [[ -f "$f" ]] || continue
    if alive "$f"; then
      local pid; pid=$(cat "$f")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"  # slurmctld 22.05 leaves its pid file behind, which breaks the package's prerm
  done
}

up() {
  [[ $(id -u) -eq 0 ]] || die "needs root"
  for cmd in slurmctld slurmd sinfo munged; do
    command -v "$cmd" >/dev/null || die "$cmd not found: apt-get install slurm-wlm munge"
  done
  if is_up; then
    echo "local-cluster: already up"
    return 0
  fi
  stop_daemons

  # munge: a key (the package's postinst makes one) and the daemon
  if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then mungekey --create --force; else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
    chown munge: /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  if ! munge -n </dev/null >/dev/null 2>&1; then
    su -s /bin/sh munge -c /usr/sbin/munged
  fi

  # the node names resolve to this machine (jobs use the first one as MASTER_ADDR)
  local n
  for n in $(node_names); do
    grep -qE "^[^#]*[[:space:]]$n([[:space:]]|\$)" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
  done

  write_conf
  install -d -o slurm -g slurm "$STATE" "$LOGS"
  rm -rf "${STATE:?}"/* "${SPOOL:?}"/*  # drain reasons and old jobs would survive a restart
  for n in $(node_names); do install -d "$SPOOL/$n"; done

  slurmctld
  for n in $(node_names); do slurmd -N "$n"; done
  for _ in $(seq 300); do
    if is_up; then echo "local-cluster: up ($NODES nodes)"; return 0; fi
    sleep 0.1
  done
  sinfo -N >&2 || true
  tail -n 20 "$LOGS/slurmctld.log" >&2 || true
  die "nodes did not become idle in 30 s"
}

down() {
  stop_daemons
  echo "local-cluster: down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) if is_up; then sinfo -N; else echo "local-cluster: not up"; exit 1; fi ;;
  *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
