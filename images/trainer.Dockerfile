# The site trainer with CUDA: `fedstudy trainer`. Build from the repository root:
#   docker build -f images/trainer.Dockerfile -t fedstudy-trainer:0.1.0 .
# PyTorch's Linux wheels on PyPI are CUDA builds that carry the CUDA runtime libraries, so a
# plain Python base suffices; the GPU driver comes from the node (NVIDIA container toolkit).
# The CPU variant is images/trainer-cpu.Dockerfile.
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
 && /opt/fedstudy/bin/pip install -c constraints.txt torch \
 && /opt/fedstudy/bin/pip install -c constraints.txt ".[trainer,imaging]" opacus \
 && /opt/fedstudy/bin/fedstudy --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="fedstudy-trainer" \
      org.opencontainers.image.description="fedstudy's site trainer (PyTorch, CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/fedstudy /opt/fedstudy
ENV PATH=/opt/fedstudy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
# The operator gives the arguments: --study, --site, --aggregator, --state-dir.
ENTRYPOINT ["fedstudy", "trainer"]
CMD ["--help"]
