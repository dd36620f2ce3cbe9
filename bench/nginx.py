"""nginx in its three roles: the fast static backend, the tuned proxy, and the proxy as
Baseten's docker_server configures it (truss/templates/docker_server/proxy.conf.jinja), each
proxy with a gRPC server (HTTP/2, grpc_pass) for the gRPC backend.

Every instance has one worker (pinned with the rest of the servers to one CPU), no access
log, and the same client-side keep-alive as model-proxy (no limit on requests per connection).
The proxies serve the same routes as model-proxy: `/predict` as it is, `/sync/<path>` to
`/<path>`, so the load generators aim at the same paths through every proxy.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .procs import Service, children, free_port, wait_for_port

SMALL_RESPONSE = '{"outputs": [1, 2, 3], "model": "static"}'
MAX_BODY = "100m"  # as model-proxy's default max_request_body_bytes

_MAIN = """\
daemon off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    default_type application/json;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{http}
}}
"""

_STATIC_BACKEND = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /predict {{ return 200 '{response}'; }}
        location /files/ {{ root {root}; }}
        # Read the whole upload before answering (a bare `return` answers first and discards
        # the body afterwards, which would time the answer, not the upload): nginx buffers
        # the body for the proxied subrequest, which then goes out without it.
        location = /upload {{
            client_max_body_size {max_body};
            client_body_buffer_size 16m;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_pass http://127.0.0.1:{port}/uploaded;
        }}
        location = /uploaded {{ return 200 '{{"ok": true}}'; }}
    }}
"""

# 1 worker, upstream keep-alive, HTTP/1.1 upstream, no buffering either way, 64k buffers
# (the stock 4k/8k costs nginx more than half its download speed). It does the header work
# model-proxy's contract asks for (X-Forwarded-*, X-Request-ID kept or generated), so both
# do the same job.
_TUNED_COMMON = """\
    map $http_upgrade $connection_upgrade { default upgrade; '' ''; }
    map $http_x_request_id $bench_request_id { default $http_x_request_id; '' $request_id; }
"""
_TUNED_SERVER = """\
    upstream {name} {{
        server 127.0.0.1:{backend};
        keepalive 1024;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size {max_body};
        proxy_http_version 1.1;
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_buffer_size 64k;
        proxy_buffers 4 64k;
        proxy_read_timeout 3600s;
        proxy_set_header Connection $connection_upgrade;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host $host;
        proxy_set_header X-Request-ID $bench_request_id;
        add_header X-Request-ID $bench_request_id always;
        location = /predict {{ proxy_pass http://{name}; }}
        location /sync/ {{ proxy_pass http://{name}/; }}
    }}
"""

# As truss's docker_server template: no upstream block (a new upstream connection per
# request), request buffering on (its default) with a 4M body buffer in memory, response
# buffering off, stock proxy buffer sizes, the client's Upgrade/Connection passed on.
_DOCKER_COMMON = """\
    client_body_buffer_size 4M;
    map $http_upgrade $upgrade_header { default $http_upgrade; '' ''; }
    map $http_connection $connection_header { default $http_connection; '' ''; }
"""
_DOCKER_SERVER = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size {max_body};
        proxy_buffering off;
        location = /predict {{
            proxy_redirect off;
            proxy_read_timeout 18030s;
            proxy_http_version 1.1;
            proxy_set_header Expect $http_expect;
            proxy_pass http://127.0.0.1:{backend};
        }}
        location /sync/ {{
            proxy_redirect off;
            proxy_read_timeout 18030s;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $upgrade_header;
            proxy_set_header Connection $connection_header;
            proxy_pass http://127.0.0.1:{backend}/;
        }}
    }}
"""


# gRPC, as truss's docker_server template does for transport.kind grpc: `listen ... http2`
# and `grpc_pass` straight to the server's port (no upstream block: a new HTTP/2 connection
# to the server per call), its long read timeout
_DOCKER_GRPC_SERVER = """\
    server {{
        listen 127.0.0.1:{port} http2 backlog=4096;
        client_max_body_size {max_body};
        http2_max_requests 1000000;
        location / {{
            proxy_read_timeout 18030s;
            grpc_pass grpc://127.0.0.1:{backend};
        }}
    }}
"""
# gRPC tuned: the same, with a keep-alive pool of HTTP/2 connections to the server
_TUNED_GRPC_SERVER = """\
    upstream {name} {{
        server 127.0.0.1:{backend};
        keepalive 1024;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port} http2 backlog=4096;
        client_max_body_size {max_body};
        http2_max_requests 1000000;
        location / {{
            grpc_read_timeout 3600s;
            grpc_pass grpc://{name};
        }}
    }}
"""


class Nginx:
    """One nginx instance (master + one worker) with its own config in `directory`."""

    def __init__(self, name: str, directory: Path, http_config: str, ports: Sequence[int]):
        self.name = name
        self.directory = directory
        self.ports = list(ports)
        # temp files in memory-backed /dev/shm, as Baseten does; the worker (nobody) writes there
        tmp = Path(tempfile.mkdtemp(prefix=f"model-proxy-bench-{name}-", dir="/dev/shm"))
        tmp.chmod(0o755)
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp / sub).mkdir()
            (tmp / sub).chmod(0o777)
        self.tmp = tmp
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "nginx.conf"
        self.config.write_text(_MAIN.format(dir=directory, tmp=tmp, http=http_config))
        self.service: Service | None = None

    def start(self) -> None:
        argv = ["nginx", "-p", str(self.directory), "-c", str(self.config)]
        self.service = Service.start(self.name, argv, log=self.directory / "stdout.log")
        for port in self.ports:
            wait_for_port(port, self.service)
        # the worker is forked after the master listens: wait until it is there
        deadline = time.monotonic() + 5
        while not children(self.service.pid) and time.monotonic() < deadline:
            time.sleep(0.01)

    def pids(self) -> list[int]:
        """The master and its workers: everything this nginx costs."""
        assert self.service is not None
        return [self.service.pid, *children(self.service.pid)]

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def static_backend(directory: Path, root: Path, port: int | None = None) -> tuple[Nginx, int]:
    """The static backend: a small JSON answer to POST /predict, `root`/files/* under
    /files/, and /upload that reads the whole body and answers."""
    port = port or free_port()

    http = _STATIC_BACKEND.format(port=port, response=SMALL_RESPONSE, root=root, max_body=MAX_BODY)
    return Nginx("nginx-backend", directory, http, [port]), port


def tuned_proxy(directory: Path, backends: dict[str, int]) -> tuple[Nginx, dict[str, int]]:
    """One listening port per backend, each with a keep-alive upstream pool."""
    ports = {name: free_port() for name in backends}
    servers = [
        (_TUNED_GRPC_SERVER if name == "grpc" else _TUNED_SERVER).format(
            name=f"up_{name}", backend=backend, port=ports[name], max_body=MAX_BODY
        )
        for name, backend in backends.items()
    ]
    return Nginx(
        "nginx-tuned", directory, _TUNED_COMMON + "".join(servers), list(ports.values())
    ), ports


def docker_server_proxy(directory: Path, backends: dict[str, int]) -> tuple[Nginx, dict[str, int]]:
    ports = {name: free_port() for name in backends}
    servers = [
        (_DOCKER_GRPC_SERVER if name == "grpc" else _DOCKER_SERVER).format(
            backend=backend, port=ports[name], max_body=MAX_BODY
        )
        for name, backend in backends.items()
    ]
    return Nginx(
        "nginx-docker", directory, _DOCKER_COMMON + "".join(servers), list(ports.values())
    ), ports
