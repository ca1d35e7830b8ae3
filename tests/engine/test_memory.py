"""engine/memory.py: handing a mapped file's pages back to the kernel, and freed heap back to the OS."""

from __future__ import annotations

import mmap
import sys

import pytest

from lcm_live.engine.memory import page_out_file, paging_out, release_freed_memory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise are Linux's")


def mapping_rss_kb(path) -> int:
    """Resident kB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = len(fields) >= 6 and fields[-1] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@linux
def test_page_out_drops_the_resident_pages_of_a_mapped_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x01" * (8 << 20))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert sum(mapped[i] for i in range(0, len(mapped), 4096)) == (8 << 20) // 4096  # touch every page
        before = mapping_rss_kb(path.resolve())
        advised = page_out_file(path)
        if advised == 0:
            pytest.skip("this kernel does not take MADV_PAGEOUT")
        assert advised >= 8 << 20
        assert before >= 7 * 1024 and mapping_rss_kb(path.resolve()) < before / 4
        assert mapped[12345] == 1  # the data is still there: the kernel reads it back on demand


def test_page_out_of_an_unmapped_file_does_nothing(tmp_path):
    path = tmp_path / "never-mapped.bin"
    path.write_bytes(b"x")
    assert page_out_file(path) == 0
    release_freed_memory()  # no error, glibc or not


@linux
def test_paging_out_keeps_a_file_being_read_from_staying_resident(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x02" * (16 << 20))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with paging_out(path, interval=0.01) as advised:
            total = sum(mapped[i] for i in range(0, len(mapped), 4096))  # a reader going through the file
        assert total == 2 * (16 << 20) // 4096  # every byte read was right
        if advised[0] == 0:
            pytest.skip("this kernel does not take MADV_PAGEOUT")
        assert mapping_rss_kb(path.resolve()) < 4 * 1024  # at the end, nothing of the 16 MB stays resident
