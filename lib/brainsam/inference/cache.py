"""A memory-bounded LRU cache of slice embeddings, so corrective clicks skip the image encoder."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable

import torch

EmbeddingKey = tuple[str, str, str, int, tuple[int, int, int, int]]
"""(backbone identity, image content hash, axis, slice index, window) of one slice embedding."""


class EmbeddingCache:
    """Least-recently-used store of embeddings, evicting once their bytes exceed `max_bytes`.

    Thread-safe: the server may serve several annotators from worker threads.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> torch.Tensor | None:
        """The embedding stored under `key` (marking it recently used), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        """Store an embedding, evicting the least recently used ones beyond the memory bound."""
        value = value.detach()
        size = value.element_size() * value.nelement()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.element_size() * old.nelement()
            self._entries[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.element_size() * evicted.nelement()

    def clear(self) -> None:
        """Drop every entry, e.g. after the encoder's adapter changed."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
