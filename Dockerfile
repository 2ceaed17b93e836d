# syntax=docker/dockerfile:1
# The waldur-operator image: a static binary on distroless, running as 65532:65532.
#   scripts/build-image            (podman or buildah)
#   podman build -t waldur-operator:dev .

# --- build ----------------------------------------------------------------------------------
FROM docker.io/library/rust:1.95-bookworm AS builder
WORKDIR /src

# The whole workspace (every member must be there for cargo to load it); .dockerignore leaves out
# target/, .git/ and the deployment files. Only the operator binary is built.
COPY . .

# glibc, statically linked: the binary needs no libraries from the final image. rustls (aws-lc)
# does TLS; the system CA bundle comes from the distroless image.
ENV RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_TERM_COLOR=never
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-gnu --bin waldur-operator \
    && install -D -m 0755 target/x86_64-unknown-linux-gnu/release/waldur-operator /out/waldur-operator \
    && /out/waldur-operator --version

# --- run ------------------------------------------------------------------------------------
FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="waldur-operator" \
      org.opencontainers.image.description="Kubernetes operator that makes Waldur OpenStack server groups declarative" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/waldur-operator /usr/local/bin/waldur-operator
USER 65532:65532
# /metrics, /healthz and /readyz.
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/waldur-operator"]
CMD ["run"]
