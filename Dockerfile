# syntax=docker/dockerfile:1
# tally: a multi-stage build. The builder compiles the bundled librdkafka
# and RocksDB (about 15 minutes cold); the runtime image holds the binary,
# the topic declarations and nothing else.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential libclang-dev pkg-config zlib1g-dev perl python3 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY src ./src
# The declarations are compiled into the binary as its defaults.
COPY topics ./topics
RUN cargo build --release --locked --bin tally \
    && strip target/release/tally

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 tally \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tally \
    && mkdir -p /var/lib/tally \
    && chown tally:tally /var/lib/tally
COPY --from=build /src/target/release/tally /usr/local/bin/tally
COPY topics /etc/tally/topics
ENV TALLY_TOPICS_DIR=/etc/tally/topics \
    TALLY_STATE_DIR=/var/lib/tally/state \
    TALLY_HTTP=0.0.0.0:8080 \
    TALLY_LOG_FORMAT=json
USER 10001:10001
VOLUME ["/var/lib/tally"]
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tally"]
CMD ["run"]
