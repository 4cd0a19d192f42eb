# Multi-stage build: compile Portico with the Rust toolchain, ship it on a slim Debian.
FROM rust:1-bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq cmake pkg-config libssl-dev >/dev/null
WORKDIR /src
COPY . .
RUN cargo build --release --bin portico && strip target/release/portico

FROM debian:bookworm-slim
RUN apt-get update -qq && apt-get install -y -qq ca-certificates libssl3 >/dev/null \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 portico
COPY --from=build /src/target/release/portico /usr/local/bin/portico
COPY config/ /etc/portico/
USER portico
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/portico"]
CMD ["run", "-c", "/etc/portico/portico.yaml"]
