# The aggregator: `fedstudy aggregator` (gRPC 7700, HTTP 8080). Build from the repository root:
#   docker build -f images/aggregator.Dockerfile -t fedstudy-aggregator:0.1.0 .
# No PyTorch: the aggregator averages numpy arrays.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY fedstudy/ fedstudy/
COPY aggregator/ aggregator/
COPY trainer/ trainer/
COPY operator/ operator/
RUN python -m venv /opt/fedstudy \
 && /opt/fedstudy/bin/pip install -c constraints.txt . \
 && /opt/fedstudy/bin/fedstudy --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="fedstudy-aggregator" \
      org.opencontainers.image.description="fedstudy's aggregator: rounds, strategies, checkpoints" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/fedstudy /opt/fedstudy
ENV PATH=/opt/fedstudy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
EXPOSE 7700 8080
# The operator gives the arguments: --study, --listen, --http, --state-dir, --out.
ENTRYPOINT ["fedstudy", "aggregator"]
CMD ["--help"]
