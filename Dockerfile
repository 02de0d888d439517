# Builds the four seaport binaries and ships them on a distroless base.
#   docker build -t seaport .
#   docker run --rm seaport seaport-seed
FROM rust:1.85-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p seaport-seed -p seaport-registry -p seaport-service -p seaport-proxy

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/seaport-seed \
                  /src/target/release/seaport-registry \
                  /src/target/release/seaport-service \
                  /src/target/release/seaport-proxy /usr/local/bin/
ENTRYPOINT []
CMD ["seaport-registry", "--help"]
