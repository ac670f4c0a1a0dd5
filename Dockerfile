# syntax=docker/dockerfile:1
# stylize: neural style transfer as a gRPC service.
#
#   docker build -t stylize .
#   docker run --rm -p 50051:50051 stylize
#
# The GPU image (README, GPU): the same build with the gpu extra, run with the NVIDIA container toolkit:
#
#   docker build --build-arg STYLIZE_EXTRAS=gpu -t stylize:gpu .
#   docker run --rm --gpus all -p 50051:50051 -e STYLIZE_PROVIDER=cuda stylize:gpu
#
# The builder runs the same scripts/setup.sh as a checkout and CI do. The project is installed editable, so
# both stages keep it at the same path, /app, where the install's recorded paths stay valid.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
# Extras to install: none by default (the runtime only); gpu = onnxruntime-gpu in place of onnxruntime,
# with the CUDA 13 and cuDNN 9 libraries as Python packages, so that the host needs only the driver.
ARG STYLIZE_EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STYLIZE_CACHE_DIR=/root/.cache/stylize
WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY server/ server/
COPY client/ client/
COPY models/ models/
COPY scripts/ scripts/
# Runtime dependencies and the chosen extras (no dev extras); pip's and the weights' downloads stay in a
# build cache. With the gpu extra the build fails unless the installed onnxruntime offers CUDA (it does
# without a GPU; whether one answers is checked when the server starts). The sources are byte-compiled
# here because the service user cannot write beside them at run time.
RUN --mount=type=cache,target=/root/.cache \
    STYLIZE_EXTRAS="$STYLIZE_EXTRAS" bash scripts/setup.sh \
    && test -n "$(find models/build -name '*.onnx' -print -quit)" \
    && case ",$STYLIZE_EXTRAS," in *,gpu,*) .venv/bin/python -c "import onnxruntime as ort; \
        offered = ort.get_available_providers(); \
        assert 'CUDAExecutionProvider' in offered, f'the gpu extra gave no CUDA provider: {offered}'" ;; esac \
    && .venv/bin/python -m compileall -q protos server client models scripts

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent stylize \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/stylize
WORKDIR /app
# The code, the venv and the built model, owned by root and read-only to the service user.
COPY --from=builder /app /app
# NVIDIA_DRIVER_CAPABILITIES: which parts of the driver the NVIDIA container toolkit mounts when the
# container is given a GPU (`--gpus`, or nvidia.com/gpu in Kubernetes); unset it mounts only `utility`,
# without which CUDA cannot run. It does nothing anywhere else, so the CPU image carries it too.
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STYLIZE_HOST=0.0.0.0 \
    STYLIZE_PORT=50051 \
    STYLIZE_STATE_DIR=/var/lib/stylize \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Numeric, so that runtimes (e.g. Kubernetes runAsNonRoot) can tell it is not root.
USER 10001:10001
# The job store (jobs, their checkpoints and results): mount a volume here so that jobs outlive the
# container (docs/jobs.md).
VOLUME /var/lib/stylize
EXPOSE 50051
# The health check reads the server's own variables: with STYLIZE_TLS_CERT/STYLIZE_TLS_KEY set (PEM files
# mounted into the container) it speaks TLS and trusts that certificate; with STYLIZE_TLS_CLIENT_CA it
# presents it as its client certificate too, unless STYLIZE_HEALTHCHECK_TLS_CERT/_KEY name another. The
# health service needs no bearer token (see the README's Security section).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/app/scripts/healthcheck.py", "--quiet"]
CMD ["stylize-server"]
