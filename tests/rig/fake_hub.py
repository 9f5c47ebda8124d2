#!/usr/bin/env python3
"""Fake Hugging Face Hub: a test double for the Hub's HTTP API used by huggingface_hub's snapshot_download.

Serves every directory ROOT/<org>/<name>/ (plain files, subdirectories allowed) as model repo
``<org>/<name>``, branch ``main``. Point the client at it with ``HF_ENDPOINT=http://HOST:PORT``.
Standard library only; nothing is ever written under ROOT.

CLI:     fake_hub.py --root DIR [--host 127.0.0.1] [--port 0] [--port-file F]
Library: srv = serve(root, host, port)   # already serving in a daemon thread
         srv.server_address, srv.requests (list of "METHOD /path STATUS"), srv.shutdown()

Every request is logged to stderr as ``fake_hub: METHOD /path STATUS``.

Endpoints (what huggingface_hub 2.4 / transformers 5 call):
  GET  /api/models/{repo}[/revision/{rev}]  model_info / repo_info (snapshot_download step 1):
       JSON {id, sha, siblings[{rfilename, size, blobId}], private, tags, ...}
  GET  /api/models/{repo}/tree/{rev}[/{path}]?recursive=true|false
       list_repo_tree / list_repo_files (snapshot_download step 2, transformers' chat-template and
       .model probes): JSON list of {type: file|directory, oid, size, path[, lfs{oid,size,pointerSize}]};
       one page, no Link header (the client's pagination stops there).
  HEAD /{repo}/resolve/{rev}/{file}   get_hf_file_metadata: 200 with X-Repo-Commit, ETag,
       Content-Length, plus X-Linked-Etag / X-Linked-Size for LFS-like files. No redirect.
  GET  /{repo}/resolve/{rev}/{file}   http_get: the bytes (Range "bytes=A-[B]" answered with 206).
{rev} is ``main`` or the repo's commit sha. The commit sha is sha1 over the sorted (path, sha256)
list of the repo's files, so it changes exactly when the content does.
Files ending in .safetensors/.bin/.pt/.pth/.gguf/.model/.onnx/.h5 or over 10 MB are "LFS" (ETag = sha256,
as on the Hub); others use their git blob sha1. Xet is never advertised (no X-Xet-* headers, no
xetHash), so the client always uses plain HTTP downloads even with hf_xet installed.
Errors carry X-Error-Code as hf_raise_for_status expects: unknown repo -> 404 RepoNotFound
(RepositoryNotFoundError), unknown revision -> 404 RevisionNotFound (RevisionNotFoundError),
missing file or tree path -> 404 EntryNotFound with X-Repo-Commit (RemoteEntryNotFoundError).
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import re
import sys
import threading
from urllib.parse import unquote, urlsplit

# a tiny Llama repository to serve (run with a python that has transformers): OUT PRESET_DIR VOCAB_SIZE
BUILD_TINY_LLAMA = """
import shutil, sys
from transformers import LlamaConfig, LlamaForCausalLM
import torch
torch.manual_seed(0)
out, preset = sys.argv[1], sys.argv[2]
config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=int(sys.argv[3]), max_position_embeddings=256)
LlamaForCausalLM(config).save_pretrained(out)
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    try:
        shutil.copy(preset + "/" + name, out + "/" + name)
    except FileNotFoundError:
        pass
"""

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".onnx", ".h5", ".msgpack")
LFS_MIN_SIZE = 10 * 1024 * 1024
_hash_cache: dict = {}  # (abs path, mtime_ns, size) -> (sha256, git sha1)
_hash_lock = threading.Lock()


def _hashes(path: str, st: os.stat_result) -> tuple[str, str]:
    key = (path, st.st_mtime_ns, st.st_size)
    with _hash_lock:
        if key in _hash_cache:
            return _hash_cache[key]
    s256, s1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % st.st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            s256.update(chunk)
            s1.update(chunk)
    with _hash_lock:
        _hash_cache[key] = (s256.hexdigest(), s1.hexdigest())
    return _hash_cache[key]


def scan_repo(repo_dir: str) -> tuple[str, dict]:
    """Return (commit sha, {path: entry}) for a repo directory; entry has size, sha256, oid, lfs, abspath."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(repo_dir):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        for fn in filenames:
            ap = os.path.join(dirpath, fn)
            st = os.stat(ap)
            sha256, git_sha1 = _hashes(ap, st)
            rel = os.path.relpath(ap, repo_dir).replace(os.sep, "/")
            lfs = rel.endswith(LFS_SUFFIXES) or st.st_size >= LFS_MIN_SIZE
            files[rel] = dict(size=st.st_size, sha256=sha256, oid=git_sha1, lfs=lfs, abspath=ap)
    listing = "".join(f"{p}\0{files[p]['sha256']}\n" for p in sorted(files))
    return hashlib.sha1(listing.encode()).hexdigest(), files


def _tree_entry(path: str, e: dict) -> dict:
    out = {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}
    if e["lfs"]:
        out["lfs"] = {"oid": e["sha256"], "size": e["size"], "pointerSize": 134}
    return out


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response sets Content-Length
    server_version = "fake-hub/1"

    def log_request(self, code="-", size="-"):
        line = f"{self.command} {self.path} {code}"
        self.server.requests.append(line)
        # the bearer token the request carried (tests check that a token reaches the hub): (line, token or None)
        auth = self.headers.get("Authorization") or ""
        self.server.tokens.append((line, auth[7:] if auth.startswith("Bearer ") else None))
        if self.server.log is not None:
            with self.server.log_lock:  # one write per line: threads must not interleave
                self.server.log.write(f"fake_hub: {line}\n")
                self.server.log.flush()

    def log_message(self, fmt, *args):  # silence the default access/error log (log_request does it)
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, headers=None):
        self._send(200, json.dumps(obj).encode(), headers)

    def _error(self, code_name: str, message: str, headers: dict | None = None):
        h = {"X-Error-Code": code_name, "X-Error-Message": message, **(headers or {})}
        self._send(404, json.dumps({"error": message}).encode(), h)

    def _repo(self, org: str, name: str, rev: str | None):
        """Resolve repo + revision; return (sha, files) or None after sending the error."""
        repo_dir = os.path.join(self.server.root, org, name)
        bad = any(p in ("", ".", "..") or "/" in p or "\\" in p for p in (org, name))
        if bad or not os.path.isdir(repo_dir):
            self._error("RepoNotFound", "Repository not found")
            return None
        sha, files = scan_repo(repo_dir)
        if rev not in (None, "main", sha):
            self._error("RevisionNotFound", "Invalid rev id: " + rev)
            return None
        return sha, files

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urlsplit(self.path)
        parts = url.path.split("/")[1:]
        try:
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                return self._api(parts[2], parts[3], parts[4:], url.query)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(parts[0], parts[1], unquote(parts[3]), unquote("/".join(parts[4:])))
            if parts[:2] == ["api", "models"] or "resolve" in parts[1:3]:  # e.g. a repo id without "org/"
                return self._error("RepoNotFound", "Repository not found")
            self._send(404, b'{"error": "not found"}')
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _api(self, org, name, rest, query):
        kind = rest[0] if rest else "info"
        if not (kind == "info" or (kind == "revision" and len(rest) == 2) or (kind == "tree" and len(rest) >= 2)):
            return self._send(404, b'{"error": "not found"}')
        rev = unquote(rest[1]) if rest else None
        found = self._repo(org, name, rev)
        if found is None:
            return
        sha, files = found
        if kind != "tree":
            return self._json({
                "_id": sha[:24], "id": f"{org}/{name}", "modelId": f"{org}/{name}", "author": org,
                "sha": sha, "private": False, "gated": False, "disabled": False, "tags": [],
                "downloads": 0, "likes": 0, "lastModified": "2024-01-01T00:00:00.000Z",
                "createdAt": "2024-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": p, "size": e["size"], "blobId": e["oid"]} for p, e in sorted(files.items())],
            })
        prefix = unquote("/".join(rest[2:])).strip("/")
        recursive = re.search(r"(^|&)recursive=(true|True|1)(&|$)", query) is not None
        dirs = {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}
        if prefix and prefix not in dirs:
            return self._error("EntryNotFound", f"{prefix} does not exist on {rev}", {"X-Repo-Commit": sha})
        base = prefix + "/" if prefix else ""
        out = []
        for typ, paths in (("directory", sorted(dirs)), ("file", sorted(files))):
            for p in paths:
                if not p.startswith(base) or (not recursive and "/" in p[len(base):]):
                    continue
                if typ == "directory":
                    out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p})
                else:
                    out.append(_tree_entry(p, files[p]))
        self._json(out)

    def _resolve(self, org, name, rev, filename):
        found = self._repo(org, name, rev)
        if found is None:
            return
        sha, files = found
        e = files.get(filename)
        if e is None:
            return self._error("EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        etag = e["sha256"] if e["lfs"] else e["oid"]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if e["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": e["size"]})
        size, start, end, code = e["size"], 0, e["size"] - 1, 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        if m and self.command == "GET":
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            if start >= size or start > end:
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
            code = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(end - start + 1 if size else 0))
        self.end_headers()
        if self.command == "GET" and size:
            with open(e["abspath"], "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)


class FakeHub(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: str, host: str, port: int, log=sys.stderr):
        self.root, self.log, self.requests, self.log_lock = os.path.abspath(root), log, [], threading.Lock()
        self.tokens = []
        super().__init__((host, port), Handler)


def serve(root: str, host: str = "127.0.0.1", port: int = 0, log=sys.stderr) -> FakeHub:
    """Start a FakeHub serving ROOT in a daemon thread; call .shutdown() (and .server_close()) to stop."""
    srv = FakeHub(root, host, port, log)
    threading.Thread(target=srv.serve_forever, name="fake-hub", daemon=True).start()
    return srv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="directory holding <org>/<name>/ repos")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    ap.add_argument("--port-file", help="write the bound port to this file")
    a = ap.parse_args(argv)
    srv = FakeHub(a.root, a.host, a.port)
    port = srv.server_address[1]
    if a.port_file:
        tmp = a.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, a.port_file)  # atomic: a reader never sees a half-written port
    print(f"fake_hub: serving {srv.root} on http://{a.host}:{port}", file=sys.stderr, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
