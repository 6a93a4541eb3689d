"""A GPU worker's cache of sessions' contexts: the KV of a session's last turn, kept so the next
turn prefills only what is new.

Owns: a bounded LRU by session id of the engine's saved contexts (``bagel`` ``SavedContext``:
anything with ``nbytes``), holding at most ``max_bytes`` (the ``session_cache_bytes`` setting;
0 keeps nothing), with hit and miss counts. A miss is never an error: the engine prefills the
turn's whole context from the transcript (``worker.sessions``), and a saved context that no
longer is a prefix of the turn's parts is ignored by the engine. Torch-free; not thread-safe,
like the engine it feeds. Leaves using it to ``worker.gpu`` and telling the dispatcher which
sessions a worker holds to ``worker.registry``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol


class Saved(Protocol):
    nbytes: int


class SessionContexts:
    """Saved contexts by session id, least recently used first out."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self.hits = self.misses = self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(saved.nbytes for saved in self._entries.values())

    def keys(self) -> list[str]:
        """Session ids held, least recently used first."""
        return list(self._entries)

    def get(self, session_id: str) -> Any | None:
        """The session's saved context (now the most recent), or None."""
        saved = self._entries.get(session_id)
        if saved is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(session_id)
        return saved

    def put(self, session_id: str, saved: Saved) -> None:
        """Keep ``saved`` for the session (replacing its older one), then drop the least recently
        used until the total fits; one larger than the whole limit is not kept."""
        self._entries.pop(session_id, None)
        if saved.nbytes > self.max_bytes:
            return
        self._entries[session_id] = saved
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)
            self.evictions += 1

    def drop(self, session_id: str) -> None:
        self._entries.pop(session_id, None)
