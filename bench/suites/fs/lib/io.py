#!/usr/bin/env python3
"""Small timed workloads of the fs benchmark; each prints one number.

  io.py create DIR N        create N files in the new directory DIR: open(O_CREAT|O_EXCL),
                            write 4 KiB, close; prints files per second
  io.py stat DIR N          lstat the N files `create` made; prints stats per second
  io.py seqwrite FILE MIB   write MIB MiB in 1 MiB writes, then fsync, then close;
                            prints MB/s (10^6 bytes) over the whole time, fsync included
  io.py seqread FILE        read FILE in 1 MiB reads; prints MB/s
  io.py fio JSON RW         the IOPS of the `RW` (read or write) side of a fio JSON report
  io.py results FILE        the RESULT lines (medians) from the per-run values in FILE

The Python loop costs a few microseconds per call, far below one filesystem operation.
"""
import json
import os
import statistics
import sys
import time

MIB = 1024 * 1024


def name(directory, i):
    return f"{directory}/f{i:06d}"


def create(directory, n):
    os.mkdir(directory)
    buf = os.urandom(4096)
    start = time.monotonic()
    for i in range(n):
        fd = os.open(name(directory, i), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        if os.write(fd, buf) != len(buf):
            raise SystemExit(f"short write to {name(directory, i)}")
        os.close(fd)
    return n / (time.monotonic() - start)


def stat(directory, n):
    start = time.monotonic()
    for i in range(n):
        os.lstat(name(directory, i))
    return n / (time.monotonic() - start)


def seqwrite(path, mib):
    # Incompressible, and a new buffer content per MiB would only cost CPU: the filesystems
    # under test neither compress nor deduplicate.
    buf = os.urandom(MIB)
    start = time.monotonic()
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    for _ in range(mib):
        view = memoryview(buf)
        while view:
            view = view[os.write(fd, view):]
    os.fsync(fd)
    os.close(fd)
    return mib * MIB / 1e6 / (time.monotonic() - start)


def seqread(path):
    total = 0
    start = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    while True:
        chunk = os.read(fd, MIB)
        if not chunk:
            break
        total += len(chunk)
    os.close(fd)
    return total / 1e6 / (time.monotonic() - start)


def fio_iops(path, rw):
    with open(path) as f:
        report = json.load(f)
    job = report["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"fio reported error {job['error']} in {path}")
    return job[rw]["iops"]


# metric, unit, better, peers (the "limit" of seq_write_mbps is the local disk's own sequential
# write bandwidth / 3, one value per run)
METRICS = [
    ("randwrite_4k_sync_iops", "IOPS", "higher", ["glusterfs", "local"]),
    ("randread_4k_iops", "IOPS", "higher", ["glusterfs", "local"]),
    ("seq_write_mbps", "MB/s", "higher", ["glusterfs", "limit"]),
    ("seq_read_mbps", "MB/s", "higher", ["glusterfs", "local"]),
    ("create_4k_files_per_s", "files/s", "higher", ["glusterfs"]),
    ("stat_per_s", "stats/s", "higher", ["glusterfs"]),
    ("untar_rootfs_s", "s", "lower", ["glusterfs"]),
]


# The targets of the issue: (metric, peer) -> (ratio bound, "min" or "max").
TARGETS = {
    ("randwrite_4k_sync_iops", "glusterfs"): (2.0, "min"),
    ("randread_4k_iops", "local"): (0.8, "min"),
    ("seq_write_mbps", "limit"): (0.9, "min"),
    ("seq_read_mbps", "local"): (0.8, "min"),
    ("create_4k_files_per_s", "glusterfs"): (2.0, "min"),
    ("stat_per_s", "glusterfs"): (2.0, "min"),
    ("untar_rootfs_s", "glusterfs"): (0.5, "max"),
}


def results(path):
    """FILE has lines `RUN SIDE METRIC VALUE`. Prints a table for people on stderr."""
    values = {}
    for line in open(path):
        if not line.strip():
            continue
        run, side, metric, value = line.split()
        values.setdefault((metric, side), []).append(float(value))
        if metric == "disk_seq_write_mbps" and side == "local":
            values.setdefault(("seq_write_mbps", "limit"), []).append(float(value) / 3)
    lines = []
    for metric, unit, better, peers in METRICS:
        ours = values.get((metric, "ours"))
        for peer in peers:
            theirs = values.get((metric, peer))
            if not ours or not theirs:
                continue
            o, p = statistics.median(ours), statistics.median(theirs)
            digits = 3 if unit == "s" else 1
            target = TARGETS.get((metric, peer))
            verdict = ""
            if target and p:
                bound, kind = target
                met = o / p >= bound if kind == "min" else o / p <= bound
                verdict = f"target {'>=' if kind == 'min' else '<='} {bound}: {'met' if met else 'MISSED'}"
            print(f"  {metric:24} ours {o:10.{digits}f}  {peer:9} {p:10.{digits}f}  ratio {o / p if p else float('nan'):6.3f}  {verdict}",
                  file=sys.stderr)
            lines.append("RESULT " + json.dumps({
                "bench": "fs", "metric": metric, "unit": unit, "ours": round(o, digits), "peer": peer,
                "peer_value": round(p, digits), "ratio": round(o / p, 3) if p else None, "better": better,
                "runs": min(len(ours), len(theirs))}, separators=(",", ":")))
    return "\n".join(lines)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "create":
        print(f"{create(args[0], int(args[1])):.1f}")
    elif cmd == "stat":
        print(f"{stat(args[0], int(args[1])):.1f}")
    elif cmd == "seqwrite":
        print(f"{seqwrite(args[0], int(args[1])):.1f}")
    elif cmd == "seqread":
        print(f"{seqread(args[0]):.1f}")
    elif cmd == "fio":
        print(f"{fio_iops(args[0], args[1]):.1f}")
    elif cmd == "results":
        print(results(args[0]))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
