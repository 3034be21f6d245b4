# syntax=docker/dockerfile:1
# kvserve image, two kinds from this one file (non-root, kvserve as PID 1, only kvserve and
# kvserve-cli installed):
#   CUDA (default): CUDA devel builder -> CUDA runtime image (cuBLAS included).
#     docker build -t kvserve .
#     docker run --gpus all -p 50051:50051 -p 9464:9464 -v ~/models/gpt2:/models/gpt2:ro kvserve
#   CPU: Debian 12 for both stages and CUDA off. CI builds and runs this one with podman
#   (scripts/container-check.sh, docs/deploy.md):
#     docker build --build-arg BUILDER_IMAGE=debian:bookworm --build-arg RUNTIME_IMAGE=debian:bookworm \
#       --build-arg KVSERVE_CUDA=OFF -t kvserve:cpu .
# The builder installs and builds with the very scripts the README and CI run
# (tests/deploy/check_dockerfile.py fails CI if this file starts doing it any other way).
# The CUDA stages use the same CUDA release, so the runtime libraries match the toolkit that compiled.
ARG BUILDER_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04
ARG RUNTIME_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

FROM ${BUILDER_IMAGE} AS builder
# GPU architectures to compile for (CMAKE_CUDA_ARCHITECTURES); 90 = H100/H200, as in CI.
ARG CUDA_ARCHITECTURES=90
# OFF builds the CPU-only binaries (the CPU image); ON uses CUDA where nvcc is found.
ARG KVSERVE_CUDA=ON
# scripts/build.sh builds only these: the image ships no tests or benchmarks.
ARG KVSERVE_BUILD_TARGETS="kvserve kvserve-cli"
WORKDIR /src
COPY scripts/install-deps.sh scripts/install-deps.sh
# Its own layer, so editing the sources does not reinstall the toolchain. Only the "build" group:
# the test and fuzz tools (promtool, clang, matplotlib, ...) would cost download time for nothing.
RUN scripts/install-deps.sh build
COPY . .
# ccache persists across builds in BuildKit's cache, not in the image.
RUN --mount=type=cache,target=/root/.cache/ccache scripts/build.sh -DKVSERVE_CUDA=${KVSERVE_CUDA} -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}
RUN scripts/runtime-packages.sh build/bin/kvserve build/bin/kvserve-cli > /runtime-packages.txt

FROM ${RUNTIME_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
COPY --from=builder /runtime-packages.txt /tmp/runtime-packages.txt
RUN apt-get update \
 && xargs -a /tmp/runtime-packages.txt apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt
# A fixed numeric id (not the Ubuntu base image's uid 1000 'ubuntu') so Kubernetes' runAsNonRoot can
# verify it without a passwd lookup.
RUN groupadd --system --gid 10001 kvserve \
 && useradd --system --uid 10001 --gid kvserve --no-create-home --shell /usr/sbin/nologin kvserve
COPY --from=builder /src/build/bin/kvserve /src/build/bin/kvserve-cli /usr/local/bin/
USER 10001:10001
VOLUME /models
# 50051: gRPC (kvserve.v1.Generation, grpc.health.v1, reflection); 9464: Prometheus /metrics.
EXPOSE 50051 9464
# Docker and Compose use this; Kubernetes ignores it and uses the grpc probes in deploy/k8s.
# The start period covers model load and warm-up, during which health answers NOT_SERVING.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["kvserve-cli", "health", "--addr", "127.0.0.1:50051"]
# Exec form: kvserve is PID 1 and receives SIGTERM itself, so `docker stop -t 45` lets it drain
# in-flight requests (--drain-timeout-s, 30 s by default) before the SIGKILL.
ENTRYPOINT ["kvserve", "serve"]
CMD ["--model", "/models/gpt2"]
