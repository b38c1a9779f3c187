# credgate as a container image: built with the official Rust image, run on Debian slim as a
# non-root user. Build and run:
#
#   docker build -t credgate .
#   docker run -d -p 8080:8080 -v credgate-data:/var/lib/credgate credgate
#
# With no key file given, `serve` generates the master key into the data volume beside the
# SQLite database (fine for one instance to try it out). For anything else pass the key as
# a mounted secret file: -v /path/master.key:/run/secrets/credgate_master_key:ro
# -e CREDGATE_MASTER_KEY_FILE=/run/secrets/credgate_master_key (the file must be readable by
# uid 10001). Every `serve` flag has a CREDGATE_* environment variable (README,
# "Configuration"); the image sets the listen address and the data directory.

FROM rust:1-bookworm AS builder
WORKDIR /build
# Dependencies first, compiled against empty targets: this layer is reused for as long as
# Cargo.toml and Cargo.lock are unchanged, so a change in src/ rebuilds only credgate.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/auth.rs \
    && cargo build --release --locked \
    && rm -f src/main.rs src/lib.rs
COPY migrations migrations
COPY src src
# The copied files keep their (older) times: touch them so cargo rebuilds the crate itself.
RUN touch build.rs src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && ./target/release/credgate --version

FROM debian:bookworm-slim
# ca-certificates: PostgreSQL over TLS (sslmode=verify-full) checks the system's roots.
# curl: the health check (the image has nothing else that speaks HTTP).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 credgate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/credgate --no-create-home \
        --shell /usr/sbin/nologin credgate \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/credgate
COPY --from=builder /build/target/release/credgate /usr/local/bin/credgate

# The SQLite database (credgate.db) and, when no key file is given, the generated master key
# (master.key) live in the data directory. A PostgreSQL deployment sets CREDGATE_DATABASE_URL
# and needs no volume.
ENV CREDGATE_LISTEN=0.0.0.0:8080 \
    CREDGATE_DATA_DIR=/var/lib/credgate
VOLUME ["/var/lib/credgate"]
USER 10001:10001
WORKDIR /var/lib/credgate
EXPOSE 8080
# Liveness only: /ready (503 while the database or the PostgreSQL listener is down) is for a
# load balancer to route around an instance, not a reason to restart it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["curl", "--fail", "--silent", "--show-error", "--output", "/dev/null", "http://127.0.0.1:8080/health"]
# SIGTERM lets in-flight requests finish (up to --shutdown-timeout, 30 s): give `docker stop`
# a longer timeout than its default 10 s (`--time 45`, compose `stop_grace_period: 45s`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["credgate"]
CMD ["serve"]
