#!/usr/bin/env bash
# local-cluster.sh: a real, throw-away Slurm cluster on ONE Debian/Ubuntu host, for pdbox's Slurm tests
# and for trying `pdbox slurm up` on a laptop. Root, no systemd, no containers needed.
#
#   slurm/local-cluster.sh up       install packages if missing, configure, start, wait until ready
#   slurm/local-cluster.sh status   daemons, nodes, queue; exit 0 when the cluster is up, 3 when it is not
#   slurm/local-cluster.sh down     cancel every job, stop every daemon this script started
#   slurm/local-cluster.sh env      print `export SLURM_CONF=...` for shells that want the clients
#
# Daemons: munged, mariadbd, slurmdbd (accounting: submitit reads job state with sacct), slurmctld and one
# slurmd per fake node (n1, n2, ...: Debian's build supports several slurmd on one host). Every file they
# write (config, munge key, database, state, spool, logs, pid files, sockets, fake GPU devices) lives
# under $PDBOX_SLURM_DIR. Outside it the script only touches /etc/hosts (one tagged line so n1, n2 resolve)
# and /etc/slurm/slurm.conf (a symlink to our config, made only when no config is there, so plain
# `sbatch`/`squeue` and submitit find the cluster). `down` removes both again.
#
# Knobs (environment):
#   PDBOX_SLURM_DIR    state directory               (default: <repo>/.slurm-local)
#   PDBOX_SLURM_NODES  fake nodes n1..nN             (default: 2)
#   PDBOX_SLURM_CPUS   CPUs advertised per node      (default: 4; may oversubscribe the host)
#   PDBOX_SLURM_GPUS   fake GPUs per node            (default: 2; char devices, so CUDA_VISIBLE_DEVICES is set)
#   PDBOX_SLURM_PORT   first of the TCP ports used   (default: 26817; ctld +0, dbd +1, mariadb +2, slurmd +10+i)
#
# Timings are fast on purpose: AuthInfo cred_expire=10 (also how long a requeued job waits before it may
# start again), bf_interval=1, sched_interval=2, KillWait=5 (submitit ignores SIGTERM). Partitions: `debug`
# (default, PriorityTier=1, GraceTime=5) is preempted (REQUEUE) by `urgent` (PriorityTier=100).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${PDBOX_SLURM_DIR:-$(dirname "$HERE")/.slurm-local}
NODES=${PDBOX_SLURM_NODES:-2}
CPUS=${PDBOX_SLURM_CPUS:-4}
GPUS=${PDBOX_SLURM_GPUS:-2}
PORT=${PDBOX_SLURM_PORT:-26817}
CLUSTER=pdbox
TAG="# pdbox-local-cluster"

ETC=$DIR/etc RUN=$DIR/run LOG=$DIR/log
export SLURM_CONF=$ETC/slurm.conf
MUNGE_SOCK=$RUN/munge/munge.socket
DB_SOCK=$RUN/mysqld.sock
CTLD_PORT=$PORT DBD_PORT=$((PORT + 1)) DB_PORT=$((PORT + 2))
T0=$(date +%s.%N)

log() { echo "[local-cluster $(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{printf "%6.2fs", a-b}')] $*"; }
die() { echo "local-cluster: ERROR: $*" >&2; exit 1; }

# wait_for <seconds> <what> <logfile|-> <command...>: poll until the command succeeds; on timeout show
# the log tail and fail.
wait_for() {
  local secs=$1 what=$2 logf=$3; shift 3
  local end=$(($(date +%s) + secs))
  until "$@" >/dev/null 2>&1; do
    if (($(date +%s) >= end)); then
      echo "local-cluster: ERROR: timed out after ${secs}s waiting for $what" >&2
      if [[ $logf != - && -e $logf ]]; then echo "--- tail of $logf" >&2; tail -n 40 "$logf" >&2; fi
      exit 1
    fi
    sleep 0.2
  done
}

# alive <pidfile> <comm>: the pid file names a live (non-zombie) process with that command name.
alive() {
  local pid state
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ -r /proc/$pid/stat && $(</proc/"$pid"/comm) == "$2" ]] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ $state != Z ]]
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# claim_port <port> <daemon>: refuse to start when someone else already listens there.
claim_port() {
  if port_open "$1"; then
    die "port $1 (for $2) is taken by another process; set PDBOX_SLURM_PORT to another base port"
  fi
}

install_packages() {
  local pkgs=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server) missing=() p
  for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]} == 0)) && return 0
  log "installing ${missing[*]}"
  command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get to install them"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"$LOG/apt.log" 2>&1 || { tail -n 20 "$LOG/apt.log" >&2; die "apt-get update failed"; }
  # Without systemd the postinst scripts cannot start anything ("policy-rc.d denied"): harmless, we do it.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$LOG/apt.log" 2>&1 \
    || { tail -n 20 "$LOG/apt.log" >&2; die "apt-get install ${missing[*]} failed"; }
}

start_munge() {
  if [[ ! -s $ETC/munge.key ]]; then
    head -c 1024 /dev/urandom >"$ETC/munge.key"
    chmod 600 "$ETC/munge.key"
  fi
  install -d -m 0755 "$RUN/munge"
  alive "$RUN/munged.pid" munged && { log "munged up (pid $(<"$RUN/munged.pid"))"; return 0; }
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
  # --force: munged runs as root here and does not insist on munge-owned directories.
  munged --force --key-file="$ETC/munge.key" --socket="$MUNGE_SOCK" --pid-file="$RUN/munged.pid" \
    --log-file="$LOG/munged.log" --seed-file="$DIR/munge.seed" 2>>"$LOG/munged.log" \
    || { tail -n 20 "$LOG/munged.log" >&2; die "munged failed to start"; }
  wait_for 10 munged "$LOG/munged.log" sh -c "munge -n -S '$MUNGE_SOCK' | unmunge -S '$MUNGE_SOCK'"
  log "munged up (pid $(<"$RUN/munged.pid"))"
}

mariadb_sql() { mariadb --no-defaults --socket="$DB_SOCK" -u root "$@"; }

start_mariadb() {
  if [[ ! -d $DIR/mysql/mysql ]]; then
    mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql" --skip-test-db \
      --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 \
      || { tail -n 20 "$LOG/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
  fi
  if ! alive "$RUN/mariadbd.pid" mariadbd; then
    claim_port "$DB_PORT" mariadbd
    setsid -f mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$DB_SOCK" \
      --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$RUN/mariadbd.pid" \
      --log-error="$LOG/mariadbd.log" --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1
  fi
  wait_for 30 mariadbd "$LOG/mariadbd.log" mariadb_sql -e 'select 1'
  [[ -s $ETC/db.pass ]] || { od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$ETC/db.pass"; chmod 600 "$ETC/db.pass"; }
  mariadb_sql -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(<"$ETC/db.pass")';
                  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  log "mariadbd up (pid $(<"$RUN/mariadbd.pid"))"
}

start_slurmdbd() {
  (umask 077; cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(<"$ETC/db.pass")
StorageLoc=slurm_acct_db
EOF
  )
  if ! alive "$RUN/slurmdbd.pid" slurmdbd; then
    claim_port "$DBD_PORT" slurmdbd
    slurmdbd || { tail -n 20 "$LOG/slurmdbd.log" >&2; die "slurmdbd failed to start"; }
  fi
  # the first start creates the schema, which takes a few seconds
  wait_for 60 "slurmdbd on port $DBD_PORT" "$LOG/slurmdbd.log" port_open "$DBD_PORT"
  log "slurmdbd up (pid $(<"$RUN/slurmdbd.pid"))"
}

# write_slurm_conf: writes slurm.conf and gres.conf; returns 0 when slurm.conf changed.
write_slurm_conf() {
  local new=$ETC/slurm.conf.new i g files
  : >"$ETC/gres.conf.new"
  {
    cat <<EOF
# written by slurm/local-cluster.sh: edit the script, not this file
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10,socket=$MUNGE_SOCK
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
# for slurmdbd connections the munge socket comes from here, not from AuthInfo
AccountingStoragePass=$MUNGE_SOCK
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
# the fake nodes advertise more CPUs than the host may have: trust slurm.conf, not the hardware
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
EOF
    ((GPUS > 0)) && echo "GresTypes=gpu"
    for ((i = 1; i <= NODES; i++)); do
      printf 'NodeName=n%d NodeHostname=%s NodeAddr=127.0.0.1 Port=%d CPUs=%d RealMemory=4000%s State=UNKNOWN\n' \
        "$i" "$(hostname)" $((PORT + 10 + i)) "$CPUS" "$( ((GPUS > 0)) && echo " Gres=gpu:$GPUS")"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=5"
    echo "PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=100 PreemptMode=OFF"
  } >"$new"
  if ((GPUS > 0)); then
    install -d "$DIR/dev"
    for ((i = 1; i <= NODES; i++)); do
      files=()
      for ((g = 0; g < GPUS; g++)); do
        # gres.conf File= must be a character device; a /dev/null clone is enough for Slurm's bookkeeping
        [[ -c $DIR/dev/n${i}gpu$g ]] || mknod "$DIR/dev/n${i}gpu$g" c 1 3
        files+=("$DIR/dev/n${i}gpu$g")
      done
      echo "NodeName=n$i Name=gpu File=$(IFS=,; echo "${files[*]}")" >>"$ETC/gres.conf.new"
    done
  fi
  mv "$ETC/gres.conf.new" "$ETC/gres.conf"
  if [[ -e $SLURM_CONF ]] && cmp -s "$new" "$SLURM_CONF"; then rm "$new"; return 1; fi
  mv "$new" "$SLURM_CONF"
  return 0
}

link_config() {
  if [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$SLURM_CONF" ]]; then return 0; fi
  if [[ -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]]; then
    log "note: /etc/slurm/slurm.conf belongs to another cluster; use: export SLURM_CONF=$SLURM_CONF"
    return 0
  fi
  install -d /etc/slurm
  ln -s "$SLURM_CONF" /etc/slurm/slurm.conf
}

add_hosts() {
  local names
  names=$(seq -f 'n%g' -s ' ' 1 "$NODES")
  if grep -q "$TAG\$" /etc/hosts; then
    grep -q "^127.0.0.1 $names $TAG\$" /etc/hosts && return 0
    remove_hosts
  fi
  echo "127.0.0.1 $names $TAG" >>/etc/hosts
}

remove_hosts() {
  grep -q "$TAG\$" /etc/hosts || return 0
  # rewrite in place (no sed -i / mv): /etc/hosts is often a bind mount
  local kept
  kept=$(grep -v "$TAG\$" /etc/hosts || true)
  printf '%s\n' "$kept" >/etc/hosts
}

nodes_ready() {
  # every node answers and is usable: idle, mixed, allocated or completing (not down/drained/unknown/*).
  # Nodes drained or downed by an earlier run of this throw-away cluster are resumed.
  local n bad
  bad=$(sinfo -h -N -t drain,down -o '%N' | sort -u | paste -sd, -)
  [[ -n $bad ]] && scontrol update nodename="$bad" state=resume >/dev/null 2>&1
  n=$(sinfo -h -N -o '%N %t' | sort -u | awk '$2 ~ /^(idle|mix|alloc|comp)$/' | wc -l)
  ((n == NODES))
}

stop_slurm_daemons() {
  local f
  for f in "$RUN"/slurmd-*.pid; do [[ -e $f ]] && stop_pid "$(basename "$f" .pid)" "$f" slurmd; done
  stop_pid slurmctld "$RUN/slurmctld.pid" slurmctld
}

start_slurm() {
  local changed=$1 i
  if [[ $changed == 1 ]] && alive "$RUN/slurmctld.pid" slurmctld; then
    log "slurm.conf changed: restarting slurmctld and slurmd"
    stop_slurm_daemons
  fi
  if ! alive "$RUN/slurmctld.pid" slurmctld; then
    claim_port "$CTLD_PORT" slurmctld
    slurmctld || { tail -n 20 "$LOG/slurmctld.log" >&2; die "slurmctld failed to start"; }
  fi
  wait_for 30 "slurmctld (scontrol ping)" "$LOG/slurmctld.log" scontrol ping
  log "slurmctld up (pid $(<"$RUN/slurmctld.pid"))"
  for ((i = 1; i <= NODES; i++)); do
    alive "$RUN/slurmd-n$i.pid" slurmd && continue
    claim_port $((PORT + 10 + i)) "slurmd n$i"
    install -d "$DIR/spool/n$i"
    slurmd -N "n$i" || { tail -n 20 "$LOG/slurmd-n$i.log" >&2; die "slurmd n$i failed to start"; }
  done
  wait_for 60 "$NODES nodes ready (sinfo)" "$LOG/slurmctld.log" nodes_ready
  log "slurmd x$NODES up, nodes ready"
  wait_for 30 "cluster '$CLUSTER' registered in slurmdbd" "$LOG/slurmdbd.log" \
    bash -c "sacctmgr -n -P list cluster format=cluster | grep -qx $CLUSTER"
  wait_for 30 "sacct" "$LOG/slurmdbd.log" sacct -n -X -S now-1minute
  log "cluster registered in slurmdbd; sacct answers"
}

up() {
  ((NODES >= 1)) || die "PDBOX_SLURM_NODES must be >= 1"
  [[ $DIR != *[[:space:]]* ]] || die "PDBOX_SLURM_DIR=$DIR contains whitespace, which slurm.conf cannot express"
  ((${#MUNGE_SOCK} < 100)) || die "PDBOX_SLURM_DIR=$DIR is too long for a unix socket path; pick a shorter one"
  [[ $(id -u) == 0 ]] || die "run as root (it starts munged, mariadbd and the Slurm daemons)"
  install -d -m 0755 "$DIR" "$ETC" "$RUN" "$LOG" "$DIR/state" "$DIR/spool"
  install_packages
  start_munge
  start_mariadb
  start_slurmdbd
  local changed=0
  write_slurm_conf && changed=1
  link_config
  add_hosts
  start_slurm "$changed"
  sinfo -o '%P %a %D %t %N %G'
  log "UP (state in $DIR; clients: export SLURM_CONF=$SLURM_CONF)"
}

# stop_pid <name> <pidfile> <comm>: SIGTERM, wait up to 10 s, then SIGKILL. Only the pid in our pid file.
stop_pid() {
  local name=$1 f=$2 comm=$3 pid i
  [[ -s $f ]] || { rm -f "$f"; return 0; }
  pid=$(<"$f")
  if alive "$f" "$comm"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$f" "$comm" || break; sleep 0.2; done
    if alive "$f" "$comm"; then kill -KILL "$pid" 2>/dev/null || true; echo "killed $name ($pid)"; else
      echo "stopped $name ($pid)"; fi
  fi
  rm -f "$f"
}

down() {
  if [[ -e $SLURM_CONF ]] && alive "$RUN/slurmctld.pid" slurmctld && timeout 10 scontrol ping >/dev/null 2>&1; then
    local jobs
    jobs=$(squeue -h -o %A | sort -u | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
      log "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      local end=$(($(date +%s) + 30))
      while [[ -n $(squeue -h -o %A) ]] && (($(date +%s) < end)); do sleep 0.3; done
      [[ -z $(squeue -h -o %A) ]] || echo "local-cluster: WARNING: jobs still in the queue: $(squeue -h)" >&2
    fi
  fi
  stop_slurm_daemons
  stop_pid slurmdbd "$RUN/slurmdbd.pid" slurmdbd
  stop_pid mariadbd "$RUN/mariadbd.pid" mariadbd
  stop_pid munged "$RUN/munged.pid" munged
  if [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$SLURM_CONF" ]]; then
    rm -f /etc/slurm/slurm.conf
  fi
  remove_hosts
  log "DOWN"
}

status() {
  local ok=0 d
  echo "state: $DIR"
  for d in munged mariadbd slurmdbd slurmctld; do
    if alive "$RUN/$d.pid" "$d"; then echo "  $d: running (pid $(<"$RUN/$d.pid"))"; else echo "  $d: stopped"; ok=3; fi
  done
  for ((i = 1; i <= NODES; i++)); do
    if alive "$RUN/slurmd-n$i.pid" slurmd; then echo "  slurmd n$i: running (pid $(<"$RUN/slurmd-n$i.pid"))"
    else echo "  slurmd n$i: stopped"; ok=3; fi
  done
  if ((ok == 0)) && timeout 10 scontrol ping >/dev/null 2>&1; then
    sinfo -o '%P %a %D %t %N %G'
    squeue -o '%.8i %.9P %.20j %.8T %.10M %R'
    nodes_ready || ok=3
  fi
  return "$ok"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 up|down|status|env   (state: \$PDBOX_SLURM_DIR, default $DIR)" >&2; exit 2 ;;
esac
