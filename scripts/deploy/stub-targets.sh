#!/bin/sh
# Writes an empty stub for every source file Cargo.toml (in the current directory), and
# the manifest of each workspace member it lists, points at, so `cargo build --release
# --locked` can compile and cache the dependencies before the real sources are copied in
# (see the Dockerfile). Cargo loads every member's manifest even when it builds only the
# root package, and refuses one whose targets have no file.
#
# Cargo refuses a manifest whose declared targets have no file, even when it would not
# build them, so every declared [[bin]], [[bench]], [[test]] and [[example]] gets a stub:
# its `path = "..."` if given, else the conventional place for its `name`.
# POSIX sh and awk only: it runs inside the rust builder image.
set -eu

stub() {
  mkdir -p "$(dirname "$1")"
  [ -e "$1" ] || printf 'fn main() {}\n' >"$1"
}

# stub_package DIR: DIR's own src/main.rs (or src/lib.rs, for the root package) and
# every target its Cargo.toml declares.
stub_package() {
  dir=$1
  if [ "$dir" = . ]; then
    mkdir -p src
    [ -e src/main.rs ] || printf 'fn main() {}\n' >src/main.rs
    [ -e src/lib.rs ] || : >src/lib.rs
  else
    stub "$dir/src/main.rs"
  fi
  awk '
    function flush() {
      if (kind != "" && (path != "" || name != "")) {
        if (path == "") {
          if (kind == "bin") path = "src/bin/" name ".rs"
          else if (kind == "bench") path = "benches/" name ".rs"
          else if (kind == "test") path = "tests/" name ".rs"
          else if (kind == "example") path = "examples/" name ".rs"
        }
        if (path != "") print path
      }
      kind = ""; name = ""; path = ""
    }
    /^[[:space:]]*\[\[(bin|bench|test|example)\]\][[:space:]]*$/ {
      flush(); kind = $0; gsub(/[][[:space:]]/, "", kind); next
    }
    /^[[:space:]]*\[/ { flush(); next }
    kind != "" && /^[[:space:]]*name[[:space:]]*=/ {
      v = $0; sub(/^[^=]*=[[:space:]]*"/, "", v); sub(/".*$/, "", v); name = v; next
    }
    kind != "" && /^[[:space:]]*path[[:space:]]*=/ {
      v = $0; sub(/^[^=]*=[[:space:]]*"/, "", v); sub(/".*$/, "", v); path = v; next
    }
    END { flush() }
  ' "$dir/Cargo.toml" | while IFS= read -r f; do
    case $f in
      src/main.rs | src/lib.rs) [ "$dir" = . ] || stub "$dir/$f" ;;
      *) stub "$dir/$f" ;;
    esac
  done
}

stub_package .
# The members the root manifest lists (`members = [".", "lab"]`, on one line).
sed -n 's/^members[[:space:]]*=[[:space:]]*\[\(.*\)\]/\1/p' Cargo.toml | tr ',' '\n' | tr -d ' "' |
  while IFS= read -r m; do
    [ -z "$m" ] || [ "$m" = . ] || stub_package "$m"
  done
