# syntax=docker/dockerfile:1
# Multi-stage build of candlestream. Dependencies build in their own layer, so changing src/
# rebuilds only the crate itself.

FROM rust:1.95-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config python3 zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build
# Dependency layer: the manifests with a stub crate.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches examples \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && for b in codec sink; do echo 'fn main() {}' > benches/$b.rs; done \
 && echo 'fn main() {}' > examples/influx_write.rs \
 && cargo build --release --locked --bin candlestream \
 && rm -rf src
# The crate itself.
COPY schemas schemas
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin candlestream

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home candlestream
COPY --from=build /build/target/release/candlestream /usr/local/bin/candlestream
COPY config/default.toml /etc/candlestream/default.toml
ENV CANDLESTREAM_CONFIG=/etc/candlestream/default.toml
USER 10001
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["candlestream", "healthcheck"]
ENTRYPOINT ["candlestream"]
CMD ["--help"]
