"""Object storage against a real S3 server (SeaweedFS over HTTP, SigV4 checked) and a local
folder: round trips, presigned and signed download URLs, tampering, wrong credentials,
multipart uploads, listings under a prefix (page by page on S3)."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx
import pytest

from worker.errors import ObjectNotFound, SignatureInvalid, StorageUnavailable
from worker.storage import LocalStore, S3Store, input_key, key_owner, local_signing_key, make_store, output_key


@pytest.fixture
def s3_settings(make_settings):
    return make_settings(storage="s3")


def test_keys_are_deterministic_and_tenant_scoped():
    assert input_key("t1", "ab" * 32) == f"inputs/t1/{'ab' * 32}"
    assert output_key("t1", "j1") == "results/t1/j1.png"
    assert output_key("t1", "j1", "txt") == "results/t1/j1.txt"


def test_key_owner_reads_tenant_and_content_or_job_from_the_layout():
    assert key_owner(input_key("t1", "ab" * 32)) == ("t1", "ab" * 32)
    assert key_owner(output_key("t1", "j1", "txt")) == ("t1", "j1")
    for other in ("inputs/t1", "inputs/t1/x/y", "results/t1/no-extension", "misc/t1/x.png"):
        assert key_owner(other) is None, other


def test_s3_round_trip_and_presigned_url(s3_settings):
    store = make_store(s3_settings)
    assert isinstance(store, S3Store)
    store.check()
    key = output_key("tenant-a", "job-1")
    assert not store.exists(key)
    store.put(key, b"\x89PNG fake", "image/png")
    store.put(key, b"\x89PNG fake", "image/png")  # a repeat is harmless
    assert store.exists(key) and store.get(key) == b"\x89PNG fake"
    url = store.url(key, 60)
    assert url.startswith(s3_settings.s3_endpoint_url)
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b"\x89PNG fake"
    assert response.headers["content-type"] == "image/png"
    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(ObjectNotFound, match="does not exist"):
        store.get(key)


def test_s3_tampered_presigned_url_is_refused(s3_settings):
    store = make_store(s3_settings)
    store.put("results/t/a.png", b"secret a", "image/png")
    store.put("results/t/b.png", b"secret b", "image/png")
    url = store.url("results/t/a.png", 60)
    parts = urlsplit(url)
    other_key = urlunsplit(parts._replace(path=parts.path.replace("a.png", "b.png")))
    assert httpx.get(other_key).status_code == 403
    query = parse_qs(parts.query)
    sig = query["X-Amz-Signature"][0]
    forged = url.replace(sig, ("0" if sig[0] != "0" else "1") + sig[1:])
    assert httpx.get(forged).status_code == 403
    assert httpx.get(url).status_code == 200


def test_s3_wrong_credentials_fail_as_unavailable(make_settings):
    bad = make_settings(storage="s3", s3_secret_access_key="not-the-secret")
    store = make_store(bad)
    with pytest.raises(StorageUnavailable, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        store.put("results/t/x.png", b"x", "image/png")
    with pytest.raises(StorageUnavailable):
        store.check()


def test_s3_unreachable_endpoint_fails_as_unavailable(make_settings):
    store = make_store(make_settings(storage="s3", s3_endpoint_url="http://127.0.0.1:9"))
    with pytest.raises(StorageUnavailable, match="failed"):
        store.check()
    with pytest.raises(StorageUnavailable, match="list 'inputs/'"):
        list(store.list_objects("inputs/"))


def test_s3_large_objects_go_up_in_parts(s3_settings):
    store = S3Store(s3_settings, multipart_threshold_bytes=5 * 1024 * 1024,
                    multipart_chunk_bytes=5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024)
    store.put("results/t/big.png", data, "image/png")
    head = store.head("results/t/big.png")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # a multipart ETag: md5-of-md5s-<parts>
    assert store.get("results/t/big.png") == data


def test_s3_prefix_isolates_stores(make_settings):
    a, b = make_store(make_settings(storage="s3")), make_store(make_settings(storage="s3"))
    a.put("results/t/x.png", b"a", "image/png")
    assert not b.exists("results/t/x.png")


def test_local_round_trip_and_signed_url(tmp_path):
    store = LocalStore(tmp_path, "http://api.example:8000/", b"k" * 32)
    store.check()
    key = output_key("t", "j")
    store.put(key, b"pixels", "image/png")
    assert store.exists(key) and store.get(key) == b"pixels"
    assert [p.name for p in (tmp_path / "results" / "t").iterdir()] == ["j.png"]  # no temp files left
    url = store.url(key, 60)
    parts = urlsplit(url)
    assert url.startswith("http://api.example:8000/v1/objects/results/t/j.png?")
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    store.verify(key, int(query["expires"]), query["sig"])
    with pytest.raises(SignatureInvalid, match="signature does not match"):
        store.verify("results/t/other.png", int(query["expires"]), query["sig"])
    with pytest.raises(SignatureInvalid, match="signature does not match"):
        store.verify(key, int(query["expires"]) + 1, query["sig"])
    with pytest.raises(SignatureInvalid, match="expired"):
        store.verify(key, int(query["expires"]), query["sig"], now=time.time() + 61)
    store.delete(key)
    store.delete(key)
    with pytest.raises(ObjectNotFound):
        store.get(key)


def test_local_store_refuses_path_escapes(tmp_path):
    store = LocalStore(tmp_path / "root", "http://x", b"k")
    for key in ("../etc/passwd", "/abs", "a/../../b", "a//b", "a/./b"):
        with pytest.raises(ObjectNotFound, match="not a valid object key"):
            store.put(key, b"x", "text/plain")


def test_local_signing_key_is_shared_through_the_storage_folder(make_settings):
    settings = make_settings(url_signing_key=None)
    first = local_signing_key(settings)
    assert len(first) == 64 and local_signing_key(settings) == first
    assert oct((settings.storage_dir / ".url-signing-key").stat().st_mode & 0o777) == "0o600"
    assert local_signing_key(make_settings(url_signing_key="explicit")) == b"explicit"


def test_local_store_unwritable_root_is_unavailable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = LocalStore(blocker / "sub", "http://x", b"k")
    with pytest.raises(StorageUnavailable, match="not writable"):
        store.check()
    with pytest.raises(StorageUnavailable, match="cannot write"):
        store.put("results/t/j.png", b"x", "image/png")


@pytest.fixture(params=["local", "s3"])
def any_store(request, make_settings):
    """An empty store of each backend (its own folder or S3 prefix)."""
    return make_store(make_settings(storage=request.param))


def test_listing_yields_the_keys_under_a_prefix_with_their_write_time(any_store):
    keys = ["inputs/t1/aa", "inputs/t1/bb", "inputs/t10/cc", "results/t1/j1.png"]
    before = datetime.now(UTC) - timedelta(minutes=5)  # generous: S3 stamps with its own clock
    for key in keys:
        any_store.put(key, key.encode(), "application/octet-stream")
    listed = {o.key: o.modified_at for o in any_store.list_objects("inputs/")}
    assert sorted(listed) == keys[:3]
    assert all(before < t < datetime.now(UTC) + timedelta(minutes=5) for t in listed.values())
    assert all(t.tzinfo is not None and t.utcoffset() == timedelta(0) for t in listed.values())
    assert sorted(o.key for o in any_store.list_objects("inputs/t1/")) == keys[:2]
    assert sorted(o.key for o in any_store.list_objects("inputs/t1")) == keys[:3]  # a prefix, not a folder
    assert sorted(o.key for o in any_store.list_objects("")) == keys
    assert list(any_store.list_objects("results/none/")) == []
    any_store.delete("inputs/t1/aa")
    assert sorted(o.key for o in any_store.list_objects("inputs/")) == keys[1:3]


def test_listing_refuses_a_prefix_that_is_no_key(any_store):
    for prefix in ("../", "/inputs/", "inputs//", "inputs/../results/"):
        with pytest.raises(ObjectNotFound, match="not a valid key prefix"):
            list(any_store.list_objects(prefix))


def test_s3_listing_is_fetched_page_by_page(s3_settings):
    store = S3Store(s3_settings, list_page_size=2)
    keys = [input_key("t", f"{i:064x}") for i in range(5)]
    for key in keys:
        store.put(key, b"x", "application/octet-stream")
    calls: list[str] = []

    def count(**_: object) -> None:
        calls.append("ListObjectsV2")

    events = store._client.meta.events
    events.register("after-call.s3.ListObjectsV2", count, unique_id="test-page-count")
    try:
        assert [o.key for o in store.list_objects("inputs/")] == keys  # S3 lists in key order
    finally:
        events.unregister("after-call.s3.ListObjectsV2", unique_id="test-page-count")
    assert len(calls) == 3  # 2 + 2 + 1


def test_local_listing_leaves_out_temporary_and_signing_key_files(make_settings):
    settings = make_settings(url_signing_key=None)
    store = make_store(settings)
    local_signing_key(settings)  # .url-signing-key at the root
    store.put("inputs/t/aa", b"x", "application/octet-stream")
    (settings.storage_dir / "inputs" / "t" / ".tmp-abc123").write_bytes(b"half a put")
    assert [o.key for o in store.list_objects("")] == ["inputs/t/aa"]
    assert list(LocalStore(settings.storage_dir / "missing", "http://x", b"k").list_objects("inputs/")) == []
