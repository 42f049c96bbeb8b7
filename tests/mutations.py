"""Byte-level mutations of real samples, for fuzz tests of the report readers."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st


@st.composite
def mutated(draw: st.DrawFn, samples: Sequence[bytes], fragments: Sequence[bytes], *,
            cut: int = 80, copy: int = 400, noise: int = 16) -> bytes:
    """One of ``samples`` with 1-6 random edits: a flipped bit, up to ``cut`` bytes
    deleted, a hostile fragment inserted, up to ``copy`` bytes of itself repeated, the
    rest cut off, or up to ``noise`` random bytes inserted."""
    data = bytearray(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        edit = draw(st.sampled_from(["flip", "delete", "fragment", "copy", "truncate", "random"]))
        if edit == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "delete":
            del data[at : at + draw(st.integers(1, cut))]
        elif edit == "fragment":
            data[at:at] = draw(st.sampled_from(fragments))
        elif edit == "copy":
            start = draw(st.integers(0, max(len(data) - 1, 0)))
            data[at:at] = data[start : start + draw(st.integers(1, copy))]
        elif edit == "truncate":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=noise))
    return bytes(data)
