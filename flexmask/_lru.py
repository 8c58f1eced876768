"""The one bounded cache every cached result of flexmask lives in, and ``clear_cache``."""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar

__all__ = ["LRU", "cache_info", "clear_cache"]


class LRU(OrderedDict[tuple[object, ...], object]):
    """A bounded mapping that forgets the least recently used entry.

    Keys must be sound (``MaskMod.cache_key``): a hit is what a fresh computation would give.
    Every instance is named, so that ``clear_cache`` empties all and ``cache_info`` reports all.
    """

    instances: ClassVar[dict[str, LRU]] = {}

    def __init__(self, name: str, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize
        LRU.instances[name] = self

    def get_recent(self, key: tuple[object, ...] | None) -> object | None:
        """The entry of ``key`` (None for no key, or no entry), now the most recent."""
        if key is None or key not in self:
            return None
        self.move_to_end(key)
        return self[key]

    def put(self, key: tuple[object, ...] | None, value: object) -> None:
        """Keep ``value`` under ``key`` (nothing for no key), forgetting the oldest past maxsize."""
        if key is None:
            return
        self[key] = value
        while len(self) > self.maxsize:
            self.popitem(last=False)


def clear_cache() -> None:
    """Forget every cached BlockMask, dense mask and what was derived from them."""
    for cache in LRU.instances.values():
        cache.clear()


def cache_info() -> dict[str, int]:
    """Entries now and bounds of each cache: ``{name}_size`` and ``{name}_maxsize``.

    ``size``/``maxsize`` are the BlockMask cache's, ``dense_size``/``dense_maxsize`` the dense
    masks'.
    """
    info = {}
    for name, cache in LRU.instances.items():
        prefix = "" if name == "block_masks" else f"{name}_"
        info[f"{prefix}size"], info[f"{prefix}maxsize"] = len(cache), cache.maxsize
    return info
