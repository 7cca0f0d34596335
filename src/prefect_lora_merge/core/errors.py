"""Typed errors. Each message names the file, tensor or option at fault and says what to do."""

from __future__ import annotations


class LoraMergeError(Exception):
    """Base class: every error this tool raises on purpose. The CLI prints its message on one line."""


class CheckpointFormatError(LoraMergeError):
    """A safetensors file, index or config of the base checkpoint is malformed or truncated."""


class UnsupportedBaseError(CheckpointFormatError):
    """A well-formed base checkpoint in a format this tool cannot merge into yet (a quantized one)."""


class AdapterError(LoraMergeError):
    """The adapter directory is missing files, malformed, or of a kind this tool cannot merge."""


class UnsupportedAdapterError(AdapterError):
    """A valid PEFT adapter whose merge is not a plain weight update (PiSSA/OLoRA init, layer replication...)."""


class AdapterMismatchError(AdapterError):
    """Adapter tensors that do not fit the base checkpoint: no target tensor, ambiguous target, wrong shape."""

    def __init__(self, summary: str, problems: list[str], hint: str) -> None:
        self.problems = problems
        shown = "; ".join(problems[:8])
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        super().__init__(f"{summary}: {shown}{more}. {hint}")


class InconsistentAdapterError(AdapterMismatchError):
    """The adapter contradicts itself: its config and its tensors disagree (r, target_modules), or a tensor cannot
    be a LoRA weight (an integer dtype). PEFT could not load it as the config describes."""


class OutputLocationError(LoraMergeError):
    """The output location would overwrite or sit inside an input, or already holds a different merge."""


class StorageError(LoraMergeError):
    """A read or write on the storage backend failed for good."""


class StorageAccessError(StorageError):
    """The store refused access in a way no retry changes: unknown access key, wrong secret, no permission, no such
    bucket, a read-only filesystem, a file where a directory should be. The message says what to check."""


class ValidationFailed(LoraMergeError):
    """The merged output does not pass validation; `failures` lists each problem with its file and tensor."""

    def __init__(self, failures: list[str]) -> None:
        self.failures = failures
        shown = "; ".join(failures[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        super().__init__(f"validation failed with {len(failures)} problem(s): {shown}{more}")
