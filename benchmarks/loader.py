"""Data-loader throughput: `ActivationDataModule.train_dataloader()` as training uses it.

The bar: the data path is never the bottleneck, i.e. the HDF5 datamodule
delivers at least 5x what the fastest trainer consumes, on a file larger than the page cache can
hold hot, with bounded memory. This script writes (or reuses) an activation file, iterates the
train loader (its defaults: batch 4096, 512-row block shuffle; `--num-workers` as given) and prints
rows/s, MB/s, the ratio to `--trainer-rate` and the memory the loader holds.

    python benchmarks/loader.py                               # 4 GB float32 file, cold + warm
    python benchmarks/loader.py --dtype float16 --num-workers 0,1,2
    python benchmarks/loader.py --path /data/big.h5 --size-gb 40  # bigger than RAM, for real

**Cold reads.** A file larger than RAM cannot stay in the page cache, so every block of an epoch
is read from disk. On a machine with more RAM than the file, "cold" emulates that: before the run
(and every `--evict-every` batches) the file's pages are dropped with
``posix_fadvise(POSIX_FADV_DONTNEED)``, so each block's first read goes to the disk. One epoch
reads each block once, so eviction at the start is enough for `--batches` up to an epoch;
`--evict-every 1` also drops the batch the loader asked the kernel to read ahead (a pessimistic
bound). On a VM the "disk" may itself be cached by the host, so cold numbers are noisy
(benchmarks/RESULTS.md, "HDF5 layout"). For the real thing pass a `--size-gb` above RAM (writing runs at ~0.2-0.3
GB/s). "Warm" first reads the whole file once, so every read is served from the page cache.

**Memory.** Each (mode, workers) run is its own subprocess. "mem" is what the process and its live
DataLoader workers hold (the sum of their PSS, so pages a forked worker shares with its parent
count once) above the level just before iteration, after 10 %, 50 % and 100 % of the batches;
"peak" is the growth of the process's max RSS (VmHWM, reset before iteration); "worker" the max
RSS of the largest worker (``RUSAGE_CHILDREN``, shared pages included). The page cache is not
RSS: bounded memory means these stay at a few batches however large the file and however many
batches are read.

The file is written through `dictlearn.data.open_for_write` (what `write_datasets` uses) slab by
slab, so a file bigger than RAM can be written: one contiguous, uncompressed dataset ``acts``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
SLAB_ROWS = 32768


# --------------------------------------------------------------------- the file
def write_file(path: str, size_gb: float, d_in: int, dtype: str) -> None:
    """`size_gb` of Gaussian rows `[n, d_in]` in `dtype`, written slab by slab (bounded memory)."""
    import numpy as np
    import torch

    from dictlearn.data import open_for_write
    from dictlearn.data.h5 import BF16_ATTR

    rows = max(1, int(size_gb * 1e9 / (d_in * ITEMSIZE[dtype])))
    slab = torch.from_numpy(np.random.default_rng(0).standard_normal((SLAB_ROWS, d_in), dtype=np.float32))
    stored = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]
    with open_for_write(path, {"d_in": d_in}) as f:
        ds = f.create_dataset("acts", shape=(rows, d_in), dtype=stored)  # contiguous, as harvest writes
        if dtype == "bfloat16":
            ds.attrs["dtype"] = BF16_ATTR
        for start in range(0, rows, SLAB_ROWS):
            n = min(SLAB_ROWS, rows - start)
            values = slab[:n] + start / rows  # rows differ from slab to slab
            if dtype == "bfloat16":
                array = values.to(torch.bfloat16).view(torch.uint16).numpy()
            else:
                array = values.numpy().astype(stored)
            ds[start : start + n] = array


def evict(path: str) -> None:
    """Drop the file's pages from the page cache (clean pages only: the writer fsynced them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_up(path: str) -> None:
    """Read the whole file once so that it sits in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def resident_fraction(path: str) -> float | None:
    """Fraction of the file's pages in the page cache (util-linux `fincore`), None without it."""
    if shutil.which("fincore") is None:
        return None
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                          capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        return None
    return int(done.stdout.split()[0]) / os.path.getsize(path)


# --------------------------------------------------------------------- memory
def _status_kib(pid: int | str, field: str) -> int:
    """A `kB` field of /proc/<pid>/status or smaps_rollup (0 if the process is gone)."""
    name = "smaps_rollup" if field == "Pss" else "status"
    try:
        lines = Path(f"/proc/{pid}/{name}").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return next((int(line.split()[1]) for line in lines if line.startswith(field + ":")), 0)


def children() -> list[int]:
    """Pids of this process's live children (DataLoader workers)."""
    me, pids = os.getpid(), []
    for task in os.listdir(f"/proc/{me}/task"):
        try:
            pids += [int(pid) for pid in Path(f"/proc/{me}/task/{task}/children").read_text().split()]
        except FileNotFoundError:
            continue
    return pids


def footprint() -> int:
    """Bytes of memory held by this process and its workers: the sum of their PSS.

    PSS splits pages shared between a forked worker and its parent (torch's libraries, ...), so
    the sum counts them once; RSS would count them in every process.
    """
    return 1024 * sum(_status_kib(pid, "Pss") for pid in [os.getpid(), *children()])


def max_rss(who: int) -> int:
    return resource.getrusage(who).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------- one run (in a subprocess)
def worker(args) -> dict:
    """Iterate the train loader for `args.batches` batches; times and memory as a dict."""
    import torch

    from dictlearn import ActivationDataModule

    torch.set_num_threads(args.threads)
    data = ActivationDataModule(args.path, batch_size=args.batch_size, num_workers=args.num_workers)
    loader = data.train_dataloader()
    n_batches = min(args.batches or len(loader), len(loader))
    checkpoints = {max(1, n_batches // 10): "mem_10", max(1, n_batches // 2): "mem_50", n_batches: "mem_100"}
    if args.mode == "cold":
        evict(args.path)
    resident = resident_fraction(args.path)
    base, rss_base, has_peak = footprint(), _status_kib("self", "VmRSS"), reset_peak_rss()
    result = {"resident_before": resident, "rows": 0, "batches": n_batches}
    times, iterator = [], iter(loader)
    start = time.perf_counter()
    for i in range(n_batches):
        if args.mode == "cold" and args.evict_every and i and i % args.evict_every == 0:
            evict(args.path)
        before = time.perf_counter()
        x, _ = next(iterator)
        times.append(time.perf_counter() - before)
        result["rows"] += len(x)
        if i + 1 in checkpoints:
            result[checkpoints[i + 1]] = footprint() - base
    result["wall"] = time.perf_counter() - start
    del x
    iterator.close()  # ends the epoch: workers exit, so RUSAGE_CHILDREN includes them
    return result | {
        "median_batch": statistics.median(times),
        "peak": 1024 * (_status_kib("self", "VmHWM") - rss_base) if has_peak else None,
        "worker_maxrss": max_rss(resource.RUSAGE_CHILDREN) if args.num_workers else None,
        "load": os.getloadavg()[0],
    }


def run_worker(args, mode: str, num_workers: int) -> dict:
    command = [
        sys.executable, __file__, "--worker", "--mode", mode, "--path", args.path,
        "--num-workers", str(num_workers), "--batches", str(args.batches), "--batch-size",
        str(args.batch_size), "--threads", str(args.threads), "--evict-every", str(args.evict_every),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run with {num_workers} workers failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------- main
def report_line(mode: str, num_workers: int, r: dict, row_bytes: int, trainer_rates: list[float]) -> str:
    rate = r["rows"] / r["wall"]
    median_rate = r["rows"] / r["batches"] / r["median_batch"]
    ratios = "".join(f"{rate / t:>10.1f}x" for t in trainer_rates)
    resident = "-" if r["resident_before"] is None else f"{r['resident_before']:.0%}"
    mib = [f"{r[k] / 2**20:>9.0f}" if r[k] is not None else f"{'-':>9}"
           for k in ("mem_10", "mem_50", "mem_100", "peak", "worker_maxrss")]
    return (f"{mode:<5}{num_workers:>8}{resident:>8}{rate:>10,.0f}{median_rate:>10,.0f}"
            f"{rate * row_bytes / 1e6:>7,.0f}{ratios}{''.join(mib)}{r['load']:>6.1f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", help="activation file to read; written first (and kept) if missing."
                        " Default: a temporary file, removed at the end")
    parser.add_argument("--size-gb", type=float, default=4.0, help="size of a file to write")
    parser.add_argument("--d-in", type=int, default=512, help="row width of a file to write")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="stored dtype of a file to write")
    parser.add_argument("--batch-size", type=int, default=4096, help="the datamodule's default")
    parser.add_argument("--batches", type=int, default=0, help="batches per run; 0 = one epoch")
    parser.add_argument("--num-workers", default="0", help="comma-separated DataLoader worker counts")
    parser.add_argument("--modes", default="cold,warm", help="cold (pages evicted first), warm (file cached)")
    parser.add_argument("--evict-every", type=int, default=0,
                        help="cold runs: evict the file again every N batches (0: only before the run)")
    parser.add_argument("--trainer-rate", default="30000,300000",
                        help="comma-separated rows/s a trainer consumes; ratios are printed against each")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, as in training")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        args.num_workers = int(args.num_workers)
        print(json.dumps(worker(args)))
        return
    trainer_rates = [float(t) for t in args.trainer_rate.split(",") if t]
    folder = None
    if args.path is None:
        folder = tempfile.mkdtemp(prefix="dictlearn-loader-")
        args.path = str(Path(folder) / "acts.h5")
    try:
        if not os.path.exists(args.path):
            import dictlearn.data  # noqa: F401  (imports outside the timed write)

            start = time.perf_counter()
            write_file(args.path, args.size_gb, args.d_in, args.dtype)
            seconds = time.perf_counter() - start
            print(f"wrote {args.path}: {os.path.getsize(args.path) / 1e9:.2f} GB in {seconds:.0f} s"
                  f" ({os.path.getsize(args.path) / 1e9 / seconds:.2f} GB/s)", flush=True)
        benchmark(args, trainer_rates)
    finally:
        if folder is not None:
            shutil.rmtree(folder)


def benchmark(args, trainer_rates: list[float]) -> None:
    import torch

    from dictlearn.data import H5Array

    array = H5Array(args.path, "acts")
    row_bytes = array.d * 4  # delivered as float32
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    print(f"{args.path}: {os.path.getsize(args.path) / 1e9:.2f} GB ({memory_gb:.0f} GB RAM), {array.n_rows:,}"
          f" rows, d_in {array.d}, stored {array.stored_dtype}; batch {args.batch_size}, torch"
          f" {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores; cold runs evict the file"
          f" {f'every {args.evict_every} batches' if args.evict_every else 'before the run'}")
    if os.path.getsize(args.path) > 1e9 * memory_gb:
        print("the file is larger than RAM: every run reads from disk; 'warm' cannot hold it in the cache")
    print("rows/s: rows / wall time from iter() to the last batch; median: batch size / median wait for a"
          " batch; MB/s: float32 delivered; mem: MiB (PSS of process + workers) above the start after"
          " 10/50/100 % of the batches; peak: max-RSS growth of the process; worker: max RSS of a worker")
    rates = "".join(f"{'/ ' + format(t, ',.0f'):>11}" for t in trainer_rates)
    print(f"{'mode':<5}{'workers':>8}{'cached':>8}{'rows/s':>10}{'median':>10}{'MB/s':>7}{rates}"
          f"{'mem 10%':>9}{'mem 50%':>9}{'mem 100%':>9}{'peak':>9}{'worker':>9}{'load':>6}")
    for num_workers in [int(w) for w in args.num_workers.split(",") if w]:
        for mode in args.modes.split(","):
            if mode == "warm" and os.path.getsize(args.path) < 1e9 * memory_gb:
                warm_up(args.path)
            result = run_worker(args, mode, num_workers)
            print(report_line(mode, num_workers, result, row_bytes, trainer_rates), flush=True)


if __name__ == "__main__":
    main()
