"""hbone.header_block against hpack itself: the same bytes, the same headers, the same tables, and every block it
does not take (Huffman, indexing, size updates, malformed, oversized) left to hpack with the state untouched."""

from __future__ import annotations

import copy
import random

import hpack
import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple

from hbone import header_block

NAMES = [b":method", b":authority", b":path", b"forwarded", b"traceparent", b"baggage", b"x-" + b"n" * 130,
         b"user-agent", b"content-type"]
VALUES = [b"CONNECT", b"GET", b"10.0.0.7:8080", b'for="10.1.2.3:40000"', b"", b"v" * 200, b"k=v,a=b",
          b"application/grpc"]


def random_headers(rng: random.Random) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    for _ in range(rng.randint(0, 6)):
        pair = (rng.choice(NAMES), rng.choice(VALUES))
        headers.append(NeverIndexedHeaderTuple(*pair) if rng.random() < 0.3 else pair)
    return headers


def table_state(table: hpack.table.HeaderTable) -> tuple[object, ...]:
    return list(table.dynamic_entries), table.maxsize, table.resized, table._current_size


def test_encode_is_hpack_byte_for_byte_and_leaves_the_table_alone() -> None:
    rng = random.Random(7)
    encoder = hpack.Encoder()
    taken = 0
    for _ in range(3000):
        headers = random_headers(rng)
        if rng.random() < 0.02:
            encoder.header_table_size = rng.choice([0, 100, 4096])
        reference = copy.deepcopy(encoder)
        expected = reference.encode(headers, huffman=False)
        before = table_state(encoder.header_table)
        fast = header_block.encode(encoder, headers)
        assert table_state(encoder.header_table) == before
        if fast is not None:
            taken += 1
            assert fast == expected
            assert table_state(reference.header_table) == before  # hpack did not change its table either
        encoder.encode(headers, huffman=False)  # the state moves on as hpack moves it
    assert taken > 300


def test_encode_takes_the_steady_connect_and_leaves_the_first_one_to_hpack() -> None:
    encoder = hpack.Encoder()
    request = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.7:8080"),
               NeverIndexedHeaderTuple(b"traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-00")]
    assert header_block.encode(encoder, request) is None  # :method CONNECT and the authority go in the table
    encoder.encode(request, huffman=False)
    assert header_block.encode(encoder, request) == copy.deepcopy(encoder).encode(request, huffman=False)


def blocks(rng: random.Random, encoder: hpack.Encoder) -> bytes:
    """A block as peers write them: hpack with and without Huffman (Envoy and ztunnel Huffman-code and index),
    sometimes resized, sometimes mangled."""
    if rng.random() < 0.03:
        encoder.header_table_size = rng.choice([0, 256, 4096])
    block = encoder.encode(random_headers(rng), huffman=rng.random() < 0.3)
    if rng.random() < 0.15 and block:
        mangled = bytearray(block)
        for _ in range(rng.randint(1, 3)):
            mangled[rng.randrange(len(mangled))] = rng.randrange(256)
        return bytes(mangled[:rng.randint(0, len(mangled))])
    return block


def decode_with_hpack(decoder: hpack.Decoder, block: bytes) -> list[HeaderTuple] | type[Exception]:
    try:
        return list(decoder.decode(block, raw=True))
    except hpack.HPACKError as e:
        return type(e)


@pytest.mark.parametrize("seed", range(4))
def test_decode_is_hpack_for_every_block_it_takes(seed: int) -> None:
    rng = random.Random(seed)
    encoder, decoder = hpack.Encoder(), hpack.Decoder(max_header_list_size=600)
    taken = 0
    for _ in range(3000):
        block = blocks(rng, encoder)
        reference = copy.deepcopy(decoder)
        expected = decode_with_hpack(reference, block)
        before = table_state(decoder.header_table)
        fast = header_block.decode(decoder, block)
        assert table_state(decoder.header_table) == before
        if fast is not None:
            taken += 1
            assert isinstance(expected, list)
            assert [(type(h), tuple(h)) for h in fast] == [(type(h), tuple(h)) for h in expected]
            assert table_state(reference.header_table) == before
        if not isinstance(decode_with_hpack(decoder, block), list):  # the tables may be out of step: start over
            encoder, decoder = hpack.Encoder(), hpack.Decoder(max_header_list_size=600)
    assert taken > 500


def test_decode_leaves_huffman_indexing_and_size_updates_to_hpack() -> None:
    encoder = hpack.Encoder()
    headers = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.7:8080")]
    assert header_block.decode(hpack.Decoder(), encoder.encode(headers, huffman=True)) is None
    encoder = hpack.Encoder()
    assert header_block.decode(hpack.Decoder(), encoder.encode(headers, huffman=False)) is None  # adds to the table
    encoder.header_table_size = 0
    assert header_block.decode(hpack.Decoder(), encoder.encode([], huffman=False)) is None  # a size update


@pytest.mark.parametrize(("block", "error"), [
    (b"\x80", hpack.InvalidTableIndex),  # index 0
    (b"\xbf", hpack.InvalidTableIndex),  # index 63: the dynamic table is empty
    (b"\x10\x05abc", hpack.HPACKDecodingError),  # truncated name
    (b"\x01\x7f\xff\xff\xff\xff\xff\x01", hpack.HPACKDecodingError),  # an integer longer than hpack allows
])
def test_bad_blocks_are_left_for_hpack_to_name(block: bytes, error: type[Exception]) -> None:
    decoder = hpack.Decoder()
    assert header_block.decode(decoder, block) is None
    with pytest.raises(error):
        decoder.decode(block, raw=True)


def test_a_block_over_the_list_limit_is_left_for_hpack_to_refuse() -> None:
    block = hpack.Encoder().encode([NeverIndexedHeaderTuple(b"x-big", b"v" * 100)], huffman=False)
    decoder = hpack.Decoder(max_header_list_size=100)
    assert header_block.decode(decoder, block) is None
    with pytest.raises(hpack.OversizedHeaderListError):
        decoder.decode(block, raw=True)
    assert header_block.decode(hpack.Decoder(max_header_list_size=200), block) is not None
