"""The scale benchmark's harness (the new tree's) driving another tree's CLI (the base, 12444e3).

Differences from `iwae-pipeline bench --scale`, all in this harness: a command that exits non-zero
is recorded (its exit code and last stderr line) instead of ending the benchmark, and the reader is
the base tree's (pipeline.estimates.read_estimates)."""
import json, sys
sys.path.insert(0, "/work/main")
import pipeline.bench_scale as bs

failures = []
def check(self, what):
    if self.code != 0:
        last = self.stderr.strip().splitlines()[-1:] if self.stderr.strip() else []
        failures.append({"what": what, "code": self.code, "seconds": self.seconds, "last": last})
        print(f"{what} exited {self.code} after {self.seconds:.0f} s: {last}", file=sys.stderr, flush=True)
    return self
bs.Watched.check = check
bs.READER = bs.READER.replace("from pipeline.store.estimates import read_estimates", "from pipeline.estimates import read_estimates")
tree, py = sys.argv[1], sys.argv[2]
sizes = [int(x) for x in sys.argv[3].split(",") if x]
images = int(sys.argv[4])
out = bs.run_scale(sizes, images, "/work/main/data", echo=lambda m: print(m, file=sys.stderr, flush=True), cli=[py, "-m", "pipeline.cli"], cwd=tree)
out["failures"] = failures
try:
    print(bs.table(out))
except Exception as e:
    print("table failed:", e)
print(json.dumps(out, sort_keys=True, default=str))
