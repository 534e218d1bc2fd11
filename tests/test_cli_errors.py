"""Ops commands answer bad input with one line, `error: ...`, and a non-zero exit code; no
traceback. Run as subprocesses against a live inference server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from fuseloop.repository import ModelRepository
from services.inference.config import InferenceServiceConfig
from services.inference.runtime.onnx_runtime import OnnxRuntime
from services.inference.server import InferenceServer, ServerThread

TOKEN = "cli-admin-token"


@pytest.fixture(scope="module")
def server(shared_repo_dir, tmp_path_factory):
    state = tmp_path_factory.mktemp("cli-errors") / "serving.json"
    thread = ServerThread(InferenceServer(InferenceServiceConfig(port=0, admin_token=TOKEN), OnnxRuntime(),
                                          ModelRepository(shared_repo_dir), state_path=state)).start()
    yield thread.address
    thread.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fuseloop(*args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FUSELOOP_ADMIN_TOKEN"}
    if token is not None:
        env["FUSELOOP_ADMIN_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "fuseloop.cli", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_deploying_a_missing_version_says_what_the_server_said(server):
    line = one_line_error(fuseloop("models", "deploy", "9", "--server", server, token=TOKEN))
    assert "version 9" in line and server in line and "NOT_FOUND" in line


def test_a_missing_or_wrong_admin_token_says_how_to_give_one(server):
    missing = one_line_error(fuseloop("models", "list", "--server", server))
    assert "UNAUTHENTICATED" in missing and "--admin-token" in missing
    wrong = one_line_error(fuseloop("models", "rollback", "--server", server, "--admin-token", "nope"))
    assert "PERMISSION_DENIED" in wrong


def test_an_unreachable_server_is_named(server):
    target = f"127.0.0.1:{free_port()}"
    line = one_line_error(fuseloop("models", "list", "--server", target, token=TOKEN))
    assert f"cannot reach {target}" in line


def test_a_deploy_without_a_version_number_or_server(server, tmp_path, shared_repo_dir):
    assert "version number" in one_line_error(fuseloop("models", "deploy", "--server", server, token=TOKEN))
    assert "needs --repo REPO_DIR" in one_line_error(fuseloop("models", "rollback", token=TOKEN))
    repo = str(tmp_path / "repo")
    shutil.copytree(shared_repo_dir, repo)
    assert "not in the repository" in one_line_error(fuseloop("models", "deploy", "9", "--repo", repo))
    assert "between 0 and 100" in one_line_error(fuseloop("models", "deploy", "1", "--canary", "250", "--repo", repo))
    assert "deploy one first" in one_line_error(fuseloop("models", "deploy", "1", "--canary", "10", "--repo", repo))
    assert fuseloop("models", "deploy", "2", "--repo", repo).returncode == 0
    assert "already serves everyone" in one_line_error(fuseloop("models", "deploy", "2", "--canary", "10",
                                                                "--repo", repo))
    assert "no previous version" in one_line_error(fuseloop("models", "rollback", "--repo", repo))


def test_train_with_bad_inputs(tmp_path, shared_repo_dir):
    bad = tmp_path / "bad.toml"
    bad.write_text("[gate]\nkl_budget = [1]\n")
    bus = f"sqlite:///{tmp_path / 'bus.db'}"
    line = one_line_error(fuseloop("train", "--repo", str(shared_repo_dir), "--bus", bus, "--config", str(bad)))
    assert "gate.kl_budget must be float" in line
    assert "does not exist" in one_line_error(fuseloop("train", "--repo", str(tmp_path / "none"), "--bus", bus))
    assert "unknown bus URL" in one_line_error(fuseloop("train", "--repo", str(shared_repo_dir), "--bus", "nats://x"))
    assert "--every" in one_line_error(fuseloop("train", "--repo", str(shared_repo_dir), "--bus", bus,
                                                "--every", "soon"))


def test_serve_with_bad_flags(tmp_path, shared_repo_dir):
    assert "does not exist" in one_line_error(fuseloop("serve", "inference", "--repo", str(tmp_path / "none")))
    line = one_line_error(fuseloop("serve", "inference", "--repo", str(shared_repo_dir), "--tls-cert", "c.pem"))
    assert "--tls-key" in line
    assert "no app tokens" in one_line_error(fuseloop("serve", "feedback", "--bus", f"sqlite:///{tmp_path}/b.db"))


def test_train_against_an_unreachable_broker_names_it(tmp_path, shared_repo_dir):
    bus = f"kafka://127.0.0.1:{free_port()}?api_version=0.9&connect_timeout_s=2"
    line = one_line_error(fuseloop("train", "--repo", str(shared_repo_dir), "--bus", bus, "--rounds", "1",
                                   "--workdir", str(tmp_path / "work")))
    assert "cannot reach Kafka at 127.0.0.1:" in line



def test_the_demo_refuses_a_bias_or_canary_share_out_of_range_before_pretraining(tmp_path, capsys):
    from fuseloop.cli import main

    assert main(["demo", "--user-bias", "1.5", "--out", str(tmp_path / "a")]) != 0
    assert capsys.readouterr().err.strip() == "error: --user-bias is a probability between 0 and 1, got 1.5"
    assert main(["demo", "--canary", "100", "--out", str(tmp_path / "b")]) != 0
    assert capsys.readouterr().err.strip() == "error: --canary is a share of traffic between 0 and 100 percent, got 100"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
