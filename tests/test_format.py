"""The layer blob format: round trips, golden bytes, strict parsing of every section, fuzzing."""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import struct

import lz4.block
import msgpack
import pytest
from conftest import pseudo_random
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dadi.errors import FormatError
from dadi.format.blob import (
    DEFAULT_CHUNK_SIZE,
    FOOTER_SIZE,
    FORMAT_VERSION,
    HEADER_SIZE,
    LAYER_MEDIA_TYPE,
    SUPPORTED_VERSIONS,
    BlobWriter,
    Footer,
    Header,
    decode_chunk,
    encode_tables,
    pack_footer,
    pack_header,
    parse_footer,
    parse_header,
    parse_tables,
    read_blob_tables,
    read_packed,
    tables_offset,
)
from dadi.format.model import BLOCK_SIZE, DEFAULT_DISK_SIZE, Chunk, Extent, LayerTables
from dadi.image import mediatypes as mt

MiB = 1 << 20


def text_like(seed: int, size: int) -> bytes:
    """Compressible, reproducible bytes: words picked by a reproducible byte stream."""
    words = [b"block", b"layer", b"chunk", b"ext4", b"inode", b"extent", b"dadi", b"\n", b" "]
    out = bytearray()
    for byte in pseudo_random(seed, size):
        out += words[byte % len(words)]
        if len(out) >= size:
            break
    return bytes(out[:size])


def write_blob(extents, *, disk_size=DEFAULT_DISK_SIZE, block_size=BLOCK_SIZE, chunk_size=DEFAULT_CHUNK_SIZE):
    """extents: (block, bytes) for data, (block, int count) for zeros. Returns (blob bytes, BlobInfo)."""
    out = io.BytesIO()
    writer = BlobWriter(out, disk_size=disk_size, block_size=block_size, chunk_size=chunk_size)
    for block, payload in extents:
        if isinstance(payload, int):
            writer.add_zero(block, payload)
        else:
            writer.add_data(block, payload)
    info = writer.finish()
    return out.getvalue(), info


def read_disk_block(blob: bytes, tables: LayerTables, block: int) -> bytes | None:
    """What a reader of this one layer sees at `block`: data, zeros, or None for a hole."""
    for extent in tables.extents:
        if extent.block <= block < extent.block + extent.count:
            if extent.zero:
                return bytes(tables.block_size)
            offset = extent.offset + (block - extent.block) * tables.block_size
            return read_packed(io.BytesIO(blob), tables, offset, tables.block_size)
    return None


def tables_bytes(blob: bytes, info) -> bytes:
    start = tables_offset(len(blob), info.tables_size)
    return blob[start : start + info.tables_size]


def tables_obj(blob: bytes, info) -> list:
    return msgpack.unpackb(tables_bytes(blob, info), raw=False)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.fixture(scope="module")
def sample():
    """A blob with merged data extents, zero extents, a raw chunk and compressed chunks, 8 KiB chunks."""
    extents = [
        (3, text_like(1, 2 * BLOCK_SIZE)),
        (5, pseudo_random(2, 2 * BLOCK_SIZE)),  # continues the previous extent: merged
        (20, 4),
        (24, 2),  # continues the zero extent: merged
        (40, text_like(3, 2 * BLOCK_SIZE)),
    ]
    blob, info = write_blob(extents, disk_size=1 * MiB, chunk_size=8192)
    return blob, info


# --- round trips -------------------------------------------------------------------------------------


def test_round_trip_reads_back_every_block(sample):
    blob, info = sample
    tables = read_blob_tables(io.BytesIO(blob))
    assert tables == info.tables
    assert info.size == len(blob)
    assert info.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert info.tables_digest == "sha256:" + hashlib.sha256(tables_bytes(blob, info)).hexdigest()
    data = text_like(1, 2 * BLOCK_SIZE) + pseudo_random(2, 2 * BLOCK_SIZE)
    for i in range(4):
        assert read_disk_block(blob, tables, 3 + i) == data[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
    assert read_disk_block(blob, tables, 22) == bytes(BLOCK_SIZE)
    assert read_disk_block(blob, tables, 41) == text_like(3, 2 * BLOCK_SIZE)[BLOCK_SIZE:]
    assert read_disk_block(blob, tables, 2) is None
    assert read_disk_block(blob, tables, 26) is None


def test_writer_merges_adjacent_extents_and_zero_extents_carry_no_data(sample):
    _, info = sample
    assert info.tables.extents == (
        Extent(3, 4, 0),
        Extent(20, 6, 0, zero=True),
        Extent(40, 2, 4 * BLOCK_SIZE),
    )
    assert info.tables.packed_size == 6 * BLOCK_SIZE


def test_incompressible_chunks_are_stored_raw_and_compressible_ones_shrink(sample):
    _, info = sample
    # 24 KiB of packed stream in 8 KiB chunks: text, random, text.
    chunks = info.tables.chunks
    assert [c.raw_length for c in chunks] == [8192, 8192, 8192]
    assert chunks[0].compressed and chunks[0].length < 8192
    assert not chunks[1].compressed and chunks[1].length == 8192  # the random bytes
    assert chunks[0].offset == HEADER_SIZE
    assert chunks[1].offset == chunks[0].offset + chunks[0].length


def test_empty_and_zero_only_layers_have_no_chunks():
    blob, info = write_blob([])
    assert read_blob_tables(io.BytesIO(blob)) == info.tables
    assert info.tables.chunks == () and info.tables.extents == ()
    assert len(blob) == HEADER_SIZE + info.tables_size + FOOTER_SIZE
    blob, info = write_blob([(0, 100)])
    assert read_blob_tables(io.BytesIO(blob)).extents == (Extent(0, 100, 0, zero=True),)


def test_last_chunk_is_shorter_and_read_packed_spans_chunks():
    data = text_like(7, 5 * BLOCK_SIZE)
    blob, info = write_blob([(0, data)], chunk_size=8192)
    tables = read_blob_tables(io.BytesIO(blob))
    assert [c.raw_length for c in tables.chunks] == [8192, 8192, 4096]
    assert read_packed(io.BytesIO(blob), tables, 100, 17000) == data[100:17100]
    assert read_packed(io.BytesIO(blob), tables, 0, len(data), verify="xxh3") == data
    assert read_packed(io.BytesIO(blob), tables, 5, 0) == b""
    with pytest.raises(ValueError, match="outside the packed stream"):
        read_packed(io.BytesIO(blob), tables, 1, len(data))


class WriteOnlySink:
    """Accepts bytes like a pipe: no seek, no tell. Records what the writer had written when."""

    def __init__(self):
        self.data = bytearray()

    def write(self, data) -> int:
        self.data += data
        return len(data)


def test_writer_streams_to_a_write_only_sink_without_buffering_the_layer():
    sink = WriteOnlySink()
    writer = BlobWriter(sink, disk_size=DEFAULT_DISK_SIZE, chunk_size=64 * 1024)
    data = pseudo_random(5, 4 * MiB)
    writer.add_data(0, data)
    # All but less than one chunk is already out: the writer does not hold the layer in memory.
    assert len(sink.data) > HEADER_SIZE + len(data) - 64 * 1024
    # A view of 4-byte items: lengths count bytes, not items.
    writer.add_data(1024, memoryview(data[: 3 * BLOCK_SIZE]).cast("I"))
    info = writer.finish()
    assert info.digest == "sha256:" + hashlib.sha256(sink.data).hexdigest()
    tables = read_blob_tables(io.BytesIO(bytes(sink.data)))
    assert (
        read_packed(io.BytesIO(bytes(sink.data)), tables, 4 * MiB, 3 * BLOCK_SIZE) == data[: 3 * BLOCK_SIZE]
    )


class ShortWritePipe:
    """A raw pipe-like sink that takes at most 1000 bytes per call, as os.write on a pipe may."""

    def __init__(self):
        self.data = bytearray()

    def write(self, data) -> int:
        self.data += bytes(data[:1000])
        return min(len(data), 1000)


def test_writer_completes_short_writes():
    sink = ShortWritePipe()
    writer = BlobWriter(sink, disk_size=DEFAULT_DISK_SIZE, chunk_size=8192)
    writer.add_data(0, text_like(1, 3 * BLOCK_SIZE))
    info = writer.finish()
    assert len(sink.data) == info.size
    assert read_blob_tables(io.BytesIO(bytes(sink.data))) == info.tables


@pytest.mark.parametrize(
    ("calls", "message"),
    [
        ([("data", 0, b"x" * 100)], "not a multiple of block_size"),
        ([("data", 0, b"")], "bad extent"),
        ([("zero", 5, 0)], "bad extent"),
        ([("data", 10, bytes(8192)), ("data", 11, bytes(4096))], "not after the previous extent"),
        ([("zero", 10, 5), ("data", 3, bytes(4096))], "not after the previous extent"),
        ([("zero", 255, 2)], "past the disk's 256 blocks"),
        ([("data", -1, bytes(4096))], "bad extent"),
    ],
)
def test_writer_rejects_bad_calls(calls, message):
    writer = BlobWriter(io.BytesIO(), disk_size=MiB)
    with pytest.raises(ValueError, match=message):
        for kind, block, arg in calls:
            writer.add_data(block, arg) if kind == "data" else writer.add_zero(block, arg)


def test_writer_rejects_bad_geometry_and_use_after_finish():
    with pytest.raises(ValueError, match="chunk_size 1000 is not a power of two"):
        BlobWriter(io.BytesIO(), disk_size=MiB, chunk_size=1000)
    with pytest.raises(ValueError, match="disk_size 1000 is not a positive multiple"):
        BlobWriter(io.BytesIO(), disk_size=1000)
    writer = BlobWriter(io.BytesIO(), disk_size=MiB)
    writer.finish()
    with pytest.raises(ValueError, match="already finished"):
        writer.add_zero(0, 1)
    with pytest.raises(ValueError, match="already finished"):
        writer.finish()


def test_constants():
    assert FORMAT_VERSION in SUPPORTED_VERSIONS
    assert LAYER_MEDIA_TYPE == mt.DADI_LAYER == "application/vnd.oci.image.layer.v1.dadi"
    assert (HEADER_SIZE, FOOTER_SIZE) == (64, 80)


# --- golden bytes: a format change without a version bump must fail these -------------------------------

# If only an lz4 upgrade breaks "mixed" and "64k-chunks", lz4 emits other (still decodable) bytes: blobs are
# then no longer byte-identical across machines with different lz4 versions. Pin python-lz4 rather than
# re-pinning the digests; "empty" and "raw-chunks" do not depend on lz4's output.
GOLDEN = {
    "empty": (
        [],
        {"chunk_size": 65536},
        "sha256:59fcca797a3e1df4a03aecd330bedbd3e6193d51e5748f12615188437f969529",
        "sha256:89201f414a8e6e19f8195d1eeaa7651e6756ece84de768a5d37d7e487b265ae6",
    ),
    "mixed": (
        [
            (3, text_like(1, 2 * BLOCK_SIZE)),
            (5, pseudo_random(2, 2 * BLOCK_SIZE)),
            (20, 6),
            (40, text_like(3, BLOCK_SIZE)),
        ],
        {"disk_size": MiB, "chunk_size": 8192},
        "sha256:f90117fc4992e63233b0ddc57a2237f2cdd833d92bf24330e1b6fbf88f45b69b",
        "sha256:af87a16509bbab10f4606b0dd2af4dcb4d8dfa633923a2a008e2c14deb175a97",
    ),
    "raw-chunks": (
        [(2, pseudo_random(6, 3 * BLOCK_SIZE)), (9, 2), (30, pseudo_random(7, BLOCK_SIZE))],
        {"disk_size": MiB, "chunk_size": 8192},
        "sha256:efb82760efc7ba18eb8b408d2de9d99c45e872e08e8f7d1671a5e2850c30d8d8",
        "sha256:c6b7bfbbd99b2c4c401685f16a0a3bf6e733da8d7360bf5a1509e0dfdf62016b",
    ),
    "64k-chunks": (
        [(0, text_like(4, 20 * BLOCK_SIZE)), (1000, 8), (262143, pseudo_random(5, BLOCK_SIZE))],
        {"chunk_size": 65536},
        "sha256:4d29ddd6f492080dd7988727689183c51a69b17d6d0c54508bd7a27289ec96b8",
        "sha256:d3c29fe16f06b956c22f1a92690fe42143d433f989f5a8f18f9a95bb971ac5b7",
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_blob_bytes(name):
    extents, geometry, blob_digest, tables_digest = GOLDEN[name]
    blob, info = write_blob(extents, **geometry)
    assert (info.digest, info.tables_digest) == (blob_digest, tables_digest)


def test_golden_header_and_footer_layout(sample):
    blob, info = sample
    # magic, version 1, flags 0, block_size 4096, chunk_size 8192, reserved, disk_size 1 MiB, reserved zeros
    assert blob[:HEADER_SIZE] == (
        b"DADIBLK\x00" + bytes.fromhex("0100 0000 00100000 00200000 00000000 0000100000000000") + bytes(32)
    )
    footer = blob[-FOOTER_SIZE:]
    assert footer[:32] == blob[:32].replace(b"DADIBLK", b"DADIEND")
    t_offset, t_size = struct.unpack("<QQ", footer[32:48])
    assert (t_offset, t_size) == (len(blob) - FOOTER_SIZE - info.tables_size, info.tables_size)
    assert footer[48:] == hashlib.sha256(tables_bytes(blob, info)).digest()
    obj = tables_obj(blob, info)
    assert obj[:3] == [b"DADITBL\x00", 1, [4096, 8192, MiB, 6 * 4096]]
    assert obj[3] == [[3, 4, 0, False], [20, 6, 0, True], [40, 2, 4 * 4096, False]]


# --- property tests ----------------------------------------------------------------------------------

BS = 512  # small blocks keep the examples small


@st.composite
def layers(draw):
    """Random non-overlapping extents on a small disk: (block, bytes) data or (block, count) zeros."""
    disk_blocks = draw(st.integers(1, 400))
    extents = []
    block = draw(st.integers(0, disk_blocks - 1))
    while block < disk_blocks:
        count = draw(st.integers(1, min(24, disk_blocks - block)))
        kind = draw(st.sampled_from(["zero", "random", "text", "constant"]))
        if kind == "zero":
            extents.append((block, count))
        elif kind == "random":
            extents.append((block, draw(st.binary(min_size=count * BS, max_size=count * BS))))
        elif kind == "text":
            extents.append((block, text_like(draw(st.integers(0, 1000)), count * BS)))
        else:
            extents.append((block, bytes([draw(st.integers(0, 255))]) * (count * BS)))
        block += count + draw(st.integers(0, 30))
    chunk_size = draw(st.sampled_from([512, 1024, 4096, 16384]))
    return disk_blocks * BS, chunk_size, extents


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers())
def test_property_write_parse_read_back(layer):
    disk_size, chunk_size, extents = layer
    blob, info = write_blob(extents, disk_size=disk_size, block_size=BS, chunk_size=chunk_size)
    tables = read_blob_tables(io.BytesIO(blob))
    assert tables == info.tables
    assert (
        parse_tables(tables_bytes(blob, info), blob_size=len(blob), expected_digest=info.tables_digest)
        == tables
    )
    expected = {}
    for block, payload in extents:
        if isinstance(payload, int):
            expected.update({b: bytes(BS) for b in range(block, block + payload)})
        else:
            expected.update({block + i: payload[i * BS : (i + 1) * BS] for i in range(len(payload) // BS)})
    for block in range(disk_size // BS):
        assert read_disk_block(blob, tables, block) == expected.get(block)


# --- fuzzing: any input parses to consistent tables or raises FormatError, nothing else -----------------


def check_consistent(tables: LayerTables, blob_size: int) -> None:
    """What a reader relies on after a successful parse."""
    end = 0
    packed = 0
    for e in tables.extents:
        assert e.block >= end and e.count > 0
        end = e.block + e.count
        assert end * tables.block_size <= tables.disk_size
        if not e.zero:
            assert e.offset == packed
            packed += e.count * tables.block_size
    assert packed == tables.packed_size
    position = HEADER_SIZE
    for c in tables.chunks:
        assert c.offset == position and c.raw_length <= tables.chunk_size
        position += c.length
    assert position <= blob_size


def parse_blob(blob: bytes) -> LayerTables | None:
    try:
        tables = read_blob_tables(io.BytesIO(blob))
    except FormatError:
        return None
    check_consistent(tables, len(blob))
    return tables


@pytest.fixture(scope="module")
def fuzz_blob():
    return write_blob(
        [(1, text_like(9, 3 * 512)), (4, pseudo_random(9, 512)), (9, 3), (20, text_like(10, 2 * 512))],
        disk_size=64 * 512,
        block_size=512,
        chunk_size=1024,
    )


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_bit_flips_and_truncations_of_a_valid_blob(fuzz_blob, data):
    blob, info = fuzz_blob
    mutated = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(blob) - 1))
        mutated[position] ^= 1 << data.draw(st.integers(0, 7))
    if data.draw(st.booleans()):
        mutated = mutated[: data.draw(st.integers(0, len(mutated)))]
    tables = parse_blob(bytes(mutated))
    if tables is None:
        return
    # Tables intact (their sha256 is in the footer): damaged chunk data is caught when it is read.
    assert tables == info.tables
    try:
        packed = read_packed(io.BytesIO(bytes(mutated)), tables, 0, tables.packed_size)
    except FormatError:
        return
    assert packed == read_packed(io.BytesIO(blob), info.tables, 0, info.tables.packed_size)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data):
    for parse in (
        lambda: parse_tables(data),
        lambda: parse_tables(data, blob_size=len(data) + 2000),
        lambda: parse_header(data[:HEADER_SIZE].ljust(HEADER_SIZE, b"\0")),
        lambda: parse_footer(data[:FOOTER_SIZE].ljust(FOOTER_SIZE, b"\0"), 10_000),
    ):
        try:
            result = parse()
        except FormatError:
            continue
        if isinstance(result, LayerTables):
            check_consistent(result, 1 << 64)
    parse_blob(data)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.binary(max_size=40)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.binary(max_size=4), children, max_size=3),
    max_leaves=30,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_structured_tables(fuzz_blob, data):
    """Replace one random node of valid tables with a random msgpack value: FormatError or consistent."""
    blob, info = fuzz_blob
    obj = tables_obj(blob, info)
    node = obj
    while isinstance(node, list) and node and data.draw(st.booleans()):
        index = data.draw(st.integers(0, len(node) - 1))
        if not isinstance(node[index], list) or not data.draw(st.booleans()):
            node[index] = data.draw(msgpack_values)
            break
        node = node[index]
    try:
        tables = parse_tables(pack(obj), blob_size=len(blob) - info.tables_size + len(pack(obj)))
    except FormatError:
        return
    check_consistent(tables, len(blob))


# --- strictness, one rule at a time ----------------------------------------------------------------------


def reparse(blob, info, mutate):
    """Apply `mutate` to the decoded tables, re-encode, and parse as if in a blob of the right size."""
    obj = tables_obj(blob, info)
    mutate(obj)
    data = pack(obj)
    return parse_tables(data, blob_size=len(blob) - info.tables_size + len(data))


def test_unmodified_tables_parse(sample):
    blob, info = sample
    assert reparse(blob, info, lambda obj: None) == info.tables


def set_at(path, value):
    def mutate(obj):
        node = obj
        for index in path[:-1]:
            node = node[index]
        node[path[-1]] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (set_at([0], b"DADIXXX\x00"), r"bad magic b'DADIXXX\\x00'"),
        (set_at([0], "DADITBL\x00"), "bad magic"),
        (set_at([1], 3), r"unsupported format version 3 \(supported: 1, 2\)"),
        (set_at([1], True), "version: expected an unsigned integer, got bool"),
        (lambda obj: obj.append([]), "expected an array of 5 items, got 6"),
        (lambda obj: obj.pop(), "expected an array of 5 items, got 4"),
        (lambda obj: obj.__delitem__(slice(1, None)), "short input"),
        (set_at([2], {}), "geometry: expected an array, got dict"),
        (set_at([2, 0], 4096.0), r"geometry\[0\]: expected an unsigned integer, got float"),
        (set_at([2, 0], 3000), "block_size 3000 is not a power of two"),
        (set_at([2, 1], 2048), r"chunk_size 2048 is not a power of two in \[block_size 4096"),
        (set_at([2, 1], 1 << 30), "chunk_size 1073741824 is not a power of two"),
        (set_at([2, 2], 1000), "disk_size 1000 is not a positive multiple"),
        (set_at([2, 3], -1), r"geometry\[3\]: -1 is outside"),
        (set_at([2, 3], 5 * 4096), "data runs past packed_size 20480"),
        (
            set_at([2, 3], 7 * 4096),
            "data extents cover 24576 bytes of the packed stream, packed_size is 28672",
        ),
        (set_at([3, 1], [20, 6, 0, 1]), "extent 1: zero flag: expected a boolean, got int"),
        (set_at([3, 1], [20, 6, 0]), "extent 1: expected an array of 4 items, got 3"),
        (set_at([3, 1], [20, 0, 0, True]), "extent 1: empty"),
        (set_at([3, 1], [6, 6, 0, True]), r"extent 1: overlaps extent 0 \(block 6\)"),
        (set_at([3, 1], [1, 2, 0, True]), r"extent 1: is not sorted after extent 0 \(block 1\)"),
        (
            set_at([3, 2], [250, 7, 4 * 4096, False]),
            "extent 2: blocks 250-256 extend past the disk's 256 blocks",
        ),
        (set_at([3, 1], [20, 6, 4096, True]), "extent 1: zero extent at block 20 has packed offset 4096"),
        (set_at([3, 2], [40, 2, 4096, False]), "extent 2: packed offset 4096 at block 40 does not continue"),
        (set_at([3, 0], [3, 4, 1, False]), "extent 0: packed offset 1 at block 3 does not continue"),
        (set_at([4, 0, 4], b"short"), "chunk 0: sha256 is not 32 bytes"),
        (set_at([4, 0, 3], "x"), "chunk 0: xxh3: expected an unsigned integer, got str"),
        (set_at([4, 0, 3], -5), "chunk 0: xxh3: -5 is outside"),
        (set_at([4, 1, 5], None), "chunk 1: compressed flag: expected a boolean, got NoneType"),
        (lambda obj: obj[4].pop(), "2 chunks, but packed_size 24576 in chunks of 8192 needs 3"),
        (set_at([4, 0, 0], 0), "chunk 0: at blob offset 0, not contiguous with the previous chunk"),
        (
            lambda obj: obj[4][0].__setitem__(1, obj[4][0][1] + 1),
            "chunk 1: at blob offset .*, not contiguous",
        ),
        (set_at([4, 2, 2], 4096), "chunk 2 at blob offset .*: raw_length 4096, expected 8192"),
        (set_at([4, 1, 1], 8193), "chunk 1 at blob offset .*: stored raw but length 8193 != raw_length 8192"),
        (
            lambda obj: obj[4][0].__setitem__(1, 8192),
            r"compressed length 8192 is not in \[1, raw_length 8192\)",
        ),
        (lambda obj: obj[4][0].__setitem__(1, 0), r"compressed length 0 is not in \[1, raw_length 8192\)"),
    ],
)
def test_parse_tables_rejects(sample, mutate, message):
    blob, info = sample
    with pytest.raises(FormatError, match=message):
        reparse(blob, info, mutate)


def test_parse_tables_rejects_bytes_level_damage(sample):
    blob, info = sample
    data = tables_bytes(blob, info)
    size = len(blob)
    with pytest.raises(FormatError, match="digest mismatch: got sha256:"):
        parse_tables(data, expected_digest="sha256:" + "0" * 64)
    with pytest.raises(FormatError, match="is not 'sha256:' and 64 hex digits"):
        parse_tables(data, expected_digest="md5:abc")
    with pytest.raises(FormatError, match=r"tables: short input \(0 bytes\)"):
        parse_tables(b"")
    with pytest.raises(FormatError, match="not valid msgpack .*incomplete"):
        parse_tables(data[:-1])
    with pytest.raises(FormatError, match=f"{len(data)} bytes of tables followed by 3 trailing bytes"):
        parse_tables(data + b"\0\0\0")
    with pytest.raises(FormatError, match="not valid msgpack"):
        parse_tables(b"\xc1")
    with pytest.raises(FormatError, match="expected an array, got int"):
        parse_tables(pack(7))
    # With the blob size, the chunks must end exactly where the tables start.
    with pytest.raises(
        FormatError, match=f"tables at blob offset {size - FOOTER_SIZE - len(data) + 1}: chunk data ends"
    ):
        parse_tables(data, blob_size=size + 1)
    with pytest.raises(FormatError, match="chunk 2 at blob offset .*: ends at .*, past the chunk data's end"):
        parse_tables(data, blob_size=size - 1)


def test_parse_tables_refuses_absurd_array_lengths_without_allocating():
    # An array header claiming 2**32-1 items in 5 bytes: msgpack must not try to build it.
    with pytest.raises(FormatError, match="not valid msgpack"):
        parse_tables(b"\xdd\xff\xff\xff\xff")
    with pytest.raises(FormatError, match="not valid msgpack"):
        parse_tables(b"\x91" * 100_000)  # nesting far too deep


def test_parse_header_rejects(sample):
    blob, _ = sample
    header = blob[:HEADER_SIZE]
    assert parse_header(header) == Header(1, 0, 4096, 8192, MiB)
    with pytest.raises(FormatError, match="header: expected 64 bytes at blob offset 0, got 63"):
        parse_header(header[:-1])
    with pytest.raises(FormatError, match="header: bad magic b'XADIBLK"):
        parse_header(b"X" + header[1:])
    with pytest.raises(FormatError, match=r"header: unsupported format version 9 \(supported: 1, 2\)"):
        parse_header(pack_header(Header(9, 0, 4096, 8192, MiB)))
    with pytest.raises(FormatError, match="header: unknown flags 0x0004 at blob offset 10"):
        parse_header(pack_header(Header(1, 4, 4096, 8192, MiB)))
    with pytest.raises(FormatError, match="header: reserved bytes"):
        parse_header(header[:-1] + b"\x01")
    with pytest.raises(FormatError, match="header: block_size 100 is not a power of two"):
        parse_header(pack_header(Header(1, 0, 100, 8192, MiB)))


def test_parse_footer_rejects(sample):
    blob, info = sample
    size = len(blob)
    footer = parse_footer(blob[-FOOTER_SIZE:], size)
    assert (footer.tables_offset, footer.tables_size) == (
        tables_offset(size, info.tables_size),
        info.tables_size,
    )
    assert footer.tables_digest == info.tables_digest

    def packed(**changes):
        fields = {f: getattr(footer, f) for f in Footer.__slots__}
        return pack_footer(Footer(**(fields | changes)))

    where = f"footer at blob offset {size - FOOTER_SIZE}"
    with pytest.raises(FormatError, match=f"{where}: expected 80 bytes, got 79"):
        parse_footer(blob[-FOOTER_SIZE + 1 :], size)
    with pytest.raises(FormatError, match=f"{where}: bad magic"):
        parse_footer(blob[:FOOTER_SIZE], size)
    with pytest.raises(FormatError, match="unsupported format version 3"):
        parse_footer(packed(version=3), size)
    with pytest.raises(FormatError, match="does not end at the footer"):
        parse_footer(packed(tables_offset=footer.tables_offset - 1), size)
    with pytest.raises(FormatError, match="do not fit in a blob"):
        parse_footer(packed(tables_size=size), size)
    with pytest.raises(FormatError, match=r"tables size 0 is not in \[1, "):
        parse_footer(packed(tables_size=0), size)
    with pytest.raises(FormatError, match="tables size 18446744073709551615 is not in"):
        parse_footer(packed(tables_size=2**64 - 1), size)
    with pytest.raises(FormatError, match="shorter than a header and a footer"):
        parse_footer(blob[-FOOTER_SIZE:], 100)


def test_read_blob_tables_cross_checks_sections(sample):
    blob, info = sample
    with pytest.raises(FormatError, match="shorter than a header and a footer"):
        read_blob_tables(io.BytesIO(blob[:100]))
    # Footer geometry differing from the header's.
    footer = parse_footer(blob[-FOOTER_SIZE:], len(blob))
    other = Footer(1, 0, 4096, 16384, MiB, footer.tables_offset, footer.tables_size, footer.tables_sha256)
    with pytest.raises(FormatError, match=r"footer .* \(1, 4096, 16384, 1048576\) differs from the header's"):
        read_blob_tables(io.BytesIO(blob[:-FOOTER_SIZE] + pack_footer(other)))
    # Header and footer agree with each other but not with the tables.
    disk = pack_header(Header(1, 0, 4096, 8192, 2 * MiB))
    other = Footer(1, 0, 4096, 8192, 2 * MiB, footer.tables_offset, footer.tables_size, footer.tables_sha256)
    with pytest.raises(FormatError, match=r"tables .* differ from the header's \(4096, 8192, 2097152\)"):
        read_blob_tables(io.BytesIO(disk + blob[HEADER_SIZE:-FOOTER_SIZE] + pack_footer(other)))
    # A damaged tables byte is caught by the footer's sha256.
    start = tables_offset(len(blob), info.tables_size)
    damaged = bytearray(blob)
    damaged[start + 5] ^= 0x40
    with pytest.raises(FormatError, match=f"tables at blob offset {start}: digest mismatch"):
        read_blob_tables(io.BytesIO(bytes(damaged)))
    # A blob_size larger than the file: short read, named.
    with pytest.raises(FormatError, match="short read"):
        read_blob_tables(io.BytesIO(blob), blob_size=len(blob) + 10)


def test_decode_chunk_verifies_then_decompresses(sample):
    blob, info = sample
    chunk = info.tables.chunks[0]
    stored = blob[chunk.offset : chunk.offset + chunk.length]
    raw = decode_chunk(stored, chunk)
    assert raw == text_like(1, 2 * BLOCK_SIZE)
    for verify in ("sha256", "xxh3", "none"):
        assert decode_chunk(memoryview(stored), chunk, verify=verify) == raw
    damaged = bytes([stored[0] ^ 1]) + stored[1:]
    where = f"chunk at blob offset {chunk.offset}"
    with pytest.raises(FormatError, match=f"{where}: sha256 mismatch"):
        decode_chunk(damaged, chunk)
    with pytest.raises(FormatError, match=f"{where}: xxh3 mismatch"):
        decode_chunk(damaged, chunk, verify="xxh3")
    with pytest.raises(
        FormatError, match=f"{where}: got {chunk.length - 1} stored bytes, expected {chunk.length}"
    ):
        decode_chunk(stored[:-1], chunk)
    with pytest.raises(ValueError, match="verify must be one of"):
        decode_chunk(stored, chunk, verify="md5")


def test_decode_chunk_names_lz4_errors_and_short_output():
    def chunk_for(stored: bytes, raw_length: int) -> Chunk:
        return Chunk(4096, len(stored), raw_length, 0, hashlib.sha256(stored).digest(), True)

    garbage = b"\xff" * 20
    with pytest.raises(FormatError, match="chunk at blob offset 4096: lz4 cannot decompress it"):
        decode_chunk(garbage, chunk_for(garbage, 8192))
    short = lz4.block.compress(b"a" * 1000, store_size=False)
    with pytest.raises(
        FormatError, match="chunk at blob offset 4096: decompressed to 1000 bytes, expected 8192"
    ):
        decode_chunk(short, chunk_for(short, 8192))


def test_read_packed_reports_corrupt_chunk_data(sample):
    blob, info = sample
    damaged = bytearray(blob)
    chunk = info.tables.chunks[1]
    damaged[chunk.offset + 10] ^= 0xFF
    tables = read_blob_tables(io.BytesIO(bytes(damaged)))  # the tables are intact
    assert read_packed(io.BytesIO(bytes(damaged)), tables, 0, 8192) == read_packed(
        io.BytesIO(blob), tables, 0, 8192
    )
    with pytest.raises(FormatError, match=f"chunk at blob offset {chunk.offset}: sha256 mismatch"):
        read_packed(io.BytesIO(bytes(damaged)), tables, 8192, 10)


def test_encode_tables_is_deterministic_and_inverse_of_parse(sample):
    blob, info = sample
    assert encode_tables(info.tables) == tables_bytes(blob, info)
    assert parse_tables(encode_tables(info.tables), blob_size=len(blob)) == info.tables


def test_large_random_layer_round_trip():
    # Several chunks of the default size, with extents that straddle chunk boundaries.
    rng = random.Random(42)
    extents, block, expected = [], 0, {}
    for _ in range(30):
        count = rng.randint(1, 40)
        data = (
            os.urandom(count * BLOCK_SIZE)
            if rng.random() < 0.3
            else text_like(rng.randint(0, 99), count * BLOCK_SIZE)
        )
        extents.append((block, data))
        for i in range(count):
            expected[block + i] = data[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
        block += count + rng.randint(1, 5)
    blob, info = write_blob(extents)
    tables = read_blob_tables(io.BytesIO(blob))
    assert len(tables.chunks) > 3
    for block, data in expected.items():
        assert read_disk_block(blob, tables, block) == data


def test_writer_with_a_thread_pool_writes_the_same_bytes():
    # Reproducibility must not depend on how many threads pack the chunks, nor on their timing.
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(7)
    extents = [(0, text_like(7, 40 * BLOCK_SIZE)), (100, 3), (200, rng.randbytes(300 * BLOCK_SIZE))]
    expected, _ = write_blob(extents)
    with ThreadPoolExecutor(max_workers=3) as pool:
        out = io.BytesIO()
        buffer = bytearray(extents[2][1])
        writer = BlobWriter(out, disk_size=DEFAULT_DISK_SIZE, executor=pool)
        writer.add_data(0, extents[0][1])
        writer.add_zero(100, 3)
        writer.add_data(200, buffer)
        buffer[:] = bytes(len(buffer))  # the caller reuses its buffer: what was added must not change
        writer.finish()
    assert out.getvalue() == expected


# --- format version 2: read hints ---------------------------------------------------------------------

GOLDEN_V2 = (
    "sha256:63316e127788514c8dff01b8a75c92cf5de8a345c4a78b3093b4a0471041e26a",
    "sha256:1780bf732bdd11f39a0dd7ebeb71884720ba5e09bff44677b37bb7a508fba4fa",
)
HINTS = {"metadata": [(3, 2)], "files": [[(5, 2)], [(40, 1)]]}


def write_hinted_blob(metadata=HINTS["metadata"], files=HINTS["files"]):
    out = io.BytesIO()
    writer = BlobWriter(out, disk_size=MiB, chunk_size=8192, hints=True)
    writer.add_data(3, text_like(1, 4 * BLOCK_SIZE))
    writer.add_data(40, text_like(3, BLOCK_SIZE))
    info = writer.finish(metadata=metadata, files=files)
    return out.getvalue(), info


def test_hinted_blob_is_version_2_and_reads_back_its_hints():
    blob, info = write_hinted_blob()
    tables = read_blob_tables(io.BytesIO(blob))
    assert parse_header(blob[:HEADER_SIZE]).version == 2
    assert (tables.version, tables.metadata, tables.files) == (2, ((3, 2),), (((5, 2),), ((40, 1),)))
    assert tables == info.tables and tables.hints_problem == ""
    assert encode_tables(tables) == tables_bytes(blob, info)  # what a node re-encodes to check a cached blob
    assert tables_obj(blob, info)[5:] == [[[3, 2]], [[[5, 2]], [[40, 1]]]]


def test_golden_hinted_blob_bytes():
    blob, info = write_hinted_blob()
    assert info.tables_digest == "sha256:" + hashlib.sha256(tables_bytes(blob, info)).hexdigest()
    assert (info.digest, info.tables_digest) == GOLDEN_V2


def test_a_writer_without_hints_still_writes_version_1():
    blob, info = write_blob([(3, text_like(1, BLOCK_SIZE))], disk_size=MiB, chunk_size=8192)
    assert parse_header(blob[:HEADER_SIZE]).version == 1 and info.tables.version == 1
    with pytest.raises(ValueError, match="need a writer made with hints=True"):
        BlobWriter(io.BytesIO(), disk_size=MiB).finish(metadata=[(0, 1)])


@pytest.mark.parametrize(
    ("metadata", "files", "message"),
    [
        ([(3, 0)], [], "metadata hints: range 0 .* is empty"),
        ([(5, 1), (3, 1)], [], "metadata hints: range 1 .* out of order"),
        ([(255, 2)], [], "extends past the disk's 256 blocks"),
        ([], [[]], "file hint 0: no ranges"),
    ],
)
def test_the_writer_refuses_malformed_hints(metadata, files, message):
    writer = BlobWriter(io.BytesIO(), disk_size=MiB, chunk_size=8192, hints=True)
    with pytest.raises(ValueError, match=message):
        writer.finish(metadata=metadata, files=files)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (set_at([5], {}), "metadata hints: expected an array, got dict"),
        (set_at([5, 0], [3]), "metadata hints: range 0: expected an array of 2 items, got 1"),
        (set_at([5, 0, 1], -1), "metadata hints: range 0: count: -1 is outside"),
        (set_at([6, 1], [[41, 1], [40, 1]]), "file hint 1: range 1 .* out of order"),
        (set_at([6], [[["x", 1]]]), "file hint 0: range 0: block: expected an unsigned integer, got str"),
    ],
)
def test_malformed_hints_are_dropped_not_fatal(mutate, message):
    blob, info = write_hinted_blob()
    obj = tables_obj(blob, info)
    mutate(obj)
    data = pack(obj)
    tables = parse_tables(data)
    assert re.search(message, tables.hints_problem), tables.hints_problem
    assert (tables.metadata, tables.files) == ((), ())
    assert tables.extents == info.tables.extents and tables.chunks == info.tables.chunks  # the blocks stay
    assert encode_tables(tables) == data  # and re-encode to the blob's own bytes


def test_version_2_tables_need_their_hint_items():
    blob, info = write_hinted_blob()
    obj = tables_obj(blob, info)
    with pytest.raises(FormatError, match="expected an array of 7 items, got 5"):
        parse_tables(pack(obj[:5]))
