"""Every invalid argument raises TypeError or ValueError naming it, early, and harms no BO."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyopencl as cl
import pytest
from conftest import AXPY_SRC, INC_SRC, check_budget, pattern

import gpubo

MiB = 1 << 20


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"budget": -1}, ValueError, "budget"),
        ({"budget": "12 parsecs"}, ValueError, "budget"),
        ({"budget": 0}, ValueError, "budget"),
        ({"budget": "0MiB"}, ValueError, "budget"),
        ({"budget": 1.5}, TypeError, "budget"),
        ({"budget": "1.5B"}, ValueError, "budget"),
        ({"store_size": "x"}, ValueError, "store_size"),
        ({"store_size": -4096}, ValueError, "store_size"),
        ({"store_size": [1]}, TypeError, "store_size"),
        ({"store_size": 65536}, ValueError, "store_size"),  # below what a store needs
        ({"device": "gpu"}, gpubo.DeviceError, "device"),  # a spec; this machine has no GPU
        ({"device": 0}, TypeError, "device"),
        ({"store": 123}, TypeError, "store"),
        ({"store": b"/tmp/x"}, TypeError, "store"),
        ({"checksums": 1}, TypeError, "checksums"),
    ],
)
def test_manager_rejects(leak_check: None, kwargs: dict[str, Any], exc: type[Exception], name: str) -> None:
    args: dict[str, Any] = {"budget": "1MiB", "store_size": "8MiB"}
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        gpubo.Manager(**args)


def test_manager_rejects_zero_store_size(leak_check: None) -> None:
    with pytest.raises(ValueError, match="store_size"):
        gpubo.Manager(budget="1MiB", store_size=0)


@pytest.mark.parametrize("size", [1, 4096, 16384])
def test_manager_rejects_tiny_store_size(leak_check: None, size: int) -> None:
    with pytest.raises(ValueError, match="store_size"):
        gpubo.Manager(budget="1MiB", store_size=size)


# -- BO and manager calls -----------------------------------------------------


@pytest.fixture
def world(mgr: gpubo.Manager, build_kernel: Callable) -> Iterator[dict[str, Any]]:
    """A manager with a resident, a swapped and a 6-byte BO, and a kernel; verified after the test."""
    res = mgr.alloc(MiB + 3, name="res")
    res.write(pattern(MiB + 3, 1))
    swp = mgr.alloc(5000, name="swp")
    swp.write(pattern(5000, 2))
    swp.evict()
    six = mgr.alloc(6, name="six")
    six.write(b"sixsix")
    w = {"mgr": mgr, "res": res, "swp": swp, "six": six, "inc": build_kernel(mgr, INC_SRC, "inc")}
    yield w
    before = mgr.stats()
    assert before.bo_count == 3 and before.pinned_bytes == 0
    assert not any(bo.pinned for bo in (res, swp, six))
    assert np.array_equal(res.read(), pattern(MiB + 3, 1))
    assert np.array_equal(swp.read(), pattern(5000, 2))
    assert six.read().tobytes() == b"sixsix"
    check_budget(mgr)


BAD_CALLS: list[tuple[str, Callable[[dict[str, Any]], object], type[Exception], str]] = [
    ("alloc(0)", lambda w: w["mgr"].alloc(0), ValueError, "nbytes"),
    ("alloc(-5)", lambda w: w["mgr"].alloc(-5), ValueError, "nbytes"),
    ("alloc(1.5)", lambda w: w["mgr"].alloc(1.5), TypeError, "nbytes"),
    ("alloc('10')", lambda w: w["mgr"].alloc("10"), TypeError, "nbytes"),
    ("alloc(True)", lambda w: w["mgr"].alloc(True), TypeError, "nbytes"),
    ("alloc(None)", lambda w: w["mgr"].alloc(None), TypeError, "nbytes"),
    ("alloc(name=3)", lambda w: w["mgr"].alloc(10, name=3), TypeError, "name"),
    ("alloc(name=b'x')", lambda w: w["mgr"].alloc(10, name=b"x"), TypeError, "name"),
    ("alloc(priority=4)", lambda w: w["mgr"].alloc(10, priority=4), ValueError, "priority"),
    ("alloc(priority=-1)", lambda w: w["mgr"].alloc(10, priority=-1), ValueError, "priority"),
    ("alloc(priority='0')", lambda w: w["mgr"].alloc(10, priority="0"), TypeError, "priority"),
    ("alloc(priority=1.0)", lambda w: w["mgr"].alloc(10, priority=1.0), TypeError, "priority"),
    ("read(dtype=object)", lambda w: w["res"].read(dtype=object), TypeError, "dtype"),
    ("read(dtype='nonsense')", lambda w: w["res"].read(dtype="nonsense"), TypeError, "dtype"),
    ("swapped.read(dtype=object)", lambda w: w["swp"].read(dtype=object), TypeError, "dtype"),
    ("read(count=-2)", lambda w: w["res"].read(count=-2), ValueError, "count"),
    ("read(count=1.0)", lambda w: w["res"].read(count=1.0), TypeError, "count"),
    ("read(offset beyond)", lambda w: w["swp"].read(offset=5001), ValueError, "offset"),
    ("read(offset=-1)", lambda w: w["res"].read(offset=-1), ValueError, "offset"),
    ("read(offset='0')", lambda w: w["res"].read(offset="0"), TypeError, "offset"),
    ("read(count too large)", lambda w: w["swp"].read(count=5001), ValueError, "count"),
    ("read(int32 count too large)", lambda w: w["six"].read(np.int32, count=2), ValueError, "count"),
    ("read(int32, count=-1) on 6 bytes", lambda w: w["six"].read(np.int32), ValueError, "count"),
    ("read(int32 at offset 3)", lambda w: w["six"].read(np.int32, count=1, offset=3), ValueError, "count"),
    ("write(str)", lambda w: w["res"].write("hello"), TypeError, "data"),
    ("write(list)", lambda w: w["res"].write([1, 2, 3]), TypeError, "data"),
    ("write(int)", lambda w: w["res"].write(5), TypeError, "data"),
    ("write(None)", lambda w: w["res"].write(None), TypeError, "data"),
    (
        "write(non-contiguous)",
        lambda w: w["res"].write(np.arange(100, dtype=np.uint8)[::2]),
        ValueError,
        "data",
    ),
    ("write(transposed)", lambda w: w["swp"].write(np.zeros((4, 5), np.uint8).T), ValueError, "data"),
    ("write(strided memoryview)", lambda w: w["res"].write(memoryview(b"abcdef")[::2]), ValueError, "data"),
    ("write(object array)", lambda w: w["res"].write(np.array([1, None], dtype=object)), TypeError, "data"),
    ("write beyond end", lambda w: w["six"].write(b"1234567"), ValueError, "offset"),
    ("write beyond end at offset", lambda w: w["swp"].write(b"ab", offset=4999), ValueError, "offset"),
    (
        "swapped whole-size write at offset",
        lambda w: w["swp"].write(bytes(5000), offset=1),
        ValueError,
        "offset",
    ),
    ("write(offset=-1)", lambda w: w["res"].write(b"a", offset=-1), ValueError, "offset"),
    ("write(offset=1.0)", lambda w: w["res"].write(b"a", offset=1.0), TypeError, "offset"),
    ("mgr.evict(-1)", lambda w: w["mgr"].evict(-1), ValueError, "nbytes"),
    ("mgr.evict('lots')", lambda w: w["mgr"].evict("lots"), ValueError, "nbytes"),
    ("mgr.evict(1.5)", lambda w: w["mgr"].evict(1.5), TypeError, "nbytes"),
    ("launch(non-kernel)", lambda w: w["mgr"].launch("inc", (1,), None, w["res"]), TypeError, "kernel"),
    ("launch(program)", lambda w: w["mgr"].launch(w["inc"].program, (1,), None), TypeError, "kernel"),
]


@pytest.mark.parametrize(("call", "exc", "name"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_call(world: dict[str, Any], call: Callable, exc: type[Exception], name: str) -> None:
    m = world["mgr"]
    before = m.stats()
    states = [world[k].state for k in ("res", "swp", "six")]
    with pytest.raises(exc, match=name):
        call(world)
    after = m.stats()
    # Early: nothing moved.
    assert after.evictions == before.evictions and after.restores == before.restores
    assert after.bo_count == before.bo_count
    assert [world[k].state for k in ("res", "swp", "six")] == states


def test_launch_with_bo_of_another_manager(
    world: dict[str, Any], make_mgr: Callable[..., gpubo.Manager]
) -> None:
    other = make_mgr(budget="1MiB", store_size="8MiB")
    foreign = other.alloc(4096, name="foreign")
    m = world["mgr"]
    before = m.stats()
    with pytest.raises(ValueError, match=r"argument 1 .*foreign.* another manager"):
        m.launch(world["inc"], (4096,), None, world["swp"], foreign)
    assert m.stats().restores == before.restores  # rejected before anything moved
    assert world["swp"].state is gpubo.State.SWAPPED
    assert foreign.state is gpubo.State.RESIDENT and not foreign.pinned


def test_launch_with_bad_wait_for(world: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="wait_for"):
        world["mgr"].launch(world["inc"], (6,), None, world["six"], wait_for="x")


def test_launch_with_bad_scalar_is_a_gpubo_error(world: dict[str, Any], build_kernel: Callable) -> None:
    """A scalar OpenCL refuses (a Python int has no size) arrives as a DeviceError, cause chained."""
    m = world["mgr"]
    axpy = build_kernel(m, AXPY_SRC, "axpy")
    with pytest.raises(gpubo.DeviceError) as info:
        m.launch(axpy, (1,), None, world["res"], world["swp"], 2, np.int32(1))
    assert isinstance(info.value.__cause__, cl.Error)
    with pytest.raises(gpubo.DeviceError):
        m.launch(axpy, (1,), None, world["res"], world["swp"], np.float64(2), np.int32(1))


def test_bad_input_on_freed_bo_still_names_argument(mgr: gpubo.Manager) -> None:
    bo = mgr.alloc(10)
    bo.free()
    with pytest.raises(ValueError, match="offset"):
        bo.read(offset=-1)
    with pytest.raises(gpubo.BufferFreed):
        bo.read(count=2)
