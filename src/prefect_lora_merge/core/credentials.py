"""Storage credentials kept outside the merge's parameters: a source that gives fsspec options where the storage is
opened (the flow's process, a Dask worker), and the translation of prefect-aws's credential and bucket blocks into
s3fs options. Engine-free: loading a block from a Prefect server lives in `prefect_lora_merge.blocks`."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from .errors import LoraMergeError

# prefect-aws's block types whose documents hold S3 credentials, by their slug.
AWS_CREDENTIALS = "aws-credentials"
MINIO_CREDENTIALS = "minio-credentials"
S3_BUCKET = "s3-bucket"
BLOCK_TYPES = (AWS_CREDENTIALS, MINIO_CREDENTIALS, S3_BUCKET)

# Option keys that carry a secret: never shown, never allowed in two places at once.
CREDENTIAL_OPTIONS = ("key", "secret", "token", "profile", "anon")


class StorageBlockError(LoraMergeError):
    """A storage block that cannot be found, or whose content this tool cannot turn into storage options."""


@runtime_checkable
class StorageCredentials(Protocol):
    """Where a location's credentials come from. Plain data (it travels in the plan to every worker); `options()`
    is called where the storage is opened, so secrets are never part of a plan, a parameter or a task's input."""

    def options(self) -> dict[str, Any]:
        """fsspec options (s3fs: key, secret, token, client_kwargs...) to combine with the user's storage options."""
        ...

    def describe(self) -> str:
        """The source's name in messages, like `storage block aws-credentials/prod`."""
        ...


def options_from_block(slug: str, name: str, data: dict[str, Any]) -> dict[str, Any]:
    """s3fs options from the fields of a prefect-aws block document (`AwsCredentials`, `MinIOCredentials`, or an
    `S3Bucket` whose `credentials` is one of them), secrets revealed. Only what the block sets is given: an empty
    `AwsCredentials` leaves botocore's own chain (environment, profile, instance role) in charge."""
    where = f"storage block {slug}/{name}"
    if slug == S3_BUCKET:
        credentials = data.get("credentials")
        if not isinstance(credentials, dict):
            raise StorageBlockError(f"{where} holds no credentials block: set its credentials (AWS or MinIO)")
        kind = credentials.get("block_type_slug") or (
            MINIO_CREDENTIALS if "minio_root_user" in credentials else AWS_CREDENTIALS
        )
        if kind == S3_BUCKET:
            raise StorageBlockError(f"{where}: its credentials are a bucket block; give AWS or MinIO credentials")
        return options_from_block(kind, f"{name}'s credentials", credentials)
    if slug == MINIO_CREDENTIALS:
        options = _given(key=data.get("minio_root_user"), secret=data.get("minio_root_password"))
    elif slug == AWS_CREDENTIALS:
        if data.get("assume_role_arn"):
            raise StorageBlockError(
                f"{where} sets assume_role_arn, which s3fs cannot do from options: name an AWS profile that assumes "
                "the role (role_arn and source_profile in ~/.aws/config on every machine that runs shards) in the "
                "block's profile_name instead, or give the role's credentials"
            )
        options = _given(
            key=data.get("aws_access_key_id"),
            secret=data.get("aws_secret_access_key"),
            token=data.get("aws_session_token"),
            profile=data.get("profile_name"),
        )
    else:
        raise StorageBlockError(
            f"{where}: a {slug!r} block holds no S3 credentials; use one of {', '.join(BLOCK_TYPES)}"
        )
    for secret in ("key", "secret"):
        if secret in options and not isinstance(options[secret], str):
            raise StorageBlockError(f"{where}: its {secret} is not a string; the server did not reveal it")
    if ("key" in options) != ("secret" in options):
        missing = "secret access key" if "key" in options else "access key ID"
        raise StorageBlockError(f"{where} has no {missing}: set both, or neither (to use the environment's)")
    client_kwargs = _given(region_name=data.get("region_name"))
    parameters = data.get("aws_client_parameters") or {}
    if not isinstance(parameters, dict):
        raise StorageBlockError(f"{where}: aws_client_parameters is not an object")
    if parameters.get("endpoint_url"):
        options["endpoint_url"] = parameters["endpoint_url"]
    if parameters.get("use_ssl") is False:
        options["use_ssl"] = False
    verify = parameters.get("verify_cert_path") or parameters.get("verify")
    if verify is not None:
        client_kwargs["verify"] = verify
    if parameters.get("api_version"):
        client_kwargs["api_version"] = parameters["api_version"]
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    if parameters.get("config"):
        if not isinstance(parameters["config"], dict):
            raise StorageBlockError(f"{where}: aws_client_parameters.config is not an object of botocore options")
        options["config_kwargs"] = dict(parameters["config"])
    return options


def _given(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value not in (None, "")}


def combined_options(
    storage_options: dict[str, Any], credentials: StorageCredentials | None, what: str
) -> dict[str, Any]:
    """The credentials' options with the user's storage options over them (an endpoint, say); credentials given
    in both places are refused, naming both."""
    if credentials is None:
        return storage_options
    given = credentials.options()
    both = sorted(k for k in CREDENTIAL_OPTIONS if k in storage_options and k in given)
    if both:
        raise LoraMergeError(
            f"{what}: --storage-options gives {', '.join(both)} and {credentials.describe()} gives credentials too: "
            "keep credentials in one place (the block)"
        )
    options = {**given, **storage_options}
    for nested in ("client_kwargs", "config_kwargs"):
        if isinstance(given.get(nested), dict) and isinstance(storage_options.get(nested), dict):
            options[nested] = {**given[nested], **storage_options[nested]}
    return options
