"""`iwae-pipeline bench --scale`: what the control plane costs, at two sizes, so that its growth shows.

On real code, through the real commands (each a process of its own, as a user runs them), on a
local Ray against a real S3 server (moto, the test suite's) behind a counting proxy
(:mod:`pipeline.s3proxy`) that sees every request of every process, the Ray workers' included:

- ``sweep scale_N`` (:mod:`jobs.scale`: N tiny real runs, each then scored on 1,000 test images)
  from an empty location: wall seconds, the driver's CPU seconds per run, storage requests per run,
  and the lease requests per minute while training ran, with the number of runs in flight;
- the same ``sweep`` again, with nothing left to do (a no-op re-run): wall seconds and requests per run;
- ``report``: wall seconds and peak memory;
- the one reader (``read_estimates``) over the whole location, in a process of its own: seconds, rows, peak memory;
- ``score`` of a tiny model on an M-row ``.npy`` at k=10: ranges per second and requests per range.

The figures are printed as a table and one JSON line. Timings on a shared 2-core machine move by a
third from run to run; the request counts do not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MODEL = '''"""A tiny user model for the scale benchmark: 16 binary pixels, a 2-unit latent."""
import torch
from torch import nn
from torch.distributions import Bernoulli, Independent
from iwae.adapter import DistributionModel, gaussian_encoder


def make_model():
    torch.manual_seed(0)  # the same weights on every call, as score asks
    enc, dec = nn.Linear(16, 4), nn.Linear(2, 16)
    model = DistributionModel(gaussian_encoder(lambda x: enc(x).chunk(2, -1)), lambda h: Independent(Bernoulli(logits=dec(h)), 1), latent_dim=2)
    model.enc, model.dec = enc, dec
    return model
'''

READER = """
import json, sys, time
from pipeline.store.estimates import read_estimates
t0 = time.perf_counter()
ev = read_estimates(sys.argv[1], estimate=None)
print(json.dumps({"seconds": time.perf_counter() - t0, "rows": len(ev), "runs": int(ev.run_id.nunique()),
                  "frame_mib": ev.memory_usage(deep=True).sum() / 2**20,
                  "peak_mib": int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))) / 1024}))
"""


class Watched:
    """A command run as a child process: its wall time, its own CPU seconds (polled from /proc while
    it runs, so a Ray it starts is not counted) and its peak resident memory (``VmHWM``, polled: the
    high-water mark of the process's own memory since its exec; ``wait4``'s ``ru_maxrss`` would
    count the parent's resident memory at the fork)."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd: str | None = None):
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd, text=True)
        self.cpu, self.peak_mib = 0.0, 0.0
        tick = os.sysconf("SC_CLK_TCK")
        out: list[str] = []
        import threading

        reader = threading.Thread(target=lambda: out.append(self.proc.stdout.read() if self.proc.stdout else ""), daemon=True)
        errs: list[str] = []
        err_reader = threading.Thread(target=lambda: errs.append(self.proc.stderr.read() if self.proc.stderr else ""), daemon=True)
        reader.start()
        err_reader.start()
        while True:
            try:
                fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                self.cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime of the process itself
                hwm = next(ln.split()[1] for ln in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines() if ln.startswith("VmHWM:"))
                self.peak_mib = max(self.peak_mib, int(hwm) / 1024)
            except (OSError, IndexError, ValueError, StopIteration):
                pass
            try:
                pid, status, _ = os.wait4(self.proc.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.2)
        reader.join(10)
        err_reader.join(10)
        self.seconds = time.perf_counter() - t0
        self.stdout, self.stderr = "".join(out), "".join(errs)
        self.code = self.proc.returncode

    def check(self, what: str) -> Watched:
        if self.code != 0:
            raise RuntimeError(f"{what} exited {self.code}: {self.stderr.strip().splitlines()[-1:] if self.stderr.strip() else ''}")
        return self


def run_scale(
    sizes: Sequence[int],
    images: int,
    data_dir: str,
    echo: Callable[[str], None],
    cli: Sequence[str] | None = None,
    cwd: str | None = None,
) -> dict[str, Any]:
    """The figures of the module docstring at each grid size of ``sizes`` (each a job ``scale_N``) and
    for ``images`` scored images. ``cli``: the command that runs ``iwae-pipeline`` (default: this
    project's, in this Python); another tree's command measures that tree the same way."""
    from moto.server import ThreadedMotoServer

    from pipeline.s3proxy import CountingProxy

    cli = list(cli or [sys.executable, "-m", "pipeline.cli"])
    creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    env = {**os.environ, **creds, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    os.environ.update(creds)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    import http.client

    conn = http.client.HTTPConnection(host, int(port), timeout=30)  # S3's CreateBucket: a PUT of the bucket's path
    conn.request("PUT", "/scale")
    conn.getresponse().read()
    conn.close()
    proxy = CountingProxy(f"{host}:{port}")
    out: dict[str, Any] = {"sizes": {}}
    try:
        for n in sizes:
            loc = f"s3://scale/grid-{n}?endpoint_override={proxy.endpoint}&scheme=http&region=us-east-1"
            row: dict[str, Any] = {}
            echo(f"scale_{n}: sweep from an empty location")
            before, t0 = proxy.snapshot(), time.monotonic()
            first = Watched([*cli, "sweep", f"scale_{n}", "--results", loc, "--data-dir", data_dir], env, cwd).check("sweep")
            used = proxy.snapshot() - before
            lease_times = [t for t, _, k in proxy.times if k == "leases" and t >= t0]
            minutes = max((lease_times[-1] - lease_times[0]) / 60, 1e-9) if len(lease_times) > 1 else 0.0
            row.update(
                sweep_seconds=first.seconds,
                sweep_driver_cpu_s_per_run=first.cpu / n,
                sweep_requests_per_run=sum(used.values()) / n,
                sweep_requests=dict(sorted((f"{m} {k}", c) for (m, k), c in used.items())),
                lease_requests_per_minute=(len(lease_times) / minutes) if minutes else 0.0,
                lease_requests_per_run=len(lease_times) / n,
            )
            echo(f"scale_{n}: the same sweep again (nothing to do)")
            before = proxy.snapshot()
            again = Watched([*cli, "sweep", f"scale_{n}", "--results", loc, "--data-dir", data_dir], env, cwd).check("no-op sweep")
            used = proxy.snapshot() - before
            row.update(noop_seconds=again.seconds, noop_requests_per_run=sum(used.values()) / n, noop_driver_cpu_s=again.cpu)
            echo(f"scale_{n}: report")
            before = proxy.snapshot()
            rep = Watched([*cli, "report", "--results", loc, "--data-dir", data_dir], env, cwd).check("report")
            row.update(report_seconds=rep.seconds, report_peak_mib=rep.peak_mib, report_requests_per_run=sum((proxy.snapshot() - before).values()) / n)
            echo(f"scale_{n}: the reader")
            red = Watched([sys.executable, "-c", READER, loc], env, cwd).check("reader")
            row["reader"] = json.loads(red.stdout.strip().splitlines()[-1]) if red.stdout.strip() else {}
            out["sizes"][n] = row
        if images:
            out["score"] = _score(images, proxy, cli, env, cwd, echo)
    finally:
        proxy.stop()
        server.stop()
    return out


def _score(images: int, proxy: Any, cli: list[str], env: dict[str, str], cwd: str | None, echo: Callable[[str], None]) -> dict[str, Any]:
    """``score`` of the tiny model on ``images`` rows at k=10: ranges per second, requests per range."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="iwae-scale-") as tmp:
        Path(tmp, "tiny_model.py").write_text(MODEL)
        x = np.random.default_rng(0).integers(0, 2, (images, 16)).astype(np.float32)
        np.save(Path(tmp, "pixels.npy"), x)
        loc = f"s3://scale/score-{images}?endpoint_override={proxy.endpoint}&scheme=http&region=us-east-1"
        ranges = -(-images // 500)
        echo(f"score: {images:,} images ({ranges} ranges) at k=10")
        before = proxy.snapshot()
        argv = [*cli, "score", str(Path(tmp, "tiny_model.py")) + ":make_model", "--data", str(Path(tmp, "pixels.npy")), "--no-binarize"]
        argv += ["--eval-k", "10", "--eval-block", "10", "--results", loc]
        w = Watched(argv, env, cwd).check("score")
        used = proxy.snapshot() - before
    return {
        "images": images,
        "ranges": ranges,
        "seconds": w.seconds,
        "ranges_per_s": ranges / w.seconds,
        "requests_per_range": sum(used.values()) / ranges,
        "driver_cpu_s_per_range": w.cpu / ranges,
    }


def table(figures: dict[str, Any]) -> str:
    """The figures as a markdown table, one column per grid size."""
    sizes = list(figures["sizes"])
    rows = [
        ("sweep from empty: seconds", "sweep_seconds", "{:.0f}"),
        ("  storage requests per run", "sweep_requests_per_run", "{:.1f}"),
        ("  driver CPU seconds per run", "sweep_driver_cpu_s_per_run", "{:.3f}"),
        ("  lease requests per minute (2 runs in flight)", "lease_requests_per_minute", "{:.0f}"),
        ("  lease requests per run", "lease_requests_per_run", "{:.1f}"),
        ("no-op re-run: seconds", "noop_seconds", "{:.1f}"),
        ("  storage requests per run", "noop_requests_per_run", "{:.2f}"),
        ("report: seconds", "report_seconds", "{:.1f}"),
        ("  peak memory (MiB)", "report_peak_mib", "{:.0f}"),
    ]
    lines = ["| | " + " | ".join(f"N = {n:,}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for label, key, f in rows:
        lines.append(f"| {label} | " + " | ".join(f.format(figures["sizes"][n].get(key, float("nan"))) for n in sizes) + " |")
    lines.append("| reader: seconds / rows / peak MiB | " + " | ".join(_reader(figures["sizes"][n]["reader"]) for n in sizes) + " |")
    sc = figures.get("score")
    if sc:
        lines += ["", f"score, {sc['images']:,} images in {sc['ranges']} ranges at k=10: {sc['seconds']:.0f} s, {sc['ranges_per_s']:.2f} ranges/s,"
                  f" {sc['requests_per_range']:.1f} requests and {sc['driver_cpu_s_per_range']:.3f} driver CPU s per range"]  # fmt: skip
    return "\n".join(lines)


def _reader(r: dict[str, Any]) -> str:
    return f"{r.get('seconds', float('nan')):.1f} / {r.get('rows', 0):,} / {r.get('peak_mib', float('nan')):.0f}"
