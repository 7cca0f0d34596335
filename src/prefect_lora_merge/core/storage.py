"""Storage: every byte the tool reads or writes goes through here, over fsspec.

The rest of the core never branches on `s3://` versus a local path; the differences between backends (how a write
is made atomic, how a copy avoids the client) stay inside this module.
"""

from __future__ import annotations

import copy
import errno
import functools
import hashlib
import inspect
import json
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from .credentials import StorageCredentials, combined_options
from .errors import LoraMergeError, OutputLocationError, StorageAccessError, StorageError

COPY_CHUNK_BYTES = 64 * 1024 * 1024
# A shard merge's pipeline: untouched bytes move in pieces of PIECE_BYTES; up to READ_AHEAD_BYTES are read ahead of
# the computing thread, up to WRITE_BEHIND_BYTES wait to be written, and up to POOLED_BYTES of free buffers are kept
# for reuse (core.buffers). A tensor larger than a budget moves alone. Measured on a 2 GB llama (attention LoRA,
# 2 CPUs): 8 MiB pieces with these budgets reuse 85% of the buffer bytes and stream the shards in ~3.7 s; 64 MiB
# pieces with 128 MiB budgets reuse half and take ~4.7 s, holding three times the memory.
PIECE_BYTES = 8 * 1024 * 1024
READ_AHEAD_BYTES = 4 * PIECE_BYTES
WRITE_BEHIND_BYTES = 4 * PIECE_BYTES
POOLED_BYTES = 8 * PIECE_BYTES


# What `atomic_writer` names a write in progress (locally and on memory://): `.<name>.partial-<32 hex digits>`, a
# sibling of its target. Only names of exactly this form are ever removed as leftovers of a crashed write.
PARTIAL_WRITE = re.compile(r"^\.(?P<name>.+)\.partial-[0-9a-f]{32}$")


def _partial_name(target: str) -> str:
    return posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.partial-{uuid.uuid4().hex}")


def safe_name(name: object) -> bool:
    """A relative name strictly inside a location: no absolute path, no URI, no `..`, `.` or empty component."""
    if not isinstance(name, str) or not name or "\0" in name or "://" in name or name.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _storage_failures() -> tuple[type[BaseException], ...]:
    """What a backend raises when storage itself fails (after its own retries), as opposed to a bug."""
    failures: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        failures += [BotoCoreError, ClientError]
    except ImportError:  # no s3fs installed: local and memory filesystems raise OSError
        pass
    return tuple(failures)


STORAGE_FAILURES = _storage_failures()


# -- failures in the user's terms -----------------------------------------------------------------------------------

_CREDENTIALS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or key and secret in --storage-options)"
_ENDPOINT = "AWS_ENDPOINT_URL (or endpoint_url in --storage-options)"
# S3 error codes (botocore's ClientError, kept by s3fs as the cause of the OSError it raises). A HEAD request has no
# error body: its refusals arrive as the bare status.
_UNKNOWN_KEY = {"InvalidAccessKeyId", "InvalidClientTokenId"}
_WRONG_SECRET = {"SignatureDoesNotMatch"}
_DENIED = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403", "Forbidden"}
_EXPIRED = {"ExpiredToken", "InvalidToken", "TokenRefreshRequired", "RequestExpired"}
_NO_BUCKET = {"NoSuchBucket", "InvalidBucketName"}
_WRITING = ("writing", "creating", "removing")


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code behind `exc` (AccessDenied, NoSuchBucket...), looking through the causes s3fs chains."""
    for _ in range(8):
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code") or "") or None
        cause = exc.__cause__ or exc.__context__
        if cause is None:
            return None
        exc = cause
    return None


def _botocore_kind(exc: BaseException) -> str | None:
    """'connect', 'timeout' or 'credentials' for botocore's own failures (no answer from the store), else None."""
    try:
        from botocore import exceptions as boto
    except ImportError:
        return None
    if isinstance(exc, (boto.ConnectionError, boto.ConnectionClosedError)):
        return "connect"
    if isinstance(exc, boto.ReadTimeoutError):
        return "timeout"
    if isinstance(exc, (boto.NoCredentialsError, boto.PartialCredentialsError, boto.CredentialRetrievalError)):
        return "credentials"
    return None


def _file_in_the_way(path: str | None) -> str | None:
    """The nearest existing path at or above `path` when it is not a directory (what makes ENOTDIR / EEXIST)."""
    while path and path != os.path.dirname(path):
        if os.path.lexists(path):
            return None if os.path.isdir(path) else path
        path = os.path.dirname(path)
    return None


def storage_failure(location: Location, exc: BaseException, doing: str, name: str | None = None) -> StorageError:
    """The one line that reports a backend failure while `doing` (reading, writing, listing...) `name` under
    `location`: what the store or the filesystem said, in the user's terms, and what to check. A refusal that no
    retry changes (credentials, permissions, a missing bucket, a file in the way) is a `StorageAccessError`."""
    what = location.describe(name) if name else location.uri
    where = f"{doing} {what}"
    code, kind = _s3_code(exc), _botocore_kind(exc)
    if code is not None or kind is not None:
        store = f"the S3 store at {location.endpoint()}"
        try:
            options = location.given_options()
        except LoraMergeError:
            options = location.storage_options
        key = options.get("key") or os.environ.get("AWS_ACCESS_KEY_ID")
        key_named = f"access key {key!r}" if key else "the access key in use"
        if location.credentials is not None and options.get("key"):
            key_named += f" (from {location.credentials.describe()})"
        if options.get("anon"):
            key_named = "anonymous requests (anon in --storage-options)"
        if code in _UNKNOWN_KEY:
            return StorageAccessError(
                f"{where}: {store} does not know {key_named}; check {_CREDENTIALS}, and that {_ENDPOINT} names the "
                "store these credentials belong to"
            )
        if code in _WRONG_SECRET:
            return StorageAccessError(
                f"{where}: {store} rejected the request's signature: the secret key is not the one of {key_named}; "
                f"check {_CREDENTIALS}"
            )
        if code in _EXPIRED:
            return StorageAccessError(
                f"{where}: {store} says the credentials have expired; renew them ({_CREDENTIALS}, AWS_SESSION_TOKEN)"
            )
        if code in _DENIED:
            may = "write or delete" if doing.startswith(_WRITING) else "read or list"
            return StorageAccessError(
                f"{where}: {store} denied access to {key_named}: check that it may {may} there (its policy, the "
                f"bucket's policy), and {_CREDENTIALS}"
            )
        if code in _NO_BUCKET:
            bucket = location.root.split("/", 1)[0]
            return StorageAccessError(
                f"{where}: the bucket {bucket!r} does not exist on {store}; check the bucket name in the URI and "
                f"that {_ENDPOINT} names the right store (create the bucket first for an --output)"
            )
        if code == "RequestTimeTooSkewed":
            return StorageAccessError(
                f"{where}: {store} refused the request because this machine's clock is off; "
                "set the clock (NTP) and re-run"
            )
        if kind == "connect":
            reason = getattr(exc, "kwargs", {}).get("error") or exc
            return StorageError(
                f"{where}: could not connect to {store} even after retries ({reason}); check that it is running and "
                f"reachable from this machine, and that {_ENDPOINT} is right"
            )
        if kind == "timeout":
            return StorageError(
                f"{where}: {store} did not answer in time even after retries ({exc}); check that it is healthy and "
                "reachable, or raise config_kwargs.read_timeout in --storage-options"
            )
        if kind == "credentials":
            return StorageAccessError(
                f"{where}: no usable S3 credentials ({exc}); set {_CREDENTIALS}, or anon: true in --storage-options "
                "for a public bucket"
            )
    elif isinstance(exc, OSError) and location.is_local:
        path = exc.filename or location.path(name or "")
        blocker = _file_in_the_way(path) if exc.errno in (errno.ENOTDIR, errno.EEXIST) else None
        if blocker is not None:
            return StorageAccessError(
                f"{where}: {blocker} is a file, not a directory: {location.uri} must be a directory (a new one, or "
                "one of this tool's outputs); choose another location or move the file away"
            )
        if exc.errno in (errno.EACCES, errno.EPERM):
            may = "create and write files" if doing.startswith(_WRITING) else "read"
            return StorageAccessError(
                f"{where}: permission denied on {path}; check that this user may {may} there, or choose another "
                "location"
            )
        if exc.errno == errno.EROFS:
            return StorageAccessError(f"{where}: {path} is on a read-only filesystem; choose a writable location")
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{what} does not exist")
    if isinstance(exc, TimeoutError) and not str(exc):
        return StorageError(f"{where} timed out even after retries; check the storage and re-run")
    return StorageError(f"{where} failed ({exc})")


def _reports_failures(doing: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Report a backend failure inside the decorated `Location` method as `storage_failure` words it, naming the
    file when the method's first argument is a name. The one place a raw OSError or botocore error becomes ours."""

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        def failure(self: Location, args: tuple[Any, ...], exc: BaseException) -> StorageError:
            return storage_failure(self, exc, doing, args[0] if args and isinstance(args[0], str) else None)

        if inspect.isgeneratorfunction(method):  # a @contextmanager's generator: failures arrive inside it

            @functools.wraps(method)
            def generator(self: Location, *args: Any, **kwargs: Any) -> Any:
                try:
                    return (yield from method(self, *args, **kwargs))
                except STORAGE_FAILURES as exc:
                    raise failure(self, args, exc) from exc

            return generator

        @functools.wraps(method)
        def wrapper(self: Location, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except STORAGE_FAILURES as exc:
                raise failure(self, args, exc) from exc

        return wrapper

    return decorate


# Backends whose own copy publishes the target only when complete (besides local and memory://, handled apart).
SERVER_COPY_PROTOCOLS = ("s3", "s3a")
# The s3fs options people write by hand, with the JSON type each must have.
_S3_OPTION_TYPES: dict[str, type] = {
    "endpoint_url": str,
    "key": str,
    "secret": str,
    "token": str,
    "profile": str,
    "anon": bool,
    "use_ssl": bool,
    "client_kwargs": dict,
    "config_kwargs": dict,
    "s3_additional_kwargs": dict,
}
_KIND_NAMES = {str: "a string", bool: "true or false", dict: "a JSON object"}


def _kernel_copy(src: str, writer: BinaryIO) -> None:
    """Copy a local file into an open local file inside the kernel: copy_file_range where the OS has it."""
    with open(src, "rb") as reader:
        size = os.fstat(reader.fileno()).st_size
        copied = 0
        try:
            while copied < size:
                step = os.copy_file_range(reader.fileno(), writer.fileno(), min(size - copied, 1 << 30))
                if step == 0:
                    break
                copied += step
        except (AttributeError, OSError):  # no copy_file_range (old kernel, macOS, some filesystems)
            reader.seek(0)
            writer.seek(0)
            writer.truncate()
            shutil.copyfileobj(reader, writer, COPY_CHUNK_BYTES)
            copied = writer.tell()
        if copied != size:
            raise OSError(f"copied {copied} of {size} bytes from {src}")


@dataclass(frozen=True)
class Location:
    """A directory-like prefix on some filesystem: a local path, `file://`, `memory://`, `s3://bucket/prefix`...

    Plain data (a URI and fsspec options), so it pickles into Prefect tasks and worker processes; the filesystem
    object is created on first use in each process.
    """

    uri: str
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False)
    # Where credentials come from when they are not in the options (a StorageCredentials: a Prefect storage block),
    # resolved in each process that opens the storage, never carried as secrets. Typed Any for the pydantic models
    # that hold locations (a protocol has no schema).
    credentials: Any = field(default=None, compare=False)

    @classmethod
    def parse(
        cls,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        credentials: StorageCredentials | None = None,
        what: str = "location",
    ) -> Location:
        if not uri or not str(uri).strip():
            raise LoraMergeError(f"the {what} is empty: give a local path or a URI such as s3://bucket/prefix")
        uri = str(uri).strip()
        typo = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]+):/(?!/)", uri)
        if typo:  # s3:/bucket/x would otherwise be a local directory named "s3:", written in the current directory
            raise LoraMergeError(
                f"the {what} {uri!r} looks like a URI with one '/' too few: write {typo.group(1)}://"
                f"{uri[typo.end() :]}, or ./ before a local path that starts like this"
            )
        if "://" not in uri:
            uri = os.path.abspath(os.path.expanduser(uri))
        if fsspec.core.split_protocol(uri)[0] not in SERVER_COPY_PROTOCOLS:
            credentials = None  # S3 credentials: a local base beside an S3 output needs none
        location = cls(
            uri=uri.rstrip("/") or "/", storage_options=copy.deepcopy(storage_options or {}), credentials=credentials
        )
        location._open(what)
        return location

    def _open(self, what: str) -> None:
        """Check, before any work, what would otherwise fail on whichever call comes first, and say it with the
        option's name: an unknown protocol, a backend not installed, options the backend refuses, a file where a
        directory should be; on S3, an endpoint that does not answer, credentials it refuses, a missing bucket."""
        protocol = fsspec.core.split_protocol(self.uri)[0]
        backend = "fsspec"
        if protocol and "::" not in protocol:
            try:
                backend = fsspec.get_filesystem_class(protocol).__module__.split(".")[0]
            except ValueError:
                raise LoraMergeError(
                    f"{what} {self.uri}: unknown storage protocol {protocol!r}; give a local path or a URI such as "
                    "s3://bucket/prefix"
                ) from None
            except ImportError as exc:
                extra = " (pip install 'prefect-lora-merge[s3]')" if protocol in SERVER_COPY_PROTOCOLS else ""
                raise LoraMergeError(f"{what} {self.uri}: {exc}{extra}") from None
        if protocol in SERVER_COPY_PROTOCOLS:
            options = self.given_options(what)
            for option, kind in _S3_OPTION_TYPES.items():
                value = options.get(option)
                if value is not None and not isinstance(value, kind):
                    raise LoraMergeError(
                        f"--storage-options: {option} must be {_KIND_NAMES[kind]}, not {json.dumps(value)}"
                    )
        try:
            fs = self.fs
            if callable(getattr(type(fs), "connect", None)):  # s3fs makes its client on first use: make it now
                fs.connect()
        except STORAGE_FAILURES as exc:
            raise storage_failure(self, exc, f"opening {what}") from exc
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            unknown = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
            problem = f"it has no option {unknown.group(1)!r}" if unknown else str(exc)
            raise LoraMergeError(
                f"--storage-options for {what} {self.uri} were refused by {backend} ({problem}); give fsspec "
                "options as JSON, like "
                '{"endpoint_url": "http://host:port", "client_kwargs": {"region_name": "us-east-1"}}'
            ) from None
        if self.is_local:
            blocker = _file_in_the_way(self.root)
            if blocker is not None:
                place = "is a file" if blocker == self.root else f"is under {blocker}, a file"
                raise StorageAccessError(f"{what} {self.uri} {place}, not a directory; give a directory")
        elif hasattr(fs, "call_s3"):
            bucket, _, prefix = self.root.partition("/")
            try:
                fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
            except STORAGE_FAILURES as exc:
                # A key may hold object permissions without ListBucket: the calls that need more will say so.
                if _s3_code(exc) not in _DENIED:
                    raise storage_failure(self, exc, f"opening {what}") from exc

    def endpoint(self) -> str:
        """The S3 endpoint the client is given, as botocore picks it (options first, then the environment)."""
        options = self.given_options()
        client_kwargs = options.get("client_kwargs")
        nested = client_kwargs.get("endpoint_url") if isinstance(client_kwargs, dict) else None
        given = options.get("endpoint_url") or nested
        found = given or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return str(found or "AWS's default endpoint (no endpoint_url or AWS_ENDPOINT_URL given)")

    def given_options(self, what: str = "location") -> dict[str, Any]:
        """The user's options over the credentials' (a storage block's), before this tool's defaults."""
        return combined_options(self.storage_options, self.credentials, f"{what} {self.uri}")

    def fsspec_options(self) -> dict[str, Any]:
        """The user's options (over the credentials') plus this tool's defaults for the backend."""
        # A deep copy: botocore rewrites the nested retries dict in place, which would change the caller's options
        # and fsspec's instance-cache key.
        options = copy.deepcopy(self.given_options())
        if self.uri.startswith(("s3://", "s3a://")):
            # botocore's legacy mode gives up after 5 attempts and s3fs does not retry a 500 after that; the
            # standard mode with 10 attempts survived 6 injected 500s in a row (shared notes).
            config = dict(options.get("config_kwargs") or {})
            config.setdefault("retries", {"mode": "standard", "max_attempts": 10})
            options["config_kwargs"] = config
        return options

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs, _ = fsspec.core.url_to_fs(self.uri, **self.fsspec_options())
        return fs

    @property
    def root(self) -> str:
        _, root = fsspec.core.url_to_fs(self.uri, **self.fsspec_options())
        return root.rstrip("/") or "/"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, name: str) -> str:
        """The backend path of `name`, which must lie strictly inside this location (names can come from files an
        attacker or a damaged run wrote: an index, a manifest)."""
        if not safe_name(name):
            raise LoraMergeError(
                f"{name!r} is not a file name inside {self.uri} (an absolute path, a URI, or a '..' component): "
                "this tool reads and writes only inside its locations; fix the file that names it"
            )
        return posixpath.join(self.root, name)

    def writable_path(self, name: str, *, directory: bool = False) -> str:
        """The path of `name` for a write or a removal, checked locally: no directory on the way from this
        location's root is a symbolic link (one pointing into the base, say: the tool never writes or deletes
        through a link) or a file, and `name` itself is no directory where a file goes (with `directory`: a
        directory, or nothing, and no link). A link where a file goes is replaced or removed itself, never
        followed."""
        target = self.path(name)
        if not self.is_local:
            return target
        current = self.root
        parts = name.split("/")
        for depth, part in enumerate(parts, start=1):
            current = os.path.join(current, part)
            where = self.describe("/".join(parts[:depth]))
            last = depth == len(parts)
            if os.path.islink(current) and (directory or not last):
                raise OutputLocationError(
                    f"{where} is a symbolic link (to {os.readlink(current)}): this tool never writes or deletes "
                    "through a link; remove the link, or choose another location"
                )
            if not os.path.lexists(current) or os.path.islink(current):
                continue
            if (directory or not last) and not os.path.isdir(current):
                raise OutputLocationError(
                    f"{where} is a file where this tool keeps a directory; it was not written by this tool: remove "
                    "it, or choose another location"
                )
            if last and not directory and os.path.isdir(current):
                raise OutputLocationError(
                    f"{where} is a directory where this tool keeps a file; it was not written by this tool: remove "
                    "it, or choose another location"
                )
        return target

    def is_link(self, name: str) -> bool:
        """A symbolic link (locally; other backends have none)."""
        return self.is_local and os.path.islink(self.path(name))

    def describe(self, name: str) -> str:
        """The name of a file as the user would write it, for messages."""
        return f"{self.uri}/{name}"

    # -- reading ------------------------------------------------------------------------------------------------

    @_reports_failures("checking")
    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self.path(name)))

    @_reports_failures("checking")
    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.root))

    @_reports_failures("reading the size of")
    def size(self, name: str) -> int:
        try:
            return int(self.fs.size(self.path(name)))
        except FileNotFoundError:
            raise StorageError(f"{self.describe(name)} does not exist") from None

    @_reports_failures("reading")
    def version(self, name: str) -> dict[str, Any]:
        """What identifies this object's current content cheaply: size plus ETag or mtime when the backend has one."""
        info = self.fs.info(self.path(name))
        tag = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified", "created") if info.get(k)), None)
        return {"size": int(info.get("size") or 0), "tag": str(tag) if tag is not None else None}

    @_reports_failures("listing")
    def list_files(self) -> list[str]:
        """File names directly under this location (not recursive), sorted."""
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        names = [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "file"]
        return sorted(names)

    @_reports_failures("listing")
    def list_entries(self, name: str | None = None) -> list[str]:
        """Names of the files and directories directly under this location (or its subdirectory `name`), sorted."""
        where = self.root if name is None else self.path(name)
        try:
            entries = self.fs.ls(where, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries} - {""})

    def sha256(
        self,
        name: str,
        chunk_bytes: int = 2 * PIECE_BYTES,
        on_chunk: Callable[[int, memoryview], None] | None = None,
    ) -> str:
        """sha256 of a whole file, read through one reused buffer of `chunk_bytes`; `on_chunk(offset, chunk)` sees
        every chunk on the way (another check over the same bytes, without reading them again)."""
        size = self.size(name)
        digest = hashlib.sha256()
        buffer = memoryview(bytearray(min(size, chunk_bytes)))
        for start in range(0, size, chunk_bytes):
            chunk = buffer[: min(size, start + chunk_bytes) - start]
            self.read_into(name, start, chunk)
            digest.update(chunk)
            if on_chunk is not None:
                on_chunk(start, chunk)
        return digest.hexdigest()

    @_reports_failures("reading")
    def read_bytes(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes [start, end) of a file; the whole file without a range. A short read is an error, not data."""
        try:
            data = self.fs.cat_file(self.path(name), start=start, end=end)
        except FileNotFoundError:
            raise StorageError(f"{self.describe(name)} does not exist") from None
        if start is not None and end is not None and len(data) != end - start:
            raise self._short_read(name, start, end, len(data))
        return data

    @_reports_failures("reading")
    def read_into(self, name: str, start: int, buffer: memoryview) -> None:
        """Fill `buffer` with the bytes from `start` on: straight into it for local files (no fresh buffer to
        page-fault in: measured 3x less kernel time than `read_bytes` on 2 GB), via `read_bytes` elsewhere."""
        if not self.is_local:
            buffer[:] = self.read_bytes(name, start, start + len(buffer))
            return
        try:
            with open(self.path(name), "rb") as handle:
                handle.seek(start)
                done = 0
                while done < len(buffer):
                    got = handle.readinto(buffer[done:])
                    if not got:
                        break
                    done += got
        except FileNotFoundError:
            raise StorageError(f"{self.describe(name)} does not exist") from None
        if done != len(buffer):
            raise self._short_read(name, start, start + len(buffer), done)

    def _short_read(self, name: str, start: int, end: int, got: int) -> StorageError:
        return StorageError(
            f"{self.describe(name)}: asked for bytes {start}..{end} and got {got}: the file is shorter than its "
            "header says (truncated upload or copy?); re-upload it"
        )

    def read_json(self, name: str) -> Any:
        data = self.read_bytes(name)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LoraMergeError(f"{self.describe(name)} is not valid JSON ({exc}); fix or replace the file") from None

    # -- writing ------------------------------------------------------------------------------------------------

    @contextmanager
    @_reports_failures("writing")
    def atomic_writer(self, name: str) -> Iterator[BinaryIO]:
        """A file object whose bytes appear under `name` only if the block finishes without an exception.

        s3fs commits a `with fs.open(key, "wb")` block even when it raised, so the commit is explicit here: local
        files go to a hidden sibling then `os.replace` (a rename on one filesystem, never a cross-device copy);
        other backends write with `autocommit=False` and `commit()` / `discard()`.
        """
        fs, target = self.fs, self.writable_path(name)
        if isinstance(fs, LocalFileSystem):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            temp = _partial_name(target)
            try:
                with open(temp, "wb") as handle:
                    yield handle
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp, target)
            except BaseException as exc:
                if os.path.exists(temp):
                    os.unlink(temp)
                if isinstance(exc, STORAGE_FAILURES):
                    raise StorageError(f"writing {self.describe(name)} failed ({exc}); nothing was committed") from exc
                raise
            return
        if isinstance(fs, MemoryFileSystem):
            # memory:// commits on open whatever autocommit says; a hidden sibling plus a move is atomic there.
            temp = _partial_name(target)
            try:
                with fs.open(temp, "wb") as handle:
                    yield handle
                fs.mv(temp, target)
            except BaseException:
                if fs.exists(temp):
                    fs.rm(temp)
                raise
            return
        handle = fs.open(target, "wb", autocommit=False)
        try:
            yield handle
            handle.close()
            handle.commit()
        except STORAGE_FAILURES as exc:
            handle.discard()
            raise StorageError(
                f"writing {self.describe(name)} failed after retries ({exc}); nothing was committed under that name"
            ) from exc
        except BaseException:
            handle.discard()
            raise
        finally:
            # A discarded file must never be flushed by its finalizer (that would start an upload nothing finishes),
            # and fsspec keeps every autocommit=False file in its transaction list for ever unless removed.
            handle.closed = True
            pending = getattr(getattr(fs, "_transaction", None), "files", None)
            if pending is not None and handle in pending:
                pending.remove(handle)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.atomic_writer(name) as handle:
            handle.write(data)

    def shares_filesystem_with(self, other: Location) -> bool:
        """Same backend with the same options (endpoint, credentials): a copy between the two needs no client bytes."""
        return type(self.fs) is type(other.fs) and self.fsspec_options() == other.fsspec_options()

    def copy_from(self, source: Location, name: str) -> bool:
        """Copy `source/name` to `name` here without the bytes passing through this process, atomically.

        Returns False, copying nothing, where that is not possible (another filesystem, or a backend whose copy is
        not known to be atomic); the caller then streams the bytes itself. Locally the kernel copies
        (`copy_file_range`: a reflink on btrfs/XFS, a server-side copy on NFS 4.2) into a hidden sibling that is
        renamed into place; on S3 the store copies (CopyObject, or UploadPartCopy above 5 GB, which publishes the
        key only when complete; an interrupted one is aborted by `discard_partial_writes`).
        """
        if not self.shares_filesystem_with(source):
            return False
        fs, src, target = self.fs, source.path(name), self.writable_path(name)
        if isinstance(fs, LocalFileSystem):
            with self.atomic_writer(name) as handle:  # hidden sibling, fsync, rename; removed on any failure
                _kernel_copy(src, handle)
            return True
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        if isinstance(fs, MemoryFileSystem) or set(protocols) & set(SERVER_COPY_PROTOCOLS):
            try:
                fs.copy(src, target)
            except FileNotFoundError:
                raise StorageError(f"{source.describe(name)} does not exist") from None
            except STORAGE_FAILURES as exc:
                raise storage_failure(self, exc, f"copying {source.describe(name)} server-side to", name) from exc
            fs.invalidate_cache(target)
            return True
        return False

    @_reports_failures("creating")
    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create `name` holding `data` only if it does not exist (O_EXCL locally, If-None-Match on S3).
        Returns False when it already exists."""
        fs, target = self.fs, self.writable_path(name)
        if isinstance(fs, LocalFileSystem):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return True
        if isinstance(fs, MemoryFileSystem):  # tests only; one process
            if fs.exists(target):
                return False
            fs.pipe_file(target, data)
            return True
        try:
            fs.pipe_file(target, data, mode="create")
        except FileExistsError:
            return False
        except OSError:
            # Some S3 servers (SeaweedFS) answer a failed If-None-Match with a generic error.
            fs.invalidate_cache(target)
            if fs.exists(target):
                return False
            raise
        return True

    @_reports_failures("removing interrupted writes under")
    def discard_partial_writes(self, directories: tuple[str, ...] = ("",), keep: tuple[str, ...] = ()) -> int:
        """Remove what writes interrupted by a crash left behind in `directories` ("" for the top) of this
        location, except writes of the files named in `keep` (a write in progress elsewhere); returns how many.

        Local and memory:// writes leave hidden siblings named exactly as `atomic_writer` names them
        (`PARTIAL_WRITE`): only those are removed, never a link or any other file. S3 leaves multipart uploads that
        were never completed (no object, but stored and billed): only uploads under this location's prefix are
        aborted, other writers elsewhere in the bucket are left alone. Call it only while holding the output's
        lease, so no live writer of this location is affected.
        """
        fs = self.fs
        if isinstance(fs, (LocalFileSystem, MemoryFileSystem)):
            removed = 0
            for directory in directories:
                for entry in self.list_entries(directory or None):
                    name = posixpath.join(directory, entry) if directory else entry
                    partial = PARTIAL_WRITE.match(entry)
                    if not partial or posixpath.join(directory, partial["name"]) in keep:
                        continue
                    if not self.is_link(name) and fs.isfile(self.path(name)):
                        fs.rm(self.writable_path(name))
                        removed += 1
            return removed
        if not hasattr(fs, "list_multipart_uploads"):
            return 0
        bucket, _, prefix = self.root.partition("/")
        prefix = prefix.rstrip("/") + "/"
        aborted = 0
        for upload in fs.list_multipart_uploads(bucket):
            if upload["Key"].startswith(prefix):
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
        return aborted

    @_reports_failures("removing")
    def remove(self, name: str) -> None:
        """Remove the file `name` (a link is removed itself, never what it points at); nothing if it is absent."""
        target = self.writable_path(name)
        if self.is_link(name):
            os.unlink(target)
        elif self.exists(name):
            self.fs.rm(target)

    def remove_empty_directory(self, name: str) -> None:
        """Remove the directory `name` if it is empty (locally; object stores have no empty directories)."""
        if self.is_local:
            try:
                os.rmdir(self.writable_path(name, directory=True))
            except OSError:  # not empty, absent, or not a directory: leave it
                pass

    @_reports_failures("removing")
    def remove_tree(self, name: str) -> None:
        if self.exists(name):
            self.fs.rm(self.writable_path(name, directory=True), recursive=True)

    # -- relations ----------------------------------------------------------------------------------------------

    def _canonical(self) -> str:
        return self.fs.unstrip_protocol(self.root).rstrip("/") + "/"

    def same_or_inside(self, other: Location) -> bool:
        """True when this location is `other` or lies under it (same filesystem; `/` and a bucket contain
        everything below them)."""
        if type(self.fs) is not type(other.fs):
            return False
        mine, theirs = self._canonical(), other._canonical()
        if self.is_local:
            mine = os.path.realpath(self.root).rstrip("/") + "/"
            theirs = os.path.realpath(other.root).rstrip("/") + "/"
        return mine.startswith(theirs)


def refuse_output_inside_inputs(output: Location, **inputs: Location) -> None:
    """The base and adapter are never written: an output equal to, inside, or containing an input is refused."""
    for what, location in inputs.items():
        if output.same_or_inside(location) or location.same_or_inside(output):
            raise OutputLocationError(
                f"--output {output.uri} overlaps the {what} location {location.uri}: inputs are never written; "
                "choose an output location outside (and not containing) the base and adapter"
            )
