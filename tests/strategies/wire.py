"""Strategies for wire structures, derived from the same layout trees as the codecs.

Deriving them from `blkif_spec.codec` trees means a new structure or field is
covered by the parity properties without touching a test.
"""

from __future__ import annotations

from random import Random

from hypothesis import strategies as st

from blkif_spec import codec, consts

ABI_NAMES = st.sampled_from(consts.ABIS)

_INT_RANGES = {
    "B": (0, 2**8 - 1),
    "H": (0, 2**16 - 1),
    "L": (0, 2**32 - 1),
    "I": (0, 2**32 - 1),
    "Q": (0, 2**64 - 1),
    "b": (-(2**7), 2**7 - 1),
    "h": (-(2**15), 2**15 - 1),
    "l": (-(2**31), 2**31 - 1),
    "q": (-(2**63), 2**63 - 1),
}


def _node(node: codec.Node) -> st.SearchStrategy:
    kind = node[0]
    if kind == "int":
        lo, hi = _INT_RANGES[node[2]]
        return st.integers(lo, hi)
    if kind == "bytes":
        return st.binary(min_size=node[2], max_size=node[2])
    if kind == "array":
        return st.lists(_node(node[3]), min_size=node[2], max_size=node[2])
    return st.fixed_dictionaries({child[1]: _node(child) for child in node[2]})


#: Above this size (the 4 KiB indirect page) examples are expanded from a small seed,
#: which keeps hypothesis' base example small while every byte still varies.
_LARGE = 512


def containers(c: codec.Codec) -> st.SearchStrategy[dict]:
    """Any value of the structure as construct's nested dict, padding included."""
    if c.size > _LARGE:
        return raw(c).map(lambda b: c.to_container(c.unpack_from(b)))
    return _node(c.tree)


def raw(c: codec.Codec) -> st.SearchStrategy[bytes]:
    """Any byte string of the structure's size: every bit pattern is a parseable structure."""
    if c.size > _LARGE:
        head = st.binary(min_size=_LARGE, max_size=_LARGE)
        return st.builds(lambda h, seed: h + Random(seed).randbytes(c.size - _LARGE), head, st.integers())
    return st.binary(min_size=c.size, max_size=c.size)


def structures() -> st.SearchStrategy[codec.Codec]:
    """Every structure of every ABI."""
    return ABI_NAMES.flatmap(lambda name: st.sampled_from(list(codec.codecs(name).structures().values())))
