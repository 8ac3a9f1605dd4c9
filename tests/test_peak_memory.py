"""benchmarks.metrics.PeakRSS on a process tree: shared pages count once, private pages of every child count."""
from __future__ import annotations

import subprocess
import sys
import time

from benchmarks.metrics import PeakRSS

MIB = 2**20

# A parent touches SHARED_MIB, forks three children that keep those pages shared, and one child of them also
# touches PRIVATE_MIB of its own; each writes a line when ready and then sleeps until it is killed.
TREE = r"""
import os, sys, time
shared = bytearray(os.urandom(1 << 20) * {shared})
pids = []
for i in range(3):
    pid = os.fork()
    if pid == 0:
        private = bytearray(os.urandom(1 << 20) * ({private} if i == 0 else 0))
        os.write(1, b"ready\n")  # one write: lines from four processes never interleave
        time.sleep(120)
        os._exit(0)
    pids.append(pid)
os.write(1, b"ready\n")
time.sleep(120)
"""
SHARED_MIB = 256
PRIVATE_MIB = 128


def test_a_forked_tree_counts_shared_pages_once_and_private_pages_of_each_child():
    proc = subprocess.Popen([sys.executable, "-c", TREE.format(shared=SHARED_MIB, private=PRIVATE_MIB)],
                            stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(4):
            assert proc.stdout.readline() == "ready\n"
        time.sleep(0.2)
        with PeakRSS(interval_s=0.05, pid=proc.pid, children=True) as mem:
            time.sleep(0.3)
        # Summed RSS would be about 4 x 256 + 128 MiB; the tree really holds about 256 + 128 MiB (+ interpreters).
        assert (SHARED_MIB + PRIVATE_MIB) * MIB <= mem.peak_bytes < (2 * SHARED_MIB + PRIVATE_MIB) * MIB
    finally:
        proc.kill()
        proc.wait()
