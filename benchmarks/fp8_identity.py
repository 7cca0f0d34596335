"""Proof that a refactor left every FP8 output byte-identical: merge the FP8 fixtures with this tree and with an
earlier commit of it, and compare every output file's bytes.

    python benchmarks/fp8_identity.py --against <commit>

The earlier commit is checked out into a temporary git worktree and imported from there (its `core` only, in a
subprocess), so both trees merge the same fixture: block-FP8 with float32 and with power-of-two (ue8m0) scales, each
written in bf16 and re-quantized to FP8, tiled and on whole tensors. Every file of the merged checkpoint is compared
(shards, index, config.json, side files), and the merge's fingerprint (so an output merged by the earlier commit
resumes under this one); the tool's own manifest and report are not: they describe the run (field names). Exit
status 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MERGE = r"""
import hashlib, json, sys
from pathlib import Path
from prefect_lora_merge.core import tiling
from prefect_lora_merge.core.pipeline import merge_checkpoint
base, adapter, out, mode, tile = sys.argv[1:6]
if tile != "default":
    tiling.TILE_VALUES = int(tile)
result = merge_checkpoint(base, adapter, out, output_dtype=mode)
digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted(Path(out).iterdir()) if p.is_file() and not p.name.startswith("lora-merge-")}
digests["(the merge's fingerprint)"] = result.plan.fingerprint
print(json.dumps(digests))
"""


def _digests(src: Path, base: Path, adapter: Path, out: Path, mode: str, tile: str) -> dict[str, str]:
    env = {"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "PREFECT_HOME": str(out.parent / "prefect")}
    done = subprocess.run(
        [sys.executable, "-c", MERGE, str(base), str(adapter), str(out), mode, tile],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"merge with {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="the commit whose FP8 outputs this tree must reproduce")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from deepseek_fp8 import build  # noqa: PLC0415  (a test fixture, not part of the package)

    different = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        old = work / "old"
        add = ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.against]
        subprocess.run(add, check=True)
        try:
            print(f"| base | --output-dtype | tiles | files | identical to {args.against[:10]} |")
            print("|---|---|---|---|---|")
            for ue8m0 in (False, True):
                case = build(work / f"case-{ue8m0}", ue8m0=ue8m0)
                for mode, tile in ((m, t) for m in ("auto", "fp8") for t in ("default", str(2 * 128 * 128))):
                    runs = {}
                    for name, src in (("new", ROOT / "src"), ("old", old / "src")):
                        out = work / f"out-{name}-{ue8m0}-{mode}-{tile}" / "merged"
                        out.parent.mkdir()
                        runs[name] = _digests(src, case.base_dir, case.adapter_dir, out, mode, tile)
                    same = runs["new"] == runs["old"]
                    different += not same
                    label = "ue8m0" if ue8m0 else "float32 scales"
                    print(f"| {label} | {mode} | {tile} | {len(runs['new'])} | {'yes' if same else 'NO'} |")
                    if not same:
                        for file in sorted(set(runs["new"]) | set(runs["old"])):
                            if runs["new"].get(file) != runs["old"].get(file):
                                print(f"  differs: {file}")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    return 1 if different else 0


if __name__ == "__main__":
    raise SystemExit(main())
