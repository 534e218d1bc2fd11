"""User ids leave the service only as keyed hashes (HMAC-SHA256 with a secret key).

The same user in the same app always gets the same pseudonym, so the trainer can group a user's
feedback, but without the key nobody can check a guessed id against it. Pseudonyms differ between
apps, so two apps' data cannot be joined on them.
"""

from __future__ import annotations

import hashlib
import hmac

MIN_KEY_BYTES = 16


class Pseudonymizer:
    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the pseudonym key must be at least {MIN_KEY_BYTES} bytes of secret, got {len(key)}")
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)  # copied per use: cheaper than re-keying

    def user(self, app_id: str, user_id: str) -> str:
        """"" stays "" (anonymous); anything else becomes "u_" + 32 hex digits."""
        if not user_id:
            return ""
        mac = self._keyed.copy()
        mac.update(app_id.encode("utf-8") + b"\x1f" + user_id.encode("utf-8"))
        return "u_" + mac.hexdigest()[:32]
