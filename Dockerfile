# syntax=docker/dockerfile:1
#
# model-proxy in front of any model server image. The base image keeps its model server, its
# Python and its packages exactly as they are; model-proxy gets a Python and a virtualenv of
# its own under /opt/model-proxy, so neither can break the other, and runs as PID 1 (it
# reaps orphaned processes and forwards SIGTERM as a drain).
#
#   docker build -t my-model .                                      # vLLM (the default base)
#   docker build -t my-mlserver --build-arg BASE_IMAGE=seldonio/mlserver:1.7.1 \
#       --build-arg CONFIG=examples/mlserver/config.yaml .
#   docker run --gpus all -p 8080:8080 -v /path/to/secrets:/secrets:ro my-model
#
# The configuration is /app/config.yaml ($MODEL_PROXY_CONFIG): the CONFIG build argument
# copies one in; mount your own over it (a Kubernetes ConfigMap, `-v ./config.yaml:/app/...`).
# Secrets are never baked in: mount them at /secrets at run time.

# the model server: any image whose start command config.yaml's docker_server runs
ARG BASE_IMAGE=vllm/vllm-openai:v0.11.0
# uv installs model-proxy's own Python (python-build-standalone, linked against an old glibc,
# so it runs on Debian, Ubuntu, UBI and conda-based images alike) and its dependencies
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8.0

FROM ${UV_IMAGE} AS uv

FROM ${BASE_IMAGE}

ARG CONFIG=examples/vllm/config.yaml
ARG PROXY_PYTHON=3.12
ARG PROXY_UID=10001

# the base may have switched to its own user: creating ours needs root, briefly
USER 0

# not on PATH on purpose: start_command must find the base image's python, not ours
ENV MODEL_PROXY_HOME=/opt/model-proxy \
    MODEL_PROXY_CONFIG=/app/config.yaml

COPY pyproject.toml README.md /tmp/model-proxy-src/
COPY proxy /tmp/model-proxy-src/proxy
COPY config /tmp/model-proxy-src/config

RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    UV_PYTHON_INSTALL_DIR="${MODEL_PROXY_HOME}/python" \
    UV_PYTHON_PREFERENCE=only-managed \
    uv venv --python "${PROXY_PYTHON}" "${MODEL_PROXY_HOME}/venv" \
    && uv pip install --no-cache --compile-bytecode \
        --python "${MODEL_PROXY_HOME}/venv/bin/python" /tmp/model-proxy-src \
    && rm -rf /tmp/model-proxy-src \
    && "${MODEL_PROXY_HOME}/venv/bin/model-proxy" presets > /dev/null

# a real passwd entry and a writable home: torch and huggingface_hub look both up
RUN useradd --uid "${PROXY_UID}" --gid 0 --create-home --home-dir /home/model-proxy \
        --shell /usr/sbin/nologin model-proxy \
    && mkdir -p /app /secrets /data \
    && chown "${PROXY_UID}:0" /data \
    && chmod g+rwX /data

# root-owned and read-only for the proxy: a process never rewrites its own configuration
COPY ${CONFIG} /app/config.yaml

USER ${PROXY_UID}:0
ENV HOME=/home/model-proxy \
    HF_HOME=/data/huggingface

EXPOSE 8080
# exec form: model-proxy itself is PID 1, no shell in between to swallow SIGTERM
ENTRYPOINT ["/opt/model-proxy/venv/bin/model-proxy", "run"]
# the base image's CMD (a model server's arguments) means nothing to model-proxy
CMD []
