"""Shared pytest fixtures. One clearly marked section per external dependency."""

# ---------------------------------------------------------------------------------------------
# MLServer: the KServe v2 reference server in its own venv (`make mlserver` -> .venv-mlserver).
# Used by tests marked `mlserver`. Missing venv: skip locally, FAIL when CI=true.
# ---------------------------------------------------------------------------------------------
import os
from pathlib import Path

import pytest

from services.inference.runtime.mlserver_launcher import DEFAULT_VENV, mlserver_executable


@pytest.fixture(scope="session")
def mlserver_venv() -> Path:
    """The MLServer side venv; start servers with MLServerProcess(repo, venv_dir=mlserver_venv)."""
    exe = mlserver_executable(DEFAULT_VENV)
    if exe is None:
        reason = f"MLServer side venv {DEFAULT_VENV} is missing: run `make mlserver`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: the KServe v2 reference tests must run)")
        pytest.skip(reason)
    return exe.parent.parent
# ------------------------------------- end of MLServer section --------------------------------
