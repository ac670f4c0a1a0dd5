# syntax=docker/dockerfile:1
# stylize: neural style transfer as a gRPC service.
#
#   docker build -t stylize .
#   docker run --rm -p 50051:50051 stylize
#
# The builder runs the same scripts/setup.sh as a checkout and CI do. The project is installed editable, so
# both stages keep it at the same path, /app, where the install's recorded paths stay valid.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STYLIZE_CACHE_DIR=/root/.cache/stylize
WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY server/ server/
COPY client/ client/
COPY models/ models/
COPY scripts/ scripts/
# Runtime dependencies only (no dev extras); pip's and the weights' downloads stay in a build cache. The
# sources are byte-compiled here because the service user cannot write beside them at run time.
RUN --mount=type=cache,target=/root/.cache \
    STYLIZE_EXTRAS='' bash scripts/setup.sh \
    && test -n "$(find models/build -name '*.onnx' -print -quit)" \
    && .venv/bin/python -m compileall -q protos server client models scripts

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent stylize
WORKDIR /app
# The code, the venv and the built model, owned by root and read-only to the service user.
COPY --from=builder /app /app
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STYLIZE_HOST=0.0.0.0 \
    STYLIZE_PORT=50051
# Numeric, so that runtimes (e.g. Kubernetes runAsNonRoot) can tell it is not root.
USER 10001:10001
EXPOSE 50051
# The health check reads the server's own variables: with STYLIZE_TLS_CERT/STYLIZE_TLS_KEY set (PEM files
# mounted into the container) it speaks TLS and trusts that certificate; with STYLIZE_TLS_CLIENT_CA it
# presents it as its client certificate too, unless STYLIZE_HEALTHCHECK_TLS_CERT/_KEY name another. The
# health service needs no bearer token (see the README's Security section).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/app/scripts/healthcheck.py", "--quiet"]
CMD ["stylize-server"]
