"""The compiled build: with MODEL_PROXY_COMPILE=1 the modules on the request path are
compiled with mypyc (they are mypy-strict already); otherwise, and wherever no compiler is,
the very same modules run as pure Python. `model-proxy --version` says which one runs.

    MODEL_PROXY_COMPILE=1 pip install .                      # compiled, into the environment
    MODEL_PROXY_COMPILE=1 python setup.py build_ext --inplace  # compiled, beside the sources

(Like mypy's own MYPY_USE_MYPYC: opt-in, so an editable install never hides an edited .py
behind a stale extension.) The metadata is pyproject.toml's; build_support/backend.py adds
mypy to the build requirements only when compiling.
"""

import os

from setuptools import setup

# the hot path: every module a request's bytes go through
COMPILED = [
    "proxy/framing.py",
    "proxy/headers.py",
    "proxy/paths.py",
    "proxy/local.py",
    "proxy/protocol.py",
    "proxy/forward.py",
    "proxy/upstream.py",
    "proxy/websocket.py",
    "proxy/frames.py",
    "proxy/events.py",
    # and what each request passes through on its way: routing and admission, the limiter,
    # the counters, the access log, the listener's first bytes
    "proxy/app.py",
    "proxy/limiter.py",
    "proxy/metrics.py",
    "proxy/logs.py",
    "proxy/sniff.py",
    # HTTP/2 and gRPC: the frames, the connection on either side, each call (the HPACK codec
    # stays Python: its field types subclass tuple, which mypyc does not compile)
    "proxy/h2frames.py",
    "proxy/h2fields.py",
    "proxy/h2conn.py",
    "proxy/h2stalls.py",
    "proxy/h2server.py",
    "proxy/grpc_upstream.py",
    "proxy/grpc_call.py",
    "proxy/grpc_status.py",
]

ext_modules = []
# build_support/backend.py runs this file once to learn what to install before building: mypy
# is not there yet then, and nothing is built
asking = os.environ.get("MODEL_PROXY_ASKING_REQUIREMENTS") == "1"
if os.environ.get("MODEL_PROXY_COMPILE") == "1" and not asking:
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED, opt_level="3")

setup(ext_modules=ext_modules)
