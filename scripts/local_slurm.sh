#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, from Debian's packages, with accounting (slurmdbd + MariaDB).
#
#   scripts/local_slurm.sh up        install what is missing, start munged, mariadbd, slurmdbd, slurmctld,
#                                    slurmd; register the cluster and an account; wait until the node is idle
#   scripts/local_slurm.sh status    what runs, sinfo, squeue, recent jobs from sacct
#   scripts/local_slurm.sh down      cancel jobs, stop the daemons this script started (state and logs stay)
#   scripts/local_slurm.sh down --purge   ... and delete the state folder (job history, database)
#
# `up` is idempotent: a daemon already running is left alone. No systemd: every daemon is started by hand.
# Why accounting: submitit learns a job's end from `sacct`. Without slurmdbd a job that died outright
# (SIGKILL, node failure) never shows as finished and the sweep command would wait forever; with it
# `sacct` reports FAILED and the sweep ends with an error that names the job.
#
# Environment (all optional):
#   PO_SLURM_DIR      state, logs, pid files, database, configs (default /tmp/po-slurm)
#   PO_SLURM_CLUSTER  cluster name (default po-local)       PO_SLURM_ACCOUNT  account (default po)
#   PO_SLURM_PORTS    slurmctld,slurmd,slurmdbd,mariadb TCP ports (default 6817,6818,6819,3307)
# Client commands (sinfo, sbatch, sacct, ...) read /etc/slurm/slurm.conf, which `up` links to
# $PO_SLURM_DIR/etc/slurm.conf unless a slurm.conf that is not ours is there; then export SLURM_CONF.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then  # daemons, apt-get and /etc/slurm need root
  exec sudo -E "$0" "$@"
fi

DIR=${PO_SLURM_DIR:-/tmp/po-slurm}
CLUSTER=${PO_SLURM_CLUSTER:-po-local}
ACCOUNT=${PO_SLURM_ACCOUNT:-po}
IFS=, read -r CTLD_PORT SLURMD_PORT DBD_PORT DB_PORT <<<"${PO_SLURM_PORTS:-6817,6818,6819,3307}"
NODE=localhost
ETC_LINK=/etc/slurm/slurm.conf
MARK="# written by po-experiments scripts/local_slurm.sh"
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
export SLURM_CONF="$DIR/etc/slurm.conf"   # daemons and our own client calls; slurmdbd.conf is found beside it

say() { printf '[local_slurm] %s\n' "$*"; }
die() { printf '[local_slurm] error: %s\n' "$*" >&2; exit 1; }

# pid of a daemon we started, from its pid file, if that process is alive and is that program
pid_of() {  # name pidfile
  local pid
  [ -s "$2" ] || return 1
  pid=$(cat "$2")
  [ -d "/proc/$pid" ] && grep -q "$1" "/proc/$pid/comm" 2>/dev/null && echo "$pid"
}

wait_for() {  # seconds description command...
  local limit=$1 what=$2 t=0
  shift 2
  until "$@" >/dev/null 2>&1; do
    t=$((t + 1))
    [ "$t" -le "$limit" ] || return 1
    sleep 1
  done
  say "$what (after ${t}s)"
}

stop_pid() {  # name pidfile
  local pid t=0
  if pid=$(pid_of "$1" "$2"); then
    say "stopping $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    while [ -d "/proc/$pid" ] && [ "$t" -lt 30 ]; do sleep 1; t=$((t + 1)); done
    if [ -d "/proc/$pid" ]; then say "$1 did not stop in 30s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$2"
}

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  say "installing ${missing[*]} (apt-get)"
  # Without systemd, maintainer scripts would try to start the services: a policy-rc.d that says
  # "not now" (exit 101) stops that, as Debian's container images do. We remove it again if we made it.
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >"$DIR/log/apt.log" 2>&1 \
    || { apt-get update -q >>"$DIR/log/apt.log" 2>&1 \
         && apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$DIR/log/apt.log" 2>&1; } \
    || { [ "$made_policy" -eq 0 ] || rm -f /usr/sbin/policy-rc.d; tail -20 "$DIR/log/apt.log" >&2; die "apt-get failed (log: $DIR/log/apt.log)"; }
  [ "$made_policy" -eq 0 ] || rm -f /usr/sbin/policy-rc.d
}

write_configs() {
  local hw cpus mem
  # The node line from what slurmd itself detects (CPUs, sockets, cores, threads, memory), under our node
  # name; memory a little below the total so that slurmd never finds "less memory than configured".
  hw=$(slurmd -C 2>/dev/null | head -1) || die "slurmd -C failed"
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=$((mem * 9 / 10))
  hw=$(sed -e "s/^NodeName=[^ ]*/NodeName=$NODE/" -e "s/RealMemory=[0-9]*/RealMemory=$mem/" <<<"$hw")
  cat >"$DIR/etc/slurm.conf.new" <<EOF
$MARK (cluster $CLUSTER, state in $DIR)
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups here (no systemd): track job processes through /proc, bind no tasks
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# a job that asks for no memory gets this much per CPU (not the whole node), so jobs can share the node
DefMemPerCPU=$((mem / cpus / 2))
ReturnToService=2
# accounting: sacct sees finished, failed and killed jobs (submitit reads job states from sacct)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NODE
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
$hw State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$DIR/etc/slurm.conf.new" "$DIR/etc/slurm.conf"; then
    rm "$DIR/etc/slurm.conf.new"
  else
    mv "$DIR/etc/slurm.conf.new" "$DIR/etc/slurm.conf"
    say "wrote $DIR/etc/slurm.conf: $(grep '^NodeName' "$DIR/etc/slurm.conf")"
    if pid_of slurmctld "$DIR/run/slurmctld.pid" >/dev/null; then
      say "slurm.conf changed: scontrol reconfigure"; scontrol reconfigure || true
    fi
  fi
  umask 077
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
$MARK
AuthType=auth/munge
DbdHost=$NODE
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$DIR/etc/db.pass")
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
  umask 022
}

link_client_conf() {
  mkdir -p /etc/slurm
  if [ -L "$ETC_LINK" ] || [ ! -e "$ETC_LINK" ]; then
    ln -sfn "$DIR/etc/slurm.conf" "$ETC_LINK"
    say "$ETC_LINK -> $DIR/etc/slurm.conf (client commands need no SLURM_CONF)"
  elif ! grep -qF "$MARK" "$ETC_LINK"; then
    say "$ETC_LINK exists and is not ours: left alone. Use: export SLURM_CONF=$DIR/etc/slurm.conf"
  fi
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged: already answering"
    return
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  fi
  chown munge:munge /etc/munge /etc/munge/munge.key && chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge "$DIR/munge" && chown munge:munge /run/munge /var/lib/munge "$DIR/munge"
  chmod 755 /run/munge
  say "starting munged (as user munge)"
  runuser -u munge -- /usr/sbin/munged --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    </dev/null >>"$DIR/log/munged.out" 2>&1
  touch "$DIR/run/munged.ours"
  wait_for 20 "munged answers" bash -c 'munge -n | unmunge' || die "munged did not start: $DIR/munge/munged.log"
}

db() { mariadb --no-defaults --socket="$DIR/run/mysqld.sock" -u root "$@"; }

start_mariadb() {
  if pid_of mariadbd "$DIR/run/mariadbd.pid" >/dev/null; then
    say "mariadbd: already running"
  else
    if [ ! -d "$DIR/db/mysql" ]; then
      say "initialising MariaDB in $DIR/db"
      mariadb-install-db --no-defaults --datadir="$DIR/db" --user=root --auth-root-authentication-method=socket \
        --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $DIR/log/mariadb-install.log"
    fi
    say "starting mariadbd (127.0.0.1:$DB_PORT)"
    setsid mariadbd --no-defaults --user=root --datadir="$DIR/db" --socket="$DIR/run/mysqld.sock" \
      --pid-file="$DIR/run/mariadbd.pid" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
      --log-error="$DIR/log/mariadb.log" --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
      </dev/null >>"$DIR/log/mariadb.out" 2>&1 &
    wait_for 60 "mariadbd answers" mariadb-admin --no-defaults --socket="$DIR/run/mysqld.sock" -u root ping \
      || die "mariadbd did not start: $DIR/log/mariadb.log"
  fi
  [ -s "$DIR/etc/db.pass" ] || (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$DIR/etc/db.pass")
  db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$DIR/etc/db.pass")';
         ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$DIR/etc/db.pass")';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
  if pid_of slurmdbd "$DIR/run/slurmdbd.pid" >/dev/null; then
    say "slurmdbd: already running"
  else
    say "starting slurmdbd (port $DBD_PORT)"
    slurmdbd </dev/null >>"$DIR/log/slurmdbd.out" 2>&1 || die "slurmdbd failed: $DIR/log/slurmdbd.log"
  fi
  wait_for 60 "slurmdbd answers" sacctmgr -n show cluster || die "slurmdbd does not answer: $DIR/log/slurmdbd.log"
  # the cluster, an account, and the users who submit (root, and the sudo caller if any) in it
  if [ -z "$(sacctmgr -n -P show cluster "$CLUSTER" format=cluster)" ]; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null && say "sacctmgr: added cluster $CLUSTER"
  fi
  if [ -z "$(sacctmgr -n -P show account "$ACCOUNT" format=account)" ]; then
    sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="po-experiments" Organization=po >/dev/null \
      && say "sacctmgr: added account $ACCOUNT"
  fi
  local u
  for u in root ${SUDO_USER:-}; do
    if [ -z "$(sacctmgr -n -P show assoc where user="$u" account="$ACCOUNT" cluster="$CLUSTER" format=user)" ]; then
      sacctmgr -i add user "$u" Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null && say "sacctmgr: added user $u to $ACCOUNT"
    fi
  done
}

start_slurmctld() {
  if pid_of slurmctld "$DIR/run/slurmctld.pid" >/dev/null; then
    say "slurmctld: already running"
  else
    say "starting slurmctld (port $CTLD_PORT)"
    slurmctld </dev/null >>"$DIR/log/slurmctld.out" 2>&1 || die "slurmctld failed: $DIR/log/slurmctld.log"
  fi
  wait_for 60 "slurmctld answers" bash -c 'scontrol ping | grep -q UP' || die "slurmctld does not answer: $DIR/log/slurmctld.log"
}

start_slurmd() {
  if pid_of slurmd "$DIR/run/slurmd.pid" >/dev/null; then
    say "slurmd: already running"
  else
    say "starting slurmd -N $NODE (port $SLURMD_PORT)"
    slurmd -N "$NODE" </dev/null >>"$DIR/log/slurmd.out" 2>&1 || die "slurmd failed: $DIR/log/slurmd.log"
  fi
  node_ok() { sinfo -h -n "$NODE" -o %T | grep -Eq '^(idle|mixed|allocated|completing)'; }
  if ! wait_for 30 "node $NODE is up" node_ok; then
    # down or drained by an earlier unclean stop: put it back in service
    scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
    wait_for 30 "node $NODE resumed" node_ok || die "node $NODE is $(sinfo -h -n "$NODE" -o '%T %E'): $DIR/log/slurmd.log"
  fi
}

up() {
  mkdir -p "$DIR"/{etc,log,run,state,spool,db}
  install_packages
  start_munge
  start_mariadb
  write_configs
  link_client_conf
  start_slurmdbd
  start_slurmctld
  start_slurmd
  sinfo
  say "up: cluster $CLUSTER (state and logs in $DIR). Stop with: $0 down"
}

down() {
  if pid_of slurmctld "$DIR/run/slurmctld.pid" >/dev/null; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then say "cancelling jobs: $jobs"; scancel $jobs || true; sleep 2; fi
  fi
  stop_pid slurmd "$DIR/run/slurmd.pid"
  stop_pid slurmctld "$DIR/run/slurmctld.pid"
  stop_pid slurmdbd "$DIR/run/slurmdbd.pid"
  stop_pid mariadbd "$DIR/run/mariadbd.pid"
  if [ -e "$DIR/run/munged.ours" ]; then stop_pid munged "$DIR/munge/munged.pid"; rm -f "$DIR/run/munged.ours"; fi
  if [ -L "$ETC_LINK" ] && [ "$(readlink "$ETC_LINK")" = "$DIR/etc/slurm.conf" ]; then rm -f "$ETC_LINK"; fi
  if [ "${1:-}" = "--purge" ]; then say "removing $DIR"; rm -rf "$DIR"; fi
  say "down"
}

status() {
  local d pid rc=0
  for d in munged:"$DIR/munge/munged.pid" mariadbd:"$DIR/run/mariadbd.pid" slurmdbd:"$DIR/run/slurmdbd.pid" \
           slurmctld:"$DIR/run/slurmctld.pid" slurmd:"$DIR/run/slurmd.pid"; do
    if pid=$(pid_of "${d%%:*}" "${d#*:}"); then say "${d%%:*}: running (pid $pid)"
    else say "${d%%:*}: not running"; rc=1; fi
  done
  [ -e "$SLURM_CONF" ] || { say "no $SLURM_CONF: run $0 up"; return 1; }
  sinfo || rc=1
  squeue || rc=1
  sacctmgr -n show cluster format=cluster,controlhost,controlport || rc=1
  sacct -a -X -S now-1hours -o JobID,JobName%20,State,ExitCode,Elapsed,NodeList || rc=1
  return "$rc"
}

case "${1:-}" in
  up) up ;;
  down) down "${2:-}" ;;
  status) status ;;
  *) echo "usage: $0 up | down [--purge] | status" >&2; exit 2 ;;
esac
