#!/usr/bin/env bash
# Stops the local lab that lab/setup-local.sh started, and only that: every process it
# recorded (by pid, checked against the process's start time), the mount, the loop
# device, the cgroups and the disk image. Safe to run when nothing is up, and twice.
#
#   ./cleanup.sh --local          (or lab/cleanup-local.sh directly)
#   LAB_STATE_DIR=...             clean up a lab started with that state folder
set -uo pipefail

case "${1:-}" in
  -h | --help)
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  -q | --quiet) QUIET=1 ;;
  "") QUIET=0 ;;
  *) echo "usage: $0 [--quiet]" >&2; exit 2 ;;
esac

# shellcheck source=lab/lib.sh
. "$(dirname "$0")/lib.sh"

say() { [ "$QUIET" = 1 ] || printf '%s\n' "$*"; }
failed=0

[ "$QUIET" = 1 ] || lab_step "cleaning up the local lab (state: ${LAB_STATE#"$LAB_ROOT"/})"

# 1. Processes, in two waves: first k6, HAProxy and the replicas (which drain their
#    queues into the database on SIGTERM), then Redis and the database, which must
#    outlive the drain. Within a wave all get SIGTERM at once; SIGKILL after 30 s.
stop_wave() {
  local e name pid start i left
  local -a wave=()
  for e in "$@"; do
    read -r name pid start <<<"$e"
    if lab_alive "$name" "$pid" "$start"; then
      say "    stopping $name (pid $pid)"
      kill -TERM "$pid" 2>/dev/null
      wave+=("$e")
    fi
  done
  for ((i = 0; i < 120; i++)); do
    left=0
    for e in "${wave[@]}"; do
      read -r name pid start <<<"$e"
      lab_alive "$name" "$pid" "$start" && left=1
    done
    [ "$left" = 0 ] && return 0
    sleep 0.25
  done
  for e in "${wave[@]}"; do
    read -r name pid start <<<"$e"
    if lab_alive "$name" "$pid" "$start"; then
      say "    $name (pid $pid) ignored SIGTERM for 30 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null
    fi
  done
  sleep 0.5
}
if [ -s "$LAB_STATE/pids" ]; then
  first=() last=()
  while read -r e; do
    case "$e" in
      mongo* | redis*) last+=("$e") ;;
      *) first+=("$e") ;;
    esac
  done < <(tac "$LAB_STATE/pids")
  [ ${#first[@]} -eq 0 ] || stop_wave "${first[@]}"
  [ ${#last[@]} -eq 0 ] || stop_wave "${last[@]}"
  rm -f "$LAB_STATE/pids"
fi

# The lab's cgroups: those recorded, and any folder of this lab's name in the cgroup v1
# hierarchies (a state folder lost mid-run must not leave them behind).
cgroups=()
if [ -f "$LAB_STATE/cgroups" ]; then mapfile -t cgroups <"$LAB_STATE/cgroups"; fi
for ctrl in blkio cpu memory; do
  [ -d "/sys/fs/cgroup/$ctrl" ] || continue
  while read -r d; do cgroups+=("$d"); done < <(find "/sys/fs/cgroup/$ctrl" -maxdepth 6 -type d -name "$LAB_CGROUP_NAME" 2>/dev/null)
done

# 2. Whatever still runs inside them was started by the lab (the database): stop it.
for cg in "${cgroups[@]}"; do
  [ -f "$cg/cgroup.procs" ] || continue
  while read -r p; do
    [ -n "$p" ] || continue
    say "    stopping pid $p (still in ${cg#/sys/fs/cgroup/})"
    kill -TERM "$p" 2>/dev/null
    for ((i = 0; i < 60; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$p" 2>/dev/null
  done <"$cg/cgroup.procs"
done

# 3. The mount and the loop device(s) backed by this lab's image.
mnt=$LAB_STATE/mnt
[ ! -f "$LAB_STATE/mountpoint" ] || mnt=$(cat "$LAB_STATE/mountpoint")
if mountpoint -q "$mnt" 2>/dev/null; then
  say "    unmounting $(basename "$mnt")"
  for ((i = 0; i < 20; i++)); do
    umount "$mnt" 2>/dev/null && break
    sleep 0.5
  done
  if mountpoint -q "$mnt"; then
    echo "    could not unmount $mnt (busy?): lazy unmount" >&2
    umount -l "$mnt" || failed=1
  fi
fi
rm -f "$LAB_STATE/mountpoint"
img=$LAB_STATE/disk.img
if command -v losetup >/dev/null; then
  # Also a loop device whose image was deleted under it ("... (deleted)").
  while read -r dev back; do
    case "$back" in
      "$img" | "$img (deleted)")
        say "    detaching $dev"
        losetup -d "$dev" || failed=1
        ;;
    esac
  done < <(losetup -l -n -O NAME,BACK-FILE 2>/dev/null)
fi
rm -f "$img" "$LAB_STATE/loopdev"

# 4. The cgroups (empty by now).
for cg in "${cgroups[@]}"; do
  [ -d "$cg" ] || continue
  say "    removing cgroup ${cg#/sys/fs/cgroup/}"
  for ((i = 0; i < 20; i++)); do rmdir "$cg" 2>/dev/null && break; sleep 0.25; done
  [ ! -d "$cg" ] || { echo "    could not remove cgroup $cg" >&2; failed=1; }
done
rm -f "$LAB_STATE/cgroups"

# 5. Logs survive in the results folder for a look afterwards; the rest of the state goes.
if compgen -G "$LAB_STATE/*.log" >/dev/null; then
  logs=$LAB_RESULTS/lab-logs$( [ "$LAB_STATE" = "$LAB_RESULTS/.lab-state" ] || echo "-$LAB_TAG")
  rm -rf "$logs" && mkdir -p "$logs" && cp "$LAB_STATE"/*.log "$logs"/ 2>/dev/null
  say "    logs kept in ${logs#"$LAB_ROOT"/}"
fi
rm -rf "$LAB_STATE"

if [ "$failed" = 0 ]; then
  say "    the local lab is down"
else
  echo "    cleanup finished with errors (see above)" >&2
fi
exit "$failed"
