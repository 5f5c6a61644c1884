"""A fake Hugging Face hub on loopback: serves a model directory as a repo, or refuses as huggingface.co does.

huggingface_hub reads the answer's status and X-Error-Code (GatedRepo, RepoNotFound, ...) to choose its
error type; snapshot_download asks /api/models/<repo>/revision/main, then the tree, then HEAD and GET each
file under /<repo>/resolve/<sha>/. Point HF_ENDPOINT at `endpoint`.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

SHA = "0123456789abcdef0123456789abcdef01234567"

# (status, headers) of a refusal, by repo name
REFUSALS = {
    "acme/not-found": (401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}),
    "acme/gated": (403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model acme/gated is restricted."}),
    "acme/forbidden": (403, {"X-Error-Message": "Your token has no read access"}),
    "acme/missing": (404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}),
    "acme/down": (503, {}),
}


class FakeHub:
    def __init__(self, repos: dict[str, Path] | None = None):
        self.files = {
            repo: {f.name: f.read_bytes() for f in d.iterdir() if f.is_file()} for repo, d in (repos or {}).items()
        }
        self.requests: list[tuple[str, str]] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        for repo, (status, headers) in REFUSALS.items():
            if path.startswith((f"/api/models/{repo}/", f"/{repo}/")):
                return status, b'{"error": "refused"}', headers
        for repo, files in self.files.items():
            if path == f"/api/models/{repo}/revision/main":
                info = {"id": repo, "sha": SHA, "siblings": [{"rfilename": name} for name in files]}
                return 200, json.dumps(info).encode(), {"Content-Type": "application/json"}
            if path == f"/api/models/{repo}/tree/{SHA}":
                tree = [
                    {"type": "file", "path": name, "size": len(body), "oid": hashlib.sha1(body).hexdigest()}
                    for name, body in files.items()
                ]
                return 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}
            name = path.removeprefix(f"/{repo}/resolve/{SHA}/")
            if name in files:
                return 200, files[name], {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(files[name]).hexdigest()}"'}
        return 404, b"{}", {"X-Error-Code": "RepoNotFound"}

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                hub.requests.append((self.command, path))
                status, body, headers = hub.answer(path)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_HEAD = do_GET

            def log_message(self, *args) -> None:
                pass

        return Handler
