"""retain_freed_memory, observed through glibc's own counters in a child process: the setting is
process-wide, so it must not leak into the pytest process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Calls retain_freed_memory(), then mallocs and frees a 64 MiB block and reports, from glibc's
# mallinfo2(), how much of it was mmapped and how much of the heap stayed after the free.
CHILD = r"""
import ctypes, json
from gca_pyg.runtime import retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = retain_freed_memory()
before = libc.mallinfo2()
block = libc.malloc(64 << 20)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "mmapped": during.hblkhd - before.hblkhd,
                  "heap_kept": after.arena - before.arena}))
"""

MIB = 1 << 20


def run_child(malloc_setting, script=CHILD):
    env = {key: value for key, value in os.environ.items() if key != "GCA_PYG_MALLOC"}
    if malloc_setting is not None:
        env["GCA_PYG_MALLOC"] = malloc_setting
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


@glibc_only
def test_freed_memory_stays_in_the_process():
    report = run_child(None)
    assert report["applied"] is True
    assert report["mmapped"] == 0  # a large block comes from the heap, not from mmap
    assert report["heap_kept"] >= 64 * MIB  # and the heap is not trimmed when it is freed


@glibc_only
def test_opt_out_leaves_malloc_alone():
    report = run_child("system")
    assert report["applied"] is False
    assert report["mmapped"] >= 64 * MIB  # glibc's default: large blocks are mmapped
    assert report["heap_kept"] < 64 * MIB


# Retains freed memory, takes the reference with a small heap, then frees a 256 MiB block that was
# touched: the process keeps it resident until FreedMemoryLimit.check() hands it back.
LIMIT_CHILD = r"""
import ctypes, json
from gca_pyg.runtime import FreedMemoryLimit, retain_freed_memory, _resident_bytes

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
retain_freed_memory()
limit = FreedMemoryLimit(ratio=1.25)
first = limit.check()
size = 256 << 20
block = libc.malloc(size)
ctypes.memset(block, 1, size)
libc.free(block)
kept = _resident_bytes()
released = limit.check()
print(json.dumps({"first": first, "released": released, "kept": kept,
                  "after": _resident_bytes(), "again": limit.check()}))
"""


@glibc_only
def test_freed_memory_is_handed_back_when_it_grows_past_the_limit():
    report = run_child(None, LIMIT_CHILD)
    assert report["first"] is False  # the first call only takes the reference
    assert report["released"] is True
    assert report["kept"] - report["after"] >= 200 * MIB  # the freed block left the process
    assert report["again"] is False  # back under the limit: nothing more to do


def test_a_limit_must_leave_room():
    from gca_pyg.runtime import FreedMemoryLimit

    with pytest.raises(ValueError, match="ratio above 1"):
        FreedMemoryLimit(ratio=1.0)
