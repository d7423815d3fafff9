"""The merged index of a layer stack, against both twins (dadi._native and the pure-Python reference).

Each twin is a separate instance of dadi/format/index.py loaded with DADI_NATIVE set, so the
environment switch itself is exercised and the two never share state.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from array import array
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dadi
import dadi.format.index as default_index
from dadi.errors import FormatError
from dadi.format.model import Extent

INDEX_PATH = Path(default_index.__file__)
NATIVE_BUILT = any(Path(dadi.__file__).parent.glob("_native*.so"))
BS = 4096
ZERO = default_index.ZERO


def load_twin(choice: str, name: str | None = None) -> ModuleType:
    """A fresh instance of the index module, imported with DADI_NATIVE=choice."""
    saved = os.environ.get("DADI_NATIVE")
    os.environ["DADI_NATIVE"] = choice
    try:
        module_name = name or f"dadi.format._index_twin_{choice}"
        spec = importlib.util.spec_from_file_location(module_name, INDEX_PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while building classes
        spec.loader.exec_module(module)
        return module
    finally:
        if saved is None:
            del os.environ["DADI_NATIVE"]
        else:
            os.environ["DADI_NATIVE"] = saved


PYTHON_TWIN = load_twin("0")
NATIVE_TWIN = load_twin("1") if NATIVE_BUILT else None
TWINS = [PYTHON_TWIN] + ([NATIVE_TWIN] if NATIVE_TWIN is not None else [])


@pytest.fixture(params=["python", "native"])
def twin(request) -> ModuleType:
    if request.param == "native":
        if NATIVE_TWIN is None:
            pytest.skip("dadi._native is not built (make native)")
        return NATIVE_TWIN
    return PYTHON_TWIN


def pieces(twin: ModuleType, stack, offset: int, length: int, **kw) -> list[tuple[int, int, int, int]]:
    index = twin.MergedIndex(stack, **kw)
    return [(p.disk_offset, p.length, p.layer, p.packed_offset) for p in index.lookup(offset, length)]


# --- which twin is loaded -------------------------------------------------------------------------


def test_native_backend_is_loaded_where_it_was_built():
    if not NATIVE_BUILT:
        pytest.skip("dadi._native is not built (make native)")
    expected = "python" if os.environ.get("DADI_NATIVE") == "0" else "native"
    assert default_index.backend == expected
    assert NATIVE_TWIN is not None and NATIVE_TWIN.backend == "native"
    assert NATIVE_TWIN._kernel.__name__ == "dadi._native"
    assert PYTHON_TWIN.backend == "python"


def test_missing_native_module_falls_back_silently_unless_forced(monkeypatch):
    monkeypatch.setitem(sys.modules, "dadi._native", None)  # makes `from dadi import _native` fail
    assert load_twin("", "dadi.format._index_twin_fallback").backend == "python"
    with pytest.raises(ImportError):
        load_twin("1", "dadi.format._index_twin_forced")


# --- hand-written stacks --------------------------------------------------------------------------


def test_upper_layer_overrides_lower(twin):
    stack = [[Extent(0, 4, 0)], [Extent(1, 2, 0)]]
    assert pieces(twin, stack, 0, 4 * BS) == [
        (0, BS, 0, 0),
        (BS, 2 * BS, 1, 0),
        (3 * BS, BS, 0, 3 * BS),  # the lower extent's tail keeps its own packed position
    ]


def test_partial_overlaps_split_lower_extents(twin):
    stack = [
        [Extent(0, 4, 0), Extent(10, 4, 4 * BS)],
        [Extent(2, 10, 8 * BS)],
    ]
    index = twin.MergedIndex(stack)
    assert list(index.iter_segments()) == [
        (0, 2 * BS, 0, 0),
        (2 * BS, 10 * BS, 1, 8 * BS),
        (12 * BS, 2 * BS, 0, 6 * BS),
    ]
    assert index.segments == 3 and index.layers == 2


def test_zero_extent_hides_lower_data(twin):
    stack = [[Extent(0, 8, 0)], [Extent(2, 2, 0, zero=True)]]
    assert pieces(twin, stack, 0, 8 * BS) == [
        (0, 2 * BS, 0, 0),
        (2 * BS, 2 * BS, ZERO, 0),
        (4 * BS, 4 * BS, 0, 4 * BS),
    ]


def test_holes_read_as_zero_and_merge_with_zero_extents(twin):
    stack = [[Extent(4, 2, 0, zero=True), Extent(6, 1, 0)]]
    # hole 0..4 and the zero extent 4..6 are one run of zeros; the tail past block 7 is a hole again
    assert pieces(twin, stack, 0, 10 * BS) == [
        (0, 6 * BS, ZERO, 0),
        (6 * BS, BS, 0, 0),
        (7 * BS, 3 * BS, ZERO, 0),
    ]


def test_unaligned_byte_ranges(twin):
    stack = [[Extent(1, 3, 5 * BS)], [Extent(2, 1, 0)]]
    assert pieces(twin, stack, BS + 100, 2 * BS) == [
        (BS + 100, BS - 100, 0, 5 * BS + 100),
        (2 * BS, BS, 1, 0),
        (3 * BS, 100, 0, 7 * BS),
    ]
    assert pieces(twin, stack, 2 * BS + 7, 9) == [(2 * BS + 7, 9, 1, 7)]
    assert pieces(twin, stack, 17, 5) == [(17, 5, ZERO, 0)]


def test_range_crossing_many_segments(twin):
    # layer 0 maps every even block, layer 1 every block divisible by 4 (as zeros every 8th)
    lower = [Extent(b, 1, (b // 2) * BS) for b in range(0, 2000, 2)]
    upper = [Extent(b, 1, 0, zero=True) if b % 8 == 0 else Extent(b, 1, (b // 4) * BS)
             for b in range(0, 2000, 4)]
    index = twin.MergedIndex([lower, upper])
    result = index.lookup(BS // 2, 1999 * BS)
    assert sum(p.length for p in result) == 1999 * BS
    assert result[0].disk_offset == BS // 2 and result[-1].disk_offset + result[-1].length == 1999 * BS + BS // 2
    for p in result:
        block = p.disk_offset // BS
        if block % 8 == 0 or block % 2 == 1:
            assert p.layer == ZERO
        elif block % 4 == 0:
            assert (p.layer, p.packed_offset) == (1, (block // 4) * BS)
        else:
            assert (p.layer, p.packed_offset) == (0, (block // 2) * BS)
    # blocks 0-1 are zeros; then every 8 blocks: data(2) zeros(3) data(4) zeros(5) data(6) zeros(7, 0, 1)
    assert len(result) == 1 + 6 * 250


def test_adjacent_continuing_extents_become_one_segment(twin):
    stack = [[Extent(0, 2, 0), Extent(2, 2, 2 * BS), Extent(4, 2, 9 * BS)]]
    index = twin.MergedIndex(stack)
    assert list(index.iter_segments()) == [(0, 4 * BS, 0, 0), (4 * BS, 2 * BS, 0, 9 * BS)]


def test_lookup_blocks_reports_layer_and_packed_offset(twin):
    index = twin.MergedIndex([[Extent(0, 4, 0)], [Extent(1, 1, 0), Extent(2, 1, 0, zero=True)]],
                             disk_size=8 * BS)
    result = index.lookup_blocks(array("Q", range(8)))
    assert list(result.layers) == [0, 1, ZERO, 0, ZERO, ZERO, ZERO, ZERO]
    assert list(result.packed_offsets) == [0, 0, 0, 3 * BS, 0, 0, 0, 0]
    # any uint64 buffer or iterable works, and `out` is filled in place
    out = twin.BlockLocations(array("q", [9, 9]), array("q", [9, 9]))
    assert twin.MergedIndex([[Extent(0, 4, 0)]]).lookup_blocks([3, 2**64 - 2], out) is out
    assert list(out.layers) == [0, ZERO] and list(out.packed_offsets) == [3 * BS, 0]
    assert list(index.lookup_blocks(memoryview(array("L", [1]))).layers) == [1]


def test_empty_stack_and_empty_range(twin):
    index = twin.MergedIndex([], disk_size=4 * BS)
    assert index.segments == 0 and index.layers == 0
    assert pieces(twin, [], 0, 4 * BS, disk_size=4 * BS) == [(0, 4 * BS, ZERO, 0)]
    assert index.lookup(BS, 0) == []
    assert list(index.lookup_blocks(array("Q")).layers) == []


def test_bad_ranges_are_refused(twin):
    index = twin.MergedIndex([[Extent(0, 1, 0)]], disk_size=4 * BS)
    with pytest.raises(ValueError, match="past the disk"):
        index.lookup(3 * BS, BS + 1)
    with pytest.raises(ValueError, match=">= 0"):
        index.lookup(-1, 10)
    with pytest.raises(ValueError, match=">= 0"):
        index.lookup(0, -10)
    with pytest.raises(ValueError, match=r"block 4 \(at position 1\) is past the end of the disk"):
        index.lookup_blocks([0, 4])
    with pytest.raises(ValueError, match="0..2"):
        index.lookup_blocks([-1])
    with pytest.raises(TypeError, match="uint64"):
        index.lookup_blocks(array("d", [1.0]))


@pytest.mark.parametrize(
    ("stack", "message"),
    [
        ([[Extent(0, 2, 0), Extent(1, 2, 0)]], "layer 0, extent 1 .*overlaps"),
        ([[], [Extent(5, 1, 0), Extent(2, 1, 0)]], "layer 1, extent 1 .*sorted"),
        ([[Extent(0, 0, 0)]], "layer 0, extent 0 .*count > 0"),
        ([[Extent(6, 4, 0)]], "layer 0, extent 0 .*past the disk"),
        ([[Extent(0, 1, -BS)]], "layer 0, extent 0 .*packed offset"),
    ],
)
def test_malformed_extent_tables_are_refused(twin, stack, message):
    with pytest.raises(FormatError, match=message):
        twin.MergedIndex(stack, disk_size=8 * BS)


# --- random stacks: both twins against a per-byte reference model ---------------------------------

SMALL_BS = 4  # tiny blocks keep a per-byte model cheap while every code path stays the same
DISK_BLOCKS = 48


@st.composite
def layer_tables(draw) -> list[Extent]:
    extents: list[Extent] = []
    block = draw(st.integers(0, 6))
    packed = 0
    for _ in range(draw(st.integers(0, 7))):
        count = draw(st.integers(1, 7))
        if block + count > DISK_BLOCKS:
            break
        if draw(st.integers(0, 3)) == 0:
            extents.append(Extent(block, count, 0, zero=True))
        else:
            packed += draw(st.sampled_from([0, 0, SMALL_BS]))  # a gap in the packed stream: not coalesced
            extents.append(Extent(block, count, packed))
            packed += count * SMALL_BS
        block += count + draw(st.sampled_from([0, 0, 1, 3]))
    return extents


def reference_block(stack: list[list[Extent]], block: int) -> tuple[int, int]:
    """(layer, packed offset) of one block: the slow, obviously right top-down search."""
    for layer in range(len(stack) - 1, -1, -1):
        for extent in stack[layer]:
            if extent.block <= block < extent.block + extent.count:
                if extent.zero:
                    return ZERO, 0
                return layer, extent.offset + (block - extent.block) * SMALL_BS
    return ZERO, 0


def expand(result) -> list[tuple[int, int]]:
    """Pieces as one (layer, packed byte) per disk byte."""
    return [(p.layer, 0 if p.layer == ZERO else p.packed_offset + i) for p in result for i in range(p.length)]


@settings(max_examples=300, deadline=None)
@given(
    stack=st.lists(layer_tables(), max_size=4),
    offset=st.integers(0, DISK_BLOCKS * SMALL_BS),
    length=st.integers(0, DISK_BLOCKS * SMALL_BS),
)
def test_twins_agree_with_reference_model(stack, offset, length):
    disk_size = DISK_BLOCKS * SMALL_BS
    length = min(length, disk_size - offset)
    per_block = [reference_block(stack, b) for b in range(DISK_BLOCKS)]
    per_byte = [(layer, 0 if layer == ZERO else packed + o % SMALL_BS)
                for o, (layer, packed) in ((o, per_block[o // SMALL_BS]) for o in range(disk_size))]
    results = []
    for twin in TWINS:
        index = twin.MergedIndex(stack, block_size=SMALL_BS, disk_size=disk_size)
        result = index.lookup(offset, length)
        # the pieces tile the range, and no two neighbours continue each other
        assert [p.disk_offset for p in result] == [offset + sum(q.length for q in result[:i])
                                                   for i in range(len(result))]
        assert all(p.length > 0 for p in result)
        for a, b in zip(result, result[1:], strict=False):
            assert not (a.layer == b.layer and (a.layer == ZERO or a.packed_offset + a.length == b.packed_offset))
        assert expand(result) == per_byte[offset:offset + length]
        blocks = index.lookup_blocks(array("Q", range(DISK_BLOCKS)))
        assert list(zip(blocks.layers, blocks.packed_offsets, strict=True)) == per_block
        segments = list(index.iter_segments())
        mapped = [b for b in range(DISK_BLOCKS) if any(e.block <= b < e.block + e.count for t in stack for e in t)]
        assert [o // SMALL_BS + i for o, n, _, _ in segments for i in range(n // SMALL_BS)] == mapped
        results.append(([(p.disk_offset, p.length, p.layer, p.packed_offset) for p in result], list(blocks.layers), list(blocks.packed_offsets), segments))
    assert all(r == results[0] for r in results)


# --- the kernel entry points on bad input: the C twin must refuse, never read out of bounds --------

KERNELS = [PYTHON_TWIN._PythonKernel] + ([NATIVE_TWIN._kernel] if NATIVE_TWIN is not None else [])


def table(n: int = 3):
    return array("Q", range(0, 2 * n, 2)), array("Q", range(1, 2 * n, 2)), array("q", [0] * n), array("q", [0] * n)


def call_lookup(kernel, *, block_size=BS, limit=100, blocks=None, out_layers=None, out_offsets=None,
                columns=None):
    blocks = array("Q", [0, 1, 2]) if blocks is None else blocks
    out_layers = array("q", [0] * 3) if out_layers is None else out_layers
    out_offsets = array("q", [0] * 3) if out_offsets is None else out_offsets
    kernel.lookup_blocks(*(columns or table()), block_size, limit, blocks, out_layers, out_offsets)
    return out_layers, out_offsets


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: getattr(k, "__name__", "python"))
def test_kernel_answers_a_good_call(kernel):
    layers, offsets = call_lookup(kernel, blocks=array("Q", [0, 1, 4]))
    assert list(layers) == [0, ZERO, 0] and list(offsets) == [0, 0, 0]
    assert kernel.find_segments(*table()[:2], 1, 5) == (1, 3)
    assert kernel.find_segments(*table()[:2], 5, 1) == (3, 3)  # an empty range is an empty slice


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: getattr(k, "__name__", "python"))
@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"blocks": array("d", [0.0, 1.0, 2.0])}, TypeError, "blocks must be"),
        ({"blocks": array("i", [0, 1, 2, 3, 4, 5])}, TypeError, "blocks must be"),
        ({"blocks": array("q", [0, 1, 2])}, TypeError, "blocks must be"),
        ({"blocks": [0, 1, 2]}, TypeError, "blocks must be"),
        ({"blocks": bytes(24)}, TypeError, "blocks must be"),
        ({"out_layers": bytes(24)}, TypeError, "out_layers must be"),
        ({"out_offsets": array("Q", [0, 0, 0])}, TypeError, "out_offsets must be"),
        ({"out_layers": array("q", [0, 0])}, ValueError, "same length"),
        ({"blocks": array("Q", [0, 1, 2, 3])}, ValueError, "same length"),
        ({"columns": table()[:3] + (array("q", [0]),)}, ValueError, "same length"),
        ({"columns": (array("q", [0, 2, 4]),) + table()[1:]}, TypeError, "starts must be"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"limit": -1}, OverflowError, "limit"),
        ({"limit": 2}, ValueError, r"block 2 \(at position 2\)"),
        ({"blocks": memoryview(bytes(48)).cast("Q", (3, 2))}, TypeError, "blocks must be"),
    ],
)
def test_kernel_refuses_bad_buffers(kernel, arguments, error, message):
    with pytest.raises(error, match=message):
        call_lookup(kernel, **arguments)


def test_native_kernel_refuses_unaligned_buffers():
    if NATIVE_TWIN is None:
        pytest.skip("dadi._native is not built (make native)")
    unaligned = memoryview(bytearray(8 * 3 + 1))[1:].cast("Q")
    with pytest.raises(ValueError, match="aligned"):
        call_lookup(NATIVE_TWIN._kernel, blocks=unaligned)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: getattr(k, "__name__", "python"))
def test_find_segments_refuses_bad_buffers(kernel):
    starts, ends, _, _ = table()
    with pytest.raises(ValueError, match="same length"):
        kernel.find_segments(starts, array("Q", [1]), 0, 1)
    with pytest.raises(TypeError, match="ends must be"):
        kernel.find_segments(starts, "abc", 0, 1)
    with pytest.raises(OverflowError, match="first_block"):
        kernel.find_segments(starts, ends, -1, 1)
