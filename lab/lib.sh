# shellcheck shell=bash
# Sourced by the lab scripts, never run. Paths, printing, the state folder that records
# everything the lab started so that cleanup-local.sh can undo exactly that.
#
#   LAB_RESULTS_DIR  reports and logs (default: <repo>/results, git-ignored)
#   LAB_STATE_DIR    pids, ports, disk image, mount point (default: $LAB_RESULTS_DIR/.lab-state)
#                    Two labs with different state folders never touch each other's parts:
#                    the cgroup names and the port range are derived from this path.

LAB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAB_RESULTS=${LAB_RESULTS_DIR:-$LAB_ROOT/results}
mkdir -p "$LAB_RESULTS"
LAB_RESULTS=$(cd "$LAB_RESULTS" && pwd)
LAB_STATE=${LAB_STATE_DIR:-$LAB_RESULTS/.lab-state}
mkdir -p "$LAB_STATE"
LAB_STATE=$(cd "$LAB_STATE" && pwd)
# A short tag unique to this state folder: names the cgroups, spreads the ports (`lab
# free-port --tag`).
LAB_TAG=$(printf '%s' "$LAB_STATE" | cksum | cut -d' ' -f1)
LAB_CGROUP_NAME="sluice-lab-$LAB_TAG"
export LAB_ROOT LAB_RESULTS LAB_STATE LAB_TAG LAB_CGROUP_NAME

lab_step() { printf '\n==> %s\n' "$*"; }
lab_info() { printf '    %s\n' "$*"; }
lab_warn() {
  printf '\n!!! WARNING: %s\n\n' "$*" >&2
  printf '%s\n' "$*" >>"$LAB_STATE/warnings"
}
lab_die() { printf '\nerror: %s\n' "$*" >&2; exit 1; }
lab_is_root() { [ "$(id -u)" -eq 0 ]; }

# lab_record_pid NAME PID: remembers a process the lab started, with its start time so
# that cleanup never signals an unrelated process that later got the same pid.
lab_record_pid() {
  local start
  start=$(lab_proc_start "$2") || start=0
  echo "$1 $2 $start" >>"$LAB_STATE/pids"
}

# lab_proc_start PID: the process's start time in clock ticks since boot (field 22 of stat).
lab_proc_start() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  # shellcheck disable=SC2086
  set -- $stat
  echo "${20}"
}

# lab_alive NAME PID START: true while that very process still runs.
lab_alive() {
  local now
  now=$(lab_proc_start "$2") || return 1
  [ "$3" = 0 ] || [ "$now" = "$3" ]
}

# lab_wait_http URL SECONDS [PID]: waits until URL answers 200; gives up early when the
# process PID has died.
lab_wait_http() {
  local url=$1 secs=$2 pid=${3:-} i
  for ((i = 0; i < secs * 4; i++)); do
    if curl -fsS -o /dev/null -m 2 "$url" 2>/dev/null; then return 0; fi
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    sleep 0.25
  done
  return 1
}

# lab_cgroup_dir CONTROLLER: the cgroup v1 folder this lab uses for CONTROLLER, nested
# under the cgroup the caller already sits in (so the lab stays inside whatever limits
# its own parent has). Prints nothing and fails where that controller is not mounted.
lab_cgroup_dir() {
  local ctrl=$1 line rel mnt
  mnt=/sys/fs/cgroup/$ctrl
  [ -d "$mnt" ] && [ -f "$mnt/cgroup.procs" ] || return 1
  line=$(awk -F: -v c="$ctrl" '{ n = split($2, a, ","); for (i = 1; i <= n; i++) if (a[i] == c) print $3 }' /proc/self/cgroup | head -n1)
  [ -n "$line" ] || return 1
  rel=${line%/}
  echo "$mnt$rel/$LAB_CGROUP_NAME"
}

# Redis requires a password, as in the cluster (k8s/redis/auth.yaml), so a replica that
# forgot it fails here as it would there. setup-local.sh makes a new one per lab
# (lab_new_redis_password); Redis and its restarts read it from this 0600 file.
LAB_REDIS_PASSWORD_FILE=$LAB_STATE/redis.password

# lab_new_redis_password: writes a fresh random password (48 hex digits, URL-safe) to
# LAB_REDIS_PASSWORD_FILE, readable by its owner only.
lab_new_redis_password() {
  local pw
  pw=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n') && [ "${#pw}" -eq 48 ] || return 1
  rm -f "$LAB_REDIS_PASSWORD_FILE"
  (umask 077 && printf '%s\n' "$pw" >"$LAB_REDIS_PASSWORD_FILE")
}

# lab_redis_password: the lab Redis' password, from LAB_REDIS_PASSWORD_FILE.
lab_redis_password() {
  local pw
  pw=$(cat "$LAB_REDIS_PASSWORD_FILE" 2>/dev/null) && [ -n "$pw" ] || return 1
  printf '%s\n' "$pw"
}

# lab_redis_url PORT: sluice's REDIS_URL for the lab Redis, password included.
lab_redis_url() {
  local pw
  pw=$(lab_redis_password) || return 1
  printf 'redis://:%s@127.0.0.1:%s\n' "$pw" "$1"
}

# lab_redact_url URL: URL with the password of its user info shown as ***, as sluice
# shows it (redis://:***@127.0.0.1:6379); for anything the lab prints.
lab_redact_url() {
  printf '%s\n' "$1" | sed -E 's#^([A-Za-z][A-Za-z0-9+.-]*://[^:/?@]*):[^/?]*@#\1:***@#'
}

# lab_start_redis PORT: an empty, non-persistent redis-server on PORT that requires the
# password in LAB_REDIS_PASSWORD_FILE, recorded; waits until it answers (setup starts it;
# ctl.sh redis-restart starts it again, empty, with the same password). The password is
# in a 0600 config file, not on the command line, where `ps` would show it.
lab_start_redis() {
  local port=$1 pid i pw conf=$LAB_STATE/redis.conf
  pw=$(lab_redis_password) || { echo "no Redis password in $LAB_REDIS_PASSWORD_FILE" >&2; return 1; }
  rm -f "$conf"
  (umask 077 && printf '# Written by lab/lib.sh: the lab Redis password.\nrequirepass %s\n' "$pw" >"$conf") ||
    return 1
  redis-server "$conf" --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
    --maxclients 10000 --dir "$LAB_STATE" --daemonize no </dev/null >>"$LAB_STATE/redis.log" 2>&1 &
  pid=$!
  # The chaos kills it with SIGKILL: out of the job table, so the shell that started it
  # does not print "Killed" into the run's output.
  disown "$pid"
  lab_record_pid redis "$pid"
  echo "$pid" >"$LAB_STATE/redis.pid"
  for ((i = 0; i < 40; i++)); do
    [ "$(REDISCLI_AUTH="$pw" redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.25
  done
  return 1
}

# lab_cg_write FILE VALUE: one cgroup write; with LAB_CG_TRACE set, also appended there
# as "FILE VALUE", so that a test can check the exact writes and their order.
lab_cg_write() {
  [ -z "${LAB_CG_TRACE:-}" ] || printf '%s %s\n' "$1" "$2" >>"$LAB_CG_TRACE"
  printf '%s\n' "$2" >"$1"
}

# lab_cgroup2_setup ROOT NAME MAJ:MIN MEMORY_BYTES: the database's limits on a cgroup v2
# (unified) host, in this order: enable the io, cpu and memory controllers for ROOT's
# children, make ROOT/NAME, then io.max (100 read + 100 write IOPS on the disk, when
# MAJ:MIN is given), cpu.max (0.5 CPU) and memory.max. Prints ROOT/NAME. Unlike v1's
# blkio throttle, io.max also throttles the page-cache writeback of that disk.
lab_cgroup2_setup() {
  local root=$1 name=$2 majmin=$3 mem=$4
  lab_cg_write "$root/cgroup.subtree_control" "+io +cpu +memory" || return 1
  mkdir -p "$root/$name" || return 1
  if [ -n "$majmin" ]; then
    lab_cg_write "$root/$name/io.max" "$majmin riops=100 wiops=100" || return 1
  fi
  lab_cg_write "$root/$name/cpu.max" "50000 100000" || return 1
  lab_cg_write "$root/$name/memory.max" "$mem" || return 1
  echo "$root/$name"
}

# lab_cgroup2_root: the v2 cgroup the caller sits in, on a unified-only host; fails on
# v1 or hybrid hosts (there v2 has no controllers: the v1 code path applies).
lab_cgroup2_root() {
  [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = cgroup2fs ] || return 1
  local rel
  rel=$(awk -F: '$1 == "0" { print $3 }' /proc/self/cgroup | head -n1)
  echo "/sys/fs/cgroup${rel%/}"
}
