"""Per-app bearer tokens: `authorization: Bearer <token>` metadata names the calling app.

Only SHA-256 digests of the tokens are kept in memory, and lookups go by digest, so the
comparison does not leak a token's prefix through timing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path


class Unauthenticated(Exception):
    """No token, a malformed header, or a token no app owns."""


class AppTokens:
    def __init__(self, tokens: dict[str, str]) -> None:
        """`tokens` maps token -> app id."""
        for token, app_id in tokens.items():
            if not token or not app_id:
                raise ValueError("app tokens and app ids must be non-empty")
        self._apps = {_digest(token): app_id for token, app_id in tokens.items()}

    def __len__(self) -> int:
        return len(self._apps)

    def app_for(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The app id the call's `authorization` metadata belongs to; Unauthenticated otherwise."""
        header = next((value for key, value in metadata or () if key.lower() == "authorization"), None)
        if header is None:
            raise Unauthenticated("missing `authorization: Bearer <app token>` metadata")
        if isinstance(header, bytes):
            header = header.decode("utf-8", "replace")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization metadata must be `Bearer <app token>`")
        app_id = self._apps.get(_digest(token.strip()))
        if app_id is None:
            raise Unauthenticated("unknown app token")
        return app_id

    @classmethod
    def parse(cls, pairs: Iterable[str]) -> dict[str, str]:
        """["TOKEN=APP", ...] -> {token: app}."""
        out: dict[str, str] = {}
        for pair in pairs:
            token, sep, app_id = pair.strip().partition("=")
            if not sep or not token or not app_id:
                raise ValueError(f"an app token is given as TOKEN=APP_ID, got {pair!r}")
            out[token] = app_id
        return out

    @classmethod
    def read_file(cls, path: str | Path) -> dict[str, str]:
        """A JSON object {token: app} or lines `TOKEN=APP` (blank lines and # comments skipped)."""
        text = Path(path).read_text()
        if text.lstrip().startswith("{"):
            data = json.loads(text)
            return {str(k): str(v) for k, v in data.items()}
        return cls.parse(line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()
