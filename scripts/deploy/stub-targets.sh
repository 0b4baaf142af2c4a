#!/bin/sh
# Writes an empty stub for every source file Cargo.toml (in the current directory)
# points at, so `cargo build --release --locked` can compile and cache the
# dependencies before the real sources are copied in (see the Dockerfile).
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

mkdir -p src
[ -e src/main.rs ] || printf 'fn main() {}\n' >src/main.rs
[ -e src/lib.rs ] || : >src/lib.rs

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
' Cargo.toml | while IFS= read -r f; do
  case $f in
    src/main.rs | src/lib.rs) ;;
    *) stub "$f" ;;
  esac
done
