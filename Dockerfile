# syntax=docker/dockerfile:1

# Builds the single `cairn` binary (serve, command-api, query-api, projector, workers,
# migrate, ...) and ships it in a slim runtime image.
#   docker build -t cairn .
# Needs BuildKit (the default builder of current Docker) for the cache mounts.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src

COPY Cargo.toml Cargo.lock ./
COPY domain ./domain
COPY platform ./platform
COPY command-api ./command-api
COPY query-api ./query-api
COPY projector ./projector
COPY workers ./workers
COPY embedded ./embedded
COPY bench ./bench
COPY src ./src
COPY migrations ./migrations
COPY tests ./tests

# The registry and target directories are cache mounts, so rebuilds reuse downloaded crates
# and compiled dependencies. A cache mount is not part of the image: the binary is copied out
# of it in the same RUN.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin cairn \
 && cp /src/target/release/cairn /usr/local/bin/cairn


FROM debian:bookworm-slim AS runtime

# ca-certificates: TLS to Postgres, S3 and SMTP. tini: PID 1 that forwards signals (graceful
# shutdown) and reaps children.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*

# An unprivileged user. /var/lib/cairn is its state directory (signing keys); a named volume
# mounted there starts out owned by this user.
RUN groupadd --system --gid 10001 cairn \
 && useradd --system --no-log-init --uid 10001 --gid cairn \
      --home-dir /var/lib/cairn --shell /usr/sbin/nologin cairn \
 && install -d -o cairn -g cairn -m 0700 /var/lib/cairn /var/lib/cairn/keys

COPY --from=builder /usr/local/bin/cairn /usr/local/bin/cairn

USER cairn
WORKDIR /var/lib/cairn

ENV CAIRN_LISTEN=0.0.0.0:8080
EXPOSE 8080

# No HEALTHCHECK here: the same image runs roles without an HTTP listener and one-off commands
# (migrate, replay, ...). Compose adds one to the HTTP roles: `cairn healthcheck` requests
# /health on CAIRN_LISTEN and exits 0 or 1.
ENTRYPOINT ["tini", "--", "cairn"]
CMD ["serve"]
