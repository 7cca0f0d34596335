"""Validation's numbers: sampled rows of every computed tensor recomputed in float64 from the base and the adapter
and compared with what the output holds; sampled byte ranges of every copied shard compared with the base.

The merge works in float32 and rounds once to the output dtype. Recomputed in float64, a right value is then within
one unit of the output dtype's precision of its operands (`eps · (|W| + |ΔW|)`), and almost every value equals the
float64 result rounded to the output dtype: only values whose float32 and float64 results straddle a rounding
boundary differ. A missing or wrong delta fails one test or the other, even when it is smaller than a bf16 step
(it then moves a share of the values across rounding boundaries).

Rows are sampled (all of them for small tensors): a few runs of rows at the start, the middle, the end and one place
chosen from the tensor's name, so that a re-run checks the same rows. Storage corruption anywhere is the checksums'
job; this is about the arithmetic and the placement of every tensor. NaN/Inf are looked for in every value of every
computed tensor, by the checksum pass (which reads every byte anyway); `check_non_finite` then compares the tensors
that hold any with the base.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from pydantic import BaseModel

from .errors import LoraMergeError
from .formats import weight_format
from .lora_math import all_finite, delta_weight, dora_rescale, expert_factors, lora_factors
from .plan import TILED_FORMS, MergePlan, PlannedTensor, ShardPlan, Update
from .safetensors_format import DTYPES, ShardHeader, TensorEntry, torch_dtype
from .storage import Location

ALL_ROWS_UP_TO = 1 << 16  # values: tensors this small are recomputed whole (the sampled runs hold as many)
RUN_VALUES = 1 << 15  # values per sampled run of rows, four runs per larger tensor
FLIP_LIMIT = 0.01  # share of values allowed to differ from the float64 result rounded to the output dtype
COPY_SAMPLES = 4  # byte ranges compared with the base per shard of copied tensors
COPY_SAMPLE_BYTES = 1 << 16

Fetch64 = Callable[[str], torch.Tensor]


class _Unreadable(Exception):
    """Rows that cannot be read as the plan says: reported as a failure of that tensor."""


class TensorNumbers(BaseModel):
    """What the recomputation found for one computed tensor."""

    tensor: str
    file: str
    rows_checked: int
    rows: int
    # ‖output − base‖ / ‖base‖ on the rows checked: the size of the change the merge made (None without a base)
    relative_change: float | None
    # share of the values checked that differ from the float64 result rounded to the output dtype
    flips: float


def check_numbers(
    plan: MergePlan, headers: dict[str, ShardHeader], failures: list[str], checks: dict[str, int]
) -> list[TensorNumbers]:
    """Recompute every computed tensor's sampled rows and byte-compare samples of the copied ones, shard by shard.

    The adapter's tensors are cached per shard, as the merge caches them: a whole adapter in float64 would make
    validation's memory grow with the model (measured: +0.07 GiB for a 44 MB adapter; a 671B all-linear adapter is
    tens of GB)."""

    def shard_job(shard: ShardPlan) -> tuple[list[TensorNumbers], list[str], int, int]:
        adapter_cache: dict[str, torch.Tensor] = {}

        def fetch(key: str) -> torch.Tensor:
            if key not in adapter_cache:
                adapter_cache[key] = plan.job.adapters.read(key).to(torch.float64)
            return adapter_cache[key]

        header = headers[shard.file]
        found, problems, computed = [], [], 0
        written = header.by_name()
        for tensor in shard.tensors:
            if not tensor.computed or not _checked_as_a_weight(tensor):
                continue
            computed += 1
            checker = _TensorCheck(plan, shard, tensor, written, headers, fetch)
            result = checker.run(problems)
            if result is not None:
                found.append(result)
        copied = _compare_copied_bytes(plan, shard, header, problems)
        return found, problems, computed, copied

    numbers: list[TensorNumbers] = []
    present = [s for s in plan.shards if s.file in headers]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for found, problems, computed, copied in pool.map(shard_job, present):
            numbers.extend(found)
            failures.extend(problems)
            checks["tensors recomputed"] = checks.get("tensors recomputed", 0) + computed
            checks["copied byte ranges"] = checks.get("copied byte ranges", 0) + copied
    return numbers


def check_non_finite(
    plan: MergePlan,
    headers: dict[str, ShardHeader],
    suspects: dict[tuple[str, str], int],
    failures: list[str],
    checks: dict[str, int],
) -> None:
    """Name every computed tensor in which the merge wrote NaN/Inf where the base holds a finite value.

    `suspects` are the computed tensors that the checksum pass, which reads every byte, found NaN/Inf in:
    (shard, tensor) -> how many. Only those are read again, whole, with the base beside them, so that NaN/Inf the
    base has of its own at the same place are not blamed on the merge (a merged value there is NaN/Inf too)."""
    shards = {s.file: s for s in plan.shards}
    for (file, name), count in sorted(suspects.items()):
        shard = shards.get(file)
        tensor = next((t for t in shard.tensors if t.name == name), None) if shard else None
        if shard is None or tensor is None or file not in headers:
            continue  # the structure checks name it
        checks["NaN/Inf tensors compared with the base"] = checks.get("NaN/Inf tensors compared with the base", 0) + 1
        if not _checked_as_a_weight(tensor):
            failures.append(
                f"{file}: {name} holds {count} NaN/Inf value(s): a quantized weight's {tensor.quantized.role} that "
                "the merge computed must be finite"
            )
            continue
        problem = _new_non_finite(plan, shard, tensor, headers)
        if problem:
            failures.append(problem)


FULL_RUN_VALUES = 1 << 20  # values per read when a whole tensor is compared with its base (8 MiB in float64)


def _new_non_finite(
    plan: MergePlan, shard: ShardPlan, tensor: PlannedTensor, headers: dict[str, ShardHeader]
) -> str | None:
    def no_adapter(key: str) -> torch.Tensor:
        raise AssertionError("comparing with the base reads no adapter tensor")

    checker = _TensorCheck(plan, shard, tensor, headers[shard.file].by_name(), headers, no_adapter)
    if checker.entry is None or checker.entry.shape != tensor.shape or checker.entry.dtype != tensor.dtype:
        return None  # the structure checks name it
    align = checker.align
    step = align * max(1, FULL_RUN_VALUES // (checker.cols * align))
    new, first = 0, ""
    try:
        for start in range(0, checker.out_rows, step):
            rows = slice(start, min(checker.out_rows, start + step))
            _, got, _ = checker._output_rows(rows)
            base = checker._base_rows(rows)
            bad = ~torch.isfinite(got)
            if base is not None:
                bad &= torch.isfinite(base)
            count = int(bad.sum())
            if count and not first:
                first = _position(bad.nonzero()[0].tolist(), rows)
            new += count
    except (_Unreadable, LoraMergeError) as exc:
        return f"{shard.file}: {tensor.name}: {exc}"
    if not new:
        return None
    return (
        f"{shard.file}: {tensor.name} holds {new} NaN/Inf value(s) where the base's values are finite (first at "
        f"{first}): the merge wrote them (a delta beyond {tensor.dtype}'s range, or NaN/Inf in the adapter)"
    )


class _TensorCheck:
    """One computed tensor: reads its sampled rows from the base and the output, recomputes, compares."""

    def __init__(
        self,
        plan: MergePlan,
        shard: ShardPlan,
        tensor: PlannedTensor,
        written: dict[str, TensorEntry],
        headers: dict[str, ShardHeader],
        fetch: Fetch64,
    ) -> None:
        self.plan, self.shard, self.tensor, self.fetch = plan, shard, tensor, fetch
        self.entry = written.get(tensor.name)
        self.headers = headers
        self.weight = tensor.quantized.weight if tensor.quantized is not None else None
        self.format = weight_format(self.weight.format) if self.weight is not None else None
        # The logical weight's shape: what the updates apply to (a re-quantized part stores packed codes).
        self.shape = self.weight.shape if self.weight is not None else tensor.shape
        self.out_rows, self.cols = _as_rows(self.shape)
        self.requantized = tensor.quantized is not None and tensor.quantized.write == "requantized"
        # A re-quantized weight is checked in whole runs of rows that share scales: its scales come from them.
        self.align = self.format.row_alignment(self.weight) if self.requantized else 1
        self._whole_base: torch.Tensor | None = None  # see _base_rows

    def run(self, problems: list[str]) -> TensorNumbers | None:
        tensor = self.tensor
        if self.entry is None or self.entry.shape != tensor.shape or self.entry.dtype != tensor.dtype:
            return None  # structure checks already name it
        whole = self.out_rows * self.cols <= ALL_ROWS_UP_TO or not _row_local(tensor)
        runs = [slice(0, self.out_rows)] if whole else _sample_runs(tensor.name, self.out_rows, self.cols, self.align)
        checked, flips, base_sq, change_sq = 0, 0, 0.0, 0.0
        for rows in runs:
            try:
                base = self._base_rows(rows)
                expected, products = self._expected_rows(base, rows)
                stored, got, rounding = self._output_rows(rows)
            except (_Unreadable, LoraMergeError) as exc:
                problems.append(f"{self.shard.file}: {tensor.name}: {exc}")
                return None
            flips += self._compare(rows, stored, got, expected, base, products, rounding, problems)
            checked += got.numel()
            if base is not None and tensor.updates:
                both = _non_finite_mask(got, base)  # NaN/Inf left out of the norms (check_non_finite judges them)
                base_sq += float((base if both is None else base[both]).square().sum())
                change_sq += float((got - base if both is None else (got - base)[both]).square().sum())
        return TensorNumbers(
            tensor=tensor.name,
            file=self.shard.file,
            rows_checked=sum(r.stop - r.start for r in runs),
            rows=self.out_rows,
            relative_change=math.sqrt(change_sq / base_sq) if base_sq > 0 else None,
            flips=flips / max(checked, 1),
        )

    # -- reading -----------------------------------------------------------------------------------------------

    def _base_rows(self, rows: slice) -> torch.Tensor | None:
        """float64 base values of these rows (a quantized weight decoded), or None where the base has no such
        rows."""
        tensor = self.tensor
        if self.weight is not None:
            assert self.format is not None
            if not self.format.row_local(self.weight):
                # rows that depend on the whole weight: dequantized whole once (float32), sampled from that
                if self._whole_base is None:
                    everything = slice(0, self.out_rows)
                    parts = self._parts_rows(self.plan.job.base, everything)
                    self._whole_base = self.format.dequantize(self.weight, parts).reshape(self.out_rows, self.cols)
                return self._whole_base[rows].to(torch.float64)
            return self.format.decode(self.weight, self._parts_rows(self.plan.job.base, rows), rows)
        base_rows, _ = _as_rows(tensor.base.shape)
        if rows.stop > base_rows:  # a resized embedding's new rows: the adapter replaces the whole tensor
            return None
        ref = self.shard.base_ref(tensor)  # an added tensor (an untied head) starts from another's bytes
        return _read_rows(self.plan.job.base, ref.file, ref.data_start, ref.entry, rows).to(torch.float64)

    def _parts_rows(self, location: Location, rows: slice) -> dict[str, torch.Tensor]:
        """The rows of every stored part of the quantized weight that hold these rows, from the base or the
        output (where each part is in its own shard's output file)."""
        assert self.weight is not None and self.format is not None
        parts = {}
        for role, ref in self.weight.parts.items():
            span = self.format.part_rows(self.weight, role, rows)
            if location is self.plan.job.base:
                parts[role] = _read_rows(location, ref.file, ref.data_start, ref.entry, span)
                continue
            header = self.headers.get(ref.file)
            entry = header.by_name().get(ref.entry.name) if header else None
            if header is None or entry is None:
                raise _Unreadable(f"its {role} {ref.entry.name} is missing from {ref.file}")
            parts[role] = _read_rows(location, ref.file, header.data_start, entry, span)
        return parts

    def _output_rows(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor, tuple[float, torch.Tensor] | None]:
        """These rows as the output stores them, their float64 values, and for a re-quantized weight the bound of
        one rounding to its format (its codes are decoded with the output's own scales)."""
        assert self.entry is not None
        if not self.requantized:
            header = self.headers[self.shard.file]
            stored = _read_rows(self.plan.job.output, self.shard.file, header.data_start, self.entry, rows)
            return stored, stored.to(torch.float64), None
        assert self.weight is not None and self.format is not None
        parts = self._parts_rows(self.plan.job.output, rows)
        got = self.format.decode(self.weight, parts, rows)
        return parts[self.weight.primary], got, self.format.rounding(self.weight, parts, rows)

    # -- arithmetic --------------------------------------------------------------------------------------------

    def _expected_rows(self, base: torch.Tensor | None, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 base + updates for these rows, in plan order, and the bound on the merge's own float32 rounding
        in computing the deltas: (rank + 2) · eps · Σ|b||a|·|s| per value (a rank-r dot product and two more
        operations, whose terms may cancel), and for DoRA (log2 n + 4) · eps of the value (its norm over n)."""
        weight = base
        products = torch.zeros(()) if base is None else torch.zeros_like(base)
        compute_eps = torch.finfo(torch.float64 if self.tensor.dtype == "F64" else torch.float32).eps
        for update in self.tensor.updates:
            weight, factor = _apply_rows(update, weight, rows, self.shape, self.fetch)
            if update.kind == "replace":
                products = torch.zeros_like(weight)
            elif update.kind == "delta":
                size = _delta_rows(update, rows, self.shape, lambda key: self.fetch(key).abs()).abs()
                products = (products + size * ((update.rank or 1) + 2) * compute_eps) * factor
                if update.magnitude:  # DoRA's norm: a float32 sum over each norm's values, a root, a division
                    per_norm = math.prod(self.shape) / max(1, self.fetch(update.magnitude).numel())
                    products = products + weight.abs() * compute_eps * (math.log2(max(per_norm, 1)) + 4)
        assert weight is not None, f"{self.tensor.name}: rows beyond the base and no replacement"
        return weight, products

    def _compare(
        self,
        rows: slice,
        stored: torch.Tensor,
        got: torch.Tensor,
        expected: torch.Tensor,
        base: torch.Tensor | None,
        products: torch.Tensor,
        rounding: tuple[float, torch.Tensor] | None,
        problems: list[str],
    ) -> int:
        """Name the values beyond the rounding bound; return how many differ from the expected value rounded."""
        tensor, where = self.tensor, f"{self.shard.file}: {self.tensor.name} rows {rows.start}–{rows.stop - 1}"
        operands = expected.abs() if base is None else base.abs() + (expected - base).abs()
        if rounding is not None:
            assert self.weight is not None and self.format is not None
            relative, absolute = rounding
            bound = operands * relative + absolute + products
            # codes, not values: a scale a last bit apart (float32 vs float64 block maxima) moves every value
            values = expected.to(torch.float32).reshape(-1, *self.shape[1:])
            rounded = self.format.quantize(self.weight, values)[self.weight.primary].reshape(stored.shape)
            limit = self.format.label
        else:
            dtype = torch_dtype(tensor.dtype)
            info = torch.finfo(dtype)
            bound = operands * info.eps + info.tiny + products
            rounded = expected.to(dtype) if info.bits < 32 else None
            limit = tensor.dtype
        # NaN/Inf are judged by `check_non_finite`, on every value of the tensor against the base's: left out here.
        finite = _non_finite_mask(got)
        excess = (got - expected).abs() - bound
        if finite is not None:
            excess = excess.masked_fill(~finite, 0.0)
        if bool((excess > 0).any()):
            worst = int(excess.argmax())
            row, col = divmod(worst, got.shape[1])
            problems.append(
                f"{where}: {int((excess > 0).sum())} value(s) differ from base + adapter recomputed in float64 by "
                f"more than {limit}'s rounding (worst at row {rows.start + row}, "
                f"column {col}: {float(got[row, col]):.6g}, expected {float(expected[row, col]):.6g})"
            )
        differ = None if rounded is None else _bits(stored) != _bits(rounded)
        flips = 0 if differ is None else int((differ if finite is None else differ & finite).sum())
        # Stored units: a packed word (8 INT4 values) or byte (2 MXFP4 values) differs when any of its values does.
        units = stored.numel()
        if flips > FLIP_LIMIT * units:
            problems.append(
                f"{where}: {100 * flips / units:.1f}% of the stored values differ from base + adapter recomputed in "
                f"float64 and rounded (a correct merge differs in under {100 * FLIP_LIMIT:g}%): the adapter's change "
                "is missing or wrong there"
            )
        return flips


def _non_finite_mask(*tensors: torch.Tensor) -> torch.Tensor | None:
    """Where all of `tensors` are finite, or None when they are everywhere (the common case, found by one fast
    reduction: elementwise isfinite is ~20× slower on CPU)."""
    if all(all_finite(t) for t in tensors):
        return None
    mask = torch.isfinite(tensors[0])
    for tensor in tensors[1:]:
        mask &= torch.isfinite(tensor)
    return mask


def _apply_rows(
    update: Update, weight: torch.Tensor | None, rows: slice, shape: tuple[int, ...], fetch: Fetch64
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """One update on a run of rows of the tensor (seen as [rows, last dim]), in float64; with the factor it scales
    the rows by (DoRA), 1 otherwise."""
    cols = shape[-1] if len(shape) > 1 else max(1, math.prod(shape))
    if update.kind == "replace":
        return fetch(update.adapter_tensors[0]).reshape(-1, cols)[rows].clone(), 1.0
    assert weight is not None
    if update.kind == "rows":
        weight = weight.clone()
        new_rows = fetch(update.adapter_tensors[0]).reshape(-1, cols)
        for k, index in enumerate(update.indices or ()):
            if rows.start <= index < rows.stop:
                weight[index - rows.start] = new_rows[k]
        return weight, 1.0
    if update.rounded_to:  # ΔW rounded to the weight's dtype and added in it (PEFT's nn.MultiheadAttention merge)
        dtype = torch_dtype(update.rounded_to)
        delta = _delta_rows(update, rows, shape, fetch).to(dtype).to(torch.float64)
        return (weight + delta).to(dtype).to(torch.float64), 1.0
    combined = weight + _delta_rows(update, rows, shape, fetch)
    if not update.magnitude:
        return combined, 1.0
    if update.form != "linear":  # DoRA's norm across rows: `rows` is the whole tensor here (see _row_local)
        rescaled = combined.reshape(shape).clone()
        dora_rescale(rescaled, fetch(update.magnitude), update.form)
        rescaled = rescaled.reshape(combined.shape)
        factor = torch.where(combined != 0, rescaled / combined, 0.0)
        return rescaled, factor.abs()
    factor = (fetch(update.magnitude).reshape(-1)[rows] / torch.linalg.norm(combined, dim=1)).view(-1, 1)
    return combined * factor, factor.abs()


def _delta_rows(update: Update, rows: slice, shape: tuple[int, ...], fetch: Fetch64) -> torch.Tensor:
    """ΔW of a run of rows in float64, without the rest of the tensor where the form allows it."""
    s = update.scale
    cols = shape[-1] if len(shape) > 1 else max(1, math.prod(shape))
    if update.form in TILED_FORMS:
        return delta_weight(update, fetch, (rows, slice(None)))
    if update.form in ("linear_t", "embedding"):
        A, B = lora_factors(update, fetch)
        return (B @ A[:, rows]).T * s
    if update.form == "experts" and len(shape) == 3:
        A3, B3 = expert_factors(update, fetch)
        per_expert = shape[1]
        parts = []
        for expert in range(rows.start // per_expert, (rows.stop - 1) // per_expert + 1):
            delta = B3[:, :, expert] @ A3[expert]  # (out, in)
            if update.experts_layout != "eoi":
                delta = delta.T
            low = max(rows.start - expert * per_expert, 0)
            high = min(rows.stop - expert * per_expert, per_expert)
            parts.append(delta[low:high] * s)
        return torch.cat(parts)
    return delta_weight(update, fetch).reshape(-1, cols)[rows]  # conv, bias: small


def _checked_as_a_weight(tensor: PlannedTensor) -> bool:
    """Whether validation recomputes this tensor's values: not a dropped part of a quantized weight, nor a
    re-quantized part other than the one that carries the weight (its primary: checked with all its parts)."""
    role = tensor.quantized
    return role is None or (not tensor.dropped and role.role == role.weight.primary)


def _row_local(tensor: PlannedTensor) -> bool:
    """Whether sampled rows can be recomputed alone (DoRA other than on a linear weight needs every row)."""
    return all(not u.magnitude or u.form == "linear" for u in tensor.updates)


def _as_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """A tensor as [rows, last dimension]; a vector or scalar is one row."""
    if len(shape) < 2:
        return 1, max(1, math.prod(shape))
    return math.prod(shape[:-1]), shape[-1]


def _sample_runs(name: str, rows: int, cols: int, align: int) -> list[slice]:
    """Four runs of whole `align`-row groups: start, middle, end, and one place picked from the tensor's name."""
    length = align * max(1, math.ceil(max(1, RUN_VALUES // cols) / align))
    groups = math.ceil(rows / align)
    picked = _seed(name) % groups
    starts = sorted({0, groups // 2 * align, max(0, rows - length) // align * align, picked * align})
    runs: list[slice] = []
    for start in starts:
        stop = min(rows, start + length)
        if runs and start < runs[-1].stop:
            runs[-1] = slice(runs[-1].start, max(stop, runs[-1].stop))
        else:
            runs.append(slice(start, stop))
    return runs


def _read_rows(location: Location, file: str, data_start: int, entry: TensorEntry, rows: slice) -> torch.Tensor:
    """Rows of a stored tensor (seen as [rows, last dim]) with one ranged read, as a tensor of its own dtype."""
    _, cols = _as_rows(entry.shape)
    itemsize = DTYPES[entry.dtype][1]
    row_bytes = cols * itemsize
    begin = data_start + entry.begin + rows.start * row_bytes
    data = location.read_bytes(file, begin, begin + (rows.stop - rows.start) * row_bytes)
    if len(data) != (rows.stop - rows.start) * row_bytes:
        raise _Unreadable(f"{file}: {entry.name} is cut short")
    return torch.frombuffer(bytearray(data), dtype=torch_dtype(entry.dtype)).reshape(-1, cols)


def _bits(values: torch.Tensor) -> torch.Tensor:
    """Stored values as integers of their width, to compare encodings (FP8 has no `!=` on CPU)."""
    return values.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()])


def _seed(text: str) -> int:
    """A number picked by a name: the same places are sampled on every run."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _position(index: list[int], rows: slice) -> str:
    return f"row {rows.start + index[0]}, column {index[1]}"


def _compare_copied_bytes(plan: MergePlan, shard: ShardPlan, header: ShardHeader, problems: list[str]) -> int:
    """Compare a few byte ranges of the tensors copied from the base with the base's bytes; return how many."""
    written = header.by_name()
    copied = [t for t in shard.tensors if not t.computed and not t.dropped and t.base.nbytes and t.name in written]
    samples = list(_copied_samples(shard.file, copied))
    for tensor, offset, length in samples:
        out_entry = written[tensor.name]
        if out_entry.nbytes != tensor.base.nbytes:
            continue  # the structure checks name a changed size
        ref = shard.base_ref(tensor)  # an added tensor (an untied head) is a copy of another's bytes
        base_bytes = plan.job.base.read_bytes(ref.file, ref.span[0] + offset, ref.span[0] + offset + length)
        out_bytes = plan.job.output.read_bytes(
            shard.file,
            header.data_start + out_entry.begin + offset,
            header.data_start + out_entry.begin + offset + length,
        )
        if base_bytes != out_bytes:
            problems.append(
                f"{shard.file}: {tensor.name} should be the base's bytes (the adapter does not touch it), but bytes "
                f"{offset}–{offset + length - 1} differ"
            )
    return len(samples)


def _copied_samples(file: str, copied: list[PlannedTensor]) -> Iterator[tuple[PlannedTensor, int, int]]:
    """(tensor, offset within it, length): the first and last copied tensors' edges, and places picked from the
    file's name along the copied bytes."""
    if not copied:
        return
    total = sum(t.base.nbytes for t in copied)
    seed = _seed(file)
    points = {0, total - 1} | {(seed >> (16 * k)) % total for k in range(COPY_SAMPLES - 2)}
    for point in sorted(points):
        before = 0
        for tensor in copied:
            size = tensor.base.nbytes
            if point < before + size:
                start = min(point - before, max(0, size - COPY_SAMPLE_BYTES))  # a whole sample where the tensor allows
                yield tensor, start, min(COPY_SAMPLE_BYTES, size - start)
                break
            before += size
