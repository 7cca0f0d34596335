"""Several adapters in one pass against one pass per adapter, beside a plain copy of the same bytes, measured in one
run on one machine.

Builds (or reuses) a random-init bf16 llama base and three all-linear rank-16 adapters (bench_merge's fixture), then
times, each into a fresh output, with the engine-free `merge_checkpoint` (plan, merge, consolidate, validate):
a plain copy of the base's files, the merge of one adapter, the merge of all three in one pass, and the three merged
one after another (each pass's --base the last one's output). Prints a Markdown table of seconds and ratios.

    .venv/bin/python benchmarks/bench_several.py --size-gb 1 --workdir ./bench-work
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import TARGETS, build_adapter, build_base, choose_dims, dir_bytes  # noqa: E402


def timed(label: str, fn, rows: list[tuple[str, float]]) -> None:
    started = time.perf_counter()
    fn()
    rows.append((label, time.perf_counter() - started))
    print(f"{label}: {rows[-1][1]:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=1.0, help="approximate bf16 size of the base")
    p.add_argument("--workdir", type=Path, default=Path("bench-work"))
    args = p.parse_args(argv)

    from prefect_lora_merge.core.pipeline import merge_checkpoint

    dims = choose_dims(int(args.size_gb * 1e9))
    work = args.workdir / f"several-{args.size_gb:g}gb"
    base = work / "base"
    if not (base / "config.json").exists():
        base.mkdir(parents=True, exist_ok=True)
        build_base(dims, base, max_shard_bytes=250_000_000, seed=0)
    adapters = []
    for seed in range(3):
        where = work / f"adapter-{seed}"
        if not (where / "adapter_config.json").exists():
            build_adapter(dims, TARGETS["all-linear"], where, base, seed=seed + 10)
        adapters.append(where)
    weights = [1.0, 0.5, -0.5]
    specs = [f"{a}:{w}" for a, w in zip(adapters, weights, strict=True)]
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()

    rows: list[tuple[str, float]] = []
    timed("plain copy of the base's files", lambda: shutil.copytree(base, runs / "copy"), rows)
    timed("one adapter", lambda: merge_checkpoint(str(base), specs[0], str(runs / "one")), rows)
    timed("three adapters, one pass", lambda: merge_checkpoint(str(base), specs, str(runs / "three")), rows)

    def one_after_another() -> None:
        previous = base
        for i, spec in enumerate(specs):
            merge_checkpoint(str(previous), spec, str(runs / f"step-{i}"))
            previous = runs / f"step-{i}"

    timed("three adapters, one pass each", one_after_another, rows)
    copy = rows[0][1]
    print(f"\nbase {dir_bytes(base) / 1e9:.2f} GB bf16 ({dims.layers} layers, hidden {dims.hidden}), 3 all-linear r=16")
    print("| run | seconds | × plain copy |\n|---|---:|---:|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.1f} | {seconds / copy:.2f} |")
    print(f"\none pass / one pass each: {rows[2][1] / rows[3][1]:.2f}")
    shutil.rmtree(runs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
