"""A model server that misbehaves on request, for the fault tests. Standard library only.

    python tests/faults/child.py --port N --dir D

Routes (HTTP/1.1, keep-alive, chunked streams as real model servers send them):

    GET  /ready            200; hangs (never answers) while D/hang-ready exists
    GET  /live             200
    GET  /stream?crash_after=K
                           SSE, one event every 10 ms; after K events the process dies
                           (os._exit(1)) without ending the stream
    GET|POST /die          the process dies as the request arrives, answering nothing
    GET  /hang             accepted, never answered
    GET  /wait             prints "waiting for the client", then "client went away" once
                           the proxy closes the connection (the request was cancelled)
    POST /upload           reads the body; prints "upload cut after N bytes" if the
                           connection closes before the body is whole
    GET|POST /predict      {"pid": <pid>}

At startup it writes its pid to D/server.pid and prints "fault child listening".
Every line it prints reaches the proxy's log, which is how the tests see what it noticed.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

EVENT_INTERVAL = 0.01  # the child simulates a model: pacing its events is its behaviour
POLL_SECONDS = 0.01


def make_handler(control: Path) -> type[BaseHTTPRequestHandler]:
    pid = os.getpid()
    never = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if url.path == "/ready":
                while (control / "hang-ready").exists():
                    time.sleep(POLL_SECONDS)  # the probe times out long before
                self.answer(200, {"ready": True})
            elif url.path == "/live":
                self.answer(200, {"live": True})
            elif url.path == "/stream":
                self.stream(int(query.get("crash_after", ["3"])[0]))
            elif url.path == "/die":
                print("dying on a request", flush=True)
                os._exit(1)
            elif url.path == "/hang":
                print("hanging", flush=True)
                never.wait()
            elif url.path == "/wait":
                self.wait_for_the_client()
            elif url.path == "/predict":
                self.answer(200, {"pid": pid})
            else:
                self.answer(404, {"path": url.path})

        def do_POST(self) -> None:
            if urlsplit(self.path).path == "/upload":
                self.upload()
                return
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.do_GET()

        def stream(self, crash_after: int) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for index in range(crash_after):
                event = f"data: {index}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                time.sleep(EVENT_INTERVAL)
            print(f"crashing after {crash_after} events", flush=True)
            os._exit(1)

        def wait_for_the_client(self) -> None:
            print("waiting for the client", flush=True)
            while True:
                select.select([self.connection], [], [])
                try:
                    if self.connection.recv(1):
                        continue  # no request has more to say: not expected
                except OSError:  # reset rather than closed
                    pass
                print("client went away", flush=True)
                self.close_connection = True
                return

        def upload(self) -> None:
            length = int(self.headers["Content-Length"])
            print(f"receiving an upload of {length} bytes", flush=True)
            received = 0
            while received < length:
                try:
                    chunk = self.rfile.read1(length - received)
                except OSError:  # reset rather than closed
                    chunk = b""
                if not chunk:
                    print(f"upload cut after {received} bytes", flush=True)
                    self.close_connection = True
                    return
                received += len(chunk)
            self.answer(200, {"bytes": received})

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.dir))
    server.daemon_threads = True
    (args.dir / "server.pid").write_text(str(os.getpid()))
    print("fault child listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
