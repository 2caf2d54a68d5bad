"""Which keys the Cache deployment can hold, as one router knows it: the lookups it may skip.

With no Redis tier, the Cache deployment's memory holds only what routers wrote into it. A
router that is the only writer therefore knows every key the Cache can hold: the keys that
were there when it synced (``TieredCache.key_digests``) plus the ones it wrote since. A
near-cache miss for any other key (every first-time input) is a certain miss in the Cache
too, and its lookup hop (a Serve handle call, milliseconds at one connection) can be skipped.

Contracts:
- ``KeyIndex.may_hold(key)`` is True unless the index is *ready* and the key is neither
  seeded nor written within the Cache's memory TTL. A wrong True costs a lookup; a wrong
  False costs one LM call that a Cache hit would have saved, never a wrong answer.
- The index is ready only after ``seed`` with the Cache's keys at a moment when this router
  was its only writer; ``disable`` (another writer, a Redis tier) makes every key a
  "maybe" again until the next ``seed``.
- ``WriterRegistry`` lives in the Cache deployment: routers announce themselves on every
  sync, and a router that stops announcing is forgotten after ``ttl_s``.

Digests are 64-bit BLAKE2b of the key: stable across processes (``hash()`` is not).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TypedDict

__all__ = ["IndexSync", "KeyIndex", "WriterRegistry", "key_digest"]


class IndexSync(TypedDict):
    """The Cache deployment's answer to a router's sync: live writers, and its keys if asked."""

    writers: int
    digests: list[int] | None


def key_digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class KeyIndex:
    """Digests of the keys the Cache may hold, oldest first, each kept for ``ttl_s`` (the
    Cache memory tier's TTL) and at most ``max_entries`` of them (oldest dropped first)."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._max = max(1, max_entries)
        self._ttl = ttl_s
        self._clock = clock
        self._expiry: OrderedDict[int, float] = OrderedDict()
        self.ready = False

    def __len__(self) -> int:
        return len(self._expiry)

    def _put(self, digest: int, expires: float) -> None:
        self._expiry[digest] = expires
        self._expiry.move_to_end(digest)

    def _trim(self) -> None:
        now = self._clock()
        while self._expiry:
            digest, expires = next(iter(self._expiry.items()))
            if expires > now and len(self._expiry) <= self._max:
                break
            del self._expiry[digest]

    def add(self, key: str) -> None:
        """A key this router is writing to the Cache (recorded before the write leaves)."""
        self._put(key_digest(key), self._clock() + self._ttl)
        self._trim()

    def seed(self, digests: Iterable[int]) -> None:
        """Merge the Cache's keys (taken while this router was its only writer) and turn the
        index on. Keys written meanwhile stay: they were added as they left."""
        expires = self._clock() + self._ttl
        for digest in digests:
            if digest not in self._expiry:
                self._put(digest, expires)
        self._trim()
        self.ready = True

    def disable(self) -> None:
        self.ready = False

    def may_hold(self, key: str) -> bool:
        if not self.ready:
            return True
        expires = self._expiry.get(key_digest(key))
        return expires is not None and expires > self._clock()


class WriterRegistry:
    """The routers that synced with this Cache replica within the last ``ttl_s``."""

    def __init__(self, ttl_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_s
        self._clock = clock
        self._seen: dict[str, float] = {}

    def touch(self, writer: str) -> int:
        """Record ``writer`` now; how many writers are live (it included)."""
        now = self._clock()
        self._seen[writer] = now
        for other in [w for w, at in self._seen.items() if now - at > self._ttl]:
            del self._seen[other]
        return len(self._seen)
