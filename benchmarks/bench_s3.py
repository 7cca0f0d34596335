#!/usr/bin/env python
"""Benchmark on object storage: a merge from one bucket to another against a plain copy of the same objects.

Starts a local S3 server (SeaweedFS `weed mini` on 127.0.0.1, as the tests do), uploads the benchmark fixture that
`bench_merge.py` built (run that first), then times, alternating in one run:
- server-side copy of every base object to another bucket (`fs.copy`: no bytes through the client);
- client-side copy of every object (read and write through this process: the floor for any merge that must
  rewrite the bytes);
- `merge_checkpoint(base=s3://..., adapter=s3://..., output=s3://...)` (the engine-free core, in-process);
- the same merge with the adapter cut down to layer 0, so that most shards are untouched and copied server-side
  (base and output on one S3 endpoint); it reports the bytes the server copied.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the SeaweedFS launcher the tests use

from s3_server import seaweedfs  # noqa: E402

from prefect_lora_merge.core.pipeline import merge_checkpoint  # noqa: E402

CHUNK = 64 * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", default="bench-work/fixtures/v1-2gb-seed0", help="bench_merge.py fixture dir")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    fixture = Path(args.fixture)
    base = sorted(fixture.glob("base-shard*"))[-1]
    adapter = sorted(fixture.glob("adapter-*"))[0]
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp, seaweedfs(Path(tmp)) as server:
        fs = server.fs()
        options = server.storage_options()
        for bucket in ("inputs", "outputs"):
            server.make_bucket(bucket)
        started = time.perf_counter()
        fs.put(str(base), "inputs/base", recursive=True)
        fs.put(str(adapter), "inputs/adapter", recursive=True)
        layer0 = _layer0_adapter(adapter, Path(tmp) / "adapter-layer0")
        fs.put(str(layer0), "inputs/adapter-layer0", recursive=True)
        objects = sorted(p for p in fs.find("inputs/base"))
        total = sum(fs.size(p) for p in objects)
        print(f"uploaded {total / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s")

        def server_copy(i: int) -> None:
            for p in objects:
                fs.copy(p, p.replace("inputs/base", f"outputs/copy-server-{i}"))

        def client_copy(i: int) -> None:
            for p in objects:
                size = fs.size(p)
                with fs.open(p.replace("inputs/base", f"outputs/copy-client-{i}"), "wb") as out:
                    for start in range(0, size, CHUNK):
                        out.write(fs.cat_file(p, start=start, end=min(size, start + CHUNK)))

        validations: list[float] = []

        def merge(i: int) -> None:
            result = merge_checkpoint(
                "s3://inputs/base",
                "s3://inputs/adapter",
                f"s3://outputs/merge-{i}",
                device="cpu",
                storage_options=options,
            )
            validations.append(result.report.seconds)

        copied: list[int] = []

        def merge_layer0(i: int) -> None:
            result = merge_checkpoint(
                "s3://inputs/base",
                "s3://inputs/adapter-layer0",
                f"s3://outputs/merge-layer0-{i}",
                device="cpu",
                storage_options=options,
            )
            copied.append(sum(r.bytes for r in result.receipts if r.copied_server_side))

        legs = {
            "server-side copy": server_copy,
            "client-side copy": client_copy,
            "lora-merge (API)": merge,
            "lora-merge (API), adapter on layer 0 only": merge_layer0,
        }
        times: dict[str, list[float]] = {name: [] for name in legs}
        for i in range(args.repeat):
            for name, leg in legs.items():
                started = time.perf_counter()
                leg(i)
                times[name].append(time.perf_counter() - started)
                print(f"round {i}: {name}: {times[name][-1]:.1f} s", flush=True)
        client = statistics.median(times["client-side copy"])
        server_side = statistics.median(times["server-side copy"])
        print(f"\n| leg | wall s (median of {args.repeat}) | GB/s | / client-side copy | / server-side copy |")
        print("|---|---:|---:|---:|---:|")
        for name, values in times.items():
            wall = statistics.median(values)
            print(
                f"| {name} | {wall:.1f} | {total / 1e9 / wall:.2f} | {wall / client:.2f}× | {wall / server_side:.2f}× |"
            )
        print(f"\nadapter on layer 0 only: {copied[-1] / 1e9:.2f} of {total / 1e9:.2f} GB copied server-side")
        merged, validated = statistics.median(times["lora-merge (API)"]), statistics.median(validations)
        print(
            f"validation (checksums, structure, recomputed numbers) of the all-linear merge: {validated:.1f} s of its "
            f"{merged:.1f} s ({validated / (merged - validated):.0%} of the merge's own time)"
        )


def _layer0_adapter(adapter: Path, target: Path) -> Path:
    """The benchmark adapter restricted to layer 0's tensors: the shards without layer 0 are left untouched."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, target)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    kept = {k: v for k, v in tensors.items() if ".layers.0." in k}
    save_file(kept, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    return target


if __name__ == "__main__":
    main()
