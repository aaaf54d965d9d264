# syntax=docker/dockerfile:1
# Multi-stage build of candlestream. cargo-chef builds the dependencies in a layer of their own
# from a recipe of the manifests, with a stub for every target the manifests declare (benches,
# tests and examples included), so changing src/ rebuilds only the crate itself and a new target
# cannot break the dependency layer. tests/dockerfile.rs replays these steps without Docker.
#
# Base images are pinned by tag and digest: the tag says what it is, the digest makes every build
# start from the same bytes. To move on: `docker buildx imagetools inspect <tag>` and change both.

# Parallel compiler jobs of the release build. Cargo's default is one per CPU, and each job of a
# dependency can take up to about 0.45 GiB beside the 0.7 GiB the build needs anyway (README,
# Memory): 2 jobs peaked at 1.15 GiB, which fits beside the running platform in 5 GiB and alone in
# the 4 GiB the README asks for, where 8 or 12 (a Docker Desktop's CPUs) would not. With more
# memory, raise it: CARGO_BUILD_JOBS in .env (docker-compose.yml passes it), or
# `docker build --build-arg CARGO_BUILD_JOBS=8 .`. Cargo reads it from the environment, where
# Docker puts each ARG during RUN.
ARG CARGO_BUILD_JOBS=2

FROM rust:1.95-slim-bookworm@sha256:d7482085ff5b415f84dba5647ae71606650bdef00db7aeb69f4b3d170c3e4082 AS chef
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config python3 zlib1g-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
ARG CARGO_BUILD_JOBS
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /build

# The recipe: every manifest and target of the project, no source.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
ARG CARGO_BUILD_JOBS
COPY --from=planner /build/recipe.json recipe.json
# Dependency layer: rebuilt only when Cargo.toml or Cargo.lock change.
RUN cargo chef cook --release --locked --bin candlestream --recipe-path recipe.json
# The crate itself.
COPY . .
RUN cargo build --release --locked --bin candlestream

FROM debian:bookworm-slim@sha256:7b140f374b289a7c2befc338f42ebe6441b7ea838a042bbd5acbfca6ec875818 AS runtime
# libssl3: librdkafka's TLS and SASL (SCRAM) for managed Kafka; ca-certificates: the public CAs
# that Bitfinex, a managed Kafka and an InfluxDB over https are checked against.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home candlestream
COPY --from=build /build/target/release/candlestream /usr/local/bin/candlestream
COPY config/default.toml /etc/candlestream/default.toml
ENV CANDLESTREAM_CONFIG=/etc/candlestream/default.toml
# In a container /healthz and /metrics listen on all of its interfaces (the default is loopback,
# for a process on a host); what reaches them is decided where the port is published.
ENV CANDLESTREAM__HTTP__LISTEN=0.0.0.0:9100
USER 10001
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["candlestream", "healthcheck"]
ENTRYPOINT ["candlestream"]
CMD ["--help"]
