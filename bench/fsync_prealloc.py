#!/usr/bin/env python3
"""What an fdatasync costs when the write grows the file, beside one that
overwrites zeros already written (what the store's writer does since it
keeps zeros ahead of a segment's end).

    python3 bench/fsync_prealloc.py [DIR]

Writes 5 000 records of 14.1 KB (three 4.7 KB messages, a batch of the
group commit), each followed by fdatasync, into a fresh file in DIR
(default: the current directory), twice each way, alternated. Prints
syncs per second and the process's CPU (user + system) per sync.
Bounded: 5 000 syncs a run, the file removed at the end.
"""
import os
import resource
import sys
import time

RECORD = b"x" * (4700 * 3)
N = 5000


def run(directory, zeros_ahead):
    path = os.path.join(directory, f"fsync-prealloc-{os.getpid()}.tmp")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if zeros_ahead:
            zero = b"\0" * (1 << 20)
            for _ in range(N * len(RECORD) // len(zero) + 1):
                os.write(fd, zero)
            os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_SET)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
        for _ in range(N):
            os.write(fd, RECORD)
            os.fdatasync(fd)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    finally:
        os.close(fd)
        os.unlink(path)
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    print(f"zeros_ahead={zeros_ahead} syncs_per_sec={N / (t1 - t0):.0f} cpu_us_per_sync={cpu / N * 1e6:.1f}")


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else "."
    for _ in range(2):
        run(directory, False)
        run(directory, True)


if __name__ == "__main__":
    main()
