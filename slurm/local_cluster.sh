#!/usr/bin/env bash
# A real single-node Slurm cluster in a folder, for tests and for trying the batch scripts on one machine.
#   slurm/local_cluster.sh install        # Debian packages (root): slurmctld slurmd slurm-client munge
#   slurm/local_cluster.sh start DIR      # munged + slurmctld + slurmd under DIR; prints SLURM_CONF=...
#   slurm/local_cluster.sh stop DIR
set -euo pipefail
cmd=${1:?usage: local_cluster.sh install|start DIR|stop DIR}

if [[ $cmd == install ]]; then
  command -v slurmctld >/dev/null && command -v munged >/dev/null && exit 0
  [[ $(id -u) == 0 ]] || { echo "need root to apt-get install slurm" >&2; exit 3; }
  command -v apt-get >/dev/null || { echo "no apt-get on this machine" >&2; exit 3; }
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  exit 0
fi

dir=$(realpath -m "${2:?need a folder}")
export SLURM_CONF=$dir/slurm.conf
if [[ $cmd == stop ]]; then
  scancel --user="$(id -un)" 2>/dev/null || true
  for p in slurmd slurmctld; do [[ -f $dir/$p.pid ]] && kill "$(cat "$dir/$p.pid")" 2>/dev/null || true; done
  munged -s --socket="$dir/munge/munge.socket" 2>/dev/null || true
  exit 0
fi

mkdir -p "$dir"/{munge,state,spool,log}
chmod 755 "$dir" "$dir/munge"
[[ -f $dir/munge/munge.key ]] || { head -c 1024 /dev/urandom >"$dir/munge/munge.key"; chmod 400 "$dir/munge/munge.key"; }
munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" --log-file="$dir/log/munged.log" \
  --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed" --force
mem=$(( $(free -m | awk '/Mem:/{print $2}') - 1024 ))
cat >"$SLURM_CONF" <<CONF
ClusterName=local
SlurmctldHost=localhost
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
MailProg=/bin/true
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=$(( 6817 + RANDOM % 500 ))
SlurmdPort=$(( 7400 + RANDOM % 500 ))
NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
setsid slurmctld -D -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 < /dev/null &
setsid slurmd -D -f "$SLURM_CONF" -N localhost >"$dir/log/slurmd.out" 2>&1 < /dev/null &
for _ in $(seq 1 60); do
  state=$(sinfo -h -o %T 2>/dev/null | head -n1 || true)
  [[ $state == idle* ]] && { echo "SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.5
done
echo "slurm did not come up; see $dir/log" >&2
exit 1
