"""`lora-merge`: parse options, call the flow or the core, report. No merge logic lives here."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from prefect_lora_merge.core.errors import LoraMergeError

if TYPE_CHECKING:  # the CLI imports torch-backed modules only when a command needs them
    from prefect_lora_merge.core.options import MergeParameters
    from prefect_lora_merge.core.recompute import TensorNumbers
    from prefect_lora_merge.flows.merge import MergeSummary


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if isinstance(getattr(args, "adapter", None), list) and len(args.adapter) == 1:
        args.adapter = args.adapter[0]  # one adapter: a plain string, as it always was in parameters and events
    try:
        storage_options = _storage_options(args)
        return int(args.handler(args, storage_options) or 0)
    except LoraMergeError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing incomplete was published, re-run the same command to finish")
    except Exception as exc:
        if getattr(args, "verbose", False):
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (re-run with --verbose for the traceback, and report it)")
    return 1


def _fail(message: str) -> None:
    print(f"lora-merge: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(1)


class _Parser(argparse.ArgumentParser):
    """A usage error is one stderr line too, like every other refusal (argparse would print the usage above it);
    exit status 2, argparse's own for usage errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lora-merge: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lora-merge",
        description="Merge a PEFT LoRA adapter into a sharded safetensors checkpoint, shard by shard.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def adapter_option(p: argparse.ArgumentParser, *, required: bool = False, help: str | None = None) -> None:
        p.add_argument(
            "--adapter",
            action="append",
            required=required,
            metavar="PATH[:WEIGHT]",
            type=_adapter,
            help=help
            or "PEFT adapter directory or URI, optionally with a weight (default 1, may be negative); repeat it to "
            "merge several adapters in one pass: W + Σ weight·ΔW",
        )

    def inputs(p: argparse.ArgumentParser, *, output_help: str) -> None:
        p.add_argument("--base", required=True, help="base checkpoint directory or URI")
        adapter_option(p, required=True)
        p.add_argument("--output", required=True, help=output_help)
        p.add_argument("--device", type=_device, default="auto", help="auto, cpu or cuda[:N] (default: auto)")
        p.add_argument("--storage-options", metavar="JSON", help="fsspec options as JSON, e.g. an endpoint_url")
        storage_block(p)
        output_dtype(p, default="auto")
        as_quantized(p)
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.add_argument("--verbose", action="store_true", help="show Prefect's logs and full tracebacks")

    def storage_block(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--storage-block",
            metavar="NAME",
            help="S3 credentials from a Prefect block (prefect-aws AwsCredentials, MinIOCredentials or S3Bucket; "
            "NAME or TYPE/NAME), read from the Prefect server where the storage is opened",
        )

    def output_dtype(p: argparse.ArgumentParser, *, default: str | None) -> None:
        p.add_argument(
            "--output-dtype",
            choices=("auto", "bf16", "keep", "fp8"),
            default=default,
            help="quantized bases (block-FP8, INT4, MXFP4) only: bf16 (auto) dequantizes every quantized weight; "
            "keep leaves untouched quantized weights byte for byte and re-quantizes touched ones in the base's "
            "format (fp8: the same, its older name)",
        )

    def as_quantized(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--as-quantized",
            choices=("nf4", "fp4"),
            help="16-bit base, QLoRA adapter: put every Linear weight through bitsandbytes' 4-bit round trip before "
            "adding the delta (the weights the adapter was trained against; see the README's QLoRA section)",
        )
        p.add_argument(
            "--as-quantized-blocksize",
            type=int,
            choices=(32, 64, 128, 256, 512, 1024, 2048, 4096),  # bitsandbytes' block sizes
            metavar="N",
            help="with --as-quantized: the 4-bit block size (default: 64, QLoRA's)",
        )
        p.add_argument(
            "--as-quantized-double-quant",
            choices=("on", "off"),
            help="with --as-quantized: double quantization of the block scales (default: on, QLoRA's)",
        )
        p.add_argument(
            "--as-quantized-skip",
            action="append",
            metavar="MODULE",
            help="with --as-quantized: a module the 4-bit load kept in 16 bits (llm_int8_skip_modules; repeat it). "
            "As in transformers, the list replaces the default, the output head: add lm_head to keep it",
        )

    run = sub.add_parser("run", help="merge through the Prefect flow")
    inputs(run, output_help="where the merged checkpoint goes")
    run.add_argument(
        "--workers",
        type=_count,
        help="shards merged at once (default: as many as the CPUs, the shards and --max-memory allow)",
    )
    run.add_argument(
        "--max-memory",
        type=_memory_size,
        metavar="SIZE",
        help="memory the shard merges may use together, like 16GiB (default: 80%% of what is available)",
    )
    run.add_argument(
        "--runner",
        choices=("threads", "dask"),
        default="threads",
        help="where shard tasks run: threads of this process (default), or a Dask cluster through prefect-dask",
    )
    run.add_argument(
        "--dask-address",
        metavar="ADDRESS",
        help="with --runner dask: the scheduler of a running cluster, like tcp://10.0.0.5:8786 (default: a local "
        "cluster on this machine)",
    )
    run.add_argument(
        "--dask-workers",
        type=_count,
        metavar="N",
        help="with --runner dask and no --dask-address: worker processes of the local cluster (default: as many "
        "as the CPUs, the shards and --max-memory allow)",
    )
    run.add_argument("--overwrite", action="store_true", help="replace an output holding a different merge")
    run.add_argument("--break-lock", action="store_true", help="take the output's lease from a run that is dead")
    run.add_argument(
        "--wait-for-output",
        action="store_true",
        help="if another run is writing the same output, wait for it to finish (a Prefect concurrency limit of one "
        "run per output, then the output's lease) instead of failing",
    )
    run.add_argument(
        "--min-delta-cosine",
        type=_cosine,
        metavar="C",
        help="with --output-dtype keep: fail when a re-quantized weight keeps less of its delta than this cosine",
    )
    # its name while block-FP8 was the only quantized format
    run.add_argument("--fp8-min-cosine", dest="min_delta_cosine", type=_cosine, help=argparse.SUPPRESS)
    run.set_defaults(handler=_run)

    plan = sub.add_parser("plan", help="dry run: what would be merged, where, and the memory it needs")
    inputs(plan, output_help="the output the merge would write (checked, not written)")
    plan.add_argument(
        "--kubernetes",
        metavar="DIR",
        help="also write DIR/job-variables.json (for infra/kubernetes/work-pool-job-template.json) and "
        "DIR/dask-cluster.yaml (a DaskCluster for the dask-kubernetes operator), sized from this plan",
    )
    plan.add_argument("--image", help="with --kubernetes: the image that has prefect-lora-merge installed")
    plan.add_argument(
        "--shards-at-once",
        type=_count,
        default=1,
        metavar="N",
        help="with --kubernetes: shards the work-pool job merges at once (default: 1)",
    )
    plan.add_argument(
        "--dask-workers", type=_count, default=4, metavar="N", help="with --kubernetes: Dask workers (default: 4)"
    )
    plan.add_argument("--gpu", action="store_true", help="with --kubernetes: one GPU per job and per Dask worker")
    plan.add_argument(
        "--prefect-api-url",
        metavar="URL",
        help="with --kubernetes: the Prefect API the Dask workers (and the job) report to, as the cluster reaches it",
    )
    plan.set_defaults(handler=_plan)

    validate = sub.add_parser("validate", help="check a merged output (against base + adapter when given)")
    validate.add_argument("--output", required=True, help="the merged checkpoint to check")
    validate.add_argument("--base", help="base checkpoint (with --adapter: check against a fresh plan)")
    adapter_option(validate, help="PEFT adapter (with --base), PATH[:WEIGHT]; repeat it for a merge of several")
    validate.add_argument("--storage-options", metavar="JSON", help="fsspec options as JSON")
    storage_block(validate)
    output_dtype(validate, default=None)
    as_quantized(validate)
    validate.add_argument(
        "--forward",
        action="store_true",
        help="also load the output with transformers and compare its logits with PEFT's merge (models that fit "
        "in memory; needs --base and --adapter)",
    )
    validate.add_argument("--json", action="store_true", help="print the report as JSON")
    validate.add_argument("--verbose", action="store_true", help="show full tracebacks")
    validate.set_defaults(handler=_validate)

    serve = sub.add_parser(
        "serve",
        help="serve the merge flow from this process (no work pool): merges start on adapter-ready events and on "
        "an optional cron schedule; needs PREFECT_API_URL",
    )
    serve.add_argument("--base", required=True, help="the base checkpoint every merge of this deployment uses")
    serve.add_argument("--name", default="lora-merge", help="the deployment's name (default: lora-merge)")
    serve.add_argument("--cron", help='also merge --adapter into --output on this UTC schedule, like "0 3 * * *"')
    adapter_option(serve, help="with --cron: the adapter to merge (a path the training job overwrites); repeatable")
    serve.add_argument("--output", help="with --cron: where its merge goes (each run replaces the last one's)")
    serve.add_argument("--limit", type=_count, help="merges this process runs at once (default: no limit)")
    serve.add_argument("--storage-options", metavar="JSON", help="fsspec options as JSON for every merge it runs")
    storage_block(serve)
    serve.add_argument("--verbose", action="store_true", help="show full tracebacks")
    serve.set_defaults(handler=_serve)

    announce = sub.add_parser(
        "announce",
        help="emit the adapter-ready event that starts a deployed merge (for a training job's last step); needs "
        "PREFECT_API_URL",
    )
    adapter_option(
        announce, required=True, help="the adapter's URI, as the merge workers reach it, PATH[:WEIGHT]; repeatable"
    )
    announce.add_argument("--output", required=True, help="where its merge goes")
    announce.add_argument(
        "--overwrite",
        action="store_true",
        help="the output may hold a merge of another adapter: replace it (else that merge is refused)",
    )
    announce.add_argument("--verbose", action="store_true", help="show full tracebacks")
    announce.set_defaults(handler=_announce)

    demo = sub.add_parser("demo", help="build a tiny model and adapter, merge them through the flow, check vs PEFT")
    demo.add_argument("--workdir", default="demo-output", help="where the demo's files go (default: ./demo-output)")
    demo.add_argument("--workers", type=_count)
    demo.add_argument("--verbose", action="store_true", help="show Prefect's logs and full tracebacks")
    demo.set_defaults(handler=_demo)
    return parser


# Option types. Each refuses with a whole sentence (argparse prints it after "argument --option:"); a ValueError
# would make argparse name the function instead ("invalid _positive value").


def _count(text: str) -> int:
    """A whole number of at least 1 (--workers, --dask-workers, --shards-at-once, --limit)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def _cosine(text: str) -> float:
    """A cosine between -1 and 1 (--min-delta-cosine)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number from -1 to 1, like 0.9, not {text!r}")
    return value


def _memory_size(text: str) -> str:
    """A size like 16GiB (--max-memory); kept as written, the merge parameters parse it again."""
    from prefect_lora_merge.core.resources import parse_size

    try:
        parse_size(text)
    except LoraMergeError:
        raise argparse.ArgumentTypeError(f"must be a size like 16GiB, 500MB or 2000000000, not {text!r}") from None
    return text


def _adapter(text: str) -> str:
    """PATH or PATH:WEIGHT (--adapter), checked as the merge will read it; kept as given."""
    from prefect_lora_merge.core.adapter_spec import AdapterSpec

    try:
        AdapterSpec.parse(text)
    except LoraMergeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def _device(text: str) -> str:
    """auto, cpu or cuda[:N] (--device); whether this machine has it is checked before a merge writes anything."""
    from prefect_lora_merge.core.resources import DEVICE_PATTERN

    if not re.fullmatch(DEVICE_PATTERN, text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu or cuda[:N] (like cuda:1), not {text!r}")
    return text


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    raw = getattr(args, "storage_options", None)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraMergeError(f"--storage-options is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise LoraMergeError("--storage-options must be a JSON object")
    return value


def _quiet_prefect(verbose: bool) -> None:
    """Prefect's console logs go to stdout, so stderr carries only our one-line error, and only with --verbose:
    this command reports the outcome itself (the Prefect UI/API still gets every log)."""
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_STREAM", "ext://sys.stdout")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A first ephemeral server start takes ~25 s on 2 cores; Prefect's default timeout is tighter than that.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def _run(args: argparse.Namespace, storage_options: dict[str, Any]) -> int:
    _quiet_prefect(args.verbose)
    from prefect_lora_merge.flows.api import ephemeral_api_ahead

    with ephemeral_api_ahead() as api:  # Prefect's ephemeral server starts while torch and the flow are imported
        from prefect_lora_merge.flows import run_merge

        params = _parameters(
            base=args.base,
            adapter=args.adapter,
            output=args.output,
            device=args.device,
            workers=args.workers,
            max_memory=args.max_memory,
            runner=args.runner,
            dask_address=args.dask_address,
            dask_workers=args.dask_workers,
            overwrite=args.overwrite,
            break_lock=args.break_lock,
            wait_for_output=args.wait_for_output,
            output_dtype=args.output_dtype,
            min_delta_cosine=args.min_delta_cosine,
            storage_options=storage_options,
            storage_block=args.storage_block,
            **_as_quantized_parameters(args),
        )
        api.ready()
        summary = run_merge(params)
    if args.json:
        print(summary.model_dump_json(indent=2))
    else:
        resumed = (
            f" ({len(summary.resumed_shards)} committed by an earlier run, skipped)" if summary.resumed_shards else ""
        )
        copied = (
            f" ({_size(summary.bytes_copied_server_side)} of it copied server-side: untouched shards)"
            if summary.bytes_copied_server_side
            else ""
        )
        print(
            f"merged {summary.shards} shard(s){resumed}, {summary.tensors_touched} tensor(s) changed, "
            f"{_size(summary.bytes_written)} written{copied} in {summary.seconds:.1f} s -> {summary.output} "
            f"({_where(summary)})"
        )
        merging = max(summary.seconds - summary.validation_seconds, 1e-9)
        print(
            f"validation passed in {summary.validation_seconds:.1f} s ({summary.validation_seconds / merging:.0%} of "
            f"the merge's time): {', '.join(f'{v} {k}' for k, v in summary.validation_checks.items())}"
        )
        if summary.largest_change is not None:
            _print_largest_change(summary.largest_change)
        peak = summary.largest_measured_peak
        if peak is not None and peak.peak_memory_bytes is not None:
            grew = peak.peak_memory_bytes - (peak.start_memory_bytes or 0)
            above = sum(1 for f in summary.shard_figures if f.above_estimate)
            print(
                f"measured memory: at most {_size(grew)} above the process's start while merging {peak.file} "
                f"(estimate {_size(peak.estimated_peak_bytes or 0)}; process peak {_size(peak.peak_memory_bytes)})"
                + (f"; {above} shard(s) ABOVE their estimate: a bug in the estimate" if above else "")
            )
        if summary.worst_delta_survival is not None:
            worst = summary.worst_delta_survival
            print(
                f"worst delta survival after re-quantization: {worst.tensor} cosine {worst.cosine:.4f}, relative error "
                f"{worst.relative_error:.3f} ({len(summary.weak_delta_survivals)} weight(s) under the warning level)"
            )
        for weak in summary.weak_delta_survivals[:10]:
            print(f"warning: {weak.tensor}: only cosine {weak.cosine:.3f} of its delta survived re-quantization")
        if summary.round_trip_shifts:
            from prefect_lora_merge.core.formats.survival import round_trip_summary

            print(f"as-quantized: {round_trip_summary(summary.round_trip_shifts)}")
        for decision in summary.decisions:
            print(f"note: {decision}")
    return 0


def _parameters(**values: Any) -> MergeParameters:
    """`MergeParameters` from options; a value it refuses is reported by its option's name."""
    from pydantic import ValidationError

    from prefect_lora_merge.core.options import MergeParameters

    try:
        return MergeParameters(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            option = f"--{field.replace('_', '-')}: " if field else ""
            problems.append(option + error["msg"].removeprefix("Value error, "))
        raise LoraMergeError("; ".join(problems)) from None


def _credentials(args: argparse.Namespace) -> Any:
    """--storage-block for the commands that open storage here (plan, validate): the block, read from the Prefect
    server (PREFECT_API_URL, else an ephemeral one) when the storage is opened; None without one."""
    from prefect_lora_merge.core.options import block_reference

    reference = block_reference(args.storage_block)
    if reference is None:
        return None
    _quiet_prefect(args.verbose)
    from prefect_lora_merge.blocks import StorageBlock

    return StorageBlock(reference)


def _plan(args: argparse.Namespace, storage_options: dict[str, Any]) -> int:
    from prefect_lora_merge.core.plan import make_plan

    plan = make_plan(
        args.base,
        args.adapter,
        args.output,
        device=args.device,
        storage_options=storage_options,
        credentials=_credentials(args),
        output_dtype=args.output_dtype,
        as_quantized=_parameters(
            base=args.base, adapter=args.adapter, output=args.output, **_as_quantized_parameters(args)
        ).round_trip(),
    )
    if args.kubernetes:
        _write_kubernetes(args, plan.estimated_peak_bytes)
    elif args.image or args.gpu:
        raise LoraMergeError("--image and --gpu size the --kubernetes files: give --kubernetes DIR too")
    adapters = plan.job.adapters
    rows = [
        {
            "shard": s.file,
            "tensors": len(s.tensors),
            "touched": len(s.touched),
            "bytes": s.base_size,
            "estimated_peak_bytes": s.peak_bytes(adapters),
            "updates": {t.name: [u.kind if u.kind != "delta" else u.form for u in t.updates] for t in s.touched},
        }
        for s in plan.shards
    ]
    if args.json:
        print(json.dumps({"summary": plan.summary(), "shards": rows}, indent=2))
        return 0
    width = max(len(r["shard"]) for r in rows)
    print(f"{'shard':<{width}}  tensors  touched      bytes  peak memory")
    for r in rows:
        print(
            f"{r['shard']:<{width}}  {r['tensors']:>7}  {r['touched']:>7}  {_size(r['bytes']):>9}  "
            f"{_size(r['estimated_peak_bytes']):>11}"
        )
    s = plan.summary()
    print(
        f"total: {s['shards']} shards ({s['shards_touched']} touched), {s['tensors_touched']} of {s['tensors']} "
        f"tensors changed by {s['adapter_tensors']} adapter tensors, {_size(s['bytes'])}; estimated peak memory "
        f"per shard task {_size(s['estimated_peak_bytes'])}"
    )
    for decision in plan.decisions:
        print(f"note: {decision}")
    print("dry run: nothing was written")
    return 0


def _where(summary: MergeSummary) -> str:
    threads = (
        f"{summary.compute_threads} compute thread(s) each"
        if summary.compute_threads
        else "each Dask worker's own compute threads"
    )
    on = " on Dask" if summary.runner == "dask" else ""
    return f"{summary.workers} shard(s) at once{on}, {threads}"


def _write_kubernetes(args: argparse.Namespace, peak_per_shard: int) -> None:
    from pathlib import Path

    import yaml

    from prefect_lora_merge.core.sizing import dask_cluster, job_variables, merge_pod

    if not args.image:
        raise LoraMergeError("--kubernetes needs --image: an image with prefect-lora-merge[s3,dask] installed")
    directory = Path(args.kubernetes)
    env = {"PREFECT_API_URL": args.prefect_api_url} if args.prefect_api_url else None
    pod = merge_pod(peak_per_shard, args.shards_at_once, gpus=1 if args.gpu else 0)
    variables = job_variables(pod, args.image, env)
    cluster = dask_cluster("lora-merge", args.image, args.dask_workers, peak_per_shard, gpu=args.gpu, env=env)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "job-variables.json").write_text(json.dumps(variables, indent=2) + "\n")
        (directory / "dask-cluster.yaml").write_text(yaml.safe_dump(cluster, sort_keys=False))
    except OSError as exc:
        raise LoraMergeError(
            f"--kubernetes {directory}: cannot write {exc.filename} ({exc.strerror}); give a directory this user "
            "may write"
        ) from None
    print(  # stderr: with --json, stdout holds the plan alone
        f"wrote {directory / 'job-variables.json'} (a job of {pod.memory}, {pod.cpu} CPUs, {pod.gpus} GPU) and "
        f"{directory / 'dask-cluster.yaml'} ({args.dask_workers} Dask workers of "
        f"{_size(peak_per_shard)} per shard each); see infra/README.md",
        file=sys.stderr,
    )
    if env is None:
        print(
            "note: the Dask workers need PREFECT_API_URL (the Prefect server the flow reports to; else each starts "
            "a server of its own): give --prefect-api-url, or add it to dask-cluster.yaml's worker env",
            file=sys.stderr,
        )


def _validate(args: argparse.Namespace, storage_options: dict[str, Any]) -> int:
    from prefect_lora_merge.core.errors import ValidationFailed
    from prefect_lora_merge.core.plan import make_plan
    from prefect_lora_merge.core.storage import Location
    from prefect_lora_merge.core.validate import validate_output

    if bool(args.base) != bool(args.adapter):
        raise LoraMergeError("validate needs both --base and --adapter, or neither")
    if args.forward and not args.base:
        raise LoraMergeError("validate --forward needs --base and --adapter: it compares with PEFT's merge of them")
    credentials = _credentials(args)
    output = Location.parse(args.output, storage_options, credentials=credentials, what="--output")
    plan = None
    if args.base:
        merged = _merged_manifest(output)
        output_dtype = args.output_dtype or (merged.output_dtype if merged is not None else "auto")
        if args.as_quantized is not None:
            round_trip = _parameters(
                base=args.base, adapter=args.adapter, output=args.output, **_as_quantized_parameters(args)
            ).round_trip()
        else:  # as the output was merged, from its manifest
            round_trip = merged.as_quantized if merged is not None else None
        plan = make_plan(
            args.base,
            args.adapter,
            output,
            storage_options=storage_options,
            credentials=credentials,
            output_dtype=output_dtype,
            as_quantized=round_trip,
        )
    report = validate_output(output, plan, forward=args.forward)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        for failure in report.failures:
            print(f"FAIL {failure}")
        checked = ", ".join(f"{v} {k}" for k, v in report.checks.items())
        print(f"{'passed' if report.passed else 'FAILED'}: {checked} ({report.seconds:.1f} s)")
        if report.forward is not None:
            f = report.forward
            print(
                f"forward ({f.architecture}, {f.tokens} tokens): logits {f.relative_diff:.2g} from PEFT's merge "
                f"(allowed {f.allowed:g}; the adapter moves them {f.adapter_effect:.2g})"
            )
        changes = report.largest_changes()
        if changes:
            _print_largest_change(changes[0])
        if report.round_trip_shifts:
            from prefect_lora_merge.core.formats.survival import round_trip_summary

            print(f"as-quantized: {round_trip_summary(report.round_trip_shifts)}")
    if not report.passed:
        raise ValidationFailed(report.failures)
    return 0


def _print_largest_change(change: TensorNumbers) -> None:
    """The touched tensor the merge changed most, as `run` and `validate` print it."""
    print(f"largest change ‖ΔW‖/‖W‖: {change.relative_change:.3g} on {change.tensor}")


def _merged_manifest(output: Any) -> Any:
    """The output's manifest (how it was merged: --output-dtype, --as-quantized), or None without a readable one."""
    from prefect_lora_merge.core.consolidate import read_manifest

    try:
        return read_manifest(output)
    except LoraMergeError:
        return None


def _as_quantized_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """--as-quantized and its settings as MergeParameters fields (only those given: the rest keep their defaults)."""
    given = {
        "as_quantized": args.as_quantized,
        "as_quantized_blocksize": args.as_quantized_blocksize,
        "as_quantized_double_quant": None
        if args.as_quantized_double_quant is None
        else args.as_quantized_double_quant == "on",
        "as_quantized_skip": args.as_quantized_skip,
    }
    return {k: v for k, v in given.items() if v is not None}


def _serve(args: argparse.Namespace, storage_options: dict[str, Any]) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect_lora_merge.core.options import block_reference
    from prefect_lora_merge.flows.deployment import serve

    serve(
        args.base,
        name=args.name,
        cron=args.cron,
        adapter=args.adapter,
        output=args.output,
        storage_options=storage_options or None,
        storage_block=block_reference(args.storage_block),
        limit=args.limit,
    )
    return 0


def _announce(args: argparse.Namespace, storage_options: dict[str, Any]) -> int:
    import logging

    from prefect_lora_merge.flows.events import announce_adapter

    if not args.verbose:  # "Still processing items: 1" while the event is sent: this command reports that itself
        logging.getLogger("EventsWorker").setLevel(logging.ERROR)

    event = announce_adapter(args.adapter, args.output, overwrite=args.overwrite)
    named = args.adapter if isinstance(args.adapter, str) else " + ".join(args.adapter)
    print(f"announced {named} -> {args.output} (event {event})")
    return 0


def _demo(args: argparse.Namespace, storage_options: dict[str, Any]) -> int:
    _quiet_prefect(args.verbose)
    from prefect_lora_merge.flows.api import ephemeral_api_ahead

    with ephemeral_api_ahead() as api:  # starting while the demo's models are built
        from prefect_lora_merge.demo import run_demo

        print(run_demo(args.workdir, workers=args.workers, before_merge=api.ready))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


if __name__ == "__main__":
    sys.exit(main())
