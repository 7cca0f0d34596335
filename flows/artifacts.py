"""What a merge run shows in Prefect's UI: a progress bar as shards finish, a table of shards, and a summary that
puts failures first. Keys are per output, so the latest run for an output is one click away."""

from __future__ import annotations

import hashlib
import re

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from prefect_lora_merge.core.formats.survival import round_trip_summary
from prefect_lora_merge.core.plan import MergePlan
from prefect_lora_merge.core.recompute import TensorNumbers
from prefect_lora_merge.core.state import ShardReceipt, shard_figures
from prefect_lora_merge.core.validate import ValidationReport


def artifact_key(plan: MergePlan, kind: str) -> str:
    """`lora-merge-<kind>-<output name>-<hash>`: Prefect keys allow lowercase letters, digits and dashes only."""
    uri = plan.job.output.uri
    name = re.sub(r"[^a-z0-9]+", "-", uri.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")[:40] or "output"
    return f"lora-merge-{kind}-{name}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}"


class ShardProgress:
    """A progress artifact advanced by each finished shard, weighted by the shard's size."""

    def __init__(self, plan: MergePlan) -> None:
        self.total = max(1, sum(s.base_size for s in plan.shards))
        self.done = 0
        self.artifact = create_progress_artifact(
            0.0, key=artifact_key(plan, "progress"), description=f"shards merged into {plan.job.output.uri}"
        )

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        update_progress_artifact(self.artifact, progress=100.0 * self.done / self.total)


def publish_shard_table(plan: MergePlan, receipts: list[ShardReceipt], checksums: dict[str, str]) -> None:
    """One row per finished shard; `checksums`: the sha256 validation took of shards the storage copied."""
    rows = []
    for r in sorted(receipts, key=lambda r: r.file):
        f = shard_figures(r)
        rows.append(
            {
                "shard": r.file,
                "tensors": r.tensors,
                "touched": len(r.touched),
                "bytes": r.bytes,
                "sha256": r.sha256 or checksums.get(r.file, "(not hashed: validation did not run)"),
                "seconds": round(r.seconds, 2),
                "outcome": "resumed" if r.resumed else "copied server-side" if r.copied_server_side else "merged",
                # measured while merging (merged shards only), next to the plan's estimate
                "bytes read": f.bytes_read,
                "waiting for storage s": round((f.read_wait_seconds or 0) + (f.write_wait_seconds or 0), 2),
                "computing s": round(f.compute_seconds or 0, 2),
                "peak MiB above start": round(((f.peak_memory_bytes or 0) - (f.start_memory_bytes or 0)) / 2**20, 1),
                "estimate MiB": round((f.estimated_peak_bytes or 0) / 2**20, 1),
                "above estimate": f.above_estimate,
            }
        )
    create_table_artifact(rows, key=artifact_key(plan, "shards"), description=f"shards of {plan.job.output.uri}")


def publish_summary(plan: MergePlan, failures: list[str], report: ValidationReport | None, seconds: float) -> None:
    """Markdown: failures first, then what was merged and what validation checked."""
    lines = [f"# LoRA merge into `{plan.job.output.uri}`", ""]
    if failures:
        lines += [f"## FAILED: {len(failures)} problem(s)", ""]
        lines += [f"- {_cell(f)}" for f in failures[:100]]
        lines += ([f"- … and {len(failures) - 100} more"] if len(failures) > 100 else []) + [""]
    else:
        lines += ["## Passed", ""]
    touched = sum(len(s.touched) for s in plan.shards)
    lines += [
        f"- base `{plan.job.base.uri}`, adapter `{plan.job.adapters.label}`",
        f"- {len(plan.shards)} shard(s), {touched} tensor(s) changed, output dtype {plan.output_dtype}",
        f"- {seconds:.1f} s in all" + (f", of which validation {report.seconds:.1f} s" if report else ""),
        f"- fingerprint `{plan.fingerprint[:16]}`",
    ]
    if report is not None:
        lines += ["", "## Validation", "", "| check | count |", "|---|---:|"]
        lines += [f"| {name} | {count} |" for name, count in report.checks.items()]
        changed = report.largest_changes()
        lines += _by_layer(changed)
        if changed:
            lines += ["", "## Largest changes ‖ΔW‖/‖W‖ (recomputed rows)", "", "| tensor | ‖ΔW‖/‖W‖ | rows checked |"]
            lines += ["|---|---:|---:|"]
            lines += [f"| {n.tensor} | {n.relative_change:.3g} | {n.rows_checked}/{n.rows} |" for n in changed[:20]]
    if report is not None and report.round_trip_shifts:
        lines += ["", "## 4-bit round trip next to the delta: ‖Q(W) − W‖ / ‖ΔW‖", ""]
        lines += [f"- {round_trip_summary(report.round_trip_shifts)}", ""]
        lines += ["| tensor | ‖Q(W) − W‖ | ‖ΔW‖ | ratio |", "|---|---:|---:|---:|"]
        lines += [
            f"| {s.tensor} | {s.shift_norm:.4g} | {s.delta_norm:.4g} | {_ratio(s.ratio)} |"
            for s in report.round_trip_shifts[:20]
        ]
    if plan.decisions:
        lines += ["", "## Decisions", ""] + [f"- {_cell(d)}" for d in plan.decisions]
    create_markdown_artifact(
        "\n".join(lines) + "\n", key=artifact_key(plan, "summary"), description=f"merge into {plan.job.output.uri}"
    )


def _ratio(ratio: float | None) -> str:
    return "ΔW = 0" if ratio is None else f"{ratio:.3g}"


def _by_layer(changed: list[TensorNumbers]) -> list[str]:
    """‖ΔW‖/‖W‖ per layer (largest and mean over its touched tensors) with a bar scaled to the largest."""
    layers: dict[int, list[float]] = {}
    for n in changed:
        found = _LAYER.search(n.tensor)
        if found and n.relative_change is not None:
            layers.setdefault(int(found.group(1)), []).append(n.relative_change)
    if not layers:
        return []
    top = max(max(v) for v in layers.values()) or 1.0
    lines = ["", "## ‖ΔW‖/‖W‖ by layer", "", "| layer | tensors | largest | mean | |", "|---:|---:|---:|---:|---|"]
    for layer, values in sorted(layers.items()):
        bar = "█" * max(1, round(20 * max(values) / top))
        lines.append(f"| {layer} | {len(values)} | {max(values):.3g} | {sum(values) / len(values):.3g} | {bar} |")
    return lines


_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
