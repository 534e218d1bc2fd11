"""A service's own Prometheus registry (no global state), served over HTTP on demand."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest, start_http_server


class MetricsRegistry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._http = None

    def serve_http(self, host: str, port: int) -> int:
        """Serves /metrics on its own thread; returns the bound port (port 0: any free one)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
