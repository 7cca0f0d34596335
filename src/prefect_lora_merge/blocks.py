"""Storage credentials from a Prefect block (`--storage-block NAME`): prefect-aws's `AwsCredentials`,
`MinIOCredentials` or `S3Bucket`, saved on the Prefect server. The block's name travels with the plan; its secrets
are read from the server in each process that opens the storage (the flow's, each Dask worker), so they never
become a flow parameter, a task input or a log line. prefect-aws itself is not needed to read them."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from prefect_lora_merge.core.credentials import BLOCK_TYPES, StorageBlockError, options_from_block
from prefect_lora_merge.core.errors import StorageError

# A long-lived Dask worker sees a rotated secret within this long.
REFRESH_SECONDS = 300.0

_loaded: dict[str, tuple[float, dict[str, Any]]] = {}
_loading = threading.Lock()


@dataclass(frozen=True)
class StorageBlock:
    """A storage block by its reference: `aws-credentials/prod` (type slug / name), or a bare name that exactly one
    of prefect-aws's credential and bucket block types holds."""

    reference: str

    def describe(self) -> str:
        return f"storage block {self.reference}"

    def options(self) -> dict[str, Any]:
        with _loading:
            loaded = _loaded.get(self.reference)
            if loaded is None or time.monotonic() - loaded[0] > REFRESH_SECONDS:
                loaded = (time.monotonic(), self._load())
                _loaded[self.reference] = loaded
        return {key: (dict(value) if isinstance(value, dict) else value) for key, value in loaded[1].items()}

    def _load(self) -> dict[str, Any]:
        import httpx
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        slug, _, name = self.reference.rpartition("/")
        slugs = (slug,) if slug else BLOCK_TYPES
        found: list[tuple[str, dict[str, Any]]] = []
        try:
            with get_client(sync_client=True) as client:
                for candidate in slugs:
                    try:
                        document = client.read_block_document_by_name(
                            name=name, block_type_slug=candidate, include_secrets=True
                        )
                    except ObjectNotFound:
                        continue
                    found.append((candidate, document.data))
        except httpx.HTTPError as exc:
            raise StorageError(
                f"{self.describe()}: the Prefect server at {_server()} did not answer ({type(exc).__name__}: {exc}); "
                "check PREFECT_API_URL where the merge runs"
            ) from None
        if not found:
            kinds = f"a {slug} block" if slug else f"a block of type {', '.join(BLOCK_TYPES)}"
            raise StorageBlockError(
                f"--storage-block {self.reference}: the Prefect server at {_server()} has no {kinds} named {name!r}; "
                "save one (prefect_aws.AwsCredentials(...).save(NAME), or in the UI under Blocks), or check "
                "`prefect block ls`"
            )
        if len(found) > 1:
            raise StorageBlockError(
                f"--storage-block {self.reference}: several blocks have that name "
                f"({', '.join(f'{kind}/{name}' for kind, _ in found)}); give one of them, with its type"
            )
        ((kind, data),) = found
        return options_from_block(kind, name, data)


def storage_block(reference: str | None) -> StorageBlock | None:
    return StorageBlock(reference) if reference else None


def _server() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "Prefect's ephemeral server (no PREFECT_API_URL)"
