# Builds the four seaport binaries and ships them on a distroless base.
#   docker build -t seaport .
#   docker run --rm seaport seaport-seed
#   docker run --rm --read-only -v $PWD/registry.seed:/run/seaport/seed:ro \
#     -p 4500:4500 seaport seaport-registry --seed-file /run/seaport/seed --listen 0.0.0.0:4500
# (the seed file must be readable by uid 65532: chown 65532 registry.seed)
#
# Without Docker, contrib/oci/build.sh builds the same image (same user,
# paths, working directory, environment and command) as an OCI layout from
# the Debian packages distroless is made of, and contrib/oci/check-dockerfile.py
# checks that this file and that image agree.
#
# The build stage is Debian 12, like the base: the binaries link against its
# glibc (2.36).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p seaport-seed -p seaport-registry -p seaport-service -p seaport-proxy

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/seaport-seed \
                  /src/target/release/seaport-registry \
                  /src/target/release/seaport-service \
                  /src/target/release/seaport-proxy /usr/local/bin/
# What the :nonroot base gives already, stated so that the OCI build can be
# checked against it.
USER 65532:65532
WORKDIR /home/nonroot
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
LABEL org.opencontainers.image.title=seaport
ENTRYPOINT []
CMD ["seaport-registry", "--help"]
