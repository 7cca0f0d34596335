"""The merge deployment's trigger and schedule, for `lora-merge serve`; deployments/prefect.yaml declares the same
ones for a work pool (a test keeps the two equal)."""

from __future__ import annotations

from typing import Any

from prefect_lora_merge.core.errors import LoraMergeError
from prefect_lora_merge.flows.events import ADAPTER_READY, ADAPTER_RESOURCE

DEPLOYMENT = "lora-merge"
WORK_POOL = "lora-merge"
TRIGGER = "adapter-ready"


def trigger_parameters(base: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flow's `params` for a run an adapter-ready event starts: the adapter and the output from the event, the
    base fixed, and runs on one output queued one after another."""
    params: dict[str, Any] = {
        "base": base,
        "adapter": "{{ event.payload.adapter }}",
        "output": "{{ event.payload.output }}",
        "wait_for_output": True,
    }
    if storage_options:
        params["storage_options"] = storage_options
    return {"params": params}


def adapter_ready_trigger(base: str, storage_options: dict[str, Any] | None = None):
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=TRIGGER,
        enabled=True,
        match={"prefect.resource.id": ADAPTER_RESOURCE + "*"},
        expect={ADAPTER_READY},
        posture="Reactive",
        threshold=1,
        within=0,
        parameters=trigger_parameters(base, storage_options),
    )


def serve(
    base: str,
    *,
    name: str = DEPLOYMENT,
    cron: str | None = None,
    adapter: str | None = None,
    output: str | None = None,
    storage_options: dict[str, Any] | None = None,
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
        raise LoraMergeError("--cron merges one adapter into one output on a schedule: give --adapter and --output")
    schedules = []
    if cron:
        params: dict[str, Any] = {"base": base, "adapter": adapter, "output": output, "wait_for_output": True}
        if storage_options:
            params["storage_options"] = storage_options
        try:
            schedules.append(Cron(cron, timezone="UTC", parameters={"params": params}))
        except ValueError as exc:
            raise LoraMergeError(f"--cron {cron!r} is not a cron expression ({exc})") from None
    lora_merge.serve(
        name=name,
        triggers=[adapter_ready_trigger(base, storage_options)],
        schedules=schedules or None,
        limit=limit,
        print_starting_message=True,
    )
