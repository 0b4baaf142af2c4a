# syntax=docker/dockerfile:1
#
# sluice's container image, in two stages:
#   builder  the Rust toolchain CI uses, compiling dependencies in a layer of their own
#            so that a change under src/ recompiles only sluice itself;
#   runtime  distroless cc (glibc, libgcc, CA certificates, no shell, no package
#            manager, no build tools), running as the numeric non-root user 65532.
#
# The release binary comes from exactly the command CI builds with (scripts/check-deploy.sh
# fails if the two drift apart):
#   cargo build --release --locked

# Keep in step with the toolchain CI uses (check-deploy compares it with rustc). The
# builder and the runtime must share a Debian release (bookworm = debian12): the binary
# links against the builder's glibc.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /build
ENV CARGO_TERM_COLOR=never

# 1. Dependencies only. Cargo.toml and Cargo.lock alone decide this layer, with the
#    lab's manifest: it is a workspace member, and cargo loads every member's manifest
#    though `cargo build` in the root builds only sluice. Every source file and declared
#    bench/test target (and the lab's main.rs) is an empty stub, so the build compiles
#    and caches sluice's dependency graph and nothing of sluice worth keeping.
COPY Cargo.toml Cargo.lock ./
COPY lab/Cargo.toml ./lab/
COPY scripts/deploy/stub-targets.sh /usr/local/bin/stub-targets
RUN sh /usr/local/bin/stub-targets \
 && cargo build --release --locked \
 && rm -rf src

# 2. sluice itself: its sources, and every file they compile in (include_str!:
#    src/http/ops.rs serves api/openapi.json). Each such file must also be admitted by
#    .dockerignore; scripts/check-deploy.sh replays this stage from the build context and
#    names any that is missing. COPY keeps the files' original modification times, which
#    can be older than the stub build above; touch the sources so cargo cannot mistake
#    the stubs' artefacts for up to date. The bench/test stubs stay: `cargo build` does
#    not build those targets, but Cargo.toml must find a file for each it declares.
COPY api/openapi.json ./api/openapi.json
COPY src ./src
RUN find src -type f -exec touch {} + \
 && cargo build --release --locked \
 && ./target/release/sluice --help >/dev/null

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /build/target/release/sluice /usr/local/bin/sluice
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 65532:65532
ENV APP_PORT=8000
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/sluice"]
