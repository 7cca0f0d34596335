"""Storage credentials from Prefect blocks (`--storage-block`): prefect-aws's AwsCredentials, MinIOCredentials and
S3Bucket become s3fs options where the storage is opened, and their secrets never become parameters or logs.

The blocks are prefect-aws's own classes. End to end (tests/test_local_stack.py), they are saved through a real
Prefect server's API and merges read and write SeaweedFS with nothing but the block."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from prefect_lora_merge.core.credentials import StorageBlockError, combined_options, options_from_block
from prefect_lora_merge.core.errors import LoraMergeError
from prefect_lora_merge.core.options import MergeParameters
from prefect_lora_merge.core.storage import Location

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "infra"))


def _document(block) -> dict:
    """A block's fields as its saved document holds them, secrets revealed (what the server returns to a reader
    that asks for them)."""
    return json.loads(block.model_dump_json(context={"include_secrets": True}))


def _aws(**fields):
    from prefect_aws import AwsCredentials

    return AwsCredentials(**fields)


def _minio(**fields):
    from prefect_aws import MinIOCredentials

    return MinIOCredentials(**fields)


class _Given:
    """A credentials source with fixed options (what a block gives), for the combination rules."""

    def __init__(self, options: dict):
        self._options = options

    def options(self) -> dict:
        return json.loads(json.dumps(self._options))

    def describe(self) -> str:
        return "storage block aws-credentials/test"


# -- what each block gives ----------------------------------------------------------------------------------------


def test_aws_credentials_give_their_keys_region_endpoint_and_client_settings():
    block = _aws(
        aws_access_key_id="AKIA-test",
        aws_secret_access_key="s3cr3t",
        aws_session_token="session",
        region_name="eu-west-1",
        aws_client_parameters={
            "endpoint_url": "http://127.0.0.1:9000",
            "use_ssl": False,
            "verify": False,
            "api_version": "2006-03-01",
            "config": {"connect_timeout": 5},
        },
    )
    assert options_from_block("aws-credentials", "prod", _document(block)) == {
        "key": "AKIA-test",
        "secret": "s3cr3t",
        "token": "session",
        "endpoint_url": "http://127.0.0.1:9000",
        "use_ssl": False,
        "client_kwargs": {"region_name": "eu-west-1", "verify": False, "api_version": "2006-03-01"},
        "config_kwargs": {"connect_timeout": 5},
    }


def test_an_empty_aws_credentials_block_leaves_botocores_own_chain_in_charge():
    assert options_from_block("aws-credentials", "default-chain", _document(_aws())) == {}
    assert options_from_block("aws-credentials", "profile", _document(_aws(profile_name="merge"))) == {
        "profile": "merge"
    }


def test_minio_credentials_give_the_root_user_as_the_key():
    block = _minio(minio_root_user="admin", minio_root_password="pw", region_name="us-east-1")
    assert options_from_block("minio-credentials", "lab", _document(block)) == {
        "key": "admin",
        "secret": "pw",
        "client_kwargs": {"region_name": "us-east-1"},
    }


@pytest.mark.parametrize("nested", ["aws", "minio"])
def test_an_s3_bucket_gives_the_credentials_it_holds(nested):
    from prefect_aws import S3Bucket

    credentials = (
        _aws(aws_access_key_id="k", aws_secret_access_key="s")
        if nested == "aws"
        else _minio(minio_root_user="k", minio_root_password="s")
    )
    document = _document(S3Bucket(bucket_name="models", credentials=credentials))
    assert options_from_block("s3-bucket", "models", document) == {"key": "k", "secret": "s"}
    document["credentials"].pop("block_type_slug")  # as the server returns a nested document: told by its fields
    assert options_from_block("s3-bucket", "models", document) == {"key": "k", "secret": "s"}


@pytest.mark.parametrize(
    ("slug", "data", "expected"),
    [
        (
            "aws-credentials",
            {"assume_role_arn": "arn:aws:iam::1:role/merge"},
            "sets assume_role_arn.*profile_name",
        ),
        ("aws-credentials", {"aws_access_key_id": "k"}, "aws-credentials/b has no secret access key"),
        ("aws-credentials", {"aws_secret_access_key": "s"}, "has no access key ID"),
        ("aws-credentials", {"aws_access_key_id": "k", "aws_secret_access_key": None}, "no secret access key"),
        ("aws-credentials", {"aws_client_parameters": "http://x"}, "aws_client_parameters is not an object"),
        ("s3-bucket", {"bucket_name": "x"}, "holds no credentials block"),
        ("gcp-credentials", {"service_account_info": {}}, "holds no S3 credentials; use one of aws-credentials"),
    ],
    ids=["assume-role", "key-only", "secret-only", "secret-null", "client-parameters", "bucket-bare", "other-type"],
)
def test_a_block_the_tool_cannot_use_is_refused_naming_it_and_what_to_do(slug, data, expected):
    with pytest.raises(StorageBlockError, match=expected):
        options_from_block(slug, "b", data)


def test_a_blocks_options_open_a_real_s3_server(s3):
    """The translation is what s3fs takes: the options alone (no AWS_* variables) list the test bucket."""
    import s3fs
    from s3_server import BUCKET

    block = _aws(
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        region_name="us-east-1",
        aws_client_parameters={"endpoint_url": s3.endpoint_url},
    )
    options = options_from_block("aws-credentials", "seaweedfs", _document(block))
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    fs.pipe(f"{BUCKET}/blocks/probe", b"reached")
    assert fs.cat_file(f"{BUCKET}/blocks/probe") == b"reached"


# -- with the user's storage options ------------------------------------------------------------------------------


def test_storage_options_add_to_a_blocks_and_win_on_settings():
    given = _Given({"key": "k", "secret": "s", "client_kwargs": {"region_name": "eu-west-1"}})
    options = combined_options(
        {"endpoint_url": "http://s3.local", "client_kwargs": {"verify": False}}, given, "--base s3://b/x"
    )
    assert options == {
        "key": "k",
        "secret": "s",
        "endpoint_url": "http://s3.local",
        "client_kwargs": {"region_name": "eu-west-1", "verify": False},
    }


def test_credentials_in_both_the_block_and_the_storage_options_are_refused():
    given = _Given({"key": "k", "secret": "s"})
    with pytest.raises(LoraMergeError, match=r"--output s3://b/x: --storage-options gives key, secret and storage "):
        combined_options({"key": "other", "secret": "other"}, given, "--output s3://b/x")


def test_a_local_location_beside_s3_ones_takes_no_s3_credentials(tmp_path):
    location = Location.parse(str(tmp_path), credentials=_Given({"key": "k", "secret": "s"}), what="--base")
    assert location.credentials is None
    assert location.fsspec_options() == {}


# -- the parameter ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["prod", "aws-credentials/prod", "s3-bucket/models-2"])
def test_storage_block_takes_a_name_or_a_type_and_name(given):
    params = MergeParameters(base="b", adapter="a", output="o", storage_block=given)
    assert params.storage_block == given


def test_an_empty_storage_block_is_none():
    assert MergeParameters(base="b", adapter="a", output="o", storage_block=" ").storage_block is None


@pytest.mark.parametrize("given", ["Prod", "a/b/c", "{{ $LORA_MERGE_STORAGE_BLOCK }}", "s3://bucket"])
def test_a_storage_block_that_is_no_blocks_name_is_refused(given):
    from prefect_lora_merge.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["run", "--base", "b", "--adapter", "a", "--output", "o", "--storage-block", given])
    assert stopped.value.code == 1
