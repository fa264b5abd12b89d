#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the workflow's SLURM tests.
#   local_cluster.sh install      apt-get the Debian packages (slurmctld slurmd slurm-client munge)
#   local_cluster.sh up DIR       start munged, slurmctld, slurmd with state under DIR
#   local_cluster.sh down DIR     stop them by their pid files and remove DIR
# Needs root (the daemons run as root / munge). One fake GPU per CPU (gres on character devices
# like /dev/null) lets GPU rules schedule, as many at once as a local run with those cores.
# Facts behind each setting: shared/notes/local-slurm.md.
set -euo pipefail

cmd=${1:?usage: local_cluster.sh install|up DIR|down DIR}

wait_for() { # seconds, command...
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "local_cluster: timed out waiting for: $*" >&2; return 1; }
    sleep 0.5
  done
}

case "$cmd" in
install)
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    packages="slurmctld slurmd slurm-client munge"
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    timeout -k 10 600 apt-get install -y -q $packages >/dev/null ||
      { timeout -k 10 300 apt-get update -q >/dev/null &&
        timeout -k 10 600 apt-get install -y -q $packages >/dev/null; }
  fi
  ;;
up)
  dir=$(realpath -m "${2:?up needs a state folder}")
  mkdir -p "$dir"/{state,spool,log,munge/run}
  chmod 0755 "$dir"
  # munge: key 0400 and socket folder 0711, both owned by munge; munged runs as munge.
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chown -R munge:munge "$dir/munge"
  chmod 0400 "$dir/munge/munge.key"
  chmod 0711 "$dir/munge/run" "$dir/munge"
  socket="$dir/munge/run/munge.socket.2"
  runuser -u munge -- munged --key-file="$dir/munge/munge.key" --socket="$socket" \
    --pid-file="$dir/munge/run/munged.pid" --log-file="$dir/munge/munged.log" \
    --seed-file="$dir/munge/munge.seed"
  wait_for 10 test -S "$socket"

  read -r cpus sockets cores threads memory < <(slurmd -C | awk '
    /NodeName/ { for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } }
    END { print v["CPUs"], v["Boards"] ? v["SocketsPerBoard"] : v["Sockets"], v["CoresPerSocket"], v["ThreadsPerCore"], v["RealMemory"] }')
  cat >"$dir/slurm.conf" <<CONF
ClusterName=sidpipe-test
SlurmctldHost=localhost(127.0.0.1)
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
SlurmUser=root
SlurmctldPort=$((20000 + RANDOM % 20000))
SlurmdPort=$((40000 + RANDOM % 20000))
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MailProg=/bin/true
DefMemPerCPU=500
MinJobAge=600
ReturnToService=2
GresTypes=gpu
NodeName=localhost CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$((memory * 9 / 10)) Gres=gpu:$cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  # each fake GPU needs its own device file (one shared /dev/null kills slurmd)
  for ((i = 0; i < cpus; i++)); do mknod "$dir/fakegpu$i" c 1 3; done
  echo "Name=gpu File=$dir/fakegpu[0-$((cpus - 1))]" >"$dir/gres.conf"
  # Inside a job the executor's jobstep drops SLURM_CONF, so the default path must work too.
  mkdir -p /etc/slurm
  if [ -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
    echo "local_cluster: /etc/slurm/slurm.conf exists and is not ours; refusing to replace it" >&2
    exit 1
  fi
  ln -sfn "$dir/slurm.conf" /etc/slurm/slurm.conf
  ln -sfn "$dir/gres.conf" /etc/slurm/gres.conf
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -f "$SLURM_CONF"
  slurmd -N localhost -f "$SLURM_CONF"
  wait_for 30 bash -c "sinfo -h -N -o '%T' | grep -qx idle"
  echo "local_cluster: up ($dir)"
  ;;
down)
  dir=$(realpath -m "${2:?down needs the state folder}")
  for name in slurmd slurmctld munge/run/munged; do
    pidfile="$dir/$name.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    wait_for 15 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
  done
  [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$dir/slurm.conf" ] && rm -f /etc/slurm/slurm.conf /etc/slurm/gres.conf
  rm -rf "$dir"
  echo "local_cluster: down"
  ;;
*)
  echo "usage: local_cluster.sh install|up DIR|down DIR" >&2
  exit 2
  ;;
esac
