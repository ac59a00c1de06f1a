"""A structural check of a Yjs v1 update before pycrdt sees it.

pycrdt (yrs) reserves memory for the counts an update declares before it reads the items: a
4-byte update declaring 2**28 structs makes it allocate half a gigabyte and spend a second.
This walk reads the update the way yrs does, without building anything, and refuses it when a
declared count exceeds the bytes left to hold it (each counted element takes at least one
byte), when it is cut short, nests too deep, or uses an encoding yrs does not know.

Layout (lib0 encoding, as Yjs/yrs write it):
    update     = varuint n_clients, n_clients x client_block, delete_set
    client     = varuint n_structs, varuint client, varuint clock, n_structs x struct
    struct     = u8 info, then GC / Skip: varuint len; Item: [left id] [right id]
                 [parent (if no ids): varuint 1 + string | varuint 0 + id] [parent_sub string]
                 content by info & 0x1f
    delete_set = varuint n_clients, n_clients x (varuint client, varuint n, n x (clock, len))

Invariants:
- Pure, bounded: time linear in the update's length, memory constant but for recursion,
  which `MAX_DEPTH` bounds.
- `check_update` raises `UpdateRejected` with a reason, or returns what the update carries;
  every update pycrdt itself writes passes (tested against updates it makes).
"""

from __future__ import annotations

MAX_DEPTH = 64  # nested Any values (objects in arrays in objects...); records are 2 deep

# Item content kinds (info & 0x1f) as yrs numbers them.
GC, DELETED, JSON, BINARY, STRING, EMBED, FORMAT, TYPE, ANY, DOC, SKIP, MOVE = range(12)
# Shared type refs that carry a name after the ref (XmlElement, XmlHook).
_TYPE_WITH_NAME = (3, 5)


class UpdateRejected(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# The walk below reads `data` at an index and returns the index after what it read: plain
# functions over local variables, because this runs over every byte a peer sends (a 4 MB
# catch-up is 60,000 records) and attribute look-ups and method calls were most of its cost.

_CUT = "update cut short"


def _varuint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    end = len(data)
    while True:
        if at >= end:
            raise UpdateRejected(_CUT)
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise UpdateRejected("varint longer than 64 bits")


def _pair(data: bytes, at: int) -> int:
    """Two varuints: an id (client, clock), a deleted range (clock, length) and the like."""
    return _varuint(data, _varuint(data, at)[1])[1]


def _count(data: bytes, at: int, what: str) -> tuple[int, int]:
    """A declared number of elements, each at least one byte: no more than the bytes left."""
    if at < len(data) and data[at] < 0x80:  # one byte: most counts
        n, at = data[at], at + 1
    else:
        n, at = _varuint(data, at)
    if n > len(data) - at:
        raise UpdateRejected(f"declares {n} {what} in {len(data) - at} remaining bytes")
    return n, at


def _skip(data: bytes, at: int, n: int) -> int:
    if n > len(data) - at:
        raise UpdateRejected(_CUT)
    return at + n


def _string(data: bytes, at: int) -> int:
    n, at = _count(data, at, "string bytes")
    return at + n  # _count checked that the bytes are there


def _varint(data: bytes, at: int) -> int:
    if at >= len(data):
        raise UpdateRejected(_CUT)
    byte = data[at]
    at += 1
    shift = 6
    while byte & 0x80:
        if at >= len(data):
            raise UpdateRejected(_CUT)
        byte = data[at]
        at += 1
        shift += 7
        if shift > 70:
            raise UpdateRejected("varint longer than 64 bits")
    return at


def _any(data: bytes, at: int, depth: int) -> int:
    if depth > MAX_DEPTH:
        raise UpdateRejected(f"values nested deeper than {MAX_DEPTH}")
    if at >= len(data):
        raise UpdateRejected(_CUT)
    tag = data[at]
    at += 1
    if tag == 119:  # string: the most common value
        return _string(data, at)
    if tag in (127, 126, 121, 120):  # undefined, null, false, true
        return at
    if tag == 125:
        return _varint(data, at)
    if tag == 124:
        return _skip(data, at, 4)
    if tag in (123, 122):
        return _skip(data, at, 8)
    if tag == 118:
        n, at = _count(data, at, "object entries")
        for _ in range(n):
            at = _any(data, _string(data, at), depth + 1)
        return at
    if tag == 117:
        n, at = _count(data, at, "array items")
        for _ in range(n):
            at = _any(data, at, depth + 1)
        return at
    if tag == 116:
        n, at = _count(data, at, "binary bytes")
        return at + n
    raise UpdateRejected(f"unknown value tag {tag}")


def _content(data: bytes, at: int, kind: int) -> int:
    if kind == ANY:
        n, at = _count(data, at, "values")
        for _ in range(n):
            at = _any(data, at, 1)
        return at
    if kind == DELETED:
        return _varuint(data, at)[1]
    if kind == JSON:
        n, at = _count(data, at, "JSON items")
        for _ in range(n):
            at = _string(data, at)
        return at
    if kind == BINARY:
        n, at = _count(data, at, "binary bytes")
        return at + n
    if kind in (STRING, EMBED):
        return _string(data, at)
    if kind == FORMAT:
        return _string(data, _string(data, at))
    if kind == TYPE:
        ref, at = _varuint(data, at)
        return _string(data, at) if ref in _TYPE_WITH_NAME else at
    if kind == DOC:
        return _any(data, _string(data, at), 1)
    if kind == MOVE:
        flags, at = _varuint(data, at)
        at = _pair(data, at)  # start id
        if not flags & 1:  # not collapsed: an end id too
            at = _pair(data, at)
        return at
    raise UpdateRejected(f"unknown content kind {kind}")


def _struct(data: bytes, at: int) -> int:
    if at >= len(data):
        raise UpdateRejected(_CUT)
    info = data[at]
    at += 1
    kind = info & 0x1F
    if kind in (GC, SKIP):
        return _varuint(data, at)[1]
    has_left, has_right = info & 0x80, info & 0x40
    if has_left:
        at = _pair(data, at)
    if has_right:
        at = _pair(data, at)
    if not has_left and not has_right:
        named, at = _varuint(data, at)
        if named == 1:
            at = _string(data, at)  # a root type's name
        else:
            at = _pair(data, at)  # the id of the parent item
        if info & 0x20:
            at = _string(data, at)
    return _content(data, at, kind)


def check_update(update: bytes) -> tuple[int, int]:
    """Walk the update; returns (structs, deleted ranges) it carries."""
    structs, ranges, _ = check_update_reach(update)
    return structs, ranges


def check_update_reach(update: bytes) -> tuple[int, int, dict[int, int]]:
    """As check_update, and for each client whose items it carries a clock its items surely
    reach: the first one's clock plus their number (each item is one clock or more). A
    replica whose clock for that client is below it gains items from the update."""
    data = bytes(update)
    structs = ranges = 0
    reach: dict[int, int] = {}
    n_clients, at = _count(data, 0, "clients")
    for _ in range(n_clients):
        n_structs, at = _count(data, at, "structs")
        client, at = _varuint(data, at)
        clock, at = _varuint(data, at)
        for _ in range(n_structs):
            at = _struct(data, at)
        structs += n_structs
        if n_structs:
            reach[client] = max(reach.get(client, 0), clock + n_structs)
    n_clients, at = _count(data, at, "delete-set clients")
    for _ in range(n_clients):
        at = _varuint(data, at)[1]
        n_ranges, at = _count(data, at, "deleted ranges")
        for _ in range(n_ranges):
            at = _pair(data, at)
        ranges += n_ranges
    if at < len(data):
        raise UpdateRejected(f"{len(data) - at} bytes after the end of the update")
    return structs, ranges, reach


def check_state_vector(state_vector: bytes) -> None:
    """A state vector: varuint n, n x (varuint client, varuint clock)."""
    decode_state_vector(state_vector)


def decode_state_vector(state_vector: bytes) -> dict[int, int]:
    """client -> clock (how many of that client's items the replica holds); UpdateRejected
    with the reason for anything else."""
    data = bytes(state_vector)
    n_clients, at = _count(data, 0, "clients")
    clocks = {}
    for _ in range(n_clients):
        client, at = _varuint(data, at)
        clocks[client], at = _varuint(data, at)
    if at < len(data):
        raise UpdateRejected(f"{len(data) - at} bytes after the end of the state vector")
    return clocks
