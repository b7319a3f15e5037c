# The operator: `fedstudy operator` (kopf). Build from the repository root:
#   docker build -f images/operator.Dockerfile -t fedstudy-operator:0.1.0 .
# The chart's helm test Pod runs this image too (python -c urllib...), so it keeps python.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY fedstudy/ fedstudy/
COPY aggregator/ aggregator/
COPY trainer/ trainer/
COPY operator/ operator/
# Every version pinned by constraints.txt; a non-editable install into its own venv.
RUN python -m venv /opt/fedstudy \
 && /opt/fedstudy/bin/pip install -c constraints.txt ".[operator]" \
 && /opt/fedstudy/bin/fedstudy --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="fedstudy-operator" \
      org.opencontainers.image.description="fedstudy's Kubernetes operator (kopf)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/fedstudy /opt/fedstudy
ENV PATH=/opt/fedstudy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# The pods' securityContext runs as 10001:10001 (restricted Pod Security Standard).
USER 10001:10001
EXPOSE 8090
ENTRYPOINT ["fedstudy", "operator"]
CMD ["--role", "standalone", "--all-namespaces"]
