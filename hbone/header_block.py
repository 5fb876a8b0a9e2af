"""HPACK header blocks of the common shapes, without hpack's per-header Python (logging, bytearrays, copies).

A CONNECT's block, once the first stream to a target has put ``:method: CONNECT`` and the ``:authority`` in the
HPACK tables, is table references plus never-indexed literals: neither encoding nor decoding it changes either
table. ``encode`` and ``decode`` handle exactly such blocks, reading the table hpack's encoder or decoder keeps
and never writing it, and produce what hpack would (the same bytes, the same header tuples); they return None
for any other block (one that adds to or resizes a table, Huffman-coded strings, anything malformed or over a
limit), which is then for hpack to encode or decode, errors included, from the same untouched state.
"""

from __future__ import annotations

from collections.abc import Sequence

from hpack import Decoder, Encoder, HeaderTuple, HPACKError, NeverIndexedHeaderTuple
from hpack.struct import Header
from hpack.table import table_entry_size

_INDEXED, _NEVER_INDEXED = 0x80, 0x10


def _integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """An HPACK integer (RFC 7541 §5.1) with ``flags`` in the bits above its prefix."""
    most = (1 << prefix_bits) - 1
    if value < most:
        return bytes((flags | value,))
    out = [flags | most]
    value -= most
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode(encoder: Encoder, headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The block ``encoder.encode(headers, huffman=False)`` makes when that leaves its table as it is: every
    header is in the table whole, or never-indexed with a name the table does not have. None otherwise, or when
    a table size update is due first."""
    table = encoder.header_table
    if table.resized:
        return None
    out = []
    for header in headers:
        name, value = header
        match = table.search(name, value)
        if isinstance(header, NeverIndexedHeaderTuple):
            if match is not None:
                return None
            out.append(b"\x10" + _integer(len(name), 7, 0) + name + _integer(len(value), 7, 0) + value)
        elif match is not None and match[2] is not None:
            out.append(_integer(match[0], 7, _INDEXED))
        else:
            return None
    return b"".join(out)


def _read_integer(block: bytes, at: int, prefix_bits: int) -> tuple[int, int]:
    """The HPACK integer at ``block[at]``, and where it ends; IndexError when the block ends first."""
    most = (1 << prefix_bits) - 1
    value = block[at] & most
    at += 1
    if value < most:
        return value, at
    shift = 0
    while True:
        byte = block[at]
        at += 1
        value += (byte & 127) << shift
        if byte < 128:
            return value, at
        shift += 7
        if shift == 28:  # longer than hpack allows, or close: hpack takes the block and says what is wrong
            raise IndexError("integer too long")


def _read_string(block: bytes, at: int) -> tuple[bytes, int]:
    """A string literal (not Huffman-coded) at ``block[at]``; IndexError if truncated or Huffman-coded."""
    if block[at] & 0x80:
        raise IndexError("Huffman-coded")
    length, at = _read_integer(block, at, 7)
    end = at + length
    if end > len(block):
        raise IndexError("truncated")
    return block[at:end], end


def decode(decoder: Decoder, block: bytes) -> list[Header] | None:
    """What ``decoder.decode(block, raw=True)`` returns, for a block of table references and literals that are
    not indexed (or never indexed) and not Huffman-coded, within the decoder's limits. None for any other block:
    the decoder decodes it (or names what is wrong with it)."""
    table, limit = decoder.header_table, decoder.max_header_list_size
    if decoder.header_table_size > decoder.max_allowed_table_size:  # the peer owes a size update
        return None
    headers: list[Header] = []
    size, at, end = 0, 0, len(block)
    try:
        while at < end:
            first = block[at]
            if first & _INDEXED:
                index, at = _read_integer(block, at, 7)
                header: Header = HeaderTuple(*table.get_by_index(index))
            elif first & 0xE0:  # incremental indexing or a table size update: the table changes
                return None
            else:
                index, at = _read_integer(block, at, 4)
                if index:
                    name = table.get_by_index(index)[0]
                else:
                    name, at = _read_string(block, at)
                value, at = _read_string(block, at)
                header = (NeverIndexedHeaderTuple if first & _NEVER_INDEXED else HeaderTuple)(name, value)
            headers.append(header)
            size += table_entry_size(header[0], header[1])
            if size > limit:
                return None
    except (IndexError, HPACKError):  # truncated, Huffman-coded, or a bad table index
        return None
    return headers
