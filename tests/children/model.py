"""A model server whose behaviour the test controls through files in a directory.

Standard library only, so it starts in a few tens of milliseconds:

    python tests/children/model.py --port N --dir D [--ignore-sigterm] [--grandchild]
                                   [--listen-after-file]

Routes (HTTP/1.1, keep-alive):

    GET /ready            200 while D/ready exists, else 503
    GET /live             503 once D/dead-<pid> exists, else 200
    GET /hold?file=NAME   prints "holding NAME", answers once D/NAME exists
    GET|POST /predict     {"pid": <pid>}

Control files, checked every 10 ms: D/exit-<pid> holding a number makes the server exit
with that code. At startup it writes its pid to D/server.pid and prints one line to each of
stdout and stderr. --grandchild forks `sleep 1000` in its process group and writes that pid
to D/grandchild.pid; --ignore-sigterm prints "ignoring SIGTERM" instead of exiting;
--listen-after-file binds the port only once D/listen exists.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

POLL_SECONDS = 0.01


def wait_for(file: Path) -> None:
    while not file.exists():
        time.sleep(POLL_SECONDS)


def make_handler(control: Path) -> type[BaseHTTPRequestHandler]:
    pid = os.getpid()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/ready":
                ok = (control / "ready").exists()
                self.answer(200 if ok else 503, {"ready": ok})
            elif url.path == "/live":
                ok = not (control / f"dead-{pid}").exists()
                self.answer(200 if ok else 503, {"live": ok})
            elif url.path == "/hold":
                name = parse_qs(url.query)["file"][0]
                print(f"holding {name}", flush=True)
                wait_for(control / name)
                self.answer(200, {"released": name})
            elif url.path == "/predict":
                self.answer(200, {"pid": pid})
            else:
                self.answer(404, {"path": url.path})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.do_GET()

        def answer(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the tests read the proxy's log: keep it to the lines they look for

    return Handler


def exit_when_told(control: Path) -> None:
    file = control / f"exit-{os.getpid()}"
    while True:
        try:
            code = int(file.read_text())
            break
        except (FileNotFoundError, ValueError):  # not there yet, or not written yet
            time.sleep(POLL_SECONDS)
    print(f"exiting with code {code}", flush=True)
    os._exit(code)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--grandchild", action="store_true")
    parser.add_argument("--listen-after-file", action="store_true")
    args = parser.parse_args()
    control: Path = args.dir

    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, lambda *_: print("ignoring SIGTERM", flush=True))
    if args.grandchild:
        sleeper = subprocess.Popen(["sleep", "1000"])
        (control / "grandchild.pid").write_text(str(sleeper.pid))
    print("model server says hello on stdout", flush=True)
    print("model server says hello on stderr", file=sys.stderr, flush=True)
    threading.Thread(target=exit_when_told, args=(control,), daemon=True).start()
    if args.listen_after_file:
        wait_for(control / "listen")
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(control))
    server.daemon_threads = True
    (control / "server.pid").write_text(str(os.getpid()))
    print(f"model server listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
