"""A local stand-in for the Hugging Face file endpoint (``HF_ENDPOINT``), serving a directory.

Layout: ``<root>/<owner>/<name>/<file>``, answered at ``/<owner>/<name>/resolve/<rev>/<file>``
with the headers huggingface_hub reads (X-Repo-Commit, ETag, Content-Length) and byte ranges, so
the real download code (resume included) runs against it. Also runnable as a script:
``python tests/hf_mirror.py ROOT PORT``.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class MirrorHandler(BaseHTTPRequestHandler):
    server: MirrorServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _resolve(self, method: str) -> Path | None:
        """The file a request names, after noting the request; None (a 404 sent) when there is none."""
        self.server.requests.append((method, self.path))
        parts = unquote(self.path.split("?")[0]).strip("/").split("/")
        path = None
        if len(parts) >= 5 and parts[2] == "resolve" and ".." not in parts:
            path = self.server.root / parts[0] / parts[1] / "/".join(parts[4:])
        if path is None or not path.is_file():
            self.send_error(404)
            return None
        return path

    def _headers(self, path: Path, status: int, start: int = 0) -> None:
        size = path.stat().st_size
        self.send_response(status)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(path.read_bytes()).hexdigest()}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(size - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()

    def do_HEAD(self) -> None:
        path = self._resolve("HEAD")
        if path is None:
            return
        self._headers(path, 200)

    def do_GET(self) -> None:
        path = self._resolve("GET")
        if path is None:
            return
        start = 0
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
        self._headers(path, 206 if start else 200, start)
        with path.open("rb") as fh:
            fh.seek(start)
            self.wfile.write(fh.read())


class MirrorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), MirrorHandler)
        self.root = Path(root)
        self.requests: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> MirrorServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


if __name__ == "__main__":
    MirrorServer(Path(sys.argv[1]), int(sys.argv[2])).serve_forever()
