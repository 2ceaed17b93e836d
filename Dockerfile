# syntax=docker/dockerfile:1
# The waldur-operator image: a static binary on distroless, running as 65532:65532.
#   scripts/build-image                                   (podman or buildah; this machine's arch)
#   PLATFORMS=linux/amd64,linux/arm64 scripts/build-image (a multi-arch manifest, with podman)
#   docker buildx build --platform linux/amd64,linux/arm64 -t waldur-operator:dev .
#
# Multi-arch without emulation: the builder stage always runs on the build machine's own platform
# ($BUILDPLATFORM) and cross-compiles for $TARGETARCH with Debian's cross toolchain; the final
# stage, the only per-platform one, just copies the binary in. BuildKit, podman and buildah set
# BUILDPLATFORM, BUILDARCH and TARGETARCH themselves.

# --- build ----------------------------------------------------------------------------------
FROM --platform=$BUILDPLATFORM docker.io/library/rust:1.95-bookworm AS builder
ARG BUILDARCH
ARG TARGETARCH
WORKDIR /src

# The Rust target, and for a foreign target the C cross compiler and its glibc: aws-lc-sys (TLS,
# through rustls) and tikv-jemalloc-sys (the allocator) compile C. aws-lc-sys 0.47 ships
# pregenerated bindings and source lists for both targets, so neither cmake nor bindgen (clang)
# is needed. The Debian packages come unpinned from the base image's own suite (bookworm), whose
# versions move only with security and point releases.
# hadolint ignore=DL3008
RUN set -eux; \
    : "${BUILDARCH:=$(dpkg --print-architecture)}"; \
    : "${TARGETARCH:=$BUILDARCH}"; \
    case "$TARGETARCH" in \
      amd64) triple=x86_64-unknown-linux-gnu; set -- gcc-x86-64-linux-gnu libc6-dev-amd64-cross ;; \
      arm64) triple=aarch64-unknown-linux-gnu; set -- gcc-aarch64-linux-gnu libc6-dev-arm64-cross ;; \
      *) echo "unsupported TARGETARCH '$TARGETARCH' (amd64 or arm64)" >&2; exit 1 ;; \
    esac; \
    if [ "$TARGETARCH" != "$BUILDARCH" ]; then \
      apt-get update; \
      apt-get install -y --no-install-recommends "$@"; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    rustup target add "$triple"; \
    printf '%s\n' "$triple" > /tmp/rust-target

# cargo-auditable embeds the dependency tree (Cargo.lock's crates and versions) in the binary, so
# that SBOM scanners (BuildKit's SBOM attestation, syft in the release workflow) list the Rust
# crates inside the image, not only the distroless base's Debian packages. Built for the build
# machine, before RUSTFLAGS below (whose +crt-static would break proc-macro crates here).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo install --locked cargo-auditable --version 0.7.7

# The whole workspace (every member must be there for cargo to load it); .dockerignore leaves out
# target/, .git/ and the deployment files. Only the operator binary is built.
COPY . .

# glibc, statically linked: the binary needs no libraries from the final image. rustls (aws-lc)
# does TLS; the system CA bundle comes from the distroless image. With --target, RUSTFLAGS apply
# to the operator only, not to build scripts and proc-macros (which run here, on the build
# machine). The C compiler, archiver and linker for each target are named explicitly; for the
# build machine's own arch they are the native gcc under its triple-prefixed name.
ENV RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_TERM_COLOR=never \
    CC_x86_64_unknown_linux_gnu=x86_64-linux-gnu-gcc \
    AR_x86_64_unknown_linux_gnu=x86_64-linux-gnu-ar \
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER=x86_64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc

# On arm64, jemalloc is built for pages up to 64 KiB (lg-page 16): configure cannot probe the
# page size when cross-compiling, and a 4 KiB build aborts on 16/64 KiB-page kernels.
# The --version smoke check runs only when the binary is for the build machine's own arch.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eux; \
    : "${BUILDARCH:=$(dpkg --print-architecture)}"; \
    : "${TARGETARCH:=$BUILDARCH}"; \
    triple=$(cat /tmp/rust-target); \
    if [ "$TARGETARCH" = arm64 ]; then export JEMALLOC_SYS_WITH_LG_PAGE=16; fi; \
    cargo auditable build --release --locked --target "$triple" --bin waldur-operator; \
    install -D -m 0755 "target/$triple/release/waldur-operator" /out/waldur-operator; \
    if [ "$TARGETARCH" = "$BUILDARCH" ]; then \
      /out/waldur-operator --version; \
    else \
      echo "built for $TARGETARCH on $BUILDARCH: the --version smoke check is skipped"; \
    fi

# --- run ------------------------------------------------------------------------------------
FROM gcr.io/distroless/static-debian12:nonroot
# Set by the release workflow (the tag without its v, and the commit); scripts/build-image sets
# VERSION from Cargo.toml and REVISION from git when it can.
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="waldur-operator" \
      org.opencontainers.image.description="Kubernetes operator that makes Waldur OpenStack server groups declarative" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/waldur/waldur-operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=builder /out/waldur-operator /usr/local/bin/waldur-operator
USER 65532:65532
# /metrics, /healthz and /readyz.
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/waldur-operator"]
CMD ["run"]
