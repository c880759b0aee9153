"""A small in-memory Hugging Face Hub for tests, on 127.0.0.1 at a random port.

It implements the endpoints that huggingface_hub's create_repo,
create_branch, list_repo_files, create_commit (preupload + NDJSON commit),
hf_hub_download and snapshot_download call, with the status codes, error
headers (X-Error-Code) and file headers (ETag, X-Repo-Commit,
Content-Length) the client reads. Every file is offered as a "regular"
upload, so no LFS or Xet storage is needed. Each commit is a full snapshot of
the repo's files, kept in memory.

Example:
```python
with HubServer() as hub:
    hub.add_repo("org/repo", {"config.json": b"{}"})
    os.environ["HF_ENDPOINT"] = hub.url
    hub.requests  # [("GET", "/api/models/org/repo/revision/main"), ...]
```
"""

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

TOKEN = "hf_loopback_test_token"


def git_blob_id(data):
    """The git object id of a file: what the Hub returns as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status, code=None, message="", **body):
        super().__init__(message)
        self.status, self.code, self.message, self.body = status, code, message, body


class Repo:
    def __init__(self, private=False):
        self.private = private
        self.commits = {}  # sha -> {path: bytes}
        self.refs = {}  # branch -> sha

    def commit(self, branch, files, summary):
        parent = self.refs.get(branch, "")
        digest = hashlib.sha1(json.dumps(
            [parent, summary, sorted((p, git_blob_id(d)) for p, d in files.items())]).encode())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        self.refs[branch] = sha
        return sha

    def resolve(self, revision):
        if revision in self.refs:
            return self.refs[revision]
        if revision in self.commits:
            return revision
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")


class HubServer:
    """The loopback Hub. `fail` holds endpoint names ("commit", ...) that answer 500;
    `truncate` maps a file path to the bytes sent before its download breaks off."""

    def __init__(self):
        self.repos = {}
        self.requests = []
        self.fail = set()
        self.truncate = {}  # file path -> bytes sent before the connection drops
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll interval: shutdown() waits for the loop to notice, once per test.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                        daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id, files, private=False, branch="main"):
        """Creates a repo holding `files` ({path: bytes}) in one commit; returns its sha."""
        repo = self.repos.setdefault(repo_id, Repo(private))
        return repo.commit(branch, files, "add files")

    def files(self, repo_id, revision="main"):
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]

    def requested(self, fragment):
        """The logged requests whose path contains `fragment`."""
        return [r for r in self.requests if fragment in r[1]]

    # ---- endpoints: each returns (status, headers, body bytes) -----------
    def route(self, method, path, query, headers, body):
        parts = [unquote(p) for p in path.strip("/").split("/")]
        authorized = headers.get("Authorization") == f"Bearer {TOKEN}"
        if parts[:2] == ["api", "repos"] and parts[2:] == ["create"] and method == "POST":
            return self.create_repo(json.loads(body), authorized)
        if parts == ["api", "validate-yaml"] and method == "POST":
            return _json({"errors": [], "warnings": []})
        if len(parts) >= 5 and parts[:2] == ["api", "models"]:
            repo_id, action, rest = "/".join(parts[2:4]), parts[4], parts[5:]
            write = method == "POST"
            repo = self.repo(repo_id, authorized, write)
            if action == "revision" and method == "GET" and rest:
                return self.revision_info(repo_id, repo, "/".join(rest))
            if action == "tree" and method == "GET" and rest:
                return self.tree(repo, rest[0], "/".join(rest[1:]),
                                 query.get("recursive", ["false"])[0].lower() == "true")
            if action == "preupload" and write and rest:
                return self.preupload(repo, "/".join(rest), json.loads(body))
            if action == "commit" and write and rest:
                if "commit" in self.fail:
                    raise HubError(500, None, "Internal Error - We're working hard to fix this")
                return self.commit(repo_id, repo, "/".join(rest), body)
            if action == "branch" and write and rest:
                return self.create_branch(repo, "/".join(rest), json.loads(body or b"{}"))
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = "/".join(parts[:2])
            repo = self.repo(repo_id, authorized, write=False)
            return self.resolve_file(repo, parts[3], "/".join(parts[4:]), headers)
        raise HubError(404, None, f"{method} {path} is not served by this test Hub")

    def repo(self, repo_id, authorized, write):
        repo = self.repos.get(repo_id)
        if write and not authorized:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        if repo is None or (repo.private and not authorized):
            # As the Hub: a private repo looks missing to someone not logged in.
            raise HubError(401 if not authorized else 404, "RepoNotFound",
                           "Repository not found")
        return repo

    def create_repo(self, payload, authorized):
        if not authorized:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            # The Hub names the existing repo; create_repo(exist_ok=True) reads it.
            raise HubError(409, None, "You already created this model repo",
                           url=f"{self.url}/{repo_id}")
        repo = self.repos[repo_id] = Repo(private=payload.get("visibility") == "private"
                                          or bool(payload.get("private")))
        repo.commit("main", {".gitattributes": b"*.h5 filter=lfs diff=lfs merge=lfs -text\n"},
                    "initial commit")
        return _json({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def create_branch(self, repo, branch, payload):
        if branch in repo.refs:
            raise HubError(409, None, f"Reference refs/heads/{branch} already exists")
        start = repo.resolve(payload.get("startingPoint") or "main")
        repo.refs[branch] = start
        return _json({})

    def revision_info(self, repo_id, repo, revision):
        sha = repo.resolve(revision)
        return _json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                      "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])]})

    def tree(self, repo, revision, prefix, recursive):
        files = repo.commits[repo.resolve(revision)]
        prefix = prefix.strip("/") + "/" if prefix else ""
        entries, folders = [], set()
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append({"type": "file", "oid": git_blob_id(data), "size": len(data),
                            "path": path})
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f}
                    for f in sorted(folders)]
        return _json(entries)

    def preupload(self, repo, revision, payload):
        files = repo.commits[repo.resolve(revision)]
        return _json({"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_id(files[f["path"]]) if f["path"] in files else None}
            for f in payload["files"]]})

    def commit(self, repo_id, repo, revision, body):
        if revision not in repo.refs:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, None, "The first line of a commit must be its header")
        files = dict(repo.commits[repo.refs[revision]])
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "EntryNotFound", "A file with this name doesn't exist")
                del files[value["path"]]
            else:  # lfsFile and the rest: never offered by preupload here
                raise HubError(400, None, f"Unsupported commit operation {key!r}")
        sha = repo.commit(revision, files, lines[0]["value"].get("summary", ""))
        return _json({"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                      "pullRequestUrl": None})

    def resolve_file(self, repo, revision, path, headers):
        sha = repo.resolve(revision)
        files = repo.commits[sha]
        if path not in files:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}")
        data = files[path]
        status, start, end = 200, 0, len(data)
        byte_range = headers.get("Range", "")
        if byte_range.startswith("bytes="):  # "bytes=START-" or "bytes=START-END" (inclusive)
            first, _, last = byte_range[6:].partition("-")
            status, start = 206, int(first)
            end = min(int(last) + 1, len(data)) if last else len(data)
        if path in self.truncate:  # a connection that drops after these many bytes
            end = min(end, start + self.truncate[path])
            return status, {"ETag": f'"{git_blob_id(data)}"', "X-Repo-Commit": sha,
                            "Content-Type": "application/octet-stream",
                            "Content-Length": str(len(data) - start)}, data[start:end]
        return status, {"ETag": f'"{git_blob_id(data)}"', "X-Repo-Commit": sha,
                        "Content-Type": "application/octet-stream"}, data[start:end]


def _json(payload, status=200):
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _handler_for(hub):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            url = urlsplit(self.path)
            with hub._lock:
                hub.requests.append((self.command, url.path))
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                with hub._lock:
                    status, headers, data = hub.route(self.command, url.path,
                                                      parse_qs(url.query), self.headers, body)
            except HubError as err:
                headers = {"Content-Type": "application/json", "X-Error-Message": err.message}
                if err.code:
                    headers["X-Error-Code"] = err.code
                status, data = err.status, json.dumps({"error": err.message, **err.body}).encode()
            self.send_response(status)
            headers.setdefault("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            if int(headers["Content-Length"]) != len(data):
                self.close_connection = True  # the promised bytes never come

        do_GET = do_HEAD = do_POST = _serve

        def log_message(self, *args):  # keep pytest's output clean
            pass

    return Handler


@pytest.fixture
def server(tmp_path, monkeypatch):
    """The loopback Hub for one test: the real huggingface_hub client points at it
    (HF_ENDPOINT) with a temporary HF_HOME and the test token, so nothing reaches
    huggingface.co or the user's cache or login. Import it into a test module
    (`from hub_server import server`) to use it."""
    with HubServer() as hub_server:
        monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield hub_server
