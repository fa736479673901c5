"""Tests of joblib_store against moto's S3 server, over HTTP on 127.0.0.1.

The server runs in a thread of the test process, behind a small WSGI layer
that counts every request it receives (from this process and from the
subprocesses the tests start) and can answer chosen requests with an error.
Each test gets a fresh bucket.
"""

import asyncio
import datetime
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
import uuid
import warnings
from collections import Counter
from contextlib import contextmanager

import joblib
import numpy as np
import pytest
from joblib import Memory
from joblib.memory import MemorizedFunc, MemorizedResult

import joblib_store
from joblib_store import S3StoreBackend, register_s3_store_backend

HERE = os.path.dirname(os.path.abspath(__file__))
JOBLIB_VERSION = tuple(int(part) for part in joblib.__version__.split(".")[:2])
needs_joblib_13 = pytest.mark.skipif(
    JOBLIB_VERSION < (1, 3),
    reason=f"joblib {joblib.__version__} has no cache_validation_callback "
    f"(new in 1.3)",
)
needs_joblib_14 = pytest.mark.skipif(
    JOBLIB_VERSION < (1, 4),
    reason=f"joblib {joblib.__version__} cannot cache coroutine functions "
    f"(new in 1.4)",
)
MiB = 2**20
STALL_SECONDS = 2  # a stalled response outlasts the 1 s read timeout of the tests

register_s3_store_backend()


# ---------------------------------------------------------------- the server


def s3_operation(environ):
    """Name the S3 operation of a request, as in the S3 API reference."""
    method = environ["REQUEST_METHOD"]
    path = environ.get("PATH_INFO", "").strip("/")
    query = environ.get("QUERY_STRING", "")
    on_object = "/" in path
    if method == "HEAD":
        return "HeadObject" if on_object else "HeadBucket"
    if method == "GET":
        if "list-type=2" in query:
            return "ListObjectsV2"
        if "uploads" in query:
            return "ListMultipartUploads"
        return "GetObject" if on_object else "ListObjects"
    if method == "PUT":
        if "partNumber" in query:
            return "UploadPart"
        if environ.get("HTTP_X_AMZ_COPY_SOURCE"):
            return "CopyObject"
        return "PutObject" if on_object else "CreateBucket"
    if method == "POST":
        if "delete" in query:
            return "DeleteObjects"
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
    if method == "DELETE":
        if "uploadId" in query:
            return "AbortMultipartUpload"
        return "DeleteObject" if on_object else "DeleteBucket"
    return f"{method} {query}"


class S3Server:
    """moto's S3 server, counting requests and injecting chosen errors."""

    def __init__(self):
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            create_backend_app,
        )

        self._moto = DomainDispatcherApplication(create_backend_app)
        self._lock = threading.Lock()
        self.requests = []
        self.faults = []
        self.port = 0
        self._server = None

    def __call__(self, environ, start_response):
        operation = s3_operation(environ)
        path = environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        with self._lock:
            self.requests.append((operation, path))
        for fault in list(self.faults):
            answer = fault(operation, path, query)
            if answer == "reset":
                # Drop the connection without a response.
                environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
                return []
            if answer == "stall":
                time.sleep(STALL_SECONDS)
                break
            if answer is not None:
                status, code = answer
                body = (
                    b""
                    if environ["REQUEST_METHOD"] == "HEAD"
                    else f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}"
                    f"</Code><Message>{code} (injected by the test)</Message>"
                    f"</Error>".encode()
                )
                start_response(
                    f"{status} {code}",
                    [("Content-Type", "application/xml"),
                     ("Content-Length", str(len(body)))],
                )
                return [body]
        return self._moto(environ, start_response)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        self._server = make_server(
            "127.0.0.1", self.port, self, threaded=True,
            request_handler=MotoRequestHandler,
        )
        self.port = self._server.server_port
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    @contextmanager
    def counting(self):
        """Count the requests made inside the block, by operation."""
        counts = Counter()
        with self._lock:
            start = len(self.requests)
        try:
            yield counts
        finally:
            # Background work (none is expected) would show up here too.
            with self._lock:
                counts.update(operation for operation, _ in self.requests[start:])


@pytest.fixture(scope="session")
def s3_server():
    environment = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # Never look for credentials or regions outside the test, and never
        # ask an instance metadata service on the network.
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = S3Server()
    server.start()
    # A location alone (as joblib sometimes gives) finds the server too.
    environment["AWS_ENDPOINT_URL"] = server.url
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        patch.delenv("AWS_PROFILE", raising=False)
        yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1")


@pytest.fixture
def bucket(s3_server, s3_client):
    name = f"test-{uuid.uuid4().hex[:20]}"
    s3_client.create_bucket(Bucket=name)
    yield name
    s3_server.faults.clear()
    keys = [
        {"Key": obj["Key"]}
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=name)
        for obj in page.get("Contents", ())
    ]
    for start in range(0, len(keys), 1000):
        s3_client.delete_objects(Bucket=name, Delete={"Objects": keys[start:start + 1000]})
    for upload in s3_client.list_multipart_uploads(Bucket=name).get("Uploads", ()):
        s3_client.abort_multipart_upload(
            Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"]
        )
    s3_client.delete_bucket(Bucket=name)


@pytest.fixture
def location(bucket):
    return f"s3://{bucket}/cache"


def keys_in(s3_client, bucket, prefix=""):
    return sorted(
        obj["Key"]
        for page in s3_client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        )
        for obj in page.get("Contents", ())
    )


def run_python(code, **env):
    """Run code in a fresh Python process; return its standard output."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=120, cwd=HERE,
        env={**os.environ, "PYTHONPATH": HERE, **env},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# ------------------------------------------------------- functions to cache

CALLS = []


def square(x):
    CALLS.append(x)
    return x * x


def identity(value):
    CALLS.append(1)
    return value


def add(x, y, debug=False):
    CALLS.append((x, y))
    return x + y


def random_array(size):
    return np.random.RandomState(size).rand(size)


def fresh(func):
    """A new function object with the same code, unknown to joblib yet."""
    copy = types.FunctionType(
        func.__code__, func.__globals__, func.__name__, func.__defaults__
    )
    copy.__module__, copy.__qualname__ = func.__module__, func.__qualname__
    return copy


@pytest.fixture(autouse=True)
def reset_calls():
    CALLS.clear()


# ----------------------------------------------------- locations and options


@pytest.mark.parametrize(
    "spelling", ["s3 url", "s3 url with backend", "bucket option"]
)
def test_three_spellings_reach_the_same_cache(bucket, spelling):
    # joblib writes func_code.py only where it first meets a function
    # object, so each cache here gets a function object of its own.
    first = Memory(f"s3://{bucket}/cache", verbose=0).cache(fresh(square))
    assert first(3) == 9 and CALLS == [3]
    if spelling == "s3 url":
        memory = Memory(f"s3://{bucket}/cache", verbose=0)
    elif spelling == "s3 url with backend":
        memory = Memory(f"s3://{bucket}/cache", backend="s3", verbose=0)
    else:
        memory = Memory("cache", backend="s3", verbose=0,
                        backend_options={"bucket": bucket})
    assert memory.store_backend.location == f"s3://{bucket}/cache/joblib"
    assert memory.cache(fresh(square))(3) == 9
    assert CALLS == [3]


def test_absolute_path_with_bucket_option_stays_in_that_bucket(bucket, s3_client):
    memory = Memory("/abs/cache", backend="s3", verbose=0,
                    backend_options={"bucket": bucket})
    assert memory.store_backend.location == f"s3://{bucket}/abs/cache/joblib"
    memory.cache(fresh(square))(4)
    assert any(key.startswith("abs/cache/joblib/") for key in keys_in(s3_client, bucket))


def test_local_paths_still_use_joblibs_own_backend(tmp_path):
    memory = Memory(str(tmp_path), verbose=0)
    assert type(memory.store_backend).__name__ == "FileSystemStoreBackend"


def test_register_is_idempotent():
    factory = joblib.memory._store_backend_factory
    register_s3_store_backend()
    register_s3_store_backend()
    assert joblib.memory._store_backend_factory is factory
    assert joblib.memory._STORE_BACKENDS["s3"] is S3StoreBackend


def test_configure_from_the_location_alone_reaches_the_same_cache(location):
    memory = Memory(location, verbose=0,
                    backend_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    memory.cache(fresh(square))(5)
    again = S3StoreBackend()
    again.configure(memory.store_backend.location)
    assert again.location == memory.store_backend.location
    assert len(again.get_items()) == 1
    # And configuring a store with its own location changes nothing.
    again.configure(again.location)
    assert again.location == memory.store_backend.location
    direct = MemorizedFunc(fresh(square), memory.store_backend.location,
                           backend="s3", verbose=0)
    assert direct(5) == 25 and CALLS == [5]


def test_storage_options_and_direct_keywords_both_reach_s3fs(location, s3_server):
    for options in (
        {"storage_options": {"endpoint_url": s3_server.url}},
        {"endpoint_url": s3_server.url},
    ):
        memory = Memory(location, verbose=0, backend_options=options)
        assert memory.store_backend.fs.endpoint_url == s3_server.url


def test_a_ready_filesystem_is_used_as_is(location, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server.url, skip_instance_cache=True)
    memory = Memory(location, verbose=0, backend_options={"fs": fs})
    assert memory.store_backend.fs is fs
    assert memory.cache(fresh(square))(6) == 36


def test_joblib_options_never_reach_s3fs(location):
    memory = Memory(location, verbose=0, compress=3)
    fs = memory.store_backend.fs
    assert "compress" not in fs.storage_options
    assert "mmap_mode" not in fs.storage_options


def test_create_bucket_option_creates_a_missing_bucket(s3_server, s3_client):
    name = f"created-{uuid.uuid4().hex[:12]}"
    Memory(f"s3://{name}/cache", verbose=0, backend_options={"create_bucket": True})
    assert name in [b["Name"] for b in s3_client.list_buckets()["Buckets"]]
    s3_client.delete_bucket(Bucket=name)


# ------------------------------------------------------------- bad input


def unreachable_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(
    "case, location_of, options, error, words",
    [
        ("empty url", lambda b: "s3://", {}, ValueError, ["'s3://"]),
        ("no bucket", lambda b: "s3:///prefix", {}, ValueError, ["no bucket"]),
        ("invalid name", lambda b: "s3://Bad_Bucket/cache", {}, ValueError,
         ["'Bad_Bucket'", "not valid"]),
        ("missing bucket", lambda b: f"s3://{b}-missing/cache", {},
         FileNotFoundError, ["-missing'", "does not exist", "create_bucket"]),
        ("unknown option", lambda b: f"s3://{b}/cache", {"colour": "red"},
         TypeError, ["colour", "endpoint_url", "bucket"]),
        ("compress not a level", lambda b: f"s3://{b}/cache", {"compress": "yes"},
         ValueError, ["compress='yes'", "zlib"]),
        ("compress wrong type", lambda b: f"s3://{b}/cache", {"compress": 1.5},
         TypeError, ["compress=1.5"]),
        ("location elsewhere", lambda b: "s3://other-bucket/cache",
         {"bucket": "this-bucket"}, ValueError, ["'other-bucket'", "'this-bucket'"]),
        ("storage options not a dict", lambda b: f"s3://{b}/cache",
         {"storage_options": "x"}, TypeError, ["storage_options"]),
    ],
)
def test_bad_input_gets_a_clear_error(bucket, case, location_of, options, error, words):
    location = location_of(bucket)
    compress = options.pop("compress", False) if "compress" in options else False
    with pytest.raises(error) as raised:
        Memory(location, backend="s3", verbose=0, compress=compress,
               backend_options=options)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


def test_access_denied_names_bucket_and_endpoint(bucket, s3_server):
    s3_server.faults.append(
        lambda operation, path, query: (403, "AccessDenied") if path.startswith(f"/{bucket}") else None
    )
    with pytest.raises(PermissionError) as raised:
        Memory(f"s3://{bucket}/denied-{uuid.uuid4().hex}", verbose=0,
               backend_options={"skip_instance_cache": True})
    message = str(raised.value)
    assert f"'{bucket}'" in message and s3_server.url in message
    assert "denied" in message


def test_no_credentials_names_bucket_and_says_what_to_set(bucket, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    with pytest.raises(PermissionError) as raised:
        Memory(f"s3://{bucket}/cache", verbose=0,
               backend_options={"skip_instance_cache": True})
    assert f"'{bucket}'" in str(raised.value)
    assert "AWS_ACCESS_KEY_ID" in str(raised.value)


def test_unreachable_endpoint_fails_fast_and_names_it(bucket):
    url = unreachable_url()
    started = time.monotonic()
    with pytest.raises(ConnectionError) as raised:
        Memory(f"s3://{bucket}/cache", verbose=0, backend_options={"endpoint_url": url})
    assert time.monotonic() - started < 10
    assert url in str(raised.value) and f"'{bucket}'" in str(raised.value)


# ------------------------------------------------- the store, method by method


@pytest.fixture
def store(location):
    backend = S3StoreBackend()
    backend.configure(location + "/joblib", verbose=0, backend_options={})
    return backend


def test_open_item_writes_and_reads_back(store):
    with store._open_item(store.location + "/f/file.bin", "wb") as f:
        f.write(b"hello")
    with store._open_item(store.location + "/f/file.bin", "rb") as f:
        assert f.read() == b"hello"
    with pytest.raises(ValueError):
        store._open_item(store.location + "/f/file.bin", "ab")


def test_item_exists_for_objects_and_folders(store):
    store.store_cached_func_code(["f"], "code")
    assert store._item_exists(store.location + "/f/func_code.py")
    assert store._item_exists(store.location + "/f")
    assert not store._item_exists(store.location + "/g")
    assert not store._item_exists(store.location + "/f/metadata.json")


def test_move_item_renames(store):
    store.store_cached_func_code(["f"], "code")
    store._move_item(store.location + "/f/func_code.py", store.location + "/g/func_code.py")
    assert store.get_cached_func_code(["g"]) == "code"
    with pytest.raises(FileNotFoundError):
        store.get_cached_func_code(["f"])


def test_create_location_makes_no_request(store, s3_server):
    with s3_server.counting() as counts:
        store.create_location(store.location + "/f/x")
    assert sum(counts.values()) == 0


def test_clear_location_spares_sibling_prefixes(store, s3_client, bucket):
    store.dump_item(["f", "a" * 32], 1)
    s3_client.put_object(Bucket=bucket, Key="cache/joblib-other/keep", Body=b"x")
    store.clear_location(store.location)
    assert keys_in(s3_client, bucket) == ["cache/joblib-other/keep"]


def test_dump_load_contains_and_clear_item(store):
    call_id = ["f", "b" * 32]
    assert not store.contains_item(call_id)
    store.dump_item(call_id, {"answer": 42})
    assert store.contains_item(call_id)
    assert store.load_item(call_id) == {"answer": 42}
    assert store.get_item_info(call_id)["location"] == f"{store.location}/f/{'b' * 32}"
    store.clear_item(call_id)
    assert not store.contains_item(call_id)
    with pytest.raises(KeyError):
        store.load_item(call_id)


def test_metadata_round_trip_and_missing_metadata_is_empty(store):
    call_id = ["f", "c" * 32]
    assert store.get_metadata(call_id) == {}
    store.store_metadata(call_id, {"duration": 1.5, "input_args": {"x": "1"}})
    metadata = store.get_metadata(call_id)
    assert metadata == {"duration": 1.5, "input_args": {"x": "1"}}
    assert metadata["duration"] == 1.5 and dict(metadata)["duration"] == 1.5
    assert pickle.loads(pickle.dumps(metadata)) == dict(metadata)


def test_func_code_and_paths(store):
    with pytest.raises(FileNotFoundError):
        store.get_cached_func_code(["mod/f"])
    store.store_cached_func_code(["mod/f"])  # no code: nothing to store
    assert not store.contains_path(["mod/f"])
    store.store_cached_func_code(["mod/f"], "def f(): pass")
    assert store.get_cached_func_code(["mod/f"]) == "def f(): pass"
    assert store.contains_path(["mod/f"])
    assert store.get_cached_func_info(["mod/f"])["location"] == store.location + "/mod/f"
    store.dump_item(["mod/f", "d" * 32], 1)
    store.clear_path(["mod/f"])
    assert not store.contains_path(["mod/f"])
    assert not store.contains_item(["mod/f", "d" * 32])


def test_get_items_reports_every_item_with_size_and_time(store):
    before = datetime.datetime.now() - datetime.timedelta(seconds=2)
    store.store_cached_func_code(["mod/f"], "code")
    for args_id in ("1" * 32, "2" * 32):
        store.dump_item(["mod/f", args_id], b"x" * 1000)
        store.store_metadata(["mod/f", args_id], {"duration": 1})
    items = sorted(store.get_items())
    assert [item.path for item in items] == [
        f"{store.location}/mod/f/{'1' * 32}", f"{store.location}/mod/f/{'2' * 32}"
    ]
    for item in items:
        assert item.size > 1000
        assert before <= item.last_access <= datetime.datetime.now() + datetime.timedelta(seconds=2)


def test_clear_empties_the_store(store):
    store.dump_item(["f", "e" * 32], 1)
    store.store_cached_func_code(["f"], "code")
    store.clear()
    assert store.get_items() == []
    assert not store.contains_path(["f"])


def test_store_pickles_into_another_process(location):
    memory = Memory(location, verbose=0)
    cached = memory.cache(fresh(square))
    cached(7)
    out = run_python(
        f"""
        import pickle, sys
        memory = pickle.loads({pickle.dumps(memory)!r})
        cached = memory.cache(__import__("test_joblib_store").square)
        print(cached.check_call_in_cache(7), cached(7))
        """
    )
    assert out.split() == ["True", "49"]


# ------------------------------------------------------- Memory on top of S3

PAYLOADS = {
    "int": 42,
    "str": "joblib ☃ store",
    "bytes": bytes(range(256)) * 10,
    "dict": {"a": [1, 2.5, None], "b": {"nested": True}},
    "list": [1, "two", 3.0, (4,)],
    "array C": np.arange(12.0).reshape(3, 4),
    "array F": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    "array object": np.array([1, "a", None, {"k": 2}], dtype=object),
}


@pytest.mark.parametrize("compress", [False, 3], ids=["raw", "zlib3"])
@pytest.mark.parametrize("payload", PAYLOADS, ids=list(PAYLOADS))
def test_miss_then_hit_returns_equal_values(location, compress, payload):
    memory = Memory(location, verbose=0, compress=compress)
    cached = memory.cache(fresh(identity))
    value = PAYLOADS[payload]
    first = cached(value)
    second = cached(value)
    assert CALLS == [1]
    for result in (first, second):
        if isinstance(value, np.ndarray):
            assert result.dtype == value.dtype
            assert result.flags.f_contiguous == value.flags.f_contiguous
            assert list(result.ravel()) == list(value.ravel())
        else:
            assert result == value


@pytest.mark.parametrize("compress", [False, ("zlib", 3), True], ids=["raw", "zlib3", "true"])
def test_a_64_mib_array_round_trips(location, compress):
    memory = Memory(location, verbose=0, compress=compress)
    cached = memory.cache(fresh(random_array))
    size = 64 * MiB // 8
    first = cached(size)
    second = cached(size)
    assert second.shape == (size,)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(second, random_array(size))


def test_changed_function_code_invalidates(location):
    memory = Memory(location, verbose=0)
    namespace = {}
    code = "def shifted(x):\n    CALLS.append(x)\n    return x + {}\n"
    exec(code.format(1), {"CALLS": CALLS}, namespace)
    assert memory.cache(namespace["shifted"])(1) == 2
    exec(code.format(10), {"CALLS": CALLS}, namespace)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joblib warns it cannot tell collisions
        assert memory.cache(namespace["shifted"])(1) == 11
    assert CALLS == [1, 1]


def test_ignore_leaves_arguments_out_of_the_key(location):
    cached = Memory(location, verbose=0).cache(fresh(add), ignore=["debug"])
    assert cached(1, 2, debug=False) == 3
    assert cached(1, 2, debug=True) == 3
    assert CALLS == [(1, 2)]


def test_call_and_shelve_gives_a_result_that_loads_clears_and_travels(location):
    cached = Memory(location, verbose=0).cache(fresh(square))
    result = cached.call_and_shelve(8)
    assert isinstance(result, MemorizedResult)
    assert result.get() == 64
    again = cached.call_and_shelve(8)
    assert again.get() == 64 and CALLS == [8]
    out = run_python(
        f"""
        import pickle
        print(pickle.loads({pickle.dumps(again)!r}).get())
        """
    )
    assert out.strip() == "64"
    result.clear()
    with pytest.raises(KeyError):
        result.get()


def test_check_call_in_cache(location):
    cached = Memory(location, verbose=0).cache(fresh(square))
    assert not cached.check_call_in_cache(9)
    cached(9)
    assert cached.check_call_in_cache(9)


@needs_joblib_13
def test_cache_validation_callback_with_expires_after(location):
    from joblib.memory import expires_after

    memory = Memory(location, verbose=0)
    cached = memory.cache(fresh(square), cache_validation_callback=expires_after(seconds=0.5))
    cached(2)
    cached(2)
    assert CALLS == [2]
    time.sleep(0.7)
    cached(2)
    assert CALLS == [2, 2]


def test_memory_clear_and_func_clear(location, s3_client, bucket):
    memory = Memory(location, verbose=0)
    cached_square, cached_add = memory.cache(fresh(square)), memory.cache(fresh(add))
    cached_square(1), cached_add(1, 2)
    cached_square.clear(warn=False)
    cached_square(1), cached_add(1, 2)
    assert CALLS == [1, (1, 2), 1]
    memory.clear(warn=False)
    assert keys_in(s3_client, bucket) == []
    cached_square(1)
    assert CALLS == [1, (1, 2), 1, 1]


def store_spaced_items(memory, count):
    """Cache square(0..count-1), a second apart: S3 times have 1 s steps."""
    cached = memory.cache(fresh(square))
    for x in range(count):
        if x:
            time.sleep(1.05)
        cached(x)
    return cached


def cached_inputs(memory, cached, count):
    return [x for x in range(count) if cached.check_call_in_cache(x)]


def reduce_size(memory, bytes_limit=None, **limits):
    """Memory.reduce_size, or on joblib < 1.3 (which lacks the item and age
    limits) the store's own eviction, which has them on every release."""
    if JOBLIB_VERSION >= (1, 3):
        memory.reduce_size(bytes_limit=bytes_limit, **limits)
    elif limits:
        memory.store_backend.enforce_store_limits(bytes_limit, **limits)
    else:
        memory.store_backend.reduce_store_size(bytes_limit)


def test_reduce_size_bytes_limit_evicts_the_oldest(location):
    memory = Memory(location, verbose=0)
    cached = store_spaced_items(memory, 3)
    items = sorted(memory.store_backend.get_items(), key=lambda item: item.last_access)
    limit = sum(item.size for item in items) - items[0].size  # room for the newest two
    reduce_size(memory, bytes_limit=limit)
    assert cached_inputs(memory, cached, 3) == [1, 2]


def test_reduce_size_items_limit_evicts_the_oldest(location):
    memory = Memory(location, verbose=0)
    cached = store_spaced_items(memory, 3)
    reduce_size(memory, items_limit=2)
    assert cached_inputs(memory, cached, 3) == [1, 2]


def test_reduce_size_age_limit_evicts_the_old(location):
    memory = Memory(location, verbose=0)
    cached = store_spaced_items(memory, 1)
    time.sleep(2.5)
    cached(5)
    reduce_size(memory, age_limit=datetime.timedelta(seconds=2))
    assert cached_inputs(memory, cached, 6) == [5]


def test_verbose_output_names_the_s3_location(location, capsys):
    cached = Memory(location, verbose=100).cache(fresh(square))
    cached(3)
    cached(3)
    out = capsys.readouterr().out
    assert "[Memory] Calling" in out and "square(3)" in out
    assert "Loading square" in out
    assert f"from {location}/joblib/" in out


@needs_joblib_14
def test_async_functions_are_cached(location):
    async def coroutine_square(x):
        CALLS.append(x)
        return x * x

    cached = Memory(location, verbose=0).cache(coroutine_square)
    assert asyncio.run(cached(4)) == 16
    assert asyncio.run(cached(4)) == 16
    assert CALLS == [4]


def test_a_second_process_hits_what_the_first_stored(location):
    program = f"""
        from joblib import Memory
        import joblib_store, test_joblib_store as t
        joblib_store.register_s3_store_backend()
        cached = Memory({location!r}, verbose=0).cache(t.square)
        print(cached(11), len(t.CALLS))
        """
    assert run_python(program).split() == ["121", "1"]
    assert run_python(program).split() == ["121", "0"]


def make_lock(name):
    CALLS.append(name)
    return threading.Lock()


def test_unpicklable_result_warns_and_is_returned(location, s3_client, bucket):
    cached = Memory(location, verbose=0).cache(fresh(make_lock))
    with pytest.warns(Warning, match="pickle"):
        assert isinstance(cached("a"), type(threading.Lock()))
    assert not cached.check_call_in_cache("a")
    assert not any(key.endswith("output.pkl") for key in keys_in(s3_client, bucket))


# ------------------------------------------------ requests each operation costs


@pytest.mark.parametrize("compress", [False, 3], ids=["raw", "zlib3"])
def test_request_budget_of_misses_and_hits(bucket, s3_server, compress):
    with s3_server.counting() as building:
        memory = Memory(f"s3://{bucket}/cache", verbose=0, compress=compress)
        cached = memory.cache(fresh(square))
    with s3_server.counting() as first_miss:
        cached(1)
    with s3_server.counting() as miss:
        cached(2)
    with s3_server.counting() as hit:
        assert cached(2) == 4
    assert sum(building.values()) <= 1, building
    assert sum(first_miss.values()) <= 4, first_miss
    assert sum(miss.values()) <= 3, miss
    assert sum(hit.values()) <= 2, hit
    # Nothing is written twice: no temporary keys, no copies, no renames.
    assert first_miss["CopyObject"] == miss["CopyObject"] == 0
    assert first_miss["PutObject"] == 3 and miss["PutObject"] == 2


def test_request_budget_of_a_hit_in_a_fresh_process(location, s3_server):
    Memory(location, verbose=0).cache(fresh(square))(3)
    program = f"""
        from joblib import Memory
        import joblib_store, test_joblib_store as t
        joblib_store.register_s3_store_backend()
        cached = Memory({location!r}, verbose=0).cache(t.square)
        for _ in range(3):
            print(cached(3))
        """
    with s3_server.counting() as fresh_process:
        assert run_python(program).split() == ["9"] * 3
    # One bucket check, then at most 3 requests for each of the 3 hits.
    assert fresh_process["HeadBucket"] == 1
    assert sum(fresh_process.values()) <= 1 + 3 * 3, fresh_process


def test_request_budget_of_reduce_size_clear_and_listing(location, s3_server):
    memory = Memory(location, verbose=0)
    cached = memory.cache(fresh(square))
    for x in range(200):
        cached(x)
    with s3_server.counting() as listing:
        assert len(memory.store_backend.get_items()) == 200
    assert sum(listing.values()) == 1, listing  # 401 keys: one page
    with s3_server.counting() as reducing:
        reduce_size(memory, items_limit=100)
    assert sum(reducing.values()) <= 2, reducing
    assert len(memory.store_backend.get_items()) == 100
    with s3_server.counting() as clearing:
        memory.clear(warn=False)
    assert sum(clearing.values()) <= 2, clearing
    assert memory.store_backend.get_items() == []


def test_listing_costs_one_request_per_thousand_keys(store, s3_server, s3_client, bucket):
    # 600 items of two objects each: 1200 keys, two pages.
    for index in range(600):
        args_id = f"{index:032x}"
        for name in ("output.pkl", "metadata.json"):
            s3_client.put_object(Bucket=bucket, Key=f"cache/joblib/f/{args_id}/{name}", Body=b"1")
    with s3_server.counting() as listing:
        assert len(store.get_items()) == 600
    assert listing == Counter({"ListObjectsV2": 2})


# ------------------------------------- a cache failure never fails a call


def cache_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, joblib_store.CacheWarning)]


def test_server_down_computes_warns_once_per_kind_and_resumes(location, s3_server, monkeypatch):
    monkeypatch.setattr(joblib_store, "_OFFLINE_PAUSE", 2.0)
    cached = Memory(location, verbose=0).cache(fresh(square))
    cached(1)
    s3_server.stop()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert [cached(x) for x in range(6)] == [x * x for x in range(6)]
    finally:
        s3_server.start()
    assert CALLS == [1, 0, 1, 2, 3, 4, 5]
    messages = cache_warnings(caught)
    # One warning per kind of failure (check, store, metadata), not per call.
    assert 1 <= len(messages) <= 3, messages
    assert all(s3_server.url in message for message in messages)
    assert any("check the cache" in message for message in messages)
    time.sleep(2.1)
    assert cached(7) == 49 and cached(7) == 49
    assert CALLS[-1] == 7 and CALLS.count(7) == 1


def one_fault(operation, answer, path_part="output.pkl"):
    """A fault that answers the first matching request only."""
    fired = []

    def fault(request_operation, path, query):
        if request_operation == operation and path_part in path and not fired:
            fired.append(path)
            return answer
        return None

    fault.fired = fired
    return fault


@pytest.mark.parametrize(
    "operation, answer",
    [
        ("GetObject", (503, "SlowDown")),
        ("GetObject", (500, "InternalError")),
        ("HeadObject", (503, "SlowDown")),
        ("GetObject", "reset"),
        ("HeadObject", "stall"),
    ],
    ids=["get 503", "get 500", "head 503", "get reset", "head timeout"],
)
def test_a_hit_that_meets_a_transient_fault_still_hits(location, s3_server, operation, answer):
    options = {"config_kwargs": {"read_timeout": 1}}
    cached = Memory(location, verbose=0, backend_options=options).cache(fresh(random_array))
    expected = cached(1000)
    fault = one_fault(operation, answer)
    s3_server.faults.append(fault)
    with warnings.catch_warnings():
        warnings.simplefilter("error", joblib_store.CacheWarning)
        np.testing.assert_array_equal(cached(1000), expected)
    assert fault.fired, "the fault was never injected"


@pytest.mark.parametrize(
    "operation, answer",
    [("PutObject", (503, "SlowDown")), ("PutObject", "reset"), ("PutObject", (500, "InternalError"))],
    ids=["put 503", "put reset", "put 500"],
)
def test_a_store_that_meets_a_transient_fault_still_stores(location, s3_server, operation, answer):
    cached = Memory(location, verbose=0).cache(fresh(square))
    fault = one_fault(operation, answer)
    s3_server.faults.append(fault)
    with warnings.catch_warnings():
        warnings.simplefilter("error", joblib_store.CacheWarning)
        assert cached(3) == 9
    assert fault.fired
    assert cached.check_call_in_cache(3)
    assert cached(3) == 9 and CALLS == [3]


@pytest.mark.parametrize(
    "name, corrupt",
    [
        ("output.pkl", lambda data: data[: len(data) // 2]),
        ("output.pkl", lambda data: b"this is not a pickle"),
        ("func_code.py", lambda data: b"\x00garbage\xff"),
    ],
    ids=["truncated result", "garbage result", "garbage function code"],
)
def test_a_corrupt_entry_is_recomputed_and_overwritten(
        location, s3_server, s3_client, bucket, name, corrupt, caplog):
    memory = Memory(location, verbose=0)
    cached = memory.cache(fresh(random_array))
    expected = cached(1000)
    key = next(k for k in keys_in(s3_client, bucket) if k.endswith("/" + name))
    good = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3_client.put_object(Bucket=bucket, Key=key, Body=corrupt(good))
    # A new function object makes joblib read func_code.py again.
    cached = memory.cache(fresh(random_array))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(cached(1000), expected)
    assert s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() != corrupt(good)
    if name == "func_code.py":
        assert len(cache_warnings(caught)) == 1
        assert "read function code" in cache_warnings(caught)[0]
    if name == "output.pkl":
        loading_errors = [r for r in caplog.records if "Exception while loading" in r.getMessage()]
        assert len(loading_errors) == 1
    # The entry is whole again: the next call hits and writes nothing.
    with s3_server.counting() as hit:
        np.testing.assert_array_equal(cached(1000), expected)
    assert hit["PutObject"] == 0 and hit["HeadObject"] == 1, hit


def test_garbage_metadata_does_not_spoil_a_hit(location, s3_client, bucket):
    cached = Memory(location, verbose=0).cache(fresh(square))
    cached(4)
    key = next(k for k in keys_in(s3_client, bucket) if k.endswith("/metadata.json"))
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"{not json")
    assert cached(4) == 16 and CALLS == [4]
    assert cached.call_and_shelve(4).get() == 16


# ------------------------------------------ nothing half-written is ever read


def test_a_writer_killed_mid_upload_leaves_nothing_to_load(location, s3_server, s3_client, bucket):
    size = 64 * MiB // 8
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            from joblib import Memory
            import joblib_store, test_joblib_store as t
            joblib_store.register_s3_store_backend()
            Memory({location!r}, verbose=0).cache(t.random_array)({size})
            """)],
        cwd=HERE, env={**os.environ, "PYTHONPATH": HERE},
    )
    deadline = time.monotonic() + 60
    while not any(operation == "UploadPart" and bucket in path
                  for operation, path in list(s3_server.requests)):
        assert time.monotonic() < deadline and writer.poll() is None, "no upload started"
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert not any(key.endswith("output.pkl") for key in keys_in(s3_client, bucket))
    cached = Memory(location, verbose=0).cache(random_array)
    assert not cached.check_call_in_cache(size)
    np.testing.assert_array_equal(cached(size), random_array(size))
    assert cached.check_call_in_cache(size)


def test_a_failed_upload_is_aborted_and_the_result_returned(location, s3_server, s3_client, bucket):
    options = {"part_size": 5 * MiB, "max_concurrency": 2}
    cached = Memory(location, verbose=0, backend_options=options).cache(fresh(random_array))
    s3_server.faults.append(
        lambda operation, path, query: (500, "InternalError")
        if operation == "UploadPart" and "partNumber=3&" in query + "&" else None
    )
    size = 32 * MiB // 8
    with pytest.warns(joblib_store.CacheWarning, match="store a result"):
        np.testing.assert_array_equal(cached(size), random_array(size))
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert not cached.check_call_in_cache(size)


def test_output_is_visible_only_when_complete(location, s3_server, bucket):
    # Multipart: the key appears only with CompleteMultipartUpload, after
    # every part; metadata.json follows the result.
    cached = Memory(location, verbose=0, backend_options={"part_size": 5 * MiB}).cache(
        fresh(random_array))
    cached(16 * MiB // 8)
    writes = [(operation, path) for operation, path in s3_server.requests
              if bucket in path and operation in (
                  "UploadPart", "CompleteMultipartUpload", "PutObject")]
    names = [operation if operation != "PutObject" else path.rsplit("/", 1)[1]
             for operation, path in writes]
    assert names[-2:] == ["CompleteMultipartUpload", "metadata.json"]
    assert names.count("UploadPart") >= 2


# ----------------------------------------------------- many writers, one cache


def test_loky_workers_share_one_cache(location, s3_server, bucket):
    from joblib import Parallel, delayed

    memory = Memory(location, verbose=0)
    cached = memory.cache(square)
    inputs = [x % 10 for x in range(40)]
    first = Parallel(n_jobs=2, backend="loky")(delayed(cached)(x) for x in inputs)
    with s3_server.counting() as second_pass:
        second = Parallel(n_jobs=2, backend="loky")(delayed(cached)(x) for x in inputs)
    assert first == second == [x * x for x in inputs]
    assert second_pass["PutObject"] == 0, second_pass  # nothing computed again
    for x in range(10):
        assert cached.check_call_in_cache(x)
        assert cached.call_and_shelve(x).get() == x * x


def test_dask_workers_share_one_cache(location, s3_server):
    from dask.distributed import Client, LocalCluster
    from joblib import Parallel, delayed

    try:
        from joblib import parallel_config as joblib_backend
    except ImportError:  # joblib < 1.3
        from joblib import parallel_backend as joblib_backend

    cached = Memory(location, verbose=0).cache(square)
    inputs = [x % 10 for x in range(40)]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        with joblib_backend("dask"):
            first = Parallel()(delayed(cached)(x) for x in inputs)
        with s3_server.counting() as second_pass:
            with joblib_backend("dask"):
                second = Parallel()(delayed(cached)(x) for x in inputs)
            mapped = client.gather(client.map(cached, inputs, pure=False))
    assert first == second == mapped == [x * x for x in inputs]
    assert second_pass["PutObject"] == 0, second_pass  # nothing computed again
    assert all(cached.check_call_in_cache(x) for x in range(10))


def test_a_changed_function_in_another_process_is_not_served_stale(location, tmp_path):
    module = tmp_path / "changing.py"
    program = f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from joblib import Memory
        import joblib_store, changing
        joblib_store.register_s3_store_backend()
        print(Memory({location!r}, verbose=0).cache(changing.f)(1))
        """
    module.write_text("def f(x):\n    return x + 1\n")
    assert run_python(program).strip() == "2"
    assert run_python(program).strip() == "2"
    module.write_text("def f(x):\n    return x + 100\n")
    assert run_python(program, PYTHONDONTWRITEBYTECODE="1").strip() == "101"


def test_reduce_size_in_another_process_never_breaks_a_call(location):
    memory = Memory(location, verbose=0)
    cached = memory.cache(fresh(square))
    cached(0)
    reducer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from joblib import Memory
            import joblib_store
            joblib_store.register_s3_store_backend()
            memory = Memory({location!r}, verbose=0)
            stop = time.monotonic() + 4
            while time.monotonic() < stop:
                memory.store_backend.enforce_store_limits(None, items_limit=2)
            """)],
        cwd=HERE, env={**os.environ, "PYTHONPATH": HERE},
    )
    calls = 0
    while reducer.poll() is None:
        for x in range(5):
            assert cached(x) == x * x
            calls += 1
    assert reducer.returncode == 0
    assert calls > 20


# ----------------------------------------------------- credentials never leak

SENTINEL_SECRET = "SENTINEL-secret-7f3a9c"
SENTINEL_TOKEN = "SENTINEL-token-51be02"


def test_credentials_never_appear_in_reprs_output_warnings_or_errors(
        location, bucket, s3_server, capsys, caplog):
    options = {"key": "AKIASENTINEL", "secret": SENTINEL_SECRET, "token": SENTINEL_TOKEN}
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        memory = Memory(location, verbose=100, backend_options=options)
        cached = memory.cache(fresh(square))
        cached(2), cached(2)
        shelved = cached.call_and_shelve(3)
        seen += [repr(x) + str(x) for x in (memory, cached, shelved, memory.store_backend)]
        cached_lock = memory.cache(fresh(make_lock))
        cached_lock("x")
        s3_server.faults.append(lambda operation, path, query: (500, "InternalError"))
        cached(5)
        s3_server.faults.clear()
        for location_of in (f"s3://{bucket}-missing/x", "s3://", f"s3://{bucket}/x"):
            try:
                extra = {"colour": 1} if location_of.endswith("/x") and "missing" not in location_of else {}
                Memory(location_of, verbose=100, backend_options={**options, **extra})
            except Exception as error:
                seen.append(repr(error) + str(error))
    seen += [str(w.message) for w in caught]
    captured = capsys.readouterr()
    seen += [captured.out, captured.err, caplog.text]
    assert len(cache_warnings(caught)) >= 1 and len(seen) >= 8
    text = "\n".join(seen)
    assert SENTINEL_SECRET not in text and SENTINEL_TOKEN not in text


@pytest.mark.parametrize(
    "encryption",
    [{"ServerSideEncryption": "AES256"},
     {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/joblib-store-test"}],
    ids=["AES256", "aws:kms"],
)
def test_server_side_encryption_reaches_every_object(location, s3_client, bucket, encryption):
    memory = Memory(location, verbose=0, backend_options={
        "s3_additional_kwargs": encryption, "part_size": 5 * MiB})
    memory.cache(fresh(square))(2)
    memory.cache(fresh(random_array))(12 * MiB // 8)  # a multipart upload
    keys = keys_in(s3_client, bucket)
    assert len(keys) == 6
    for key in keys:
        head = s3_client.head_object(Bucket=bucket, Key=key)
        assert head["ServerSideEncryption"] == encryption["ServerSideEncryption"], key
        if "SSEKMSKeyId" in encryption:
            assert encryption["SSEKMSKeyId"] in head["SSEKMSKeyId"], key


# ------------------------------------------------------ least recently used


def test_reduce_size_evicts_the_least_recently_used(location):
    memory = Memory(location, verbose=0, backend_options={"access_interval": 0})
    cached = store_spaced_items(memory, 3)  # stores 0, 1, 2 in that order
    time.sleep(1.05)
    assert cached(0) == 0  # a hit on the oldest
    joblib_store._wait_for_background_requests()
    reduce_size(memory, items_limit=2)
    assert cached_inputs(memory, cached, 3) == [0, 2]


def test_age_limit_counts_from_the_last_access(location):
    memory = Memory(location, verbose=0, backend_options={"access_interval": 0})
    cached = store_spaced_items(memory, 2)
    time.sleep(2.5)
    assert cached(0) == 0
    joblib_store._wait_for_background_requests()
    reduce_size(memory, age_limit=datetime.timedelta(seconds=2))
    assert cached_inputs(memory, cached, 2) == [0]


def test_an_access_record_is_one_copy_inside_s3_per_interval(location, s3_server):
    memory = Memory(location, verbose=0, backend_options={"access_interval": 2})
    cached = memory.cache(fresh(square))
    cached(1)
    with s3_server.counting() as fresh_entry:
        cached(1)  # written less than 2 s ago: that is its last access
        joblib_store._wait_for_background_requests()
    time.sleep(2.2)
    with s3_server.counting() as due:
        cached(1)
        joblib_store._wait_for_background_requests()
    with s3_server.counting() as just_recorded:
        cached(1)
        joblib_store._wait_for_background_requests()
    assert fresh_entry == just_recorded == Counter({"HeadObject": 1, "GetObject": 1})
    # One server-side copy: no download, no upload of the result.
    assert due == Counter({"HeadObject": 1, "GetObject": 1, "CopyObject": 1}), due
    assert CALLS == [1]


def test_an_access_record_keeps_the_result_and_its_encryption(location, s3_client, bucket):
    memory = Memory(location, verbose=0, backend_options={
        "access_interval": 0, "s3_additional_kwargs": {"ServerSideEncryption": "AES256"}})
    cached = memory.cache(fresh(random_array))
    expected = cached(1000)
    key = next(k for k in keys_in(s3_client, bucket) if k.endswith("output.pkl"))
    written = s3_client.head_object(Bucket=bucket, Key=key)
    time.sleep(1.05)
    np.testing.assert_array_equal(cached(1000), expected)
    joblib_store._wait_for_background_requests()
    accessed = s3_client.head_object(Bucket=bucket, Key=key)
    assert accessed["LastModified"] > written["LastModified"]
    assert accessed["ServerSideEncryption"] == "AES256"
    assert accessed["ContentLength"] == written["ContentLength"]
    np.testing.assert_array_equal(cached(1000), expected)


def test_verbose_reports_big_transfers(location, capsys):
    cached = Memory(location, verbose=10).cache(fresh(random_array))
    size = 16 * MiB // 8
    cached(size)
    cached(size)
    out = capsys.readouterr().out
    assert "[Memory] Stored 16.0 MiB in" in out and "MiB/s)" in out
    assert "[Memory] Loaded 16.0 MiB in" in out


# ------------------------------------------------------------ command line


def run_cli(*arguments, input=None):
    return subprocess.run(
        [sys.executable, "-m", "joblib_store", *arguments],
        capture_output=True, text=True, timeout=120, cwd=HERE, input=input,
        env={**os.environ, "PYTHONPATH": HERE},
    )


@pytest.fixture
def filled_cache(location):
    """Two functions, three items, the oldest a second before the others."""
    memory = Memory(location, verbose=0)
    memory.cache(fresh(square))(1)
    time.sleep(1.05)
    memory.cache(fresh(square))(2)
    memory.cache(fresh(add))(1, 2)
    return memory


def test_cli_ls_lists_functions(location, filled_cache):
    result = run_cli("ls", location)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[0] == "2" and line.endswith("test_joblib_store/square") for line in lines)
    assert any(line.split()[0] == "1" and line.endswith("test_joblib_store/add") for line in lines)
    listed = json.loads(run_cli("ls", location, "--json").stdout)
    assert {row["function"]: row["items"] for row in listed} == {
        "test_joblib_store/add": 1, "test_joblib_store/square": 2}
    assert all(row["bytes"] > 0 and row["oldest_access"] <= row["newest_access"] for row in listed)


def test_cli_prune_dry_run_then_prune(location, filled_cache):
    dry = run_cli("prune", location, "--items-limit", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove 1 items" in dry.stdout
    assert len(filled_cache.store_backend.get_items()) == 3
    pruned = run_cli("prune", location, "--items-limit", "2")
    assert pruned.returncode == 0 and "removed 1 items" in pruned.stdout
    remaining = filled_cache.store_backend.get_items()
    assert len(remaining) == 2
    assert filled_cache.cache(fresh(square)).check_call_in_cache(2)
    assert not filled_cache.cache(fresh(square)).check_call_in_cache(1)


def test_cli_prune_age_and_bytes_limits(location, filled_cache):
    assert "removed 0 items" in run_cli("prune", location, "--age-limit", "1d").stdout
    assert "removed 3 items" in run_cli("prune", location, "--bytes-limit", "0").stdout
    assert filled_cache.store_backend.get_items() == []


def test_cli_clear_asks_unless_yes(location, filled_cache):
    refused = run_cli("clear", location)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert len(filled_cache.store_backend.get_items()) == 3
    one = run_cli("clear", location, "--function", "add", "--yes")
    assert one.returncode == 0, one.stderr
    assert "deleted 1 items" in one.stdout
    assert len(filled_cache.store_backend.get_items()) == 2
    everything = run_cli("clear", location, "--yes")
    assert everything.returncode == 0 and filled_cache.store_backend.get_items() == []


@pytest.mark.parametrize(
    "arguments, status, words",
    [
        (["ls"], 2, "required"),
        (["prune", "s3://b-x/c"], 2, "--bytes-limit"),
        (["prune", "s3://b-x/c", "--age-limit", "soon"], 2, "age-limit"),
        (["ls", "s3://"], 1, "s3://"),
        (["ls", "s3://{bucket}-missing/c"], 1, "does not exist"),
        (["clear", "s3://{bucket}/cache", "--function", "nothing", "--yes"], 2, "nothing"),
    ],
)
def test_cli_errors_are_one_line_with_the_right_status(bucket, arguments, status, words):
    result = run_cli(*[argument.format(bucket=bucket) for argument in arguments])
    assert result.returncode == status, result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_never_prints_credentials(location, filled_cache):
    env_secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL_SECRET)
        patch.setenv("AWS_SESSION_TOKEN", SENTINEL_TOKEN)
        outputs = [run_cli("ls", location), run_cli("ls", "s3://nope-missing-bucket/x"),
                   run_cli("prune", location, "--items-limit", "5")]
    assert env_secret == "testing"
    for result in outputs:
        assert SENTINEL_SECRET not in result.stdout + result.stderr
        assert SENTINEL_TOKEN not in result.stdout + result.stderr


# ------------------------------------------------------- memory-mapped hits


def local_copies(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*.pkl"))


@pytest.mark.parametrize("order", ["C", "F"])
def test_mmap_hits_map_a_local_copy_fetched_once(location, s3_server, tmp_path, order):
    memory = Memory(location, verbose=0, mmap_mode="r",
                    backend_options={"local_cache_dir": str(tmp_path)})
    cached = memory.cache(fresh(identity))
    value = np.asarray(np.arange(300_000.0).reshape(600, 500), order=order)
    first = cached(value)
    with s3_server.counting() as second_hit:
        second = cached(value)
    for result in (first, second):
        assert isinstance(result, np.memmap) and result.mode == "r"
        np.testing.assert_array_equal(result, value)
        assert result.flags.f_contiguous == (order == "F")
    # A hit on a machine that holds the copy: the existence check, no bytes.
    assert second_hit == Counter({"HeadObject": 1}), second_hit
    assert len(local_copies(tmp_path)) == 1 and CALLS == [1]


def test_mmap_uses_a_per_user_folder_by_default(location, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = Memory(location, verbose=0, mmap_mode="c").cache(fresh(random_array))
    assert isinstance(cached(1000), np.memmap)
    assert len(local_copies(tmp_path / "joblib_store")) == 1


def test_a_rewritten_result_is_downloaded_again(location, tmp_path):
    memory = Memory(location, verbose=0, mmap_mode="r",
                    backend_options={"local_cache_dir": str(tmp_path)})
    cached = memory.cache(fresh(random_array))
    cached(1000)
    np.testing.assert_array_equal(cached(1000), random_array(1000))
    # Another process rewrites the result (same key, new content).
    other = S3StoreBackend()
    other.configure(memory.store_backend.location)
    [item] = other.get_items()
    call_id = item.path[len(other.location) + 1:].rsplit("/", 1)
    other.dump_item(call_id, np.zeros(1000))
    np.testing.assert_array_equal(cached(1000), np.zeros(1000))
    assert len(local_copies(tmp_path)) == 1


def test_local_copies_stay_under_their_limit_least_recently_used_first(
        location, s3_server, tmp_path):
    memory = Memory(location, verbose=0, mmap_mode="r", backend_options={
        "local_cache_dir": str(tmp_path), "local_cache_bytes_limit": 20_000})
    cached = memory.cache(fresh(random_array))
    cached(1000), cached(1001)  # 8 kB each: both fit
    assert len(local_copies(tmp_path)) == 2
    time.sleep(0.05)
    cached(1000)  # now 1001 is the least recently used
    time.sleep(0.05)
    cached(1002)
    copies = local_copies(tmp_path)
    assert len(copies) == 2
    sizes = {os.path.getsize(tmp_path / copy) for copy in copies}
    assert all(size < 10_000 for size in sizes)
    with s3_server.counting() as counts:
        cached(1000)
    assert counts["GetObject"] == 0, counts  # kept
    with s3_server.counting() as counts:
        cached(1001)
    assert counts["GetObject"] == 1, counts  # evicted, fetched again


def test_clear_and_reduce_size_drop_local_copies(location, tmp_path):
    memory = Memory(location, verbose=0, mmap_mode="r",
                    backend_options={"local_cache_dir": str(tmp_path)})
    memory.cache(fresh(square))(0)
    time.sleep(1.05)  # S3 times have 1 s steps: square(0) is the oldest
    cached_array = memory.cache(fresh(random_array))
    cached_array(10), cached_array(11), cached_array(10)
    # joblib maps a result right after computing it: three local copies.
    assert len(local_copies(tmp_path)) == 3
    reduce_size(memory, items_limit=2)
    assert len(local_copies(tmp_path)) == 2
    reduce_size(memory, items_limit=1)
    assert len(local_copies(tmp_path)) == 1
    memory.clear(warn=False)
    assert local_copies(tmp_path) == []


def test_a_local_cache_serves_plain_hits_too(location, s3_server, tmp_path):
    memory = Memory(location, verbose=0,
                    backend_options={"local_cache_dir": str(tmp_path)})
    cached = memory.cache(fresh(random_array))
    cached(5000)
    cached(5000)
    with s3_server.counting() as hit:
        result = cached(5000)
    assert not isinstance(result, np.memmap)
    np.testing.assert_array_equal(result, random_array(5000))
    assert hit == Counter({"HeadObject": 1}), hit
