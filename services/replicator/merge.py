"""The merge rule and the digests, as pure functions and one in-memory table (no I/O).

A record is one key's state: a value, or a tombstone. Records are ordered by their rank
`(version, origin, deleted, content hash)`, a total order that every site computes alike, and a
key keeps the greatest record it has seen. Taking the maximum is commutative, associative and
idempotent, so any interleaving, duplication or reordering of the same set of writes and
deletes leaves every site with the same record for every key.

- `version` first: the writer's own counter (an agent's `epoch × 10⁶ + sequence`, the CLI's
  `current + 1`).
- `origin` breaks a tie of versions (two sites wrote `v6` of the same key at once): the greater
  origin string wins, at every site.
- `deleted`: a tombstone wins over a value of the same version and origin.
- The content hash (of value and `updated_at`) breaks what is left, so even two different
  values written under the same version by the same origin converge.

A tombstone carries the version of the delete (the deleted record's version + 1); it expires
`ttl` seconds after its `updated_at`, the same instant at every site.

Digests: a key belongs to a group (its first level, `parameters`, or a site's family,
`sites/<site>/agents`) and to one of `BUCKETS` buckets (a hash of the key). A bucket's digest
is the sum mod 2⁶⁴ of its records' item hashes (key + content), kept up to date on every change,
so comparing two sites' digests costs nothing until they differ, and then only the differing
buckets' versions are exchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

BUCKETS = 64  # per group; part of the protocol (a digest says how many it used)
MASK = (1 << 64) - 1
SMALL_GROUP = 16  # a group of at most this many keys is sent as one hash, without buckets

Rank = tuple[int, str, bool, int]


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class Record:
    """One key's state: a value with what a merge needs, or a tombstone (`deleted`)."""

    version: int
    origin: str
    updated_at: float
    value: Any = None
    deleted: bool = False
    content: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        body = [self.deleted, self.updated_at, None if self.deleted else self.value]
        object.__setattr__(self, "content", _hash64(orjson.dumps(body, option=_CANONICAL)))

    @property
    def rank(self) -> Rank:
        return (self.version, self.origin, self.deleted, self.content)

    def tombstone(self, *, origin: str, at: float) -> Record:
        """The delete of this record: one version later."""
        return Record(self.version + 1, origin, at, None, True)

    def expired(self, now: float, ttl: float) -> bool:
        return self.deleted and self.updated_at + ttl <= now


_CANONICAL = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def newer(a: Record | None, b: Record | None) -> bool:
    """True when `a` supersedes `b` (nothing supersedes a record by being absent)."""
    if a is None:
        return False
    return b is None or a.rank > b.rank


def merge(a: Record | None, b: Record | None) -> Record | None:
    """The record a key keeps after seeing both: the greater rank."""
    return a if newer(a, b) or b is None else b


def group_of(key: str) -> str:
    """`parameters/m/t` → `parameters`; `sites/b/agents/w1` → `sites/b/agents`."""
    levels = key.split("/", 3)
    if levels[0] == "sites" and len(levels) >= 3:
        return "/".join(levels[:3])
    return levels[0]


def bucket_of(key: str) -> int:
    return _hash64(key.encode()) % BUCKETS


def item_hash(key: str, record: Record) -> int:
    """What a record adds to its bucket's digest: a hash of the key and the whole rank."""
    version, origin, deleted, content = record.rank
    return _hash64(f"{key}\0{version}\0{origin}\0{int(deleted)}\0{content}".encode())


@dataclass(frozen=True, slots=True)
class GroupState:
    """A group's digest: key count, and the sum of its item hashes per bucket."""

    count: int
    buckets: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.buckets) & MASK


class Replica:
    """Every key's greatest record, with digests kept up to date."""

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        self._sums: dict[str, list[int]] = {}
        self._counts: dict[str, int] = {}
        self._items: dict[str, int] = {}  # key → its item hash (what to subtract on change)
        self._keys: dict[str, set[str]] = {}  # group → its keys

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: str) -> Record | None:
        return self.records.get(key)

    def merge(self, key: str, record: Record) -> bool:
        """Keep `record` if it supersedes what `key` holds; True when it did."""
        if not newer(record, self.records.get(key)):
            return False
        self.put(key, record)
        return True

    def put(self, key: str, record: Record) -> None:
        """Set a key's record whatever it held (the owner of a key may go back in versions)."""
        self.remove(key)
        group, item = group_of(key), item_hash(key, record)
        sums = self._sums.setdefault(group, [0] * BUCKETS)
        bucket = bucket_of(key)
        sums[bucket] = (sums[bucket] + item) & MASK
        self._counts[group] = self._counts.get(group, 0) + 1
        self._keys.setdefault(group, set()).add(key)
        self.records[key], self._items[key] = record, item

    def remove(self, key: str) -> Record | None:
        record = self.records.pop(key, None)
        if record is None:
            return None
        group, item = group_of(key), self._items.pop(key)
        sums, bucket = self._sums[group], bucket_of(key)
        sums[bucket] = (sums[bucket] - item) & MASK
        self._counts[group] -= 1
        self._keys[group].discard(key)
        if not self._counts[group]:
            del self._counts[group], self._sums[group], self._keys[group]
        return record

    def expire(self, now: float, ttl: float) -> list[str]:
        """Drop the tombstones older than `ttl`; their keys."""
        gone = [k for k, r in self.records.items() if r.expired(now, ttl)]
        for key in gone:
            self.remove(key)
        return gone

    def groups(self) -> Iterable[str]:
        return self._counts.keys()

    def group_state(self, group: str) -> GroupState | None:
        if group not in self._counts:
            return None
        return GroupState(self._counts[group], tuple(self._sums[group]))

    def digest(self, include: Callable[[str], bool]) -> dict[str, GroupState]:
        """The digest of the groups `include` selects."""
        return {
            g: GroupState(self._counts[g], tuple(self._sums[g])) for g in self._counts if include(g)
        }

    def by_bucket(self, group: str) -> dict[int, list[tuple[str, Record]]]:
        """The records of `group` per bucket, each list sorted by key."""
        out: dict[int, list[tuple[str, Record]]] = {}
        for key in sorted(self._keys.get(group, ())):
            out.setdefault(bucket_of(key), []).append((key, self.records[key]))
        return out

    def in_buckets(self, group: str, buckets: Iterable[int]) -> Iterator[tuple[str, Record]]:
        """The records of `group` that fall in `buckets`, sorted by key."""
        wanted = set(buckets)
        for key in sorted(self._keys.get(group, ())):
            if bucket_of(key) in wanted:
                yield key, self.records[key]


def differing(
    mine: dict[str, GroupState],
    theirs: dict[str, tuple[int, int, tuple[int, ...] | None]],
    groups: Iterable[str],
) -> list[tuple[str, int]]:
    """The (group, bucket) pairs where two digests differ, sorted, among `groups`.

    `theirs` maps a group to (count, total, bucket sums or None when the group was small and
    sent only as its total); a group one side lacks differs in every bucket the other side uses.
    """
    out: list[tuple[str, int]] = []
    for group in sorted(set(groups)):
        own, other = mine.get(group), theirs.get(group)
        if own is None and other is None:
            continue
        if other is None:
            assert own is not None
            out += [(group, i) for i in range(BUCKETS) if own.buckets[i]]
            continue
        count, total, buckets = other
        if own is not None and own.count == count and own.total == total:
            continue
        if buckets is None:
            out += [(group, i) for i in range(BUCKETS)]
        elif own is None:
            out += [(group, i) for i in range(BUCKETS) if buckets[i]]
        else:
            out += [(group, i) for i in range(BUCKETS) if own.buckets[i] != buckets[i]]
    return out


def fold(writes: Iterable[tuple[str, Record]]) -> dict[str, Record]:
    """The state that any order of delivering `writes` converges to (for tests and checks)."""
    state: dict[str, Record] = {}
    for key, record in writes:
        kept = merge(record, state.get(key))
        assert kept is not None
        state[key] = kept
    return state
