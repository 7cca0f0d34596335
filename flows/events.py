"""The event that says an adapter is ready to merge: a training job emits it, the deployment's trigger starts a merge.

lora-merge.adapter.ready   resource lora-merge.adapter.<adapter URI>   payload {adapter, output, overwrite, ...}

`adapter` is one `PATH[:WEIGHT]` or a list of them (several adapters merged in one pass); the resource is the first
adapter's, and the others are related resources.
"""

from __future__ import annotations

from typing import Any

from prefect_lora_merge.core.errors import LoraMergeError

ADAPTER_READY = "lora-merge.adapter.ready"
ADAPTER_RESOURCE = "lora-merge.adapter."  # + the adapter's URI


def announce_adapter(adapter: str | list[str], output: str, *, overwrite: bool = False, **details: Any) -> str:
    """Emit `lora-merge.adapter.ready` for `adapter`, to be merged into `output`, on the Prefect server at
    PREFECT_API_URL, and wait until it is sent. Returns the event's id.

    The merge refuses an output that holds a merge of another adapter unless `overwrite` (an announcement of the
    adapter already merged there finds every shard committed and only validates again).

    `details` (JSON values: a training run id, a step...) travel in the payload and show in the Prefect UI."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    from prefect_lora_merge.core.options import adapter_specs

    adapters = [adapter] if isinstance(adapter, str) else list(adapter)
    for option, value in [*(("adapter", a) for a in adapters or [""]), ("output", output)]:
        if not value or not value.strip():
            raise LoraMergeError(f"announcing an adapter needs its {option} URI (--{option})")
    specs = adapter_specs(adapters)  # a bad weight is refused here, not by the run it would start
    if not PREFECT_API_URL.value():
        raise LoraMergeError(
            "PREFECT_API_URL is not set: the event must reach the Prefect server the merge deployment lives on "
            "(export PREFECT_API_URL=http://HOST:4200/api)"
        )
    resources = [{"prefect.resource.id": ADAPTER_RESOURCE + s.uri, "prefect.resource.name": s.uri} for s in specs]
    event = emit_event(
        event=ADAPTER_READY,
        resource=resources[0],
        related=[{**r, "prefect.resource.role": "adapter"} for r in resources[1:]] or None,
        payload={"adapter": adapters[0] if len(adapters) == 1 else adapters, "output": output, "overwrite": overwrite}
        | details,
    )
    EventsWorker.drain_all()  # a short-lived process would otherwise exit before the websocket sends it
    if event is None:
        raise LoraMergeError(
            f"the Prefect client did not emit the event (is PREFECT_API_URL={PREFECT_API_URL.value()} "
            "a Prefect server?)"
        )
    return str(event.id)
