"""Two versions of the engine-free core, timed alternately in one run on a bench_merge.py fixture.

Checks out REV in a git worktree under WORKDIR, then runs `merge_checkpoint` from it and from this tree, in fresh
processes, alternating, for each adapter of the fixture, and prints the median time of the shard merges, of the
validation and of the whole call. Timings on a shared VM drift by tens of percent within minutes: only a
comparison made this way, in one run, says whether a change made the merge faster.

    python benchmarks/bench_commits.py aac7a71 --fixture bench-work/fixtures/v1-2gb-seed0 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import prefect_lora_merge
assert prefect_lora_merge.__file__.startswith(sys.argv[1]), prefect_lora_merge.__file__
from prefect_lora_merge.core import pipeline
spent = {}
for step in ("merge_or_resume_shard", "merge_shard", "finish_validation"):
    original = getattr(pipeline, step, None)
    if original is None:
        continue
    def timed(*args, _original=original, _step=step, **kwargs):
        started = time.perf_counter()
        try:
            return _original(*args, **kwargs)
        finally:
            spent[_step] = spent.get(_step, 0.0) + time.perf_counter() - started
    setattr(pipeline, step, timed)
started = time.perf_counter()
pipeline.merge_checkpoint(base=sys.argv[2], adapter=sys.argv[3], output=sys.argv[4], device="cpu")
spent["merge_checkpoint"] = time.perf_counter() - started
print(json.dumps(spent))
"""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev", help="the git revision to compare this tree with")
    p.add_argument("--fixture", type=Path, default=Path("bench-work/fixtures/v1-2gb-seed0"))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("bench-work"))
    args = p.parse_args(argv)
    rev = ["git", "rev-parse", "--short", args.rev]
    sha = subprocess.run(rev, cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    old = (args.workdir / f"rev-{sha}").resolve()
    if not old.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.rev], cwd=ROOT, check=True)
    trees = {f"{args.rev}": old / "src", "this tree": ROOT / "src"}
    base = sorted(args.fixture.glob("base-shard*"))[0]
    adapters = sorted(args.fixture.glob("adapter-*"))
    out = (args.workdir / "commits-out").resolve()
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for round_ in range(args.repeat):
        for adapter in adapters:
            for name, tree in trees.items():
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=False)
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, str(tree), str(base), str(adapter), str(out)],
                    capture_output=True,
                    text=True,
                )
                if done.returncode:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return 1
                spent = json.loads(done.stdout.strip().splitlines()[-1])
                runs.setdefault((adapter.name, name), []).append(spent)
                print(f"round {round_ + 1}: {adapter.name}, {name}: {spent['merge_checkpoint']:.2f} s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    print(f"\n| adapter | code | shard merges s | validation s | merge_checkpoint s |  (medians of {args.repeat})")
    print("|---|---|---:|---:|---:|")
    for (adapter_name, name), spent in runs.items():
        shards = statistics.median(s.get("merge_or_resume_shard", s.get("merge_shard", 0.0)) for s in spent)
        validation = statistics.median(s.get("finish_validation", 0.0) for s in spent)
        whole = statistics.median(s["merge_checkpoint"] for s in spent)
        print(f"| {adapter_name} | {name} | {shards:.2f} | {validation:.2f} | {whole:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
