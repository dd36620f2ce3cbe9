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
#   docker run --gpus all -p 8080:8080 -v /path/to/secrets:/secrets:ro --stop-timeout 45 my-model
#
# --stop-timeout (or `docker stop -t`) above shutdown_grace_seconds + child_stop_grace_seconds
# (30 + 10 by default) lets the drain finish before Docker's SIGKILL.
#
# The configuration is /app/config.yaml ($MODEL_PROXY_CONFIG): the CONFIG build argument
# copies one in; mount your own over it (a Kubernetes ConfigMap, `-v ./config.yaml:/app/...`).
# Secrets are never baked in: mount them at /secrets at run time.
#
# Behind a firewall or a TLS-intercepting proxy (the README's "Container image" section):
#   docker build --build-arg PROXY_PYTHON=/usr/bin/python3 \
#       --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt .
# PROXY_PYTHON as a path uses the base image's own Python (>= 3.11) instead of downloading
# one; the ca-bundle secret is the CA file uv trusts while it installs, mounted for that one
# step and in no layer of the image. HTTP_PROXY/HTTPS_PROXY/NO_PROXY build arguments reach uv
# as usual.
#
# The request path is compiled with mypyc where the base image can build C extensions (a C
# compiler and the headers of model-proxy's Python): PROXY_COMPILE=auto, the default, says in
# the build log which build it installs; 1 fails the build rather than install pure Python; 0
# never compiles. Which one an image runs:
#   docker run --rm --entrypoint /opt/model-proxy/venv/bin/model-proxy my-model --version

# the model server: any image whose start command config.yaml's docker_server runs
ARG BASE_IMAGE=vllm/vllm-openai:v0.11.0
# uv installs model-proxy's own Python (python-build-standalone, linked against an old glibc,
# so it runs on Debian, Ubuntu, UBI and conda-based images alike) and its dependencies
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8.0

FROM ${UV_IMAGE} AS uv

FROM ${BASE_IMAGE}

ARG CONFIG=examples/vllm/config.yaml
# a version uv downloads (python-build-standalone, from GitHub), or the path of an interpreter
# the base image has (>= 3.11), used as it is: nothing to download
ARG PROXY_PYTHON=3.12
# the request path compiled with mypyc: auto (where the base has a C compiler and the headers
# of PROXY_PYTHON), 1 (compiled, or the build fails) or 0 (pure Python)
ARG PROXY_COMPILE=auto
ARG PROXY_UID=10001

# the base may have switched to its own user: creating ours needs root, briefly
USER 0

# not on PATH on purpose: start_command must find the base image's python, not ours
ENV MODEL_PROXY_HOME=/opt/model-proxy \
    MODEL_PROXY_CONFIG=/app/config.yaml

COPY pyproject.toml setup.py README.md /tmp/model-proxy-src/
COPY build_support /tmp/model-proxy-src/build_support
COPY proxy /tmp/model-proxy-src/proxy
COPY config /tmp/model-proxy-src/config

# the optional build secret ca-bundle: a CA file for uv's TLS (it trusts its own roots, not
# the base image's), mounted for this step only; without it the mount is simply absent.
# image_install.py decides on PROXY_COMPILE and runs uv; mypy (mypyc) lives in uv's build
# environment and the C sources in the source tree, both gone when this step ends
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    --mount=type=secret,id=ca-bundle \
    if [ -f /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle; fi \
    && UV_PYTHON_INSTALL_DIR="${MODEL_PROXY_HOME}/python" \
    UV_PYTHON_PREFERENCE=only-managed \
    uv venv --python "${PROXY_PYTHON}" "${MODEL_PROXY_HOME}/venv" \
    && PROXY_COMPILE="${PROXY_COMPILE}" "${MODEL_PROXY_HOME}/venv/bin/python" \
        /tmp/model-proxy-src/build_support/image_install.py /tmp/model-proxy-src \
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
