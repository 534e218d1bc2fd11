"""A process's peak resident memory, as the kernel counts it (VmHWM in /proc/PID/status): how much
the server and its engine process each needed at their worst, which is what a memory limit has
to fit."""

from __future__ import annotations

import os


def peak_rss_bytes(pid: int | None = None) -> int | None:
    """The peak resident set size of process `pid` (default: this one) in bytes; None when the
    process is gone or the system has no /proc (not Linux)."""
    try:
        with open(f"/proc/{os.getpid() if pid is None else pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError):
        pass
    return None
