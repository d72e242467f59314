"""The team data workflow on an S3 remote, as docs/remote.md tells it, against a local S3 server.

A moto server on 127.0.0.1 (a free port, every request's credentials checked) stands in for S3
and a bare git repository for the team's git remote. The pipeline runs once (`vlm=pixels`, the
quick params: no trained probe at the model's point) in an origin project that pushes to both;
clones of the git remote then pull, reproduce and exchange an experiment. The failure cases push
from a clone that holds every output.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import yaml

from conftest import QUICK_PARAMS, ROOT, make_project, run, tool_env

pytestmark = pytest.mark.slow

REMOTE = "storage"
PLACEHOLDER_URL = "s3://YOUR-BUCKET/vlmprobe"
TEAM_BUCKET = "vlmprobe-team"
REGION = "us-east-1"
EXPERIMENT = "seed1"
UP_TO_DATE = "Data and pipelines are up to date."
# Option names that hold secrets in DVC's remote settings (access_key_id, secret_access_key,
# session_token, password, account_key, ...) and the shape of an AWS access key id.
CREDENTIAL_OPTION = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)
AWS_ACCESS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")

# The commands docs/remote.md gives; the tests run them with their own bucket and endpoint.
PUSH = ["dvc", "push", "--run-cache"]
PULL = ["dvc", "pull"]
REPRO_PULL = ["dvc", "repro", "--pull"]
EXP_RUN = ["dvc", "exp", "run", "--pull", "-n", EXPERIMENT, "-S", "data.seed=1"]
EXP_PUSH = ["dvc", "exp", "push", "origin", EXPERIMENT]
EXP_PULL = ["dvc", "exp", "pull", "origin", EXPERIMENT]
EXP_SHOW = ["dvc", "exp", "show"]
EXP_METRICS_DIFF = ["dvc", "metrics", "diff", "main", EXPERIMENT]
EXP_APPLY = ["dvc", "exp", "apply", EXPERIMENT]


def moto_server_command(port: int) -> list[str]:
    return ["python", "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def create_bucket_command(endpoint: str, bucket: str) -> list[str]:
    code = (
        f'import boto3; boto3.client("s3", endpoint_url="{endpoint}", region_name="{REGION}")'
        f'.create_bucket(Bucket="{bucket}")'
    )
    return ["python", "-c", code]


def remote_commands(bucket: str, endpoint: str) -> list[list[str]]:
    """Point the remote at a bucket on an S3 server, in `.dvc/config.local`: url AND endpoint."""
    modify = ["dvc", "remote", "modify", "--local", REMOTE]
    return [[*modify, "url", f"s3://{bucket}/vlmprobe"], [*modify, "endpointurl", endpoint]]


def credential_commands(access_key_id: str, secret_access_key: str) -> list[list[str]]:
    modify = ["dvc", "remote", "modify", "--local", REMOTE]
    return [
        [*modify, "access_key_id", access_key_id],
        [*modify, "secret_access_key", secret_access_key],
    ]


def documented_commands() -> list[list[str]]:
    endpoint, bucket = "http://127.0.0.1:5000", "vlmprobe-demo"
    return [
        moto_server_command(5000),
        create_bucket_command(endpoint, bucket),
        *remote_commands(bucket, endpoint),
        *credential_commands("YOUR-ACCESS-KEY-ID", "YOUR-SECRET-ACCESS-KEY"),
        PUSH,
        PULL,
        REPRO_PULL,
        EXP_RUN,
        EXP_PUSH,
        EXP_PULL,
        EXP_SHOW,
        EXP_METRICS_DIFF,
        EXP_APPLY,
    ]


# --- the local S3 server -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key_id: str
    secret_access_key: str

    def keys(self, bucket: str) -> list[str]:
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def wait_until_answers(endpoint: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"moto server exited {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"moto server did not answer on {endpoint} in 60 s:\n{log.read_text()}")


def enforce_team_credentials(endpoint: str) -> tuple[str, str]:
    """Create an IAM user allowed all of S3 and return its key; from then on the server rejects
    requests that are not signed with a key it issued."""
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    iam.create_user(UserName="team")
    key = iam.create_access_key(UserName="team")["AccessKey"]
    allow_s3 = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="team", PolicyName="s3", PolicyDocument=json.dumps(allow_s3))
    enforce = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=b"0",
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    with urllib.request.urlopen(enforce, timeout=10):
        return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="module")
def aws_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pytest.MonkeyPatch]:
    """Nothing AWS from this machine (credentials, profiles, endpoints, instance metadata) and no
    proxy for 127.0.0.1: commands see only the settings the tests give them."""
    empty = tmp_path_factory.mktemp("aws")
    for name in ("config", "credentials"):
        (empty / name).touch()
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("AWS_")]:
            patch.delenv(name)
        patch.setenv("AWS_CONFIG_FILE", str(empty / "config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("NO_PROXY", "127.0.0.1")
        patch.setenv("no_proxy", "127.0.0.1")
        yield patch


@pytest.fixture(scope="module")
def s3_server(
    aws_env: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[S3Server]:
    """`python -m moto.server` on a free port of 127.0.0.1, stopped by its process id."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            moto_server_command(port), stdout=output, stderr=subprocess.STDOUT, env=tool_env()
        )
    try:
        wait_until_answers(endpoint, server, log)
        yield S3Server(endpoint, *enforce_team_credentials(endpoint))
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def create_bucket(repo: Path, s3: S3Server, bucket: str) -> None:
    run(create_bucket_command(s3.endpoint, bucket), repo)


def connect(repo: Path, bucket: str, endpoint: str) -> None:
    for command in remote_commands(bucket, endpoint):
        run(command, repo)


# --- the team: an origin project, its git remote and the bucket --------------------------------


@dataclass(frozen=True)
class Team:
    origin: Path
    git_remote: Path
    push: subprocess.CompletedProcess

    def clone(self, dest: Path) -> Path:
        run(["git", "clone", "-q", str(self.git_remote), str(dest)], dest.parent)
        return dest


@pytest.fixture(scope="module")
def team(
    tmp_path_factory: pytest.TempPathFactory, aws_env: pytest.MonkeyPatch, s3_server: S3Server
) -> Team:
    """The pipeline run once and pushed: git to a bare repository, outputs and run-cache to S3.

    `dvc repro` runs with the committed placeholder remote and no AWS settings at all: a user
    without S3 is not held up by the default remote.
    """
    base = tmp_path_factory.mktemp("team")
    # These tests don't read the probe stage's numbers: the quick params, fewer bootstrap
    # resamples.
    origin = make_project(base / "origin",
                          {**QUICK_PARAMS, "vlm": "pixels", "probe.bootstrap": 100})
    run(["dvc", "repro"], origin)
    run(["git", "add", "-A"], origin)
    run(["git", "commit", "-qm", "pipeline ran"], origin)
    git_remote = base / "vlmprobe.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(git_remote)], base)
    run(["git", "remote", "add", "origin", str(git_remote)], origin)
    run(["git", "push", "-q", "origin", "main"], origin)

    aws_env.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key_id)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_access_key)
    create_bucket(origin, s3_server, TEAM_BUCKET)
    connect(origin, TEAM_BUCKET, s3_server.endpoint)
    return Team(origin, git_remote, run(PUSH, origin))


@pytest.fixture
def holder(team: Team, tmp_path: Path) -> Path:
    """A teammate's clone that holds every output (the origin's cache, hard-linked) and has no
    remote set up yet."""
    clone = team.clone(tmp_path / "holder")
    shutil.copytree(team.origin / ".dvc" / "cache", clone / ".dvc" / "cache", copy_function=os.link)
    run(["dvc", "checkout"], clone)
    return clone


def pipeline_outputs(repo: Path) -> list[str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]


def contents(path: Path) -> dict[str, str]:
    """The sha256 of each file under `path` (or of `path` itself), by name relative to `path`."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def assert_same_outputs(repo: Path, reference: Path) -> None:
    for out in pipeline_outputs(reference):
        assert contents(repo / out) == contents(reference / out), out


def pushed_count(push: subprocess.CompletedProcess) -> int:
    found = re.search(r"(\d+) files? pushed", push.stdout)
    assert found, push.stdout
    return int(found.group(1))


# --- configuration -----------------------------------------------------------------------------


def test_committed_config_names_a_placeholder_default_remote_and_no_credentials():
    settings = dict(
        line.split("=", 1)
        for line in run(["dvc", "config", "--project", "--list"], ROOT).stdout.splitlines()
    )
    assert settings["core.remote"] == REMOTE
    assert settings[f"remote.{REMOTE}.url"] == PLACEHOLDER_URL
    credentials = [name for name in settings if CREDENTIAL_OPTION.search(name.split(".")[-1])]
    assert not credentials, f".dvc/config is committed: move {credentials} to config.local or env"
    assert not AWS_ACCESS_KEY_ID.search((ROOT / ".dvc" / "config").read_text())
    ignored = run(["git", "check-ignore", "-q", ".dvc/config.local"], ROOT, check=False)
    assert ignored.returncode == 0, "git must ignore .dvc/config.local"


def test_docs_give_the_commands_these_tests_run():
    docs = (ROOT / "docs" / "remote.md").read_text()
    missing = [shlex.join(c) for c in documented_commands() if shlex.join(c) not in docs]
    assert not missing, f"docs/remote.md lacks: {missing}"


def test_placeholder_remote_stays_out_of_work_without_s3(holder: Path, monkeypatch):
    """With the committed default remote (a bucket that does not exist) and no credentials, a
    stage, an experiment and a metrics diff run: had they touched S3, they would fail."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert not (holder / ".dvc" / "config.local").exists()

    repro = run(["dvc", "repro", "--force", "--single-item", "report"], holder)
    assert "Running stage 'report'" in repro.stdout
    experiment = run(["dvc", "exp", "run", "-n", "offline"], holder)
    assert "Ran experiment(s): offline" in experiment.stdout
    metrics = run(["dvc", "metrics", "diff", "main", "--all"], holder)
    assert "metrics/probe.json" in metrics.stdout


def remotes_without_url(repo: Path) -> set[str]:
    """docs/remote.md's check: remotes `dvc config --local --list` gives settings but no url."""
    listed = run(["dvc", "config", "--local", "--list"], repo).stdout.splitlines()
    names = [line.split("=", 1)[0].split(".") for line in listed if line.startswith("remote.")]
    return {name[1] for name in names} - {name[1] for name in names if name[2] == "url"}


def test_partial_remote_in_config_local_hides_metrics_of_revisions_without_the_remote(
    team: Team, s3_server: S3Server, tmp_path: Path
):
    """docs/remote.md's pitfall: a config.local that gives the remote only an endpoint makes the
    remote incomplete in revisions whose .dvc/config lacks it, and their metrics vanish."""
    clone = team.clone(tmp_path / "clone")
    run(["git", "checkout", "-q", "-b", "before-remote"], clone)
    run(["dvc", "remote", "remove", "--project", REMOTE], clone)
    run(["git", "commit", "-qam", "as before the S3 remote was configured"], clone)
    run(["git", "checkout", "-q", "main"], clone)
    diff = ["dvc", "metrics", "diff", "before-remote", "--all", "--json"]

    run(["dvc", "remote", "modify", "--local", REMOTE, "endpointurl", s3_server.endpoint], clone)
    assert remotes_without_url(clone) == {REMOTE}
    partial = run(diff, clone)
    assert "failed to load metrics in revision 'before-remote'" in partial.stderr
    assert "expected 'url'" in partial.stderr
    old = [m["old"] for m in json.loads(partial.stdout)["metrics/probe.json"].values()]
    assert old and all(value is None for value in old)

    connect(clone, TEAM_BUCKET, s3_server.endpoint)
    assert remotes_without_url(clone) == set()
    complete = run(diff, clone)
    assert "failed to load" not in complete.stderr
    metrics = json.loads(complete.stdout)["metrics/probe.json"].values()
    assert all(m["old"] == m["new"] for m in metrics)


# --- sharing outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("get", [PULL, REPRO_PULL], ids=shlex.join)
def test_fresh_clone_gets_every_output_without_running_a_stage(
    get: list[str], team: Team, s3_server: S3Server, tmp_path: Path
):
    clone = team.clone(tmp_path / "clone")
    assert not (clone / ".dvc" / "cache").exists()
    connect(clone, TEAM_BUCKET, s3_server.endpoint)

    result = run(get, clone)
    assert "Running stage" not in result.stdout
    assert_same_outputs(clone, team.origin)
    assert UP_TO_DATE in run(["dvc", "status"], clone).stdout
    again = run(REPRO_PULL, clone).stdout
    assert "Running stage" not in again
    for stage in yaml.safe_load((clone / "dvc.lock").read_text())["stages"]:
        assert f"Stage '{stage}' didn't change, skipping" in again


def test_pushed_run_cache_restores_stages_the_lock_file_does_not_record(
    team: Team, s3_server: S3Server, tmp_path: Path
):
    """A branch whose dvc.lock lacks a run someone pushed (here: no dvc.lock at all) still gets
    the expensive outputs from the run-cache instead of re-running their stages."""
    runs = team.origin / ".dvc" / "cache" / "runs"
    entries = {f"vlmprobe/runs/{p.relative_to(runs)}" for p in runs.rglob("*") if p.is_file()}
    assert entries and entries <= set(s3_server.keys(TEAM_BUCKET))

    clone = team.clone(tmp_path / "clone")
    connect(clone, TEAM_BUCKET, s3_server.endpoint)
    (clone / "dvc.lock").unlink()
    result = run([*REPRO_PULL, "extract"], clone)
    assert "Running stage" not in result.stdout
    for stage in ("assets", "data", "extract"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in result.stdout
    for out in ("data/assets", "data/images", "data/features"):
        assert contents(clone / out) == contents(team.origin / out), out


def test_experiment_pushed_to_git_and_bucket_is_pulled_into_another_clone(
    team: Team, s3_server: S3Server, tmp_path: Path
):
    author = team.clone(tmp_path / "author")
    connect(author, TEAM_BUCKET, s3_server.endpoint)
    ran = run(EXP_RUN, author).stdout
    assert "Running stage 'assets'" not in ran  # pulled from the bucket
    assert "Running stage 'extract'" in ran
    assert f"Pushed experiment {EXPERIMENT}" in run(EXP_PUSH, author).stdout
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], team.git_remote)
    assert any(ref.endswith(f"/{EXPERIMENT}") for ref in refs.stdout.split())

    reader = team.clone(tmp_path / "reader")
    connect(reader, TEAM_BUCKET, s3_server.endpoint)
    assert "Pulled experiment" in run(EXP_PULL, reader).stdout
    assert EXPERIMENT in run(EXP_SHOW, reader).stdout
    assert "metrics/probe.json" in run(EXP_METRICS_DIFF, reader).stdout
    run(EXP_APPLY, reader)  # checks out from the local cache only: exp pull fetched the outputs
    assert UP_TO_DATE in run(["dvc", "status"], reader).stdout
    assert_same_outputs(reader, author)
    assert contents(reader / "data/features") != contents(team.origin / "data/features")


# --- failures ----------------------------------------------------------------------------------


def file_stamps(repo: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of each file of the workspace and DVC cache (not .git and
    DVC's scratch folder .dvc/tmp)."""
    skip = (repo / ".git", repo / ".dvc" / "tmp")
    return {
        str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in repo.rglob("*")
        if p.is_file() and not any(p.is_relative_to(s) for s in skip)
    }


def failed_push(repo: Path) -> str:
    """Push, expecting failure; check nothing local changed; return DVC's error output.

    One attempt per request (`AWS_MAX_ATTEMPTS=1`): the default retries each file with back-off,
    which adds tens of seconds and no different message.
    """
    before = file_stamps(repo)
    result = run(PUSH, repo, check=False, env={**os.environ, "AWS_MAX_ATTEMPTS": "1"})
    assert result.returncode != 0, result.stdout
    assert file_stamps(repo) == before
    assert UP_TO_DATE in run(["dvc", "status"], repo).stdout
    return result.stderr


def test_push_to_a_server_that_is_down_says_it_cannot_connect(holder: Path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    connect(holder, TEAM_BUCKET, endpoint)
    message = failed_push(holder)
    assert f'Could not connect to the endpoint URL: "{endpoint}/{TEAM_BUCKET}/' in message


def test_push_with_wrong_credentials_is_forbidden_and_writes_nothing(
    holder: Path, s3_server: S3Server
):
    create_bucket(holder, s3_server, "vlmprobe-wrong-credentials")
    connect(holder, "vlmprobe-wrong-credentials", s3_server.endpoint)
    for command in credential_commands("AKIAUNKNOWNUNKNOWN00", "not-the-secret"):
        run(command, holder)
    message = failed_push(holder)
    assert "Forbidden" in message and "(403)" in message
    assert s3_server.keys("vlmprobe-wrong-credentials") == []


def test_push_to_a_missing_bucket_says_the_bucket_does_not_exist(holder: Path, s3_server: S3Server):
    connect(holder, "vlmprobe-missing", s3_server.endpoint)
    assert "The specified bucket does not exist" in failed_push(holder)


class FailingLink:
    """A relay on 127.0.0.1 to the S3 server that passes `uploads` object uploads (PUT), then goes
    down for good, dropping open connections and refusing new ones: what a push sees when the
    server or the network dies part way."""

    def __init__(self, upstream: str, uploads: int) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.uploads_left = uploads
        self.down = False
        self.lock = threading.Lock()
        self.server = RelayServer(("127.0.0.1", 0), RelayHandler)
        self.server.link = self
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever)

    def __enter__(self) -> FailingLink:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.go_down()
        self.thread.join()

    def admit(self, method: str) -> bool:
        """Whether to relay a request; the first upload past the allowance takes the link down."""
        with self.lock:
            if not self.down:
                if method != "PUT":
                    return True
                if self.uploads_left > 0:
                    self.uploads_left -= 1
                    return True
        self.go_down()
        return False

    def go_down(self) -> None:
        with self.lock:
            if self.down:
                return
            self.down = True
        self.server.shutdown()
        self.server.server_close()


class RelayServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    link: FailingLink


class RelayHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RelayServer

    def relay(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length) if length else None
        if not self.server.link.admit(self.command):
            self.close_connection = True  # no answer: the client sees the connection drop
            return
        upstream = http.client.HTTPConnection(*self.server.link.upstream, timeout=60)
        try:
            # Headers as signed by the client, Host included, so the server accepts the signature.
            upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
            answer = upstream.getresponse()
            payload = answer.read()
        finally:
            upstream.close()
        self.send_response_only(answer.status, answer.reason)
        for name, value in answer.getheaders():
            if name.lower() not in ("connection", "content-length", "transfer-encoding"):
                self.send_header(name, value)
        length = answer.getheader("Content-Length", "0") if self.command == "HEAD" else len(payload)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = relay

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test asserts on what DVC reports."""


def test_interrupted_push_is_completed_by_the_next_push(
    team: Team, holder: Path, s3_server: S3Server
):
    bucket = "vlmprobe-interrupted"
    create_bucket(holder, s3_server, bucket)
    with FailingLink(s3_server.endpoint, uploads=10) as link:
        connect(holder, bucket, link.endpoint)
        assert link.endpoint in failed_push(holder)
    stored = s3_server.keys(bucket)
    total = pushed_count(team.push)
    assert 0 < len(stored) < total

    connect(holder, bucket, s3_server.endpoint)
    # The data files already stored are not sent again; the run-cache entries (a few small
    # files) are re-sent by every `push --run-cache`.
    stored_data = [key for key in stored if key.startswith("vlmprobe/files/")]
    assert pushed_count(run(PUSH, holder)) == total - len(stored_data)
    status = run(["dvc", "status", "--cloud"], holder)
    assert f"Cache and remote '{REMOTE}' are in sync." in status.stdout
    assert len(s3_server.keys(bucket)) == total
