# appevents: the worker, the HTTP API (`appevents serve`) and the stand-in CRM in one image
# (the stand-in is its own crate of the workspace, and its own binary).
#
#   docker build -t appevents:local .
#   docker run --rm appevents:local --help
#
# Default command: `appevents worker`. Other commands: `docker run ... appevents:local migrate`,
# `... serve`, or `--entrypoint appevents-standin ... --listen 0.0.0.0:8099`.

# ---------------------------------------------------------------------------------------------
# Builder.
#
# The workspace declares rust-version = "1.88" and edition 2024, so it needs Rust 1.88 or newer.
# `rust:1-bookworm` is the newest stable 1.x on Debian 12 (always >= 1.88), deliberately not
# `rust:1.88-bookworm`: a dependency in Cargo.lock may raise its own rust-version above the
# crate's, and `--locked` would then fail on an exactly pinned old toolchain. Bookworm matches
# the runtime stage, so the binaries link against the same glibc they run with.
# ---------------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder

WORKDIR /src

# 1. Dependencies only, in their own layer: it is rebuilt only when a manifest or Cargo.lock
#    changes. Stub sources give Cargo every target of the workspace it expects (the
#    product's library and binary, the stand-in CRM's library and binary, the benchmark);
#    the stubs' own artefacts and fingerprints are removed afterwards, so the real sources
#    below are always compiled.
COPY Cargo.toml Cargo.lock ./
COPY crates/standin/Cargo.toml crates/standin/
COPY crates/bench/Cargo.toml crates/bench/
RUN mkdir -p src crates/standin/src crates/bench/src \
    && echo 'fn main() {}' > src/main.rs \
    && : > src/lib.rs \
    && echo 'fn main() {}' > crates/standin/src/main.rs \
    && : > crates/standin/src/lib.rs \
    && echo 'fn main() {}' > crates/bench/src/main.rs \
    && cargo build --release --locked --bin appevents --bin appevents-standin \
    && rm -rf src crates/standin/src crates/bench/src \
        target/release/.fingerprint/appevents-* \
        target/release/deps/appevents-* \
        target/release/deps/appevents_standin-* \
        target/release/deps/libappevents-* \
        target/release/deps/libappevents_standin-* \
        target/release/appevents \
        target/release/appevents.d \
        target/release/appevents-standin \
        target/release/appevents-standin.d \
        target/release/libappevents.* \
        target/release/libappevents_standin.*

# 2. The workspace itself. config/default.toml (include_str!), migrations/ (refinery's
#    embed_migrations!), the pages' templates/ (askama) and assets/ (include_str!) are read at
#    compile time, so all of them must be here for the build.
COPY src ./src
COPY crates ./crates
COPY migrations ./migrations
COPY config ./config
COPY templates ./templates
COPY assets ./assets
RUN cargo build --release --locked --bin appevents --bin appevents-standin

# ---------------------------------------------------------------------------------------------
# Runtime: Debian 12 slim with the CA bundle (outbound TLS to Salesforce and HubSpot, amqps://)
# and nothing else.
# ---------------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates is left unpinned on purpose: a Debian stable point release replaces the
# pinned version and the build would break; its updates are the ones we want.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

# Unprivileged user with fixed ids (10001), no home and no login shell.
RUN groupadd --system --gid 10001 appevents \
    && useradd --system --uid 10001 --gid appevents \
        --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin appevents

COPY --from=builder /src/target/release/appevents /src/target/release/appevents-standin /usr/local/bin/
# The per-environment layer files: config/{APPEVENTS_ENVIRONMENT}.toml is read over the compiled-in
# defaults when it exists. Owned by root, read-only for the service user.
COPY config/ /app/config/

WORKDIR /app
ENV APPEVENTS_CONFIG_DIR=/app/config
# Each container has its own network: the ops endpoints on a fixed port, for Prometheus and
# the probes (outside a container the default picks a free port).
ENV APPEVENTS__WORKER__OPS_LISTEN=0.0.0.0:9090

# The `appevents` user, by number: a numeric USER lets Kubernetes' runAsNonRoot verify it
# without reading /etc/passwd.
USER 10001:10001

# 9090: ops endpoints of the worker (/metrics, /healthz, /readyz).
# 8080: HTTP ingest and management API of `appevents serve`.
EXPOSE 9090 8080

ENTRYPOINT ["appevents"]
CMD ["worker"]
