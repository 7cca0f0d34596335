"""Conditions a user causes end as one stderr line naming the store, file or option and what to check, and write
nothing: S3 credentials the store refuses, an endpoint nobody answers on, a missing bucket, an output that cannot be
written or is a file, a malformed weight_map, storage options of the wrong type, a device this machine lacks, option
values the parser refuses. Through the CLI, against the real SeaweedFS of the `s3` fixture.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from s3_server import BUCKET

from prefect_lora_merge.cli import main
from prefect_lora_merge.core.errors import LoraMergeError
from prefect_lora_merge.core.pipeline import merge_checkpoint

PREFIX = f"{BUCKET}/user-errors"
# A Python exception's class name (PermissionError, ClientError, EndpointConnectionError...) in a message.
EXCEPTION_NAME = re.compile(r"\b[A-Z]\w*(Error|Exception)\b")


def refusal(capsys, *argv: str, status: int = 1) -> str:
    """Run the CLI in this process; check it exits with `status` after exactly one stderr line of ours that names no
    exception class; return that line."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exited.value.code == status, err
    assert len(lines) == 1 and lines[0].startswith("lora-merge: error: "), err
    assert "unexpected" not in lines[0] and not EXCEPTION_NAME.search(lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def on_s3(s3, llama_case) -> dict[str, str]:
    """The llama base and adapter uploaded once; their URIs by option."""
    fs = s3.fs()
    fs.put(str(llama_case.base_dir), f"{PREFIX}/base", recursive=True)
    fs.put(str(llama_case.adapter_dir), f"{PREFIX}/adapter", recursive=True)
    return {"base": f"s3://{PREFIX}/base", "adapter": f"s3://{PREFIX}/adapter", "output": f"s3://{PREFIX}/out"}


def locations(llama_case, tmp_path: Path, on_s3: dict[str, str], where: str, uri: str | None = None) -> list[str]:
    """--base, --adapter and --output with the one named by `where` on S3 (at `uri` if given), the others local."""
    chosen = {"base": str(llama_case.base_dir), "adapter": str(llama_case.adapter_dir), "output": str(tmp_path / "o")}
    chosen[where] = uri or on_s3[where]
    return [f"--{name}={value}" for name, value in chosen.items()]


def written_under(s3, prefix: str) -> list[str]:
    return s3.fs().find(f"{PREFIX}/{prefix}")


# -- S3: the first call on each location says what is wrong ------------------------------------------------------

WHERE = ["base", "adapter", "output"]


@pytest.mark.parametrize("where", WHERE)
def test_a_wrong_secret_key_names_the_location_the_store_and_the_credentials_to_check(
    capsys, s3, on_s3, llama_case, tmp_path, where
):
    options = json.dumps(s3.storage_options(secret="not-the-secret"))
    args = locations(llama_case, tmp_path, on_s3, where)
    line = refusal(capsys, "plan", *args, "--storage-options", options)
    assert f"--{where} {on_s3[where]}" in line and f"the S3 store at {s3.endpoint_url}" in line
    assert f"secret key is not the one of access key {s3.access_key!r}" in line
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line


@pytest.mark.parametrize("where", WHERE)
def test_an_unknown_access_key_names_the_key_and_the_endpoint_to_check(capsys, s3, on_s3, llama_case, tmp_path, where):
    options = json.dumps(s3.storage_options(key="nobody-knows-me"))
    line = refusal(capsys, "plan", *locations(llama_case, tmp_path, on_s3, where), "--storage-options", options)
    assert f"--{where} {on_s3[where]}" in line
    assert f"the S3 store at {s3.endpoint_url} does not know access key 'nobody-knows-me'" in line
    assert "AWS_ACCESS_KEY_ID" in line and "AWS_ENDPOINT_URL (or endpoint_url in --storage-options)" in line


def _port_nobody_listens_on() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("where", WHERE)
def test_an_endpoint_that_is_down_is_named_with_what_to_check(capsys, s3, on_s3, llama_case, tmp_path, where):
    down = f"http://127.0.0.1:{_port_nobody_listens_on()}"
    # One attempt, so the test does not sit through botocore's retries.
    config = {"retries": {"mode": "standard", "max_attempts": 1}, "connect_timeout": 2}
    options = json.dumps(s3.storage_options(endpoint_url=down, config_kwargs=config))
    line = refusal(capsys, "plan", *locations(llama_case, tmp_path, on_s3, where), "--storage-options", options)
    assert f"--{where} {on_s3[where]}: could not connect to the S3 store at {down}" in line
    assert "check that it is running" in line and "AWS_ENDPOINT_URL (or endpoint_url in --storage-options)" in line


@pytest.mark.parametrize("where", WHERE)
def test_a_bucket_that_does_not_exist_is_named_with_the_store(capsys, s3, on_s3, llama_case, tmp_path, where):
    bucket = f"no-such-bucket-for-{where}"
    uri = f"s3://{bucket}/merge"
    options = json.dumps(s3.storage_options())
    line = refusal(capsys, "plan", *locations(llama_case, tmp_path, on_s3, where, uri), "--storage-options", options)
    assert f"--{where} {uri}: the bucket {bucket!r} does not exist on the S3 store at {s3.endpoint_url}" in line
    assert "check the bucket name" in line
    assert not s3.fs().exists(bucket)


@pytest.mark.usefixtures("prefect_server")
def test_a_run_with_a_wrong_secret_writes_nothing_to_the_output(capsys, s3, on_s3, llama_case, tmp_path):
    output = f"s3://{PREFIX}/wrong-secret"
    args = ["--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir), "--output", output]
    options = json.dumps(s3.storage_options(secret="not-the-secret"))
    line = refusal(capsys, "run", *args, "--device", "cpu", "--storage-options", options)
    assert f"--output {output}" in line and "AWS_SECRET_ACCESS_KEY" in line
    assert written_under(s3, "wrong-secret") == []


def test_credentials_from_the_environment_are_reported_the_same_way(s3, on_s3, llama_case, tmp_path):
    """The usual setup: AWS_* variables, no --storage-options, the CLI as its own process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3.env(), AWS_SECRET_ACCESS_KEY="not-the-secret")
    out = tmp_path / "never-written"
    command = [sys.executable, "-m", "prefect_lora_merge.cli", "plan", "--base", on_s3["base"]]
    command += ["--adapter", str(llama_case.adapter_dir), "--output", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"lora-merge: error: opening --base {on_s3['base']}: the S3 store at {s3.endpoint_url}")
    assert f"access key {s3.access_key!r}" in lines[0] and "AWS_SECRET_ACCESS_KEY" in lines[0]
    assert not EXCEPTION_NAME.search(lines[0]) and not out.exists()


# -- outputs that cannot be written ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reader(s3, on_s3) -> dict:
    """Storage options of an identity that may read and list the bucket, not write it."""
    s3.add_identity("lora-merge-reader", "lora-merge-reader", "reader-secret", ("Read", "List"))
    return s3.storage_options(key="lora-merge-reader", secret="reader-secret")


@pytest.mark.usefixtures("prefect_server")
def test_an_s3_output_the_credentials_may_not_write_is_refused_naming_the_key(
    capsys, s3, on_s3, reader, llama_case, tmp_path
):
    output = f"s3://{PREFIX}/read-only"
    args = ["--base", on_s3["base"], "--adapter", on_s3["adapter"], "--output", output, "--device", "cpu"]
    line = refusal(capsys, "run", *args, "--storage-options", json.dumps(reader))
    assert f"s3://{PREFIX}/read-only/" in line and f"the S3 store at {s3.endpoint_url} denied access" in line
    assert "access key 'lora-merge-reader'" in line and "may write" in line
    assert written_under(s3, "read-only") == []


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may create files in: mode 0555 for a normal user; for root (whom modes do not stop), the
    immutable attribute. Skipped where neither holds (root on a filesystem without chattr support)."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        undo = ["chmod", "0755", str(directory)]
    else:
        undo = ["chattr", "-i", str(directory)]
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", directory], capture_output=True).returncode:
            pytest.skip("root, and `chattr +i` does not work here: no local directory can be made read-only")
    try:
        try:
            (directory / "probe").write_bytes(b"")
        except PermissionError:
            pass
        else:
            pytest.skip(f"{directory} is still writable")
        yield directory
    finally:
        subprocess.run(undo, check=True)


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("inside", [False, True], ids=["the-directory", "a-new-directory-in-it"])
def test_a_local_output_without_write_permission_is_refused_naming_the_path(capsys, llama_case, read_only_dir, inside):
    out = read_only_dir / "merged" if inside else read_only_dir
    args = ["--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir), "--output", str(out)]
    line = refusal(capsys, "run", *args, "--device", "cpu")
    assert f"{out}/" in line and "permission denied" in line and "may create and write files there" in line
    assert list(read_only_dir.iterdir()) == []


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("command", ["run", "plan"])
def test_an_output_path_that_is_a_file_is_refused_and_the_file_left_alone(capsys, llama_case, tmp_path, command):
    file = tmp_path / "notes.txt"
    file.write_bytes(b"not a checkpoint")
    inputs = ["--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir)]
    line = refusal(capsys, command, *inputs, "--output", str(file), "--device", "cpu")
    assert line == f"lora-merge: error: --output {file} is a file, not a directory; give a directory"
    line = refusal(capsys, command, *inputs, "--output", str(file / "merged"), "--device", "cpu")
    assert f"--output {file / 'merged'} is under {file}, a file, not a directory" in line
    assert file.read_bytes() == b"not a checkpoint" and sorted(tmp_path.iterdir()) == [file]


# -- inputs and options -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [3, None, ["model-00001-of-00006.safetensors"], {"file": "model-00001-of-00006.safetensors"}, "pytorch_model.bin"]
    + ["../base/model-00001-of-00006.safetensors"],
    ids=["number", "null", "list", "object", "not-safetensors", "another-directory"],
)
def test_a_weight_map_entry_that_is_not_a_shard_file_name_is_refused_naming_it(capsys, llama_case, tmp_path, value):
    base = Path(shutil.copytree(llama_case.base_dir, tmp_path / "base"))
    (base / "pytorch_model.bin").write_bytes(b"\x80" * 64)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    victim = sorted(index["weight_map"])[0]
    index["weight_map"][victim] = value
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    args = ["--base", str(base), "--adapter", str(llama_case.adapter_dir), "--output", str(tmp_path / "o")]
    line = refusal(capsys, "plan", *args)
    assert f"{base}/model.safetensors.index.json: weight_map must map each tensor name to the file name" in line
    assert f"{victim!r} -> {json.dumps(value)}" in line


def test_validate_reports_an_output_index_with_a_non_string_shard(capsys, llama_case, tmp_path):
    out = tmp_path / "merged"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out), device="cpu")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"] = {name: 1 for name in index["weight_map"]}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit) as exited:
        main(["validate", "--output", str(out)])
    captured = capsys.readouterr()
    assert exited.value.code == 1 and "weight_map must map each tensor name to the file name" in captured.out
    assert captured.err.startswith("lora-merge: error: validation failed") and len(captured.err.splitlines()) == 1


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"endpoint_url": 5}, "--storage-options: endpoint_url must be a string, not 5"),
        ({"client_kwargs": "x"}, '--storage-options: client_kwargs must be a JSON object, not "x"'),
        ({"config_kwargs": "x"}, '--storage-options: config_kwargs must be a JSON object, not "x"'),
        ({"anon": "yes"}, '--storage-options: anon must be true or false, not "yes"'),
        ({"no_such_option": 1}, "were refused by s3fs (it has no option 'no_such_option')"),
        ({"config_kwargs": {"no_such_option": 1}}, "were refused by s3fs (it has no option 'no_such_option')"),
        ({"endpoint_url": "not a url"}, "were refused by s3fs (Invalid endpoint: not a url)"),
        ({"key": "only-a-key", "secret": None}, "no usable S3 credentials"),
    ],
    ids=["number-endpoint", "string-client-kwargs", "string-config-kwargs", "string-anon", "unknown", "unknown-config"]
    + ["endpoint-not-a-url", "key-without-secret"],
)
def test_storage_options_the_backend_refuses_are_named_as_storage_options(
    capsys, s3, on_s3, llama_case, tmp_path, options, expected
):
    given = {k: v for k, v in s3.storage_options(**options).items() if v is not None}
    args = locations(llama_case, tmp_path, on_s3, "base")
    line = refusal(capsys, "plan", *args, "--storage-options", json.dumps(given))
    assert expected in line


def test_a_uri_missing_a_slash_is_refused_instead_of_becoming_a_local_directory(
    capsys, llama_case, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    args = ["--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir), "--output", "s3:/bucket/out"]
    line = refusal(capsys, "plan", *args)
    assert "the --output 's3:/bucket/out' looks like a URI with one '/' too few: write s3://bucket/out" in line
    assert list(tmp_path.iterdir()) == []


def test_plan_kubernetes_into_a_path_that_is_a_file_names_the_option(capsys, llama_case, tmp_path):
    file = tmp_path / "k8s"
    file.write_text("not a directory")
    inputs = ["--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir)]
    line = refusal(capsys, "plan", *inputs, "--output", str(tmp_path / "o"), "--kubernetes", str(file), "--image", "x")
    assert f"--kubernetes {file}: cannot write {file}" in line and file.read_text() == "not a directory"


def test_an_unknown_storage_protocol_is_named(capsys, llama_case, tmp_path):
    args = ["--base", "foo://models/base", "--adapter", str(llama_case.adapter_dir), "--output", str(tmp_path / "o")]
    line = refusal(capsys, "plan", *args)
    assert "--base foo://models/base: unknown storage protocol 'foo'" in line


# -- devices -----------------------------------------------------------------------------------------------------------

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@no_cuda
@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_run_refuses_cuda_on_a_machine_without_it_before_writing_anything(capsys, llama_case, tmp_path, device):
    out = tmp_path / "never-written"
    args = ["--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir), "--output", str(out)]
    line = refusal(capsys, "run", *args, "--device", device)
    assert line.startswith(f"lora-merge: error: --device {device}: this machine has no CUDA device")
    assert "re-run" not in line and not out.exists()


@no_cuda
def test_merge_checkpoint_refuses_cuda_on_a_machine_without_it_before_writing_anything(llama_case, tmp_path):
    out = tmp_path / "never-written"
    with pytest.raises(LoraMergeError, match="--device cuda: this machine has no CUDA device"):
        merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out), device="cuda")
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("prefect_server")
def test_run_refuses_a_cuda_device_index_this_machine_does_not_have(capsys, llama_case, tmp_path):
    count = torch.cuda.device_count()
    out = tmp_path / "never-written"
    args = ["--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir), "--output", str(out)]
    line = refusal(capsys, "run", *args, "--device", f"cuda:{count}")
    assert f"this machine has {count} CUDA device(s)" in line and not out.exists()


# -- option values -----------------------------------------------------------------------------------------------------

INPUTS = ["--base", "b", "--adapter", "a", "--output", "o"]


@pytest.mark.parametrize(
    ("argv", "option", "value", "expected"),
    [
        (["run", *INPUTS], "--workers", "0", "must be a whole number of at least 1"),
        (["run", *INPUTS], "--workers", "two", "must be a whole number of at least 1"),
        (["run", *INPUTS], "--workers", "1.5", "must be a whole number of at least 1"),
        (["run", *INPUTS, "--runner", "dask"], "--dask-workers", "0", "must be a whole number of at least 1"),
        (["run", *INPUTS], "--min-delta-cosine", "high", "must be a number from -1 to 1"),
        (["run", *INPUTS], "--min-delta-cosine", "2", "must be a number from -1 to 1"),
        (["run", *INPUTS], "--min-delta-cosine", "nan", "must be a number from -1 to 1"),
        (["run", *INPUTS], "--max-memory", "lots", "must be a size like 16GiB"),
        (["run", *INPUTS], "--device", "gpu", "must be auto, cpu or cuda[:N]"),
        (["plan", *INPUTS], "--device", "cuda:first", "must be auto, cpu or cuda[:N]"),
        (["plan", *INPUTS], "--shards-at-once", "0", "must be a whole number of at least 1"),
        (["plan", *INPUTS], "--dask-workers", "-2", "must be a whole number of at least 1"),
        (["serve", "--base", "b"], "--limit", "none", "must be a whole number of at least 1"),
        (["demo"], "--workers", "0", "must be a whole number of at least 1"),
    ],
)
def test_an_option_value_the_parser_refuses_is_one_line_naming_the_option(capsys, argv, option, value, expected):
    line = refusal(capsys, *argv, f"{option}={value}", status=2)
    assert f"argument {option}: {expected}" in line and f"not {value!r}" in line
    assert "invalid" not in line and "_count" not in line and "_positive" not in line
