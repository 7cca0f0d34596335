"""The merge deployment's trigger and schedule, for `lora-merge serve`; deployments/prefect.yaml declares the same
ones for a work pool (a test keeps the two equal)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prefect_lora_merge.core.errors import LoraMergeError
from prefect_lora_merge.flows.events import ADAPTER_READY, ADAPTER_RESOURCE

DEPLOYMENT = "lora-merge"
WORK_POOL = "lora-merge"
TRIGGER = "adapter-ready"


# What a run the trigger starts takes from the event (announce_adapter's payload). An event without `overwrite`
# (emitted by other tools) does not replace another adapter's merge.
# The adapter is one URI or a list of them (several adapters in one pass): rendered as JSON, then parsed, so a list
# arrives as a list and not as its Python repr.
ADAPTER_FROM_EVENT = {
    "__prefect_kind": "json",
    "value": {"__prefect_kind": "jinja", "template": "{{ event.payload.adapter | tojson }}"},
}
OUTPUT_FROM_EVENT = "{{ event.payload.output }}"
OVERWRITE_FROM_EVENT = "{{ event.payload.overwrite | default(false) }}"


def trigger_parameters(
    base: str, storage_options: dict[str, Any] | None = None, storage_block: str | None = None
) -> dict[str, Any]:
    """The flow's `params` for a run an adapter-ready event starts: the adapter and the output from the event, the
    base fixed, and runs on one output queued one after another."""
    return _params(base, ADAPTER_FROM_EVENT, OUTPUT_FROM_EVENT, OVERWRITE_FROM_EVENT, storage_options, storage_block)


def _params(
    base: str,
    adapter: str | list[str] | dict[str, Any],
    output: str,
    overwrite: bool | str,
    storage_options: dict[str, Any] | None,
    storage_block: str | None = None,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "base": base,
        "adapter": adapter,
        "output": output,
        "overwrite": overwrite,
        "wait_for_output": True,
    }
    if storage_options:
        params["storage_options"] = storage_options
    if storage_block:  # the block's name only: each run reads its secrets from the server
        params["storage_block"] = storage_block
    return {"params": params}


# Keys of storage options that hold credentials: they would be stored in the deployment's parameters, readable by
# anyone who can read the deployment. Workers take credentials from their own environment instead.
SECRET_OPTION_KEYS = ("key", "secret", "token", "password", "credential")


def _refuse_secrets(storage_options: dict[str, Any] | None) -> None:
    def keys(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
        """(dotted path, key) of every key, nested ones included."""
        if isinstance(value, dict):
            for key, inner in value.items():
                yield prefix + str(key), str(key).lower()
                yield from keys(inner, f"{prefix}{key}.")

    secret = [path for path, key in keys(storage_options) if any(word in key for word in SECRET_OPTION_KEYS)]
    if secret:
        raise LoraMergeError(
            f"--storage-options {', '.join(secret)}: a served deployment stores its parameters on the Prefect "
            "server, readable by anyone who can read the deployment; give credentials to the serving process's "
            "environment instead (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) or to a Prefect block "
            "(--storage-block NAME), and keep only endpoints and the like in --storage-options"
        )


def adapter_ready_trigger(base: str, storage_options: dict[str, Any] | None = None, storage_block: str | None = None):
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=TRIGGER,
        enabled=True,
        match={"prefect.resource.id": ADAPTER_RESOURCE + "*"},
        expect={ADAPTER_READY},
        posture="Reactive",
        threshold=1,
        within=0,
        parameters=trigger_parameters(base, storage_options, storage_block),
    )


def serve(
    base: str,
    *,
    name: str = DEPLOYMENT,
    cron: str | None = None,
    adapter: str | list[str] | None = None,
    output: str | None = None,
    storage_options: dict[str, Any] | None = None,
    storage_block: str | None = None,
    limit: int | None = None,
) -> None:
    """Serve the merge flow from this process (no work pool): started by adapter-ready events, and by `cron` for
    `adapter` into `output` when given. Runs until interrupted."""
    from prefect.schedules import Cron
    from prefect.settings import PREFECT_API_URL

    from prefect_lora_merge.flows.merge import lora_merge

    if not PREFECT_API_URL.value():
        raise LoraMergeError(
            "lora-merge serve needs a Prefect server (events and schedules are evaluated there): start one "
            "(infra/local_stack.py start) and export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    if cron and not (adapter and output):
        raise LoraMergeError(
            "--cron merges its adapter(s) into one output on a schedule: give --adapter (repeatable) and --output"
        )
    if (adapter or output) and not cron:
        raise LoraMergeError(
            "--adapter and --output name what --cron merges; without --cron the deployment merges what each "
            "adapter-ready event names: give --cron too, or leave them out"
        )
    _refuse_secrets(storage_options)
    schedules = []
    if cron:
        # The adapter at that path changes between runs: each run replaces the last one's merge (an unchanged
        # adapter finds every shard committed and only validates again).
        params = _params(base, adapter, output, True, storage_options, storage_block)
        try:
            schedules.append(Cron(cron, timezone="UTC", parameters=params))
        except ValueError as exc:
            raise LoraMergeError(f"--cron {cron!r} is not a cron expression ({exc})") from None
    lora_merge.serve(
        name=name,
        triggers=[adapter_ready_trigger(base, storage_options, storage_block)],
        schedules=schedules or None,
        limit=limit,
        print_starting_message=True,
    )
