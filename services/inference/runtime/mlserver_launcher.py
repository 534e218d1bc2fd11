"""Start Seldon MLServer as a KServe v2 (Triton gRPC protocol) server over a Triton-layout
model repository: the CPU stand-in for NVIDIA Triton in tests and on machines without Docker.

MLServer runs from its own venv (`make mlserver`) in its own process: mlserver and
tritonclient.grpc register the same `inference.*` protobuf symbols, so this module never
imports mlserver. The server side lives in deploy/mlserver/ (an ONNX Runtime model class and
a model repository that reads `<repo>/<model>/<version>/model.onnx` + config.pbtxt).

    with MLServerProcess("runs/model_repository", load_models_at_startup=False) as server:
        client = tritonclient.grpc.InferenceServerClient(server.url)
        client.load_model("fuseloop")          # explicit model control, as Triton's
        client.infer("fuseloop", inputs, model_version="2")
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional, Tuple, Union

PROJECT_ROOT = Path(__file__).resolve().parents[3]
RUNTIME_DIR = PROJECT_ROOT / "deploy" / "mlserver"
DEFAULT_VENV = ".venv-mlserver"

PathLike = Union[str, Path]


def _project_path(path: PathLike) -> Path:
    # Relative paths name things in the checkout (the side venv), wherever the caller runs.
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path


def mlserver_executable(venv_dir: PathLike = DEFAULT_VENV) -> Optional[Path]:
    """The `mlserver` command of the side venv, or None when `make mlserver` has not run."""
    exe = _project_path(venv_dir) / "bin" / "mlserver"
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MLServerProcess:
    """One `mlserver start` subprocess (own process group) serving `repo_dir` over gRPC.

    `load_models_at_startup=False` is Triton's `--model-control-mode=explicit` without
    `--load-model`: nothing is served until RepositoryModelLoad. True loads every model
    (the versions its config.pbtxt version_policy selects) before the server reports ready.
    """

    def __init__(
        self,
        repo_dir: PathLike,
        venv_dir: PathLike = DEFAULT_VENV,
        host: str = "127.0.0.1",
        *,
        load_models_at_startup: bool = True,
        max_message_bytes: int = 64 * 1024 * 1024,
        startup_timeout_s: float = 60.0,
        runtime_dir: PathLike = RUNTIME_DIR,
        adaptive_batching: Optional[Tuple[int, float]] = None,
    ) -> None:
        self.repo_dir = Path(repo_dir).resolve()
        self.venv_dir = _project_path(venv_dir)
        self.host = host
        self.load_models_at_startup = load_models_at_startup
        self.max_message_bytes = max_message_bytes
        self.startup_timeout_s = startup_timeout_s
        self.runtime_dir = Path(runtime_dir).resolve()
        # (max_batch_size, max_batch_time_s) of MLServer's adaptive batching; None: off.
        self.adaptive_batching = adaptive_batching
        self.grpc_port: Optional[int] = None
        self.http_port: Optional[int] = None
        self.workdir: Optional[Path] = None
        self._process: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def url(self) -> str:
        """host:port of the gRPC endpoint, as tritonclient.grpc wants it."""
        if self.grpc_port is None:
            raise RuntimeError("MLServerProcess is not started")
        return f"{self.host}:{self.grpc_port}"

    @property
    def log_path(self) -> Optional[Path]:
        return self.workdir / "mlserver.log" if self.workdir else None

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def _write_settings(self) -> None:
        batching = {}
        if self.adaptive_batching:
            size, seconds = self.adaptive_batching
            batching["adaptive_batching"] = {"max_batch_size": size, "max_batch_time": seconds}
        settings = {
            "debug": False,
            "host": self.host,
            "grpc_port": self.grpc_port,
            # MLServer always starts its REST server too; give it a free port of its own.
            "http_port": self.http_port,
            "grpc_max_message_length": self.max_message_bytes,
            # Inference in the server process: parallel workers crash with uvloop 0.23 and
            # were slower for small models (shared/NOTES.md).
            "parallel_workers": 0,
            "metrics_endpoint": None,
            "load_models_at_startup": self.load_models_at_startup,
            "model_repository_implementation": "triton_repository.TritonModelRepository",
            "model_repository_implementation_args": {"triton_root": str(self.repo_dir), **batching},
            "environments_dir": str(self.workdir / "envs"),
            "metrics_dir": str(self.workdir / "metrics"),
        }
        (self.workdir / "settings.json").write_text(json.dumps(settings, indent=2))

    def start(self) -> "MLServerProcess":
        exe = mlserver_executable(self.venv_dir)
        if exe is None:
            raise FileNotFoundError(
                f"no MLServer in {self.venv_dir}: run `make mlserver` to create the side venv"
            )
        if not self.repo_dir.is_dir():
            raise FileNotFoundError(f"model repository {self.repo_dir} does not exist")
        if self._process is not None:
            raise RuntimeError("MLServerProcess already started")

        self.workdir = Path(tempfile.mkdtemp(prefix="mlserver-"))
        self.grpc_port = _free_port(self.host)
        self.http_port = _free_port(self.host)
        self._write_settings()

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.runtime_dir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        # MLSERVER_* variables override nothing in settings.json, but a stray
        # MLSERVER_MODEL_IMPLEMENTATION would turn an empty repository into a model.
        for key in [k for k in env if k.startswith("MLSERVER_MODEL_")]:
            del env[key]
        self._log = open(self.log_path, "wb")
        self._process = subprocess.Popen(
            [str(exe), "start", str(self.workdir)],
            cwd=self.workdir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() takes its children too
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep_workdir=True)
            raise
        return self

    def _wait_ready(self) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + self.startup_timeout_s
        client = grpcclient.InferenceServerClient(self.url)
        try:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"mlserver exited with code {self._process.returncode} during startup; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    if client.is_server_ready(client_timeout=1.0):
                        return
                except InferenceServerException:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"mlserver not ready after {self.startup_timeout_s:.0f} s; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.1)
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0, keep_workdir: bool = False) -> None:
        """SIGTERM the process group, SIGKILL after `timeout_s`; removes the settings folder
        unless `keep_workdir` (kept automatically when startup failed, for its log)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.workdir is not None and not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "MLServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
