"""Object storage for input images and job results: one interface, two backends.

Owns: ``ResultStore`` (put/get/exists/delete/list_objects/url/check), the deterministic key
layout (``inputs/{tenant}/{sha256}``, ``results/{tenant}/{job}.png|.txt``), the S3 backend (boto3,
presigned GET URLs, multipart uploads above a threshold, paginated listings) and the local-folder
backend (atomic writes, HMAC-signed expiring download URLs served by the API's ``/v1/objects``
route). Leaves deciding what to store to the API and the workers, and what to sweep to
``worker.orphans``.

Every infrastructure failure becomes ``StorageUnavailable`` (transient: retried by workers,
503 from the API); a missing key is ``ObjectNotFound``.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from worker.errors import ObjectNotFound, SignatureInvalid, StorageUnavailable
from worker.settings import Settings

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")
MAX_KEY_CHARS = 512
SIGNING_KEY_FILE = ".url-signing-key"
MULTIPART_THRESHOLD_BYTES = 16 * 1024 * 1024
MULTIPART_CHUNK_BYTES = 8 * 1024 * 1024
LIST_PAGE_SIZE = 1000  # S3's own maximum per ListObjectsV2 call
INPUTS_PREFIX = "inputs/"
RESULTS_PREFIX = "results/"
ADAPTERS_PREFIX = "adapters/"

_clients: dict[tuple[str | None, ...], Any] = {}
_clients_lock = threading.Lock()


def input_key(tenant_id: str, sha256: str) -> str:
    return f"{INPUTS_PREFIX}{tenant_id}/{sha256}"


def output_key(tenant_id: str, job_id: str, extension: str = "png") -> str:
    return f"{RESULTS_PREFIX}{tenant_id}/{job_id}.{extension}"


def attempt_key(tenant_id: str, job_id: str, attempt: int) -> str:
    """Where the quality gate keeps a picture that was not chosen as the job's result."""
    return f"{RESULTS_PREFIX}{tenant_id}/{job_id}.attempt-{attempt}.png"


def adapter_keys(tenant_id: str, sha256: str) -> tuple[str, str]:
    """Where an adapter's ``adapter_config.json`` and ``adapter_model.safetensors`` are stored
    (content-addressed by the weights' hash)."""
    return f"{ADAPTERS_PREFIX}{tenant_id}/{sha256}.json", f"{ADAPTERS_PREFIX}{tenant_id}/{sha256}.safetensors"


def key_owner(key: str) -> tuple[str, str] | None:
    """What a key of the layout names: ``(tenant, sha256)`` for an input or an adapter's file,
    ``(tenant, job id)`` for a result; None for any other key."""
    parts = key.split("/")
    if len(parts) != 3 or not all(parts):
        return None
    if f"{parts[0]}/" == INPUTS_PREFIX:
        return parts[1], parts[2]
    if f"{parts[0]}/" in (RESULTS_PREFIX, ADAPTERS_PREFIX) and "." in parts[2]:
        return parts[1], parts[2].split(".", 1)[0]
    return None


def check_key(key: str) -> str:
    """Keys are relative, slash-separated, of safe characters, with no ``.``/``..`` segments."""
    if len(key) > MAX_KEY_CHARS or not _KEY_RE.match(key) or any(p in (".", "..") for p in key.split("/")):
        raise ObjectNotFound(f"key: {key[:80]!r} is not a valid object key", field="key")
    return key


def _is_valid_key(key: str) -> bool:
    try:
        check_key(key)
    except ObjectNotFound:
        return False
    return True


def _check_prefix(prefix: str) -> str:
    """A listing prefix is a key or the start of one (``"inputs/"``, ``"results/t1/"``)."""
    if prefix and not _is_valid_key(prefix.removesuffix("/")):
        raise ObjectNotFound(f"prefix: {prefix[:80]!r} is not a valid key prefix", field="prefix")
    return prefix


def _reraise(exc: OSError) -> None:
    raise exc


@dataclass(frozen=True)
class StoredObject:
    """One object of a listing: its key and when it was last written (UTC)."""

    key: str
    modified_at: datetime


def content_type_for(key: str) -> str:
    if key.endswith(".png"):
        return "image/png"
    if key.endswith(".txt"):
        return "text/plain; charset=utf-8"
    if key.endswith((".jpg", ".jpeg")):
        return "image/jpeg"
    if key.endswith(".webp"):
        return "image/webp"
    if key.endswith(".json"):
        return "application/json"
    return "application/octet-stream"


class ResultStore(ABC):
    """Where inputs and results live. Keys are deterministic, so a repeated put is harmless."""

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def list_objects(self, prefix: str) -> Iterator[StoredObject]:
        """The objects whose keys start with ``prefix``, fetched lazily (page by page on S3);
        files that are no valid key (a put's temporary file) are left out."""

    @abstractmethod
    def url(self, key: str, expires_s: int) -> str:
        """A URL anyone holding it can GET for ``expires_s`` seconds."""

    @abstractmethod
    def check(self) -> None:
        """Raise ``StorageUnavailable`` unless the store can be reached (for ``/readyz``)."""


class LocalStore(ResultStore):
    """A folder on the local disk; download URLs point at the API and carry an HMAC signature."""

    def __init__(self, root: Path, public_base_url: str, signing_key: bytes) -> None:
        self.root = Path(root)
        self.public_base_url = public_base_url.rstrip("/")
        self._signing_key = signing_key

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # readers never see a half-written object
        except OSError as exc:
            raise StorageUnavailable(f"storage_dir: cannot write {key!r} under {self.root}: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"key: {key!r} does not exist", field="key") from exc
        except OSError as exc:
            raise StorageUnavailable(f"storage_dir: cannot read {key!r}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"storage_dir: cannot delete {key!r}: {exc}") from exc

    def list_objects(self, prefix: str) -> Iterator[StoredObject]:
        # The folders a prefix can fall in: "inputs/t1" matches inputs/t1/… and inputs/t10/….
        folder = self.root / _check_prefix(prefix).rpartition("/")[0]
        if not folder.is_dir():
            return
        try:
            for dirpath, _, names in os.walk(folder, onerror=_reraise):
                for name in names:
                    key = (Path(dirpath) / name).relative_to(self.root).as_posix()
                    if not key.startswith(prefix) or not _is_valid_key(key):
                        continue
                    try:
                        mtime = (Path(dirpath) / name).stat().st_mtime
                    except FileNotFoundError:
                        continue  # deleted since the folder was read
                    yield StoredObject(key, datetime.fromtimestamp(mtime, UTC))
        except OSError as exc:
            raise StorageUnavailable(f"storage_dir: cannot list {prefix!r} under {self.root}: {exc}") from exc

    def _signature(self, key: str, expires: int) -> str:
        return hmac.new(self._signing_key, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, key: str, expires_s: int) -> str:
        expires = int(time.time()) + int(expires_s)
        query = urlencode({"expires": expires, "sig": self._signature(check_key(key), expires)})
        return f"{self.public_base_url}/v1/objects/{quote(key)}?{query}"

    def verify(self, key: str, expires: int, sig: str, now: float | None = None) -> None:
        """Raise ``SignatureInvalid`` unless ``sig`` signs ``key`` until ``expires`` (not passed)."""
        now = time.time() if now is None else now
        expected = self._signature(check_key(key), int(expires)).encode()
        if not hmac.compare_digest(expected, sig.encode("utf-8", "replace")):  # any text compares, none matches
            raise SignatureInvalid("sig: the download URL's signature does not match", field="sig")
        if int(expires) < now:
            raise SignatureInvalid(f"expires: the download URL expired at {int(expires)} (now {int(now)})",
                                   field="expires")

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{secrets.token_hex(4)}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise StorageUnavailable(f"storage_dir: {self.root} is not writable: {exc}") from exc


class S3Store(ResultStore):
    """An S3 bucket (AWS or any S3-compatible server) under an optional key prefix."""

    def __init__(self, settings: Settings, *, multipart_threshold_bytes: int = MULTIPART_THRESHOLD_BYTES,
                 multipart_chunk_bytes: int = MULTIPART_CHUNK_BYTES, list_page_size: int = LIST_PAGE_SIZE) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        assert settings.s3_bucket, "S3Store needs s3_bucket (Settings validates this)"
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix
        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        config = Config(signature_version="s3v4", connect_timeout=5, read_timeout=60,
                        retries={"max_attempts": 3, "mode": "standard"},
                        s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"})
        ident = (settings.s3_endpoint_url, settings.s3_region, settings.s3_access_key_id, secret)
        with _clients_lock:  # building a client loads botocore's models (~0.3 s); clients are thread-safe
            if ident not in _clients:
                _clients[ident] = boto3.session.Session().client(
                    "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
                    aws_access_key_id=settings.s3_access_key_id, aws_secret_access_key=secret, config=config)
            self._client = _clients[ident]
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold_bytes,
                                        multipart_chunksize=multipart_chunk_bytes, max_concurrency=4)
        self._list_page_size = list_page_size

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _fail(self, action: str, key: str, exc: Exception) -> Exception:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(f"key: {key!r} does not exist", field="key")
            return StorageUnavailable(f"s3: {action} {key!r} in bucket {self.bucket!r} refused: {code} "
                                      f"({exc.response.get('Error', {}).get('Message', '')})")
        return StorageUnavailable(f"s3: {action} {key!r} in bucket {self.bucket!r} failed: {exc}")

    def put(self, key: str, data: bytes, content_type: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key),
                                        ExtraArgs={"ContentType": content_type}, Config=self._transfer)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("put", key, exc) from exc

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("get", key, exc) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except (BotoCoreError, ClientError) as exc:
            err = self._fail("head", key, exc)
            if isinstance(err, ObjectNotFound):
                return False
            raise err from exc

    def head(self, key: str) -> dict:
        """The object's metadata (size, ETag, content type) — multipart uploads show in the ETag."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("head", key, exc) from exc

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("delete", key, exc) from exc

    def list_objects(self, prefix: str) -> Iterator[StoredObject]:
        from botocore.exceptions import BotoCoreError, ClientError

        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + _check_prefix(prefix),
            PaginationConfig={"PageSize": self._list_page_size})
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix):]
                    if _is_valid_key(key):
                        yield StoredObject(key, item["LastModified"].astimezone(UTC))
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("list", prefix, exc) from exc

    def url(self, key: str, expires_s: int) -> str:
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=int(expires_s))

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("head bucket", "", exc) from exc


def local_signing_key(settings: Settings) -> bytes:
    """``url_signing_key`` if set, else a random key kept in ``storage_dir`` (created once, 0600),
    so the API and the workers of an embedded stack sign and check with the same key."""
    if settings.url_signing_key is not None:
        return settings.url_signing_key.get_secret_value().encode()
    path = Path(settings.storage_dir) / SIGNING_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        except FileExistsError:
            pass  # another process of the stack created it first
    for _ in range(50):
        key = path.read_text().strip()
        if key:
            return key.encode()
        time.sleep(0.01)  # the creator has not written it yet
    raise StorageUnavailable(f"storage_dir: signing key file {path} is empty")


def make_store(settings: Settings) -> ResultStore:
    """The store the settings name (``storage_backend``)."""
    if settings.storage_backend == "s3":
        return S3Store(settings)
    return LocalStore(Path(settings.storage_dir), settings.public_base_url, local_signing_key(settings))
