# syntax=docker/dockerfile:1

# Build stage. cgo is required: github.com/miekg/pkcs11 loads the PKCS#11
# module with dlopen. The runtime image is the same Debian release, so the
# binary's glibc matches.
FROM golang:1.26-bookworm AS build
WORKDIR /src
ENV CGO_ENABLED=1
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod \
    go mod download
COPY . .
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    go build -trimpath -o /out/hsmd ./cmd/hsmd

# Runtime stage.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends softhsm2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A system user without a login shell; in the softhsm group so that it can
# use SoftHSM's default token directory (/var/lib/softhsm/tokens).
RUN useradd --system --user-group --groups softhsm --uid 10001 \
        --home-dir /var/lib/hsmd --no-create-home --shell /usr/sbin/nologin hsmd \
    && install -d -m 0700 -o hsmd -g hsmd /var/lib/hsmd
COPY --from=build /out/hsmd /usr/local/bin/hsmd
USER hsmd
WORKDIR /var/lib/hsmd
VOLUME /var/lib/hsmd
# The default command is the dev profile: a SoftHSM token made in the volume
# on first start, whose PINs sit in 0600 files there until the TPM issue seals
# them. Production runs `serve --config FILE` with its own HSM and PIN source.
# gRPC is served on the unix socket /var/lib/hsmd/hsmd.sock (share the volume);
# plaintext TCP stays on loopback until mTLS lands. Metrics are published.
EXPOSE 9464
ENTRYPOINT ["hsmd"]
CMD ["serve", "--dev", "--data-dir", "/var/lib/hsmd", "--listen-metrics", "0.0.0.0:9464"]
