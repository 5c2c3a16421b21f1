"""Image storage: S3-compatible, or a local directory with HMAC-signed URLs. On S3,
generated images are written with obstore; boto3 does the rest (uploaded files,
streamed reads, the readiness check, presigned URLs, credentials).

Keys are deterministic per job and image index (``{project}/{job}/{index}.{ext}``)
so a job that runs twice overwrites rather than duplicates; the job id carries
74 random bits and every URL is signed, so keys cannot be guessed into access.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO, Protocol
from urllib.parse import quote, urlencode

import boto3
import obstore
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as S3ConnectionError
from obstore.auth.boto3 import Boto3CredentialProvider
from obstore.exceptions import (
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from obstore.store import S3Store

from shared.core.errors import Forbidden, NotFound, StorageUnavailable
from shared.core.settings import Settings


def image_key(project_id: str, job_id: str, index: int, ext: str) -> str:
    return f"{project_id}/{job_id}/{index}.{ext}"


def input_key(project_id: str, job_id: str, name: str, ext: str) -> str:
    """An edit's input image (``input-0``, ...) or mask, stored under its job."""
    return f"{project_id}/{job_id}/{name}.{ext}"


# S3 error codes that mean "later", besides any 5xx status.
_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    # Set-up not finished (see S3Storage.put): waited out, not a failed request.
    "NoSuchBucket",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
}


# S3's DeleteObjects takes at most this many keys a call.
DELETE_BATCH = 1000


@dataclass(frozen=True)
class StoredObject:
    """One object found by ``Storage.scan``."""

    key: str
    size: int
    modified: datetime  # aware, UTC


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store the object; raises StorageUnavailable when the store is out."""
        ...

    def put_file(self, key: str, fileobj: BinaryIO, content_type: str) -> None:
        """Store a file's content read in chunks (an upload), never all in memory."""
        ...

    def get(self, key: str) -> bytes: ...

    def lines(self, key: str) -> Iterator[bytes]:
        """The object's lines, read as a stream (never the whole object at once)."""
        ...

    def url(self, key: str, expires_in: int, base_url: str) -> str: ...

    def delete(self, keys: Sequence[str]) -> int:
        """Delete the objects (a key already gone is no error), at most
        ``DELETE_BATCH`` a call; returns the calls made. Raises StorageUnavailable
        when the store is out or refuses a key (nothing is reported deleted that
        was not)."""
        ...

    def scan(self, prefix: str = "", start_after: str = "") -> Iterator[StoredObject]:
        """Every object whose key starts with ``prefix`` (and sorts after
        ``start_after``: a scan resumed where one stopped), with its size and last
        write, in key order, a page (1,000 on S3) at a time."""
        ...

    def check(self) -> None:
        """Raise if the store cannot take objects now (readiness)."""
        ...


@contextmanager
def _outage_as_unavailable() -> Iterator[None]:
    """boto3's own retries (standard mode, 5 attempts) come first; what still fails
    with a connection error or a 5xx is an outage, not a bad request."""
    try:
        yield
    except (S3ConnectionError, HTTPClientError) as exc:
        raise StorageUnavailable(f"storage unreachable: {exc}") from exc
    except ClientError as exc:
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if status >= 500 or exc.response.get("Error", {}).get("Code") in _TRANSIENT_CODES:
            raise StorageUnavailable(f"storage error: {exc}") from exc
        raise


class S3Storage:
    def __init__(self, settings: Settings) -> None:
        assert settings.s3_bucket
        self.bucket = settings.s3_bucket
        # One client per process, explicit timeouts and retries (boto3 clients are
        # thread-safe; sessions are not, hence the client is made here once).
        config = Config(
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=max(10, settings.worker_concurrency),
            signature_version="s3v4",
        )
        session = boto3.session.Session()
        self.client = session.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            config=config,
        )
        self.signer = self.client
        if settings.s3_public_endpoint_url:
            # Presigning is local computation: this client never opens a connection.
            self.signer = session.client(
                "s3",
                endpoint_url=settings.s3_public_endpoint_url,
                region_name=settings.s3_region,
                config=config,
            )

        # Images are written with obstore (Rust, its own connection pool): measured
        # against moto, 0.5 ms of CPU per 30 KB put where boto3's put_object took
        # 3.0 ms, the worker's largest cost per job. It takes its credentials from
        # the same boto3 session (the same chain and keys); boto3 stays for the rest
        # (multipart uploads of files, streamed reads, presigning).
        self.images = S3Store(
            self.bucket,
            endpoint=settings.s3_endpoint_url,
            region=settings.s3_region,
            credential_provider=Boto3CredentialProvider(session),
            client_options={
                "allow_http": True,
                "connect_timeout": timedelta(seconds=5),
                "timeout": timedelta(seconds=30),
            },
            # As boto3's standard mode above: a few quick tries, then the outage is
            # reported (the job waits it out with its images in hand).
            retry_config={
                "max_retries": 4,
                "backoff": {"init_backoff": timedelta(milliseconds=100), "base": 2},
                "retry_timeout": timedelta(seconds=20),
            },
        )

    def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            obstore.put(self.images, key, data, attributes={"Content-Type": content_type})
        # A missing bucket or refused keys is a deployment still being set up, not a
        # bad job: the job waits (its status_detail says for what, /readyz too) and
        # completes once the operator fixes it, rather than failing every job meanwhile.
        # obstore raises Python's own FileNotFoundError/PermissionError for these.
        except (FileNotFoundError, NotFoundError) as exc:
            raise StorageUnavailable(self._misconfigured("does not exist", exc)) from exc
        except (PermissionError, PermissionDeniedError, UnauthenticatedError) as exc:
            raise StorageUnavailable(self._misconfigured("refuses these keys", exc)) from exc
        except BaseError as exc:  # 5xx and connection errors, after its retries
            raise StorageUnavailable(f"storage unreachable: {exc}") from exc

    def _misconfigured(self, what: str, exc: Exception) -> str:
        return (
            f"the bucket '{self.bucket}' {what} ({str(exc).splitlines()[0][:200]}); "
            "create it or fix IMAGEGEN_S3_* and the AWS keys"
        )

    def put_file(self, key: str, fileobj: BinaryIO, content_type: str) -> None:
        # upload_fileobj reads in 8 MB parts (a multipart upload for big files).
        with _outage_as_unavailable():
            self.client.upload_fileobj(
                fileobj, self.bucket, key, ExtraArgs={"ContentType": content_type}
            )

    def get(self, key: str) -> bytes:
        obj = self.client.get_object(Bucket=self.bucket, Key=key)
        return bytes(obj["Body"].read())

    def lines(self, key: str) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        try:
            yield from body.iter_lines(chunk_size=64 * 1024)
        finally:
            body.close()

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)  # reachable, and the bucket is there

    def delete(self, keys: Sequence[str]) -> int:
        calls = 0
        for start in range(0, len(keys), DELETE_BATCH):
            chunk = keys[start : start + DELETE_BATCH]
            with _outage_as_unavailable():
                answer = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True},
                )
            calls += 1
            # Quiet: only the keys S3 could not delete are listed (a missing key
            # is deleted as far as S3 is concerned).
            if errors := answer.get("Errors"):
                first = errors[0]
                raise StorageUnavailable(
                    f"storage refused to delete {len(errors)} object(s), e.g. "
                    f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}"[:300]
                )
        return calls

    def scan(self, prefix: str = "", start_after: str = "") -> Iterator[StoredObject]:
        # S3 lists in UTF-8 byte order, and StartAfter starts there: no page before.
        after = {"StartAfter": start_after} if start_after else {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket,
            Prefix=prefix,
            PaginationConfig={"PageSize": DELETE_BATCH},
            **after,
        )
        with _outage_as_unavailable():
            for page in pages:
                for obj in page.get("Contents", []):
                    yield StoredObject(obj["Key"], int(obj["Size"]), obj["LastModified"])

    def url(self, key: str, expires_in: int, base_url: str) -> str:
        return str(
            self.signer.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_in
            )
        )


class LocalStorage:
    """Files under ``data_dir/files``, served by the API at ``/v1/images/files/{key}``."""

    def __init__(self, root: Path, secret: str) -> None:
        self.root = root
        self._secret = secret.encode()

    def _path(self, key: str) -> Path:
        # A lexical check, no syscalls (resolve() per image was ~8% of a batch
        # worker's CPU): keys are relative, without '.', '..' or empty segments.
        parts = key.split("/")
        if not key or "\\" in key or "\x00" in key or any(p in ("", ".", "..") for p in parts):
            raise NotFound("No such file")
        return self.root.joinpath(*parts)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.put_file(key, io.BytesIO(data), content_type)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise PermissionError(f"{self.root} is not writable")

    def put_file(self, key: str, fileobj: BinaryIO, content_type: str) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("wb") as out:
                shutil.copyfileobj(fileobj, out, 1024 * 1024)
            tmp.replace(path)  # atomic: a reader never sees half a file
        except OSError as exc:  # a full or failing disk: wait for the operator
            raise StorageUnavailable(f"storage write failed: {exc}") from exc

    def get(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise NotFound("No such file")
        return path.read_bytes()

    def lines(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise NotFound("No such file")
        with path.open("rb") as f:
            yield from f

    def delete(self, keys: Sequence[str]) -> int:
        for key in keys:
            path = self._path(key)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise StorageUnavailable(f"storage delete failed: {exc}") from exc
            # The job's folder goes with its last file (best effort: another
            # writer may have just put a file there).
            with contextlib.suppress(OSError):
                path.parent.rmdir()
        return len(keys)

    def scan(self, prefix: str = "", start_after: str = "") -> Iterator[StoredObject]:
        # Walk only the folder the prefix names (keys are folder paths).
        folders = prefix.split("/")[:-1]
        top = self.root.joinpath(*folders)
        if top.is_dir():
            yield from self._walk(top, "".join(f + "/" for f in folders), prefix, start_after)

    def _walk(
        self, folder: Path, under: str, prefix: str, start_after: str
    ) -> Iterator[StoredObject]:
        """A folder's keys in S3's order (a folder sorts as its name and '/': its
        keys all start so), folders wholly at or before ``start_after`` skipped."""
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:  # deleted meanwhile
            return
        named = sorted(
            (
                (under + e.name + ("/" if e.is_dir(follow_symlinks=False) else ""), e)
                for e in entries
            ),
            key=lambda pair: pair[0],
        )
        for key, entry in named:
            if key.endswith("/"):
                before = key < start_after and not start_after.startswith(key)
                if not before and (key.startswith(prefix) or prefix.startswith(key)):
                    yield from self._walk(Path(entry.path), key, prefix, start_after)
                continue
            if not key.startswith(prefix) or key <= start_after:
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:  # deleted meanwhile
                continue
            if not S_ISREG(stat.st_mode):
                continue  # a link to a folder: never an object of ours
            yield StoredObject(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC))

    def sign(self, key: str, expires: int) -> str:
        return hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, key: str, expires_in: int, base_url: str) -> str:
        expires = int(time.time()) + expires_in
        query = urlencode({"expires": expires, "signature": self.sign(key, expires)})
        return f"{base_url.rstrip('/')}/v1/images/files/{quote(key)}?{query}"

    def signed(self, key: str, expires: int, signature: str) -> bool:
        """The URL was made by us (whether or not it has expired)."""
        return hmac.compare_digest(self.sign(key, expires), signature)

    def verify(self, key: str, expires: int, signature: str) -> None:
        if expires < time.time():
            raise Forbidden("This URL has expired.")
        if not hmac.compare_digest(self.sign(key, expires), signature):
            raise Forbidden("Invalid signature.")


def make_storage(settings: Settings) -> Storage:
    if settings.s3_bucket:
        return S3Storage(settings)
    return LocalStorage(settings.files_dir, settings.resolved_secret_key())


def get_storage() -> Storage:
    """The process's storage (its context's)."""
    from shared.core.context import current  # the context is made of this module's parts

    return current().storage
