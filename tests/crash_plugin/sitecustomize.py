"""Loaded by a test's child process (on PYTHONPATH): kill -9 the process at the point named by LORA_MERGE_KILL_AT,
or, with LORA_MERGE_PAUSE_MARKER set, stop after the first committed shard, touch that file and wait to be killed.
With LORA_MERGE_KILL_ONCE naming a file, only the first process to reach the point dies (it creates that file): of
a Dask cluster's worker processes, which all load this plugin, one dies and its restart does not.

Only tests put this directory on PYTHONPATH; the tool itself has no crash hooks.
"""

import os
import signal

POINT = os.environ.get("LORA_MERGE_KILL_AT", "")
PAUSE_MARKER = os.environ.get("LORA_MERGE_PAUSE_MARKER", "")
KILL_ONCE = os.environ.get("LORA_MERGE_KILL_ONCE", "")


def _die() -> None:
    if KILL_ONCE:
        try:
            os.close(os.open(KILL_ONCE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another process died here already
    os.kill(os.getpid(), signal.SIGKILL)


def _install() -> None:
    from prefect_lora_merge.core import consolidate, merge, pipeline, storage

    calls = {"records": 0, "writes": 0, "files": 0}

    if PAUSE_MARKER:
        original = merge.write_record

        def write_record_then_pause(output, record):
            import time

            original(output, record)
            with open(PAUSE_MARKER, "w") as marker:
                marker.write(str(os.getpid()))
            time.sleep(600)

        merge.write_record = write_record_then_pause

    if POINT in ("between-shards", "after-commit-before-record"):
        original_record = merge.write_record

        def write_record(output, record):
            calls["records"] += 1
            if POINT == "after-commit-before-record" and calls["records"] == 2:
                _die()  # the second shard's object is committed, its record is not
            original_record(output, record)
            if POINT == "between-shards" and calls["records"] == 2:
                _die()

        merge.write_record = write_record

    if POINT == "inside-shard-write":
        original_writer = storage.Location.atomic_writer

        class Dying:
            def __init__(self, handle):
                self.handle = handle

            def write(self, data):
                calls["writes"] += 1
                if calls["writes"] == 3:
                    _die()
                return self.handle.write(data)

            def __getattr__(self, name):
                return getattr(self.handle, name)

        def atomic_writer(self, name):
            context = original_writer(self, name)
            if not name.endswith(".safetensors"):
                return context
            calls["files"] += 1
            if calls["files"] < 2:
                return context

            class Wrapped:
                def __enter__(self_inner):
                    return Dying(context.__enter__())

                def __exit__(self_inner, *exc):
                    return context.__exit__(*exc)

            return Wrapped()

        storage.Location.atomic_writer = atomic_writer

    if POINT == "during-consolidation":
        original_write = consolidate._write

        def _write(output, name, data):
            calls["writes"] += 1
            original_write(output, name, data)
            if calls["writes"] == 2:  # the index and one side file are written
                _die()

        consolidate._write = _write

    if POINT == "before-manifest":

        def publish_manifest(output, manifest):
            _die()

        pipeline.publish_manifest = publish_manifest


if POINT or PAUSE_MARKER:
    _install()
