"""Fast `struct` codecs derived from the construct definitions in `blkif_spec.wire`.

Nothing here restates a layout: `derive()` walks a construct `Struct` (named
fields, fixed-size integers, `Bytes` padding, fixed-count `Array`s) and produces
the equivalent `struct.Struct` format string plus the flattened field names. A
property test (`tests/test_codec.py`) keeps construct and the codec
byte-identical for every structure and ABI.

The hot-path representation is the **flat tuple** that `struct.unpack_from`
returns (field order = `Codec.fields`, segments flattened as `seg[0].gref`, …),
so parsing costs what raw `struct` costs. `to_container()` rebuilds construct's
nested dict when readability matters more than speed. Padding is kept as `Ns`
byte fields, never `x`, so it stays visible (SEC-5).

Codecs do not validate: like compiled construct, they are not validators of
hostile input; validation is the reader's job (SEC-1 copies, then checks).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from construct import Array, Bytes, Construct, Default, FormatField, Renamed, Struct

from blkif_spec import wire

# A layout tree: ("int", name, fmtchar) | ("bytes", name, n) | ("struct", name, [nodes])
#                | ("array", name, count, node)
Node = tuple


def _tree(con: Construct, name: str) -> Node:
    while isinstance(con, (Renamed, Default)):
        if isinstance(con, Renamed):
            name = con.name or name
        con = con.subcon
    if isinstance(con, FormatField):
        order, char = con.fmtstr[0], con.fmtstr[1:]
        if order != "<" or len(char) != 1:
            raise TypeError(f"{name}: only little-endian scalar fields are supported, got {con.fmtstr!r}")
        return ("int", name, char)
    if isinstance(con, Bytes):
        if not isinstance(con.length, int):
            raise TypeError(f"{name}: Bytes length must be a constant")
        return ("bytes", name, con.length)
    if isinstance(con, Array):
        if not isinstance(con.count, int):
            raise TypeError(f"{name}: Array count must be a constant")
        return ("array", name, con.count, _tree(con.subcon, ""))
    if isinstance(con, Struct):
        return ("struct", name, [_tree(sub, sub.name) for sub in con.subcons])
    raise TypeError(f"{name}: construct {type(con).__name__} has no fixed struct equivalent")


def _flatten(node: Node, prefix: str) -> Iterator[tuple[str, str]]:
    """(flat field name, struct format item) for every leaf, in layout order."""
    kind, name = node[0], node[1]
    path = f"{prefix}.{name}" if prefix and name else (name or prefix)
    if kind == "int":
        yield path, node[2]
    elif kind == "bytes":
        yield path, f"{node[2]}s"
    elif kind == "array":
        for i in range(node[2]):
            yield from _flatten(node[3], f"{path}[{i}]")
    else:
        for child in node[2]:
            yield from _flatten(child, path)


def _to_container(node: Node, it: Iterator[Any]) -> Any:
    kind = node[0]
    if kind in ("int", "bytes"):
        return next(it)
    if kind == "array":
        return [_to_container(node[3], it) for _ in range(node[2])]
    return {child[1]: _to_container(child, it) for child in node[2]}


def _from_container(node: Node, obj: Any, out: list[Any]) -> None:
    kind = node[0]
    if kind == "int":
        out.append(obj)
    elif kind == "bytes":
        out.append(bytes(obj) if obj is not None else bytes(node[2]))
    elif kind == "array":
        for item in obj:
            _from_container(node[3], item, out)
    else:
        for child in node[2]:
            value = obj.get(child[1]) if child[0] == "bytes" else obj[child[1]]
            _from_container(child, value, out)


@dataclass(frozen=True, eq=False)
class Codec:
    """A struct codec for one construct structure. Methods are bound `struct.Struct` ones."""

    name: str
    fmt: str
    fields: tuple[str, ...]
    tree: Node
    unpack_from: Callable[..., tuple]
    pack_into: Callable[..., None]
    pack: Callable[..., bytes]
    size: int

    def index(self, field: str) -> int:
        """Position of a flat field in the tuple (e.g. `codec.index("id")`)."""
        try:
            return self.fields.index(field)
        except ValueError:
            raise KeyError(f"{self.name} has no field {field!r}") from None

    def offset(self, field: str) -> int:
        """Byte offset of a flat field, computed from the derived format."""
        i = self.index(field)
        items = _format_items(self.fmt)
        return struct.calcsize("<" + "".join(items[:i]))

    def to_container(self, values: Sequence[Any]) -> dict:
        """The flat tuple as construct's nested dict (same keys, same nesting)."""
        return _to_container(self.tree, iter(values))

    def from_container(self, obj: Any) -> tuple:
        """A construct-style nested dict as the flat tuple (padding defaults to zeros)."""
        out: list[Any] = []
        _from_container(self.tree, obj, out)
        return tuple(out)

    def field_parts(self, *names: str) -> list[tuple[int, struct.Struct]]:
        """(byte offset, struct) of each named field, for writers that place fields one by one."""
        items = _format_items(self.fmt)
        return [(self.offset(name), struct.Struct("<" + items[self.index(name)])) for name in names]

    def field_packer(self, *names: str) -> Callable[..., None]:
        """A writer of only these fields, leaving every other byte of the buffer untouched.

        Used to write responses field by field, as SEC-5 (XSA-216) asks: padding is
        never written, so nothing private can leak through it.
        """
        parts = [(off, st.pack_into) for off, st in self.field_parts(*names)]

        def pack_fields(buf: Any, offset: int, *values: Any) -> None:
            for (off, pack_into), value in zip(parts, values, strict=True):
                pack_into(buf, offset + off, value)

        return pack_fields


def _format_items(fmt: str) -> list[str]:
    items, i, body = [], 0, fmt[1:]
    while i < len(body):
        j = i
        while body[j].isdigit():
            j += 1
        items.append(body[i : j + 1])
        i = j + 1
    return items


def derive(con: Construct, name: str = "") -> Codec:
    """Derive the struct codec of a construct structure."""
    tree = _tree(con, name)
    root = ("struct", "", tree[2]) if tree[0] == "struct" else tree
    flat = list(_flatten(root, ""))
    fmt = "<" + "".join(item for _, item in flat)
    compiled = struct.Struct(fmt)
    if compiled.size != con.sizeof():
        raise AssertionError(f"{name}: derived size {compiled.size} != construct size {con.sizeof()}")
    return Codec(
        name=name,
        fmt=fmt,
        fields=tuple(field for field, _ in flat),
        tree=tree,
        unpack_from=compiled.unpack_from,
        pack_into=compiled.pack_into,
        pack=compiled.pack,
        size=compiled.size,
    )


@dataclass(frozen=True)
class AbiCodecs:
    """The derived codecs of one ABI, named like `wire.Abi`'s structures."""

    abi: wire.Abi
    segment: Codec
    request_rw: Codec
    request_discard: Codec
    request_indirect: Codec
    request_other: Codec
    response: Codec
    indirect_page: Codec
    sring_header: Codec

    def structures(self) -> dict[str, Codec]:
        return {name: getattr(self, name) for name in self.abi.structures()}

    def request(self, form: str) -> Codec:
        return getattr(self, f"request_{form}")


@cache
def codecs(abi_name: str) -> AbiCodecs:
    """Codecs for ABI `abi_name`, derived once and cached."""
    a = wire.abi(abi_name)
    derived = {name: derive(con, name) for name, con in a.structures().items()}
    return AbiCodecs(abi=a, **derived)
