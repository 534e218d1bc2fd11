"""Per-version LRU caches in front of the version's tokenizer.

Prompts repeat (apps send templated questions) and best_of reranking re-tokenizes the texts just
decoded; each Hugging Face tokenizer call costs about 100 µs of event-loop time, which at a few
thousand requests per second is most of a core. Results are the Preprocessor's own, memoized.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence

from services.inference.runtime.base import LoadedVersion


class VersionTokenization:
    def __init__(self, loaded: LoadedVersion, maxsize: int) -> None:
        pre = loaded.preprocessor
        memoized = pre.memoized(maxsize)
        self.prompt_ids: Callable[[str], list[int]] = memoized.prompt_ids
        self.response_ids: Callable[[str], list[int]] = memoized.response_ids
        self._decode = functools.lru_cache(maxsize)(lambda ids: pre.decode(list(ids)))

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode(tuple(ids))


class TokenizationCache:
    def __init__(self, maxsize: int = 4096) -> None:
        self.maxsize = maxsize
        self._versions: weakref.WeakKeyDictionary[LoadedVersion, VersionTokenization] = weakref.WeakKeyDictionary()

    def __call__(self, loaded: LoadedVersion) -> VersionTokenization:
        cached = self._versions.get(loaded)
        if cached is None:
            cached = self._versions[loaded] = VersionTokenization(loaded, self.maxsize)
        return cached
