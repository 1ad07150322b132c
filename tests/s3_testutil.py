"""A real S3-compatible server on 127.0.0.1 for the tests and benchmarks: moto's server mode, started and
stopped in-process, with a switch that makes it answer some requests with HTTP 503 (a transient fault)."""

from __future__ import annotations

import os
import re
import socket
import threading


class LoopbackS3:
    """``with LoopbackS3() as s3:`` sets the AWS environment variables to point at the server (never anywhere
    else) and restores them on exit. ``s3.fail_next(n, pattern)`` answers the next ``n`` requests whose path
    matches ``pattern`` with ``503 SlowDown``; ``s3.requests`` lists every request received."""

    ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
           "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")

    def __init__(self, separate_process: bool = False):
        """``separate_process``: run the server as its own process (``python -m moto.server``), so that its
        Python work does not share this process's GIL (benchmarks); no fault switch then."""
        from moto.server import ThreadedMotoServer

        self.separate_process = separate_process
        self.process = None

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._fail = [0, None]
        self.failed = 0
        # "METHOD /path" of every request the server received, then " bytes=A-B" for a ranged one (in-process only)
        self.requests: list[str] = []
        self._lock = threading.Lock()
        outer = self

        class _Server(ThreadedMotoServer):
            def _server_entry(self):  # moto's own entry, with our fault switch around its WSGI app
                from moto.moto_server.threaded_moto_server import (
                    DomainDispatcherApplication, MotoRequestHandler, create_backend_app, make_server)

                app = outer._faulty(DomainDispatcherApplication(create_backend_app))
                self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
                self._server_ready_event.set()
                self._server.serve_forever()

        self.server = _Server(ip_address="127.0.0.1", port=self.port, verbose=False)

    def _faulty(self, app):
        def wrapped(environ, start_response):
            with self._lock:
                ranged = f" {environ['HTTP_RANGE']}" if environ.get("HTTP_RANGE") else ""
                self.requests.append(f"{environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO', '')}{ranged}")
                n, pattern = self._fail
                hit = n > 0 and (pattern is None or re.search(pattern, environ.get("PATH_INFO", "")))
                if hit:
                    self._fail[0] -= 1
                    self.failed += 1
            if hit:
                body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                start_response("503 Service Unavailable", [("Content-Type", "application/xml"),
                                                          ("Content-Length", str(len(body)))])
                return [body]
            return app(environ, start_response)
        return wrapped

    def fail_next(self, n: int, pattern: str | None = None) -> None:
        with self._lock:
            self._fail = [n, pattern]

    def make_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return f"s3://{name}"

    @staticmethod
    def _forget_clients() -> None:
        """fsspec caches filesystem instances by their arguments, not by the endpoint taken from the
        environment: one made for an earlier server (another test module's) would still call its port."""
        from s3fs import S3FileSystem

        S3FileSystem.clear_instance_cache()

    def __enter__(self) -> "LoopbackS3":
        self._forget_clients()
        self._saved = {k: os.environ.get(k) for k in self.ENV}
        for k in self.ENV:
            os.environ.pop(k, None)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=self.endpoint,
                          AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        if self.separate_process:
            import subprocess
            import sys
            import time

            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                             str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.2)
        else:
            self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
        else:
            self.server.stop()
        self._forget_clients()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
