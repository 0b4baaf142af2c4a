#!/usr/bin/env bash
# What the lab's conductor (lab/src/conductor/) asks of the machine for its faults that
# start a server as setup does (Redis) or act on the database's disk (root's mount). The
# decisions (when, which) are the conductor's; this only acts. Signals to the replicas
# and the database are the conductor's own (lab/src/replica.rs, conductor/chaos.rs).
#
#   ctl.sh redis-restart       kill -9 Redis and start it again, empty, on the same port
#                              with the same password
#   ctl.sh disk-fill           fill the database's own disk; exit 3 when it has none
#   ctl.sh disk-free           remove what disk-fill wrote; restart a panicked database
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lab/lib.sh
. "$HERE/lib.sh"

gone() { # PID SECONDS: true once PID has exited
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.1
  done
  return 1
}

case "${1:-}" in
  redis-restart)
    # shellcheck disable=SC1091
    . "$LAB_STATE/lab.env"
    pid=$(cat "$LAB_STATE/redis.pid") || exit 1
    kill -KILL "$pid" 2>/dev/null
    gone "$pid" 5 || exit 1
    # redis://:PASSWORD@127.0.0.1:PORT: the port follows the last colon. Never printed:
    # the URL holds the password.
    port=${REDIS_URL##*:}
    [[ $port =~ ^[0-9]+$ ]] || { echo "no port at the end of REDIS_URL in lab.env" >&2; exit 1; }
    # Same port, same password (lab_start_redis reads it from its file): the replicas'
    # REDIS_URL stays right.
    lab_start_redis "$port"
    ;;
  disk-fill)
    mnt=$LAB_STATE/mnt
    if [ ! -f "$LAB_STATE/mountpoint" ] || ! mountpoint -q "$mnt"; then
      echo "the database has no disk of its own here (no loop device)"
      exit 3
    fi
    stat -c %s "$LAB_STATE/mongo.log" >"$LAB_STATE/fill-logpos" 2>/dev/null || echo 0 >"$LAB_STATE/fill-logpos"
    avail=$(df -B1 --output=avail "$mnt" | tail -n1 | tr -d ' ')
    # Most of it at once, the last few MiB written until the filesystem refuses.
    fallocate -l $((avail > 64 << 20 ? avail - (32 << 20) : 0)) "$mnt/chaos-fill" 2>/dev/null || true
    dd if=/dev/zero of="$mnt/chaos-fill-2" bs=1M status=none 2>/dev/null
    echo "$((avail >> 20)) MiB"
    ;;
  disk-free)
    rm -f "$LAB_STATE/mnt/chaos-fill" "$LAB_STATE/mnt/chaos-fill-2"
    # WiredTiger panics when a write finds the disk full; secantusd-rs then stays up
    # answering every command with WT_PANIC, where mongod would exit. The lab restarts
    # it, as the kubelet restarts a mongod that exited.
    pid=$(cat "$LAB_STATE/mongo.pid") || exit 1
    pos=$(cat "$LAB_STATE/fill-logpos" 2>/dev/null || echo 0)
    # Not `tail | grep -q`: under pipefail, grep quitting at the first match would fail
    # the pipeline with tail's SIGPIPE, and the panic go unseen; here only grep's status
    # counts.
    if grep -q WT_PANIC <(tail -c +$((pos + 1)) "$LAB_STATE/mongo.log" 2>/dev/null) && kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" && gone "$pid" 5 && echo "the database had panicked (WT_PANIC): restarted"
    fi
    ;;
  *)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
