"""Errors a user can cause and fix. `fuseloop` prints them as one line, `error: ...`, with no
traceback; any other exception is a fault and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Something the user asked for can't be done; the message says what and what to do."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config file or an override is malformed: unknown key, wrong type, bad TOML."""


class ServiceError(UserError):
    """A service answered with an error status, or could not be reached."""

    exit_code = 1


def rpc_error_line(error, target: str) -> str:
    """One line for a grpc.RpcError: the server's message, the status and the target."""
    import grpc

    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach {target}: {details} (is the service running, and is the address right?)"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{target} did not answer in time: {details}"
    hint = {grpc.StatusCode.UNAUTHENTICATED: " (give --admin-token or set $FUSELOOP_ADMIN_TOKEN)",
            grpc.StatusCode.PERMISSION_DENIED: " (check --admin-token / $FUSELOOP_ADMIN_TOKEN)"}.get(code, "")
    name = code.name if code is not None else "error"
    return f"{target} answered {name}: {details}{hint}"
