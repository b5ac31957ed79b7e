"""A new version of a chunk as copies from the previous version plus the bytes in between.

A node state re-saved after a change repeats most of its previous version: an agent's message history grows by a
turn, a counter ticks, a status flips. Compressing the whole new version against the old one (a zstd dictionary)
stores little, but indexes the whole dictionary on every save: a run's checkpointing CPU grew with the square of its
length. Here the two versions are aligned with C-speed primitives only (``bytes.startswith`` and ``bytes.find``:
memcmp and a two-way search), so a save costs one pass over the bytes plus what changed.

``ops`` is a flat list: two ints ``offset, length`` copy that range of the old version, a ``bytes`` is inserted as is.
:func:`diff` checks its answer by applying it, so a delta that does not rebuild the new version exactly is never
returned.
"""

from __future__ import annotations

MIN_COPY = 24  # a copy op costs about 6 bytes: shorter matches stay in the literal
PROBE = 32  # bytes of the new version searched for in the old one to find where they line up again
_SKIPS = (8, 32, 128, 512, 2048, 8192, 32768)  # probe this far past a mismatch (a change is usually short)
MAX_OPS = 96
_GALLOP = 256
_AHEAD = 1024  # past 4x the probe's skip: how far a deletion may have moved the rest (farther: a literal)
_BEHIND = 4096  # how far back content may have moved (a copy from before the last one)


def _match(new: bytes, i: int, old: memoryview, j: int) -> int:
    """Length of the common prefix of ``new[i:]`` and ``old[j:]`` (galloping, then halving; ``old`` is a memoryview,
    so its slices are not copies and ``startswith`` is a memcmp)."""
    limit = min(len(new) - i, len(old) - j)
    if new.startswith(old[j : j + limit], i):
        return limit
    good, step = 0, _GALLOP
    while good + step < limit and new.startswith(old[j + good : j + good + step], i + good):
        good += step
        step *= 2
    bad = min(good + step, limit)  # new[i:i+bad] differs from old[j:j+bad] somewhere past good
    while bad - good > 1:
        mid = (good + bad) // 2
        if new.startswith(old[j + good : j + mid], i + good):
            good = mid
        else:
            bad = mid
    return good


def _back(new: bytes, lo: int, p: int, old: memoryview, q: int) -> int:
    """How far the match at ``new[p]`` / ``old[q]`` extends backwards (not before ``new[lo]``)."""
    good, bad = 0, min(p - lo, q) + 1
    while bad - good > 1:
        mid = (good + bad) // 2
        if new.startswith(old[q - mid : q], p - mid):
            good = mid
        else:
            bad = mid
    return good


def _resync(new: bytes, i: int, old: bytes, j: int) -> tuple[int, int] | None:
    """Where, past ``new[i]``, the new version lines up with the old one again: (position in new, in old)."""
    for skip in _SKIPS:
        p = i + skip
        if p + PROBE > len(new):
            return None
        probe = new[p : p + PROBE]
        q = old.find(probe, j, j + 4 * skip + _AHEAD)  # bounded: a failed search must not scan all of old
        if q < 0:
            q = old.find(probe, max(0, j - _BEHIND), j + PROBE)
        if q >= 0:
            back = _back(new, i, p, memoryview(old), q)
            return p - back, q - back
    return None


def diff(old: bytes, new: bytes) -> list | None:
    """The ops that turn ``old`` into ``new``, or None when a delta would not pay (too many changes, or the changes
    outweigh half of ``new``)."""
    ops: list = []
    i = j = literal = 0
    n, view = len(new), memoryview(old)
    while i < n:
        k = _match(new, i, view, j) if j < len(old) else 0
        if k >= MIN_COPY or (k and i + k == n):
            ops += (j, k)
            i, j = i + k, j + k
            continue
        found = _resync(new, i, old, j)
        end, at = found if found is not None else (n, j)
        if end > i:
            ops.append(new[i:end])
            literal += end - i
        if literal * 2 > n or len(ops) > MAX_OPS:
            return None
        i, j = end, at
    return ops if rebuilds(old, ops, new) else None  # cannot fail: checked because a wrong delta would lose data


def rebuilds(old: bytes, ops: list, new: bytes) -> bool:
    """Whether ``ops`` over ``old`` give exactly ``new`` (compared in place: no copy of either is made)."""
    view, at = memoryview(old), 0
    index = 0
    while index < len(ops):
        op = ops[index]
        if type(op) is bytes:
            piece, index = op, index + 1
        else:
            piece, index = view[op : op + ops[index + 1]], index + 2
        if not new.startswith(piece, at):
            return False
        at += len(piece)
    return at == len(new)


def apply(old: bytes, ops: list) -> bytes:
    """The new version ``ops`` describe; ValueError for ops that are malformed or reach outside ``old``."""
    parts: list = []
    index, size, view = 0, len(old), memoryview(old)
    while index < len(ops):
        op = ops[index]
        if type(op) is bytes:
            parts.append(op)
            index += 1
            continue
        if index + 1 >= len(ops) or type(op) is not int or type(ops[index + 1]) is not int:
            raise ValueError(f"delta op {index} is malformed")
        start, length = op, ops[index + 1]
        if start < 0 or length <= 0 or start + length > size:
            raise ValueError(f"delta copy {start}+{length} reaches outside its {size}-byte source")
        parts.append(view[start : start + length])  # joined below: one copy of the new version, not two
        index += 2
    return b"".join(parts)
