"""The output's own files are input like any other: stale, damaged or planted, they never make the tool delete or
write outside the output, through a link, or over files it did not write, and a damaged shard is merged again.

Planted state files name victims outside the output with their true size and sha256, so that nothing but the
tool's own rule (names strictly inside the output, no link followed) keeps them alive.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pytest
from checkpoint_tools import tree_digest
from s3_server import BUCKET

from prefect_lora_merge.cli import main
from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.plan import MANIFEST_FILE, REPORT_FILE
from prefect_lora_merge.core.state import record_name

pytestmark = pytest.mark.usefixtures("prefect_server")

VICTIM = b"a file that is not the tool's to delete\n"
OTHER_FINGERPRINT = "f" * 64


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """Exit code and stderr of one `lora-merge` command; a failure must be exactly one `lora-merge: error:` line."""
    try:
        code = main(list(args))
    except SystemExit as exited:
        code = exited.code
    err = capsys.readouterr().err.strip().splitlines()
    if code:
        assert len(err) == 1 and err[0].startswith("lora-merge: error:"), err
    return code, "\n".join(err)


def _planted_state(names: list[str]) -> dict[str, bytes]:
    """Another merge's state as an attacker would plant it: a run file, a manifest and shard records, each naming
    `names` (paths outside the output) with the victims' true size and sha256."""
    listed = {name: {"bytes": len(VICTIM), "sha256": _sha(VICTIM)} for name in names}
    manifest = {
        "tool": "prefect-lora-merge",
        "tool_version": "0.1.0",
        "fingerprint": OTHER_FINGERPRINT,
        "base": {},
        "adapter": {},
        "decisions": [],
        "files": listed,
        "shards": [],
    }
    state = {
        ".lora-merge/run.json": json.dumps({"fingerprint": OTHER_FINGERPRINT}).encode(),
        MANIFEST_FILE: json.dumps(manifest).encode(),
    }
    for i, name in enumerate(names):
        record = {
            "file": name,
            "bytes": len(VICTIM),
            "sha256": _sha(VICTIM),
            "fingerprint": OTHER_FINGERPRINT,
            "tensors": 1,
            "touched": [],
            "applied": [],
        }
        state[f".lora-merge/shards/planted-{i}.json"] = json.dumps(record).encode()
    return state


def test_overwrite_deletes_nothing_that_planted_state_names_outside_a_local_output(llama_case, tmp_path):
    out = tmp_path / "area" / "out"
    out.mkdir(parents=True)
    victims = [tmp_path / "victim.txt", tmp_path / "area" / "sibling.txt", tmp_path / "area" / "out-2" / "x.bin"]
    for victim in victims:
        victim.parent.mkdir(parents=True, exist_ok=True)
        victim.write_bytes(VICTIM)
    names = [str(victims[0]), "../sibling.txt", "../out-2/x.bin", "../../victim.txt", f"file://{victims[0]}"]
    for name, data in _planted_state(names).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)

    result = merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out), overwrite=True)

    assert result.report.passed
    assert [v.read_bytes() for v in victims] == [VICTIM] * len(victims), "nothing outside the output is deleted"
    assert not list((out / ".lora-merge" / "shards").glob("planted-*")), "the other merge's records are replaced"


def test_overwrite_deletes_nothing_that_planted_state_names_outside_an_s3_output(s3, llama_case):
    fs = s3.fs()
    area = f"trust-{uuid.uuid4().hex[:8]}"
    other_bucket = f"victims-{uuid.uuid4().hex[:8]}"
    fs.mkdir(other_bucket)
    victims = [f"{other_bucket}/victim.txt", f"{BUCKET}/{area}/sibling.txt", f"{BUCKET}/{area}/out-2/x.bin"]
    for key in victims:
        fs.pipe(key, VICTIM)
    names = [
        f"s3://{other_bucket}/victim.txt",
        f"/{other_bucket}/victim.txt",
        "../sibling.txt",
        "../out-2/x.bin",
        f"../../../{other_bucket}/victim.txt",
    ]
    for name, data in _planted_state(names).items():
        fs.pipe(f"{BUCKET}/{area}/out/{name}", data)

    def outside() -> dict[str, str]:
        """Every object outside the output, in both buckets, with its sha256."""
        fs.invalidate_cache()
        keys = [k for bucket in (BUCKET, other_bucket) for k in fs.find(bucket)]
        return {k: _sha(fs.cat_file(k)) for k in keys if not k.startswith(f"{BUCKET}/{area}/out/")}

    before = outside()
    result = merge_checkpoint(
        str(llama_case.base_dir),
        str(llama_case.adapter_dir),
        f"s3://{BUCKET}/{area}/out",
        overwrite=True,
        storage_options=s3.storage_options(),
    )

    assert result.report.passed
    assert outside() == before, "nothing outside the output is deleted or written"
    assert set(victims) <= set(before)


def test_overwrite_removes_another_merges_files_only_where_their_bytes_prove_it_wrote_them(llama_case, tmp_path):
    out = tmp_path / "out"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out))
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    # The earlier merge also wrote a file this one will not rewrite, and the user put one beside it with a name that
    # the planted manifest lists with another file's checksum.
    (out / "old-extra.json").write_bytes(b"{}")
    (out / "notes.txt").write_bytes(b"mine")
    manifest["fingerprint"] = OTHER_FINGERPRINT
    manifest["files"]["old-extra.json"] = {"bytes": 2, "sha256": _sha(b"{}")}
    manifest["files"]["notes.txt"] = {"bytes": 4, "sha256": _sha(b"not mine")}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    (out / ".lora-merge" / "run.json").write_text(json.dumps({"fingerprint": OTHER_FINGERPRINT}))

    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out), overwrite=True)

    assert not (out / "old-extra.json").exists(), "a file the other merge provably wrote is removed"
    assert (out / "notes.txt").read_bytes() == b"mine", "a file whose bytes do not match the record is kept"


def test_start_of_run_cleanup_removes_only_the_partial_writes_this_tool_names(llama_case, tmp_path):
    out = tmp_path / "out"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out))
    users = [
        out / "notes.partial.txt",
        out / ".model.safetensors.partial-backup",
        out / ".lora-merge" / "run.json.partial",
        out / "data.partial-0123456789abcdef0123456789abcdef",  # not hidden: not a name the tool writes
    ]
    for path in users:
        path.write_bytes(b"user data")
    ours = [
        out / f".model-00001-of-00006.safetensors.partial-{uuid.uuid4().hex}",
        out / ".lora-merge" / "shards" / f".model-00002-of-00006.safetensors.json.partial-{uuid.uuid4().hex}",
    ]
    for path in ours:
        path.write_bytes(b"half a write")

    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out))

    assert [p.read_bytes() for p in users] == [b"user data"] * len(users)
    assert not any(p.exists() for p in ours), "the tool's own partial writes are removed"


@pytest.mark.parametrize("link", [".lora-merge", ".lora-merge/shards"])
def test_a_state_directory_linked_into_the_base_is_refused_and_the_base_never_written(
    capsys, llama_case, tmp_path, link
):
    base = Path(shutil.copytree(llama_case.base_dir, tmp_path / "base"))
    out = tmp_path / "out"
    (out / link).parent.mkdir(parents=True, exist_ok=True)
    (out / link).symlink_to(base, target_is_directory=True)
    before = tree_digest(base)

    code, message = run_cli(
        capsys,
        "run",
        "--base",
        str(base),
        "--adapter",
        str(llama_case.adapter_dir),
        "--output",
        str(out),
        "--overwrite",
    )

    assert code == 1
    assert "symbolic link" in message and link in message, message
    assert tree_digest(base) == before, "the base is never written"
    assert not any(p.name.endswith(".safetensors") for p in out.iterdir()), "nothing was merged"


def test_an_output_holding_other_files_is_refused_unless_overwrite_and_those_files_are_kept(
    capsys, llama_case, tmp_path
):
    out = tmp_path / "out"
    (out / "thesis").mkdir(parents=True)
    (out / "thesis" / "chapter1.tex").write_text("years of work")
    (out / "config.txt").write_text("keep")
    before = tree_digest(out)
    args = ("run", "--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir), "--output", str(out))

    code, message = run_cli(capsys, *args)
    assert code == 1
    assert "not empty" in message and "config.txt" in message and "--overwrite" in message, message
    assert tree_digest(out) == before and sorted(p.name for p in out.iterdir()) == ["config.txt", "thesis"]

    code, _ = run_cli(capsys, *args, "--overwrite")
    assert code == 0
    assert {k: v for k, v in tree_digest(out).items() if k in before} == before, "files it did not write are kept"
    assert run_cli(capsys, "validate", "--output", str(out))[0] == 0


def test_the_root_directory_as_output_is_refused_for_containing_the_inputs(capsys, llama_case):
    code, message = run_cli(
        capsys, "plan", "--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir), "--output", "/"
    )
    assert code == 1
    assert "--output / overlaps the base" in message, message


def _flip_a_byte(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_shard_corrupted_after_a_finished_merge_is_merged_again_by_the_next_run(llama_case, tmp_path):
    out = tmp_path / "out"
    first = merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out))
    good = {r.file: (out / r.file).read_bytes() for r in first.receipts}
    touched = next(r.file for r in first.receipts if r.touched)
    untouched = next(r.file for r in first.receipts if not r.touched)
    _flip_a_byte(out / touched)
    _flip_a_byte(out / untouched)

    again = merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out))

    assert again.report.passed
    assert sorted(r.file for r in again.receipts if not r.resumed) == sorted([touched, untouched])
    assert {f: (out / f).read_bytes() for f in good} == good


@pytest.mark.parametrize(
    "tamper",
    [
        {"applied": []},
        {"touched": []},
        {"sha256": "0" * 64},
        {"file": "model-00001-of-00006.safetensors"},
        {"bytes": "many"},
    ],
    ids=["applied", "touched", "sha256", "file", "type"],
)
def test_a_tampered_shard_record_is_not_trusted_and_its_shard_is_merged_again(llama_case, tmp_path, tamper):
    out = tmp_path / "out"
    first = merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out))
    shard = next(r.file for r in reversed(first.receipts) if r.touched)
    record = out / record_name(shard)
    record.write_text(json.dumps({**json.loads(record.read_text()), **tamper}))

    again = merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out))

    assert again.report.passed
    assert [r.file for r in again.receipts if not r.resumed] == [shard]


def test_a_planted_lease_with_impossible_values_is_reported_in_one_line_and_broken_on_request(
    capsys, llama_case, tmp_path
):
    out = tmp_path / "out"
    (out / ".lora-merge").mkdir(parents=True)
    lease = {"holder": "elsewhere:99999999999999999999999:x", "acquired": 0, "expires": 1e300}
    (out / ".lora-merge" / "lease.json").write_text(json.dumps(lease))
    args = ("run", "--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir), "--output", str(out))

    code, message = run_cli(capsys, *args)
    assert code == 1
    assert "elsewhere:99999999999999999999999:x" in message and "--break-lock" in message, message

    assert run_cli(capsys, *args, "--break-lock")[0] == 0


def test_a_merged_output_used_as_the_next_base_gives_an_output_that_validates(capsys, llama_case, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    adapter = str(llama_case.adapter_dir)
    assert (
        run_cli(capsys, "run", "--base", str(llama_case.base_dir), "--adapter", adapter, "--output", str(first))[0] == 0
    )

    code, _ = run_cli(capsys, "run", "--base", str(first), "--adapter", adapter, "--output", str(second))

    assert code == 0
    assert run_cli(capsys, "validate", "--output", str(second))[0] == 0
    assert run_cli(capsys, "validate", "--output", str(second), "--base", str(first), "--adapter", adapter)[0] == 0
    manifest = json.loads((second / MANIFEST_FILE).read_text())
    assert MANIFEST_FILE not in manifest["files"] and REPORT_FILE not in manifest["files"]
    assert json.loads((second / REPORT_FILE).read_text())["output"] == str(second)


@pytest.mark.parametrize(
    "planted, kind",
    [
        (".lora-merge", "file"),
        (".lora-merge/lease.json", "directory"),
        (".lora-merge/run.json", "directory"),
        (".lora-merge/shards/model-00003-of-00006.safetensors.json", "directory"),
        ("lora-merge-manifest.json", "directory"),
        ("model-00002-of-00006.safetensors", "directory"),
    ],
)
def test_a_file_or_directory_in_the_way_of_the_merge_is_refused_before_anything_is_written(
    capsys, llama_case, tmp_path, planted, kind
):
    out = tmp_path / "out"
    (out / planted).parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        (out / planted).write_text("someone's")
    else:
        (out / planted).mkdir()
        (out / planted / "inside").write_text("someone's")
    before = tree_digest(out)
    args = ("run", "--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir), "--output", str(out))

    code, message = run_cli(capsys, *args, "--overwrite")

    assert code == 1
    assert f"{out / planted} is a {kind} where this tool keeps a" in message, message
    assert tree_digest(out) == before, "nothing was written"


def test_validate_names_a_manifest_entry_that_points_outside_the_output(capsys, llama_case, tmp_path):
    out = tmp_path / "area" / "out"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out))
    (tmp_path / "area" / "secret.txt").write_bytes(VICTIM)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["files"]["../secret.txt"] = {"bytes": len(VICTIM), "sha256": _sha(VICTIM)}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))

    code, message = run_cli(capsys, "validate", "--output", str(out))

    assert code == 1
    assert "'../secret.txt', which is no file inside the output" in message, message
