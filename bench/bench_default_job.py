"""The default job's wall time at two commits, measured side by side in one run.

`python pipelines/distill.py` with no arguments, at `--before` (a commit, checked out into a temporary git
worktree) and at `--after` (default: this checkout, uncommitted changes included). Each side gets its own
$TDM_HOME, warmed first by a one-step job that trains and registers the toy teacher, so the timed runs
measure what a later run of the default job costs: distillation, evaluation and registration, the teacher
reused. Timed runs alternate in the order B A A B ... to cancel drift of the machine; each uses a new run
name (a finished name would register nothing). Both sides run on the same seeds, so their tables must agree.

    python bench/bench_default_job.py --before df7451b [--after PATH] [--rounds 2] [--keep DIR]

Prints each run's seconds and the ratio of the medians (after / before); the tables go to the log.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = re.compile(r"^sampler .*?(?=\n\n)", re.S | re.M)


def run_job(code: Path, home: Path, name: str, *extra: str) -> tuple[float, str]:
    """One `pipelines/distill.py` job with the code at `code` (first on PYTHONPATH: it shadows the editable
    install, in the driver and in the Ray workers it starts) and $TDM_HOME `home`; (seconds, stdout)."""
    env = dict(os.environ, TDM_HOME=str(home), RAY_AUTH_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(code / "pipelines" / "distill.py"), "--name", name, *extra],
                          cwd=code, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{code} {name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    if "toy teacher: reusing" not in proc.stdout and not extra:
        raise SystemExit(f"{code} {name}: the teacher was not reused, so this run timed its training too")
    return seconds, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="commit to compare against")
    ap.add_argument("--after", default=str(ROOT), help="checkout to measure (default: this one)")
    ap.add_argument("--rounds", type=int, default=2, help="timed runs per side")
    ap.add_argument("--keep", help="keep the worktree and homes here instead of a temporary directory")
    args = ap.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-default-job-"))
    work.mkdir(parents=True, exist_ok=True)
    before = work / "before"
    if not before.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before], check=True,
                       capture_output=True)
    sides = {"before": before, "after": Path(args.after).resolve()}
    homes = {side: work / f"home-{side}" for side in sides}
    try:
        for side, code in sides.items():   # the toy teacher, trained and registered once per side
            if not (homes[side] / "mlflow.db").exists():
                print(f"warm-up {side}: training the toy teacher", flush=True)
                run_job(code, homes[side], "warmup", "--train.max_steps", "1", "--eval.enabled", "false")
        times: dict[str, list[float]] = {side: [] for side in sides}
        tables: dict[str, str] = {}
        order = [s for r in range(args.rounds) for s in (("before", "after") if r % 2 else ("after", "before"))]
        for i, side in enumerate(order):
            seconds, out = run_job(sides[side], homes[side], f"bench-{i}")
            times[side].append(seconds)
            table = TABLE.search(out)
            tables.setdefault(side, table.group(0) if table else out[-2000:])
            print(f"run {i} {side}: {seconds:.1f} s", flush=True)
        for side in sides:
            print(f"\n## {side} ({sides[side]}), first timed run's table\n{tables[side]}")
        med = {side: statistics.median(ts) for side, ts in times.items()}
        print(f"\nmedian seconds: before {med['before']:.1f}, after {med['after']:.1f}; "
              f"after / before = {med['after'] / med['before']:.3f}")
        fid = re.compile(r"^(\S+)\s+\d+\s+(\S+)\s+(\S+)", re.M)
        same = [m[:3] for m in fid.findall(tables["before"])] == [m[:3] for m in fid.findall(tables["after"])]
        print(f"tables (sampler, FID, adherence) identical: {same}")
    finally:
        if not args.keep:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
