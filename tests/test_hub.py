"""The real hub path, end to end, against a local hub: `vlmprobe pin`, then `from_pretrained` at
the pinned revision downloads into a fresh cache and extracts; a wrong revision fails clearly.

The hub is a small HTTP server on 127.0.0.1 speaking the part of the hub API huggingface_hub
2.4.0 uses (`model_info`, `list_repo_tree`, HEAD/GET `resolve`). huggingface_hub reads
HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE when it is imported, so everything that talks to the
hub runs in a subprocess with the environment set, as `dvc exp run` would.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
import yaml

from conftest import make_project
from vlmprobe.models.registry import (
    ENTRIES_DIR,
    RegistryError,
    adapter_for,
    apply_pins,
    entries,
    get_entry,
    read_pins,
)

REPO_ID = "vlmprobe-tests/qwen2_5_vl_tiny"
ENTRY = "qwen2_5_vl_hub"  # the test's hub entry, from $VLMPROBE_ENTRIES_DIR
UNKNOWN_REVISION = "0123456789abcdef0123456789abcdef01234567"
TIMEOUT_S = 300  # every subprocess is bounded


def commit_of(files: dict[str, bytes]) -> str:
    """A 40-hex commit sha determined by the files, as a hub commit is."""
    digest = hashlib.sha1()
    for name, body in sorted(files.items()):
        digest.update(name.encode() + b"\0" + body + b"\0")
    return digest.hexdigest()


class LocalHub(ThreadingHTTPServer):
    """One repo at one commit (`sha`), its default branch `main`; records every request."""

    daemon_threads = True

    def __init__(self, repo_id: str, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repo_id, self.files, self.sha = repo_id, files, commit_of(files)
        self.requests: list[str] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(BaseHTTPRequestHandler):
    server: LocalHub

    def log_message(self, *args) -> None:  # quiet: the requests are kept in server.requests
        pass

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def do_GET(self) -> None:
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        hub, path = self.server, unquote(urlparse(self.path).path)
        hub.requests.append(f"{self.command} {path}")
        api, resolve = f"/api/models/{hub.repo_id}", f"/{hub.repo_id}/resolve/"
        if path in (api, f"{api}/revision/main", f"{api}/revision/{hub.sha}"):
            return self.send_json(self.model_info(), body)
        if path.startswith(f"{api}/revision/"):
            return self.send_error_code("RevisionNotFound", body)
        if path.startswith(f"{api}/tree/"):
            revision, _, folder = path.removeprefix(f"{api}/tree/").partition("/")
            if revision not in ("main", hub.sha):
                return self.send_error_code("RevisionNotFound", body)
            return self.send_json(self.tree(folder), body)
        if path.startswith(resolve):
            revision, _, filename = path.removeprefix(resolve).partition("/")
            if revision not in ("main", hub.sha):
                return self.send_error_code("RevisionNotFound", body)
            if filename not in hub.files:
                return self.send_error_code("EntryNotFound", body)
            return self.send_file(hub.files[filename], body)
        self.send_error_code("RepoNotFound", body)

    def model_info(self) -> dict:
        hub = self.server
        return {"id": hub.repo_id, "modelId": hub.repo_id, "sha": hub.sha, "private": False,
                "siblings": [{"rfilename": name} for name in sorted(hub.files)]}

    def tree(self, folder: str) -> list[dict]:
        prefix = f"{folder}/" if folder else ""
        return [{"type": "file", "path": name, "size": len(body),
                 "oid": hashlib.sha1(body).hexdigest()}
                for name, body in sorted(self.server.files.items()) if name.startswith(prefix)]

    def send_json(self, data: object, body: bool) -> None:
        payload = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def send_file(self, payload: bytes, body: bool) -> None:
        self.send_response(200)
        self.send_header("X-Repo-Commit", self.server.sha)
        self.send_header("ETag", f'"{hashlib.sha256(payload).hexdigest()}"')
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def send_error_code(self, code: str, body: bool) -> None:
        payload = json.dumps({"error": code}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        if code == "EntryNotFound":
            self.send_header("X-Repo-Commit", self.server.sha)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict[str, bytes]:
    """The tiny Qwen2.5-VL (real class, seeded random weights) as a checkpoint's files."""
    folder = tmp_path_factory.mktemp("checkpoint")
    adapter = adapter_for(get_entry("qwen2_5_vl_tiny"))
    model = adapter.load(Path.cwd(), torch.device("cpu"))
    model.save_pretrained(folder)
    adapter.save_preprocessing(folder)
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hub(checkpoint):
    server = LocalHub(REPO_ID, checkpoint)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def entries_dir(tmp_path_factory) -> Path:
    """A user's entries folder holding the hub twin of `qwen2_5_vl_tiny` (same points)."""
    folder = tmp_path_factory.mktemp("entries")
    entry = yaml.safe_load((ENTRIES_DIR / "qwen2_5_vl_tiny.yaml").read_text())
    entry.update(display_name="Qwen2.5-VL tiny from a local hub",
                 weights={"source": "hub", "repo_id": REPO_ID, "revision": None})
    (folder / f"{ENTRY}.yaml").write_text(yaml.safe_dump(entry, sort_keys=False))
    return folder


def hub_env(hub: LocalHub | None, entries_dir: Path, cache: Path) -> dict[str, str]:
    """The environment of a run that may reach `hub` (None: offline), with its own cache."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               VLMPROBE_ENTRIES_DIR=str(entries_dir), HF_HUB_CACHE=str(cache),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", DVC_NO_ANALYTICS="1")
    if hub is None:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = hub.endpoint
    return env


def run_in(cwd: Path, cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


# Loads the entry through the real path (resolve_pretrained -> from_pretrained at the entry's
# revision) and extracts every point of 2 images; prints what came out, or the error.
LOAD_AND_EXTRACT = """
import json, sys
from pathlib import Path
import numpy as np, torch
from vlmprobe.extract.engine import extract_points
from vlmprobe.models.base import WeightsUnavailable
from vlmprobe.models.registry import adapter_for, get_entry
entry = get_entry(sys.argv[1])
adapter = adapter_for(entry)
try:
    model = adapter.load(Path.cwd(), torch.device("cpu"))
except WeightsUnavailable as e:
    sys.exit(f"error: {e}")
images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
tokens = extract_points(adapter, model, images, list(entry.points), torch.device("cpu"))
print(json.dumps({"revision": entry.weights["revision"],
                  "shapes": {p: list(t.shape) for p, t in tokens.items()},
                  "finite": all(bool(torch.isfinite(t).all()) for t in tokens.values()),
                  "sums": {p: float(t.double().sum()) for p, t in tokens.items()}}))
"""


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A project root for the commands (they read and write its pins.yaml)."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def test_pin_records_the_hubs_current_commit(hub, entries_dir, workdir, tmp_path):
    env = hub_env(hub, entries_dir, tmp_path / "cache")
    result = run_in(workdir, ["vlmprobe", "pin", ENTRY], env)
    assert result.returncode == 0, result.stderr
    assert f"{ENTRY} ({REPO_ID}): None -> {hub.sha}" in result.stdout
    pins = yaml.safe_load((workdir / "pins.yaml").read_text())
    assert pins == {ENTRY: {"revision": hub.sha}}
    assert f"GET /api/models/{REPO_ID}" in hub.requests


def test_pinned_revision_downloads_caches_and_extracts(hub, entries_dir, workdir, tmp_path):
    cache = tmp_path / "cache"
    env = hub_env(hub, entries_dir, cache)
    assert run_in(workdir, ["vlmprobe", "pin", ENTRY], env).returncode == 0
    hub.requests.clear()
    result = run_in(workdir, [sys.executable, "-c", LOAD_AND_EXTRACT, ENTRY], env)
    assert result.returncode == 0, result.stderr[-4000:]
    online = json.loads(result.stdout.splitlines()[-1])
    assert online["revision"] == hub.sha and online["finite"]
    tiny = get_entry("qwen2_5_vl_tiny")
    assert set(online["shapes"]) == set(tiny.points)
    assert all(shape[0] == 2 for shape in online["shapes"].values())
    # Every file came at the pinned commit, into the fresh cache's snapshot of that commit.
    assert any(r == f"GET /{REPO_ID}/resolve/{hub.sha}/model.safetensors" for r in hub.requests)
    assert not [r for r in hub.requests if "/resolve/" in r and f"/resolve/{hub.sha}/" not in r]
    snapshot = cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / hub.sha
    assert (snapshot / "config.json").exists() and (snapshot / "model.safetensors").exists()

    # Cached: offline, the same revision loads from the cache alone, to the same features.
    offline = run_in(workdir, [sys.executable, "-c", LOAD_AND_EXTRACT, ENTRY],
                     hub_env(None, entries_dir, cache))
    assert offline.returncode == 0, offline.stderr[-4000:]
    assert json.loads(offline.stdout.splitlines()[-1]) == online


def test_unknown_revision_fails_naming_it_and_the_fix(hub, entries_dir, workdir, tmp_path):
    (workdir / "pins.yaml").write_text(f"{ENTRY}: {{revision: {UNKNOWN_REVISION}}}\n")
    result = run_in(workdir, [sys.executable, "-c", LOAD_AND_EXTRACT, ENTRY],
                    hub_env(hub, entries_dir, tmp_path / "cache"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: model {ENTRY!r}")
    assert UNKNOWN_REVISION in message and REPO_ID in message
    assert f"vlmprobe pin {ENTRY}" in message


def test_pin_offline_says_so_in_one_line(entries_dir, workdir, tmp_path):
    result = run_in(workdir, ["vlmprobe", "pin", ENTRY], hub_env(None, entries_dir, tmp_path))
    assert result.returncode != 0
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert "offline" in result.stderr and REPO_ID in result.stderr
    assert not (workdir / "pins.yaml").exists()


@pytest.mark.slow
def test_dvc_exp_run_downloads_the_pinned_revision_and_extracts(hub, entries_dir, tmp_path):
    project = make_project(tmp_path / "project")
    env = hub_env(hub, entries_dir, tmp_path / "cache")
    assert run_in(project, ["vlmprobe", "pin", ENTRY], env).returncode == 0
    hub.requests.clear()
    result = run_in(project, ["dvc", "exp", "run", "extract", "-S", f"vlm={ENTRY}"], env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f"GET /{REPO_ID}/resolve/{hub.sha}/model.safetensors" in hub.requests
    extract = json.loads((project / "metrics" / "extract.json").read_text())
    assert json.dumps(extract).count(hub.sha) >= 1  # the run records the revision it used


def test_pins_apply_to_hub_entries_only_and_bad_pins_name_the_fix(tmp_path):
    known, pins_file = entries(), tmp_path / "pins.yaml"
    pins_file.write_text("qwen2_5_vl: {revision: main}\n")
    with pytest.raises(RegistryError, match=r"40-hex.*`vlmprobe pin qwen2_5_vl`"):
        read_pins(pins_file)
    with pytest.raises(RegistryError, match=r"'pixels', which is not a hub entry.*Fix: remove"):
        apply_pins(known, {"pixels": UNKNOWN_REVISION}, pins_file)
    pinned = apply_pins(known, {"qwen2_5_vl": UNKNOWN_REVISION}, pins_file)["qwen2_5_vl"]
    assert pinned.weights["revision"] == UNKNOWN_REVISION
    assert pinned.weights["pinned_in"] == "pins.yaml"
    assert known["qwen2_5_vl"].weights["revision"] != UNKNOWN_REVISION  # the package's, as is


def test_entries_dir_adds_entries_and_refuses_a_clash(entries_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMPROBE_ENTRIES_DIR", str(entries_dir))
    entries.cache_clear()
    try:
        assert get_entry(ENTRY).weights["repo_id"] == REPO_ID
        (tmp_path / "pixels.yaml").write_text((ENTRIES_DIR / "pixels.yaml").read_text())
        monkeypatch.setenv("VLMPROBE_ENTRIES_DIR", str(tmp_path))
        entries.cache_clear()
        with pytest.raises(RegistryError, match=r"'pixels' is already defined.*Fix: rename"):
            entries()
        monkeypatch.setenv("VLMPROBE_ENTRIES_DIR", str(tmp_path / "nowhere"))
        entries.cache_clear()
        with pytest.raises(RegistryError, match=r"VLMPROBE_ENTRIES_DIR=.*is not a folder"):
            entries()
    finally:
        monkeypatch.delenv("VLMPROBE_ENTRIES_DIR")
        entries.cache_clear()
