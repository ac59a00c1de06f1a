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


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def left(self) -> int:
        return len(self.data) - self.at

    def u8(self) -> int:
        if self.at >= len(self.data):
            raise UpdateRejected("update cut short")
        value = self.data[self.at]
        self.at += 1
        return value

    def varuint(self) -> int:
        value = shift = 0
        while True:
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise UpdateRejected("varint longer than 64 bits")

    def varint(self) -> None:
        byte = self.u8()
        shift = 6
        while byte & 0x80:
            byte = self.u8()
            shift += 7
            if shift > 70:
                raise UpdateRejected("varint longer than 64 bits")

    def count(self, what: str) -> int:
        """A declared number of elements, each at least one byte: no more than the bytes left."""
        n = self.varuint()
        if n > self.left():
            raise UpdateRejected(f"declares {n} {what} in {self.left()} remaining bytes")
        return n

    def skip(self, n: int) -> None:
        if n > self.left():
            raise UpdateRejected("update cut short")
        self.at += n

    def string(self) -> None:
        self.skip(self.count("string bytes"))


def _any(r: _Reader, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise UpdateRejected(f"values nested deeper than {MAX_DEPTH}")
    tag = r.u8()
    if tag in (127, 126, 121, 120):  # undefined, null, false, true
        return
    if tag == 125:
        r.varint()
    elif tag == 124:
        r.skip(4)
    elif tag in (123, 122):
        r.skip(8)
    elif tag == 119:
        r.string()
    elif tag == 118:
        for _ in range(r.count("object entries")):
            r.string()
            _any(r, depth + 1)
    elif tag == 117:
        for _ in range(r.count("array items")):
            _any(r, depth + 1)
    elif tag == 116:
        r.skip(r.count("binary bytes"))
    else:
        raise UpdateRejected(f"unknown value tag {tag}")


def _content(r: _Reader, kind: int) -> None:
    if kind == DELETED:
        r.varuint()
    elif kind == JSON:
        for _ in range(r.count("JSON items")):
            r.string()
    elif kind == BINARY:
        r.skip(r.count("binary bytes"))
    elif kind in (STRING, EMBED):
        r.string()
    elif kind == FORMAT:
        r.string()
        r.string()
    elif kind == TYPE:
        if r.varuint() in _TYPE_WITH_NAME:
            r.string()
    elif kind == ANY:
        for _ in range(r.count("values")):
            _any(r, 1)
    elif kind == DOC:
        r.string()
        _any(r, 1)
    elif kind == MOVE:
        flags = r.varuint()
        r.varuint()
        r.varuint()  # start id
        if not flags & 1:  # not collapsed: an end id too
            r.varuint()
            r.varuint()
    else:
        raise UpdateRejected(f"unknown content kind {kind}")


def _struct(r: _Reader) -> None:
    info = r.u8()
    kind = info & 0x1F
    if kind in (GC, SKIP):
        r.varuint()
        return
    has_left, has_right, has_sub = info & 0x80, info & 0x40, info & 0x20
    if has_left:
        r.varuint()
        r.varuint()
    if has_right:
        r.varuint()
        r.varuint()
    if not has_left and not has_right:
        if r.varuint() == 1:
            r.string()  # a root type's name
        else:
            r.varuint()
            r.varuint()  # the id of the parent item
        if has_sub:
            r.string()
    _content(r, kind)


def check_update(update: bytes) -> tuple[int, int]:
    """Walk the update; returns (structs, deleted ranges) it carries."""
    r = _Reader(update)
    structs = ranges = 0
    for _ in range(r.count("clients")):
        n_structs = r.count("structs")
        r.varuint()  # client
        r.varuint()  # clock
        for _ in range(n_structs):
            _struct(r)
        structs += n_structs
    for _ in range(r.count("delete-set clients")):
        r.varuint()
        n_ranges = r.count("deleted ranges")
        for _ in range(n_ranges):
            r.varuint()
            r.varuint()
        ranges += n_ranges
    if r.left():
        raise UpdateRejected(f"{r.left()} bytes after the end of the update")
    return structs, ranges


def check_state_vector(state_vector: bytes) -> None:
    """A state vector: varuint n, n x (varuint client, varuint clock)."""
    r = _Reader(state_vector)
    for _ in range(r.count("clients")):
        r.varuint()
        r.varuint()
    if r.left():
        raise UpdateRejected(f"{r.left()} bytes after the end of the state vector")
