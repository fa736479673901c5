"""Tests of joblib_store against real S3 servers over HTTP on 127.0.0.1.

moto's S3 server runs in a thread of the test process, behind a small WSGI
layer that records every request it receives (from this process and from
the subprocesses the tests start), can answer chosen requests with an
error, drop or stall them, and can play an outage. Tests of the S3 protocol
itself (the store's methods, least-recently-used records, local copies) run
a second time against npm's s3rver, an independent implementation, which
the README's test command installs into .s3rver; where Node is missing
those runs are skipped, with the reason printed. Each test gets a fresh
bucket.
"""

import asyncio
import datetime
import importlib
import itertools
import json
import logging
import multiprocessing
import os
import pickle
import posixpath
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
import urllib.parse
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
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
# Credentials that must never be shown, whatever the input.
SENTINEL_SECRET = "SENTINEL-secret-7f3a9c"
SENTINEL_TOKEN = "SENTINEL-token-51be02"
STALL_SECONDS = 2  # a stalled response outlasts the 1 s read timeout of the tests
FAST_FAILURE = {"config_kwargs": {"read_timeout": 1, "connect_timeout": 1,
                                  "retries": {"total_max_attempts": 2, "mode": "standard"}}}


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
        if "versions" in query:
            return "ListObjectVersions"
        return "GetObject" if on_object else "ListObjects"
    if method == "PUT":
        if "partNumber" in query:
            return "UploadPart"
        if environ.get("HTTP_X_AMZ_COPY_SOURCE"):
            return "CopyObject"
        if "versioning" in query:
            return "PutBucketVersioning"
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


class Request:
    """One request the server received, and how it was answered."""

    def __init__(self, operation, path, query, size, byte_range, token):
        self.operation = operation
        self.path = path
        self.query = query
        self.size = size  # of the request's body
        self.byte_range = byte_range
        self.token = token  # the session token the request was signed with
        self.status = None
        self.started = time.monotonic()
        self.ended = None

    def __iter__(self):  # (operation, path), as older tests read them
        return iter((self.operation, self.path))


class S3Server:
    """moto's S3 server, recording requests and injecting chosen faults.

    ``faults`` holds callables ``fault(operation, path, query)`` that may
    answer a request instead of moto: ``(status, code)`` for an S3 error,
    ``"reset"`` to drop the connection, ``"stall"`` to wait STALL_SECONDS
    and then drop it, ``"cut"`` to send moto's answer with half its body,
    ``"no etag"`` to send it without its ETag header, ``"lost"`` to let
    moto carry the request out and drop the connection before its answer;
    ``None`` lets the request through (a fault may also
    just wait, to hold a request back). ``outage`` set to ``"reset"`` or
    ``"stall"`` does that to every request.
    """

    def __init__(self):
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            create_backend_app,
        )

        self._moto = DomainDispatcherApplication(create_backend_app)
        self._lock = threading.Lock()
        self.requests = []
        self.answering = threading.local()
        self.faults = []
        self.outage = None
        self.ignore_if_match = False
        self._upload_times = {}  # upload id -> when it was created
        self._conditional = threading.Lock()
        self.scope = None  # the bucket whose requests recording() keeps
        self.port = 0
        self._server = None

    def __call__(self, environ, start_response):
        request = Request(
            s3_operation(environ), environ.get("PATH_INFO", ""),
            environ.get("QUERY_STRING", ""), int(environ.get("CONTENT_LENGTH") or 0),
            environ.get("HTTP_RANGE"), environ.get("HTTP_X_AMZ_SECURITY_TOKEN"),
        )
        request.if_match = environ.get("HTTP_IF_MATCH")
        self.answering.request = request  # for a fault that needs more than its arguments
        with self._lock:
            self.requests.append(request)

        def recording_start_response(status, headers, *args):
            request.status = int(status.split()[0])
            return start_response(status, headers, *args)

        # S3 applies a conditional write atomically; moto checks, then
        # writes: conditional writes go one at a time here, as on S3.
        conditional = environ["REQUEST_METHOD"] == "PUT" and (
            "HTTP_IF_NONE_MATCH" in environ or "HTTP_IF_MATCH" in environ)
        try:
            if conditional:
                with self._conditional:
                    return list(self._answer(request, environ, recording_start_response))
            return self._answer(request, environ, recording_start_response)
        finally:
            request.ended = time.monotonic()

    def _answer(self, request, environ, start_response):
        if self.ignore_if_match:  # as s3rver does
            environ.pop("HTTP_IF_MATCH", None)
        answers = [self.outage] + [
            fault(request.operation, request.path, request.query) for fault in list(self.faults)
        ]
        for answer in answers:
            if answer == "cut":
                return self._cut_off(environ, start_response)
            if answer == "no etag":  # as some S3-compatible servers and proxies answer
                return self._served(environ, lambda status, headers, *rest: start_response(
                    status, [(name, value) for name, value in headers if name.lower() != "etag"],
                    *rest))
            if answer == "lost":  # carried out, then the answer is lost
                list(self._served(environ, lambda status, headers, *rest: lambda data: None))
                answer = "reset"
            if answer == "stall":
                time.sleep(STALL_SECONDS)
                answer = "reset"
            if answer == "reset":
                # Drop the connection without a response.
                environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
                return []
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
        return self._served(environ, start_response)

    def _served(self, environ, start_response):
        """moto's answer; multipart uploads are dated as S3 dates them (moto
        lists every upload as begun in 2010)."""
        operation = s3_operation(environ)
        if operation not in ("CreateMultipartUpload", "ListMultipartUploads"):
            return self._moto(environ, start_response)
        answered = {}

        def keep(status, headers, *rest):
            answered.update(status=status, headers=headers)
            return lambda data: None

        body = b"".join(self._moto(environ, keep))
        if operation == "CreateMultipartUpload":
            for upload_id in re.findall(rb"<UploadId>([^<]+)</UploadId>", body):
                self._upload_times[upload_id] = datetime.datetime.now(datetime.timezone.utc)
        else:
            def dated(upload):
                upload_id = re.search(rb"<UploadId>([^<]+)</UploadId>", upload.group(0))
                begun = upload_id and self._upload_times.get(upload_id.group(1))
                if not begun:
                    return upload.group(0)
                stamp = begun.strftime("%Y-%m-%dT%H:%M:%S.000Z").encode()
                return re.sub(rb"<Initiated>[^<]*</Initiated>", b"<Initiated>" + stamp
                              + b"</Initiated>", upload.group(0))

            body = re.sub(rb"<Upload>.*?</Upload>", dated, body, flags=re.S)
        headers = [(name, str(len(body)) if name.lower() == "content-length" else value)
                   for name, value in answered["headers"]]
        start_response(answered["status"], headers)
        return [body]

    def _cut_off(self, environ, start_response):
        # moto's answer, whose body breaks off half-way.
        body = b"".join(self._served(environ, start_response))

        def half():
            yield body[: len(body) // 2]
            environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)

        return half()

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
    def recording(self):
        """The requests received inside the block, as Request objects.

        Only those for the bucket of the test (``scope``): a request that a
        process of an earlier test left in flight does not count.
        """
        with self._lock:
            start = len(self.requests)
        received = []
        try:
            yield received
        finally:
            with self._lock:
                received.extend(
                    request for request in self.requests[start:]
                    if self.scope is None or request.path.split("/")[1] == self.scope
                )

    @contextmanager
    def counting(self):
        """Count the requests made inside the block, by operation."""
        counts = Counter()
        with self.recording() as received:
            yield counts
        counts.update(request.operation for request in received)


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
        patch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1")


def empty_bucket(client, name, multipart=True):
    keys = [
        {"Key": obj["Key"]}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name)
        for obj in page.get("Contents", ())
    ]
    for start in range(0, len(keys), 1000):
        client.delete_objects(Bucket=name, Delete={"Objects": keys[start:start + 1000]})
    if multipart:
        for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", ()):
            client.abort_multipart_upload(
                Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"]
            )


@pytest.fixture
def bucket(s3_server, s3_client):
    name = f"test-{uuid.uuid4().hex[:20]}"
    s3_client.create_bucket(Bucket=name)
    s3_server.scope = name
    yield name
    s3_server.scope = None
    s3_server.faults.clear()
    s3_server.outage = None
    s3_server.ignore_if_match = False
    joblib_store._wait_for_background_requests()
    empty_bucket(s3_client, name)
    s3_client.delete_bucket(Bucket=name)


@pytest.fixture
def location(bucket):
    return f"s3://{bucket}/cache"


# ------------------------------------------------- a second S3 implementation

S3RVER = os.path.join(HERE, ".s3rver", "node_modules", "s3rver", "bin", "s3rver.js")
S3RVER_INSTALL = "npm install --prefix .s3rver --no-audit --no-fund s3rver@3.7.1"


@pytest.fixture(scope="session")
def s3rver_url(tmp_path_factory):
    """npm's s3rver on 127.0.0.1, for the session; skipped without Node."""
    if os.environ.get("JOBLIB_STORE_TESTS_ON_S3RVER") == "0":
        # The CI's version matrix: the README's test command runs them once.
        reason = "JOBLIB_STORE_TESTS_ON_S3RVER=0: the tests on s3rver run in another job"
        print(f"\n{reason}")
        pytest.skip(reason)
    node = shutil.which("node")
    if node is None:
        reason = "Node.js is not installed, so the tests on s3rver are skipped"
        print(f"\n{reason}")
        pytest.skip(reason)
    if not os.path.exists(S3RVER):
        pytest.fail(f"s3rver is not installed: run '{S3RVER_INSTALL}' in {HERE}")
    data = tmp_path_factory.mktemp("s3rver")
    log_path = data.parent / "s3rver.log"
    # s3rver signs continuation tokens with DES, in OpenSSL 3's legacy provider.
    environment = {**os.environ, "NODE_OPTIONS": "--openssl-legacy-provider"}
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [node, S3RVER, "--directory", str(data), "--address", "127.0.0.1", "--port", "0"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=environment,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            listening = re.search(r"listening on [^\s:]+:(\d+)", log_path.read_text(errors="replace"))
            if listening:
                break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"s3rver did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{listening.group(1)}"
    finally:
        server.terminate()
        server.wait(timeout=10)


class Site:
    """One S3 implementation the protocol tests run against."""

    def __init__(self, name, url, storage_options, client):
        self.name = name
        self.url = url
        self.storage_options = storage_options  # for backend_options
        self.client = client  # boto3


@pytest.fixture(params=["moto", "s3rver"])
def site(request, s3_server, s3_client):
    import boto3

    if request.param == "moto":
        return Site("moto", s3_server.url, {"endpoint_url": s3_server.url}, s3_client)
    url = request.getfixturevalue("s3rver_url")
    credentials = {"key": "S3RVER", "secret": "S3RVER"}
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                          aws_access_key_id="S3RVER", aws_secret_access_key="S3RVER")
    return Site("s3rver", url, {"endpoint_url": url, **credentials}, client)


@pytest.fixture
def site_bucket(site):
    name = f"test-{uuid.uuid4().hex[:20]}"
    site.client.create_bucket(Bucket=name)
    yield name
    joblib_store._wait_for_background_requests()
    # s3rver has no ListMultipartUploads; its tests leave no uploads behind.
    empty_bucket(site.client, name, multipart=site.name == "moto")
    site.client.delete_bucket(Bucket=name)


@pytest.fixture
def site_memory(site, site_bucket):
    """Memory(...) on the site's bucket, with the site's credentials."""

    def make(**kwargs):
        options = {**site.storage_options, **kwargs.pop("backend_options", {})}
        return Memory(f"s3://{site_bucket}/cache", verbose=0, backend_options=options, **kwargs)

    return make


def keys_in(s3_client, bucket, prefix=""):
    return sorted(
        obj["Key"]
        for page in s3_client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        )
        for obj in page.get("Contents", ())
    )


def run_python(code, check=True, **env):
    """Run code in a fresh Python process; return its standard output."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=180, cwd=env.pop("cwd", HERE),
        env={**os.environ, "PYTHONPATH": HERE, **env},
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result.stdout if check else result


def cache_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, joblib_store.CacheWarning)]


@contextmanager
def no_warnings():
    """Fail on any warning raised inside the block."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    unexpected = [
        f"{w.category.__name__}: {w.message}" for w in caught
        if not issubclass(w.category, DeprecationWarning)
        # joblib times its metadata write and warns past 0.5 s, which a
        # loaded test machine can reach without any fault.
        and not str(w.message).startswith("Persisting input arguments took")
    ]
    assert unexpected == [], unexpected


# ------------------------------------------------------- functions to cache

CALLS = []


def square(x):
    CALLS.append(x)
    return x * x


def cube(x):
    CALLS.append(x)
    return x * x * x


def identity(value):
    CALLS.append(1)
    return value


def got_plus_one(shelved):
    return shelved.get() + 1


def add(x, y, debug=False):
    CALLS.append((x, y))
    return x + y


def random_array(size):
    return np.random.RandomState(size).rand(size)


@contextmanager
def serving_a_call_of(memorized, store):
    """Calls of store's methods in this block serve a call() of memorized (a
    MemorizedFunc), as if joblib made them: their results carry its code."""
    call = joblib_store._Call(joblib_store._Kind.FORCE, memorized, store)
    token = joblib_store._CURRENT_CALL.set(call)
    try:
        yield
    finally:
        joblib_store._CURRENT_CALL.reset(token)
        call.close()


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
        ("create_bucket a string", lambda b: f"s3://{b}-missing/cache",
         {"create_bucket": "false"}, TypeError, ["create_bucket", "True or False"]),
        ("access_interval nan", lambda b: f"s3://{b}/cache",
         {"access_interval": float("nan")}, ValueError, ["access_interval", "finite"]),
        ("part_size over S3's limit", lambda b: f"s3://{b}/cache",
         {"part_size": 6 * 2**30}, ValueError, ["part_size", "5 GiB"]),
        ("part_size unbounded", lambda b: f"s3://{b}/cache",
         {"part_size": 2**40}, ValueError, ["part_size", "too large"]),
        ("config_kwargs a string", lambda b: f"s3://{b}/cache",
         {"config_kwargs": "x"}, TypeError, ["config_kwargs must be a dict"]),
        ("endpoint_url a number", lambda b: f"s3://{b}/cache",
         {"endpoint_url": 123}, TypeError, ["endpoint_url must be a str"]),
        ("endpoint_url not http", lambda b: f"s3://{b}/cache",
         {"endpoint_url": "minio:9000"}, ValueError, ["endpoint_url", "http://"]),
        ("local_cache_dir bytes", lambda b: f"s3://{b}/cache",
         {"local_cache_dir": b"/some/dir"}, TypeError, ["local_cache_dir", "bytes"]),
        ("compute_once a string", lambda b: f"s3://{b}/cache",
         {"compute_once": "yes"}, TypeError, ["compute_once"]),
        ("credentials in the location", lambda b: f"s3://AKIAEXAMPLE:{SENTINEL_SECRET}@{b}/cache",
         {}, ValueError, ["cannot carry credentials", "key and secret"]),
        ("credentials with a slash in the location",
         lambda b: f"s3://AKIAEXAMPLE:{SENTINEL_SECRET[:8]}/{SENTINEL_SECRET[8:]}@{b}/cache",
         {}, ValueError, ["cannot carry credentials", "key and secret"]),
        ("credentials in endpoint_url", lambda b: f"s3://{b}/cache",
         {"endpoint_url": f"http://user:{SENTINEL_SECRET}@127.0.0.1:5000"}, ValueError,
         ["endpoint_url cannot carry credentials"]),
        ("credentials in an endpoint_url botocore refuses", lambda b: f"s3://{b}/cache",
         {"endpoint_url": f"http://user:{SENTINEL_SECRET[:8]}/{SENTINEL_SECRET[8:]}@127.0.0.1:99999"},
         ValueError, ["endpoint_url cannot carry credentials"]),
        ("compute_once beyond a day", lambda b: f"s3://{b}/cache",
         {"compute_once": 1e10}, ValueError, ["compute_once", "one day"]),
        ("local_cache_dir empty", lambda b: f"s3://{b}/cache",
         {"local_cache_dir": ""}, ValueError, ["local_cache_dir is empty"]),
        ("version_aware a string", lambda b: f"s3://{b}/cache",
         {"version_aware": "false"}, TypeError, ["version_aware must be a bool"]),
        ("local_cache_bytes_limit not a size", lambda b: f"s3://{b}/cache",
         {"local_cache_bytes_limit": "lots"}, ValueError, ["local_cache_bytes_limit='lots'", "'500M'"]),
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
    assert "SENTINEL" not in str(raised.value) + repr(raised.value)  # nor a part of it


@pytest.mark.parametrize("location", ["s3:/bucket/cache", "S3:bucket/cache"])
def test_an_s3_location_missing_a_slash_is_refused_not_made_a_local_folder(
        location, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="must begin with 's3://'"):
        Memory(location, verbose=0)
    assert list(tmp_path.iterdir()) == []


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



def test_a_bucket_check_passes_a_policy_that_may_list_only_the_prefix(bucket, s3_server):
    # Credentials whose policy has an s3:prefix condition may list the cache's
    # own prefix, and nothing else: no HeadBucket, no listing of the bucket.
    def policy(operation, path, query):
        if not path.startswith(f"/{bucket}"):
            return None
        if operation == "HeadBucket":
            return (403, "AccessDenied")
        if operation == "ListObjectsV2" and "prefix=cache%2F" not in query:
            return (403, "AccessDenied")
        return None

    s3_server.faults.append(policy)
    memory = Memory(f"s3://{bucket}/cache", verbose=0,
                    backend_options={"skip_instance_cache": True})
    cached = memory.cache(fresh(square))
    assert cached(3) == 9 and cached(3) == 9 and CALLS == [3]


def test_creating_a_bucket_that_is_already_ours_is_success(s3_server, s3_client):
    name = f"created-{uuid.uuid4().hex[:12]}"

    created = []

    def created_meanwhile(operation, path, query):
        # Another of our processes creates the bucket between the check
        # and this process's CreateBucket.
        if operation == "CreateBucket" and path.strip("/") == name and not created:
            created.append(name)
            s3_client.create_bucket(Bucket=name)
            return (409, "BucketAlreadyOwnedByYou")
        return None

    s3_server.faults.append(created_meanwhile)
    try:
        memory = Memory(f"s3://{name}/cache", verbose=0,
                        backend_options={"create_bucket": True})
        assert created == [name]
        assert memory.cache(fresh(square))(2) == 4
    finally:
        s3_server.faults.clear()
        empty_bucket(s3_client, name)
        s3_client.delete_bucket(Bucket=name)


def test_importing_the_module_registers_it(location, tmp_path):
    # A worker that unpickles a MemorizedResult, or builds Memory("s3://..."),
    # without calling register_s3_store_backend() never makes a folder "s3:".
    cached = Memory(location, verbose=0).cache(fresh(square))
    shelved = cached.call_and_shelve(4)
    out = run_python(
        f"""
        import os, pickle
        import joblib
        result = pickle.loads({pickle.dumps(shelved)!r})
        print(result.get())
        import joblib_store  # imported by the unpickling already
        memory = joblib.Memory({location!r}, verbose=0)
        print(type(memory.store_backend).__name__, os.listdir("."))
        """,
        cwd=str(tmp_path),
    )
    assert out.split("\n")[:2] == ["16", "S3StoreBackend []"]


def test_an_unregistered_backend_is_an_error_not_a_local_folder(tmp_path):
    result = run_python(
        """
        import joblib, joblib.memory
        import joblib_store
        del joblib.memory._STORE_BACKENDS["s3"]
        joblib.Memory("s3://some-bucket/cache")
        """,
        check=False, cwd=str(tmp_path),
    )
    assert result.returncode == 1
    assert "register_s3_store_backend()" in result.stderr
    assert os.listdir(tmp_path) == []


def test_a_location_alone_takes_credentials_only_from_the_same_endpoint(
        bucket, s3_server, monkeypatch):
    given = {"endpoint_url": s3_server.url, "key": "testing", "secret": "testing",
             "token": "given-token"}
    first = Memory(f"s3://{bucket}/cache", verbose=0, backend_options=given).store_backend
    # The environment names the same endpoint: the options given are reused.
    same = S3StoreBackend()
    same.configure(first.location)
    assert same._parts.connection.storage_options == first.options.storage_options
    assert same.options.storage_options == {}  # and they are never pickled with it
    # It names another endpoint (here another name of the same server):
    # nothing given for the first one travels there.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url.replace("127.0.0.1", "localhost"))
    other = S3StoreBackend()
    with s3_server.recording() as requests:
        other.configure(first.location)
        other.contains_item(["f", "0" * 32])
    assert requests and {request.token for request in requests} == {"testing"}
    assert other.options.storage_options == {}


def test_the_bucket_check_is_skipped_only_for_the_same_credentials(bucket, s3_server):
    options = {"endpoint_url": s3_server.url, "skip_instance_cache": True}
    with s3_server.counting() as first:
        Memory(f"s3://{bucket}/cache", verbose=0, backend_options=options)
    with s3_server.counting() as again:
        Memory(f"s3://{bucket}/cache", verbose=0, backend_options=options)
    with s3_server.counting() as other_credentials:
        Memory(f"s3://{bucket}/cache", verbose=0, backend_options={
            **options, "key": "testing", "secret": "testing", "token": "another"})
    assert first["ListObjectsV2"] == 1
    assert sum(again.values()) == 0
    assert other_credentials["ListObjectsV2"] == 1


# ------------------------------------------------- the store, method by method
# These run on moto and on s3rver.


@pytest.fixture
def store(site, site_bucket):
    backend = S3StoreBackend()
    backend.configure(f"s3://{site_bucket}/cache/joblib", verbose=0,
                      backend_options=site.storage_options)
    return backend


def test_open_item_writes_and_reads_back(store):
    with store._open_item(store.location + "/f/file.bin", "wb") as f:
        f.write(b"hello")
    with store._open_item(store.location + "/f/file.bin", "rb") as f:
        assert f.read() == b"hello"
    with pytest.raises(ValueError):
        store._open_item(store.location + "/f/file.bin", "ab")


def test_open_item_publishes_nothing_when_the_writing_block_fails(store):
    with pytest.raises(RuntimeError):
        with store._open_item(store.location + "/f/broken.bin", "wb") as f:
            f.write(b"half")
            raise RuntimeError("the writer failed")
    assert not store._item_exists(store.location + "/f/broken.bin")


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


def test_clear_location_spares_sibling_prefixes(store, site, site_bucket):
    store.dump_item(["f", "a" * 32], 1)
    site.client.put_object(Bucket=site_bucket, Key="cache/joblib-other/keep", Body=b"x")
    store.clear_location(store.location)
    assert keys_in(site.client, site_bucket) == ["cache/joblib-other/keep"]


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


@pytest.mark.parametrize("compress", [False, 3], ids=["raw", "zlib3"])
def test_a_large_result_loads_in_ranges_of_one_version(store, compress):
    # 20 MiB in ranges of 4 MiB, the first with the lookup.
    store.compress = compress
    value = np.random.RandomState(0).bytes(20 * MiB)
    store.dump_item(["f", "c" * 32], value)
    assert store.load_item(["f", "c" * 32]) == value


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


def test_create_location_makes_no_request(location, s3_server):
    store = Memory(location, verbose=0).store_backend
    with s3_server.counting() as counts:
        store.create_location(store.location + "/f/x")
    assert sum(counts.values()) == 0


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


def compare_vars(left, right, ignored=("store_backend", "timestamp", "_func_code_id")):
    assert set(vars(left)) == set(vars(right))
    for name in vars(left):
        if name not in ignored:
            assert vars(left)[name] == vars(right)[name], name


@pytest.mark.parametrize("options", [
    {"compress": 3, "verbose": 2},
    {"mmap_mode": "r", "verbose": 5, "backend_options": {"part_size": 6 * MiB}},
], ids=["compress", "mmap"])
def test_a_pickle_round_trip_is_exact(location, tmp_path, options):
    # joblib's own test_memory_pickle_dump_load, on the S3 store.
    memory = Memory(location, **options)
    memory.cache(fresh(square))(1)  # a used store: clients, checks, records
    copy = pickle.loads(pickle.dumps(memory))
    compare_vars(memory.store_backend, copy.store_backend)
    compare_vars(memory, copy)
    assert joblib.hash(memory) == joblib.hash(copy)
    cached = memory.cache(square)
    compare_vars(cached.store_backend, pickle.loads(pickle.dumps(cached)).store_backend)
    result = cached.call_and_shelve(1)
    result_copy = pickle.loads(pickle.dumps(result))
    compare_vars(result.store_backend, result_copy.store_backend)
    compare_vars(result, result_copy)


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
def test_miss_then_hit_returns_equal_values(site_memory, compress, payload):
    memory = site_memory(compress=compress)
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
def test_a_64_mib_array_round_trips(site_memory, compress):
    memory = site_memory(compress=compress)
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
    time.sleep(3.2)  # ages are the server's, in 1 s steps
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


def make_other_lock(name):
    return threading.Lock()


def test_unpicklable_results_warn_for_each_function_and_are_returned(
        location, s3_client, bucket):
    memory = Memory(location, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for function in (make_lock, make_other_lock, make_lock):
            assert isinstance(memory.cache(fresh(function))("a"), type(threading.Lock()))
    messages = [str(w.message) for w in caught if "pickle" in str(w.message)]
    assert len(messages) == 2, messages  # one per function, as Python shows warnings
    assert any("make_lock" in m for m in messages) and any("make_other_lock" in m for m in messages)
    assert not memory.cache(fresh(make_lock)).check_call_in_cache("a")
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
    assert building == Counter({"ListObjectsV2": 1}), building
    # GET func_code.py (404) beside GET output.pkl (the lookup that serves
    # a process where the code is stored already), then func_code.py, the
    # result and its metadata: no listing, since results carry the digest
    # of their code.
    assert first_miss == Counter({"GetObject": 2, "PutObject": 3}), first_miss
    assert miss == Counter({"GetObject": 1, "PutObject": 2}), miss
    assert hit == Counter({"GetObject": 1}), hit


@pytest.mark.parametrize("compress", [False, 3], ids=["raw", "zlib3"])
def test_request_budget_of_a_miss_where_the_code_was_not_written(bucket, s3_server, compress):
    location = f"s3://{bucket}/cache"
    Memory(location, verbose=0, compress=compress).cache(fresh(square))(1)
    # A new function object: joblib reads its stored code, as in a fresh process.
    cached = Memory(location, verbose=0, compress=compress).cache(fresh(square))
    together = hold_until_beside(s3_server, "GetObject", "/func_code.py", "/output.pkl")
    with s3_server.counting() as miss:
        assert cached(2) == 4
    # func_code.py beside the lookup (404), then the result and its metadata.
    assert miss == Counter({"GetObject": 2, "PutObject": 2}), miss
    assert together == [True]


@pytest.mark.parametrize("compress", [False, 3], ids=["raw", "zlib3"])
def test_request_budget_of_a_hit_in_a_fresh_process(location, bucket, s3_server, compress):
    Memory(location, verbose=0, compress=compress).cache(fresh(square))(3)
    program = f"""
        from joblib import Memory
        import test_joblib_store as t
        memory = Memory({location!r}, verbose=0, compress={compress!r})
        cached = memory.cache(t.square)
        for _ in range(3):
            print(cached(3))
        """
    together = hold_until_beside(s3_server, "GetObject", "/func_code.py", "/output.pkl")
    with s3_server.recording() as requests:
        assert run_python(program).split() == ["9"] * 3
    operations = [(request.operation, request.path.rsplit("/", 1)[1]) for request in requests]
    # The bucket check, then for each hit func_code.py and the result,
    # together: joblib reads the code again at every call in a process
    # that did not write it.
    assert operations[0] == ("ListObjectsV2", bucket), operations
    assert sorted(operations[1:]) == [
        ("GetObject", "func_code.py")] * 3 + [("GetObject", "output.pkl")] * 3, operations
    assert together == [True] * 3


def hold_until_beside(s3_server, operation, held, awaited, awaited_operation=None):
    """Make the server answer a request (operation) on a key ending in held
    only once the same request (or awaited_operation) on a key ending in
    awaited arrived: a call completes at once only if both went out
    together (the hold gives up after 10 s otherwise). Returns, for each
    held request, whether its companion came."""
    arrived = threading.Event()
    together = []

    def hold(request_operation, path, query):
        if request_operation == (awaited_operation or operation) and path.endswith(awaited):
            arrived.set()
        if request_operation == operation and path.endswith(held):
            together.append(arrived.wait(timeout=10))
            arrived.clear()
        return None

    s3_server.faults.append(hold)
    return together


def hold_the_result_until_its_metadata(s3_server, operation):
    """hold_until_beside for a result and its metadata.json."""
    return hold_until_beside(s3_server, operation, "/output.pkl", "/metadata.json")


@needs_joblib_13
def test_request_budget_of_a_hit_with_a_validation_callback(location, s3_server):
    from joblib.memory import expires_after

    cached = Memory(location, verbose=0).cache(
        fresh(square), cache_validation_callback=expires_after(minutes=5))
    cached(2)
    seen = hold_the_result_until_its_metadata(s3_server, "GetObject")
    with s3_server.counting() as hit:
        assert cached(2) == 4
    assert hit == Counter({"GetObject": 2}) and seen == [True]


def test_request_budget_of_large_transfers(location, s3_server):
    memory = Memory(location, verbose=0)
    cached = memory.cache(fresh(random_array))
    cached(1000)
    size = 64 * MiB // 8
    with s3_server.counting() as storing:
        cached(size)
    with s3_server.counting() as loading:
        cached(size)
    # 8 MiB parts; a load is the lookup's 4 MiB, then 8 ranges at once.
    assert storing == Counter({"GetObject": 1, "CreateMultipartUpload": 1, "UploadPart": 9,
                               "CompleteMultipartUpload": 1, "PutObject": 1}), storing
    assert loading == Counter({"GetObject": 9}), loading


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
    # The listing, the incomplete uploads' listing, one batched delete.
    assert sum(reducing.values()) <= 3, reducing
    assert len(memory.store_backend.get_items()) == 100
    with s3_server.counting() as clearing:
        memory.clear(warn=False)
    assert sum(clearing.values()) <= 2, clearing
    assert memory.store_backend.get_items() == []


def test_listing_costs_one_request_per_thousand_keys(location, s3_server, s3_client, bucket):
    store = Memory(location, verbose=0).store_backend
    # 600 items of two objects each: 1200 keys, two pages.
    for index in range(600):
        args_id = f"{index:032x}"
        for name in ("output.pkl", "metadata.json"):
            s3_client.put_object(Bucket=bucket, Key=f"cache/joblib/f/{args_id}/{name}", Body=b"1")
    with s3_server.counting() as listing:
        assert len(store.get_items()) == 600
    assert listing == Counter({"ListObjectsV2": 2})


def test_a_miss_sends_the_metadata_beside_the_result(location, s3_server):
    cached = Memory(location, verbose=0).cache(fresh(square))
    cached(1)  # the function's code is stored
    seen = hold_the_result_until_its_metadata(s3_server, "PutObject")
    assert cached(2) == 4
    assert seen == [True]
    assert cached.check_call_in_cache(2)


@pytest.mark.parametrize("compress", [0, 3])
def test_the_complete_of_parts_sent_at_once_goes_beside_the_metadata(location, s3_server, compress):
    options = {"part_size": 5 * MiB, "max_concurrency": 2}
    cached = Memory(location, verbose=0, compress=compress,
                    backend_options=options).cache(fresh(random_array))
    cached(1000)  # the function's code is stored
    seen = hold_until_beside(s3_server, "CompleteMultipartUpload", "/output.pkl",
                             "/metadata.json", awaited_operation="PutObject")
    size = 12 * MiB // 8  # parts of 5, 5 and 2 MiB, all sent at once
    with no_warnings():
        np.testing.assert_array_equal(cached(size), random_array(size))
    assert seen == [True]
    assert cached.check_call_in_cache(size)


@pytest.mark.parametrize("failing", ["UploadPart", "CompleteMultipartUpload"])
def test_an_upload_that_fails_beside_the_metadata_leaves_no_metadata(
        location, s3_server, s3_client, bucket, failing):
    options = {**FAST_FAILURE, "part_size": 5 * MiB, "max_concurrency": 2}
    cached = Memory(location, verbose=0, backend_options=options).cache(fresh(random_array))
    cached(1000)
    s3_server.faults.append(lambda operation, path, query: (500, "InternalError")
                            if operation == failing else None)
    size = 12 * MiB // 8  # one wave of parts
    with pytest.warns(joblib_store.CacheWarning, match="store a result"):
        np.testing.assert_array_equal(cached(size), random_array(size))
    s3_server.faults.clear()
    folders = {key.rsplit("/", 1)[0] for key in keys_in(s3_client, bucket)
               if key.endswith("/output.pkl")}
    assert [key for key in keys_in(s3_client, bucket) if key.endswith("/metadata.json")
            and key.rsplit("/", 1)[0] not in folders] == []
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert not cached.check_call_in_cache(size)


@pytest.mark.parametrize("upload", ["in waves", "large"])
def test_the_complete_of_other_uploads_ends_before_the_metadata(
        location, s3_server, monkeypatch, upload):
    # Their Complete may take long: joblib warns of a slow store_metadata.
    monkeypatch.setattr(joblib_store, "_COMPLETE_BESIDE_METADATA", 10 * MiB)
    options = {"part_size": 5 * MiB, "max_concurrency": 2}
    cached = Memory(location, verbose=0, backend_options=options).cache(fresh(random_array))
    cached(1000)
    # Five parts in waves of two; or three at once, more than 10 MiB.
    size = (22 if upload == "in waves" else 12) * MiB // 8
    with s3_server.recording() as requests:
        np.testing.assert_array_equal(cached(size), random_array(size))
    completed = next(r for r in requests if r.operation == "CompleteMultipartUpload")
    metadata_put = next(r for r in requests if r.path.endswith("/metadata.json"))
    assert completed.ended <= metadata_put.started, requests
    assert cached.check_call_in_cache(size)


def test_a_first_miss_uploads_its_result_beside_its_code(location, s3_server, s3_client, bucket):
    def slow_code(operation, path, query):
        if operation == "PutObject" and path.endswith("/func_code.py"):
            time.sleep(0.5)
        return None

    s3_server.faults.append(slow_code)
    cached = Memory(location, verbose=0).cache(fresh(square))
    with s3_server.recording() as requests:
        assert cached(1) == 1
    [code] = [r for r in requests if r.path.endswith("/func_code.py") and r.operation == "PutObject"]
    later = [r for r in requests if r.path.endswith(("/output.pkl", "/metadata.json"))
             and r.operation == "PutObject"]
    assert len(later) == 2
    # Neither waits for the code: the result carries the digest of its code.
    assert all(request.started < code.ended for request in later)
    key = stored_key(s3_client, bucket)
    stored = s3_client.head_object(Bucket=bucket, Key=key)
    assert stored["Metadata"] == {
        "code-digest": joblib_store._code_digest(cached.func_code_info[0]),
        "result-id": result_id_in_metadata(s3_client, bucket, key)}


def test_a_result_shelved_by_one_function_is_got_inside_another(location):
    # get() inside a cached function is no call of that function: its code
    # is not the shelved result's.
    memory = Memory(location, verbose=0)
    shelved = memory.cache(fresh(square)).call_and_shelve(3)
    with no_warnings():
        assert memory.cache(fresh(got_plus_one))(shelved) == 10
        assert memory.cache(fresh(got_plus_one))(shelved) == 10
    assert CALLS == [3]


def test_a_results_user_metadata_is_kept_beside_its_code_digest(bucket, s3_client):
    memory = Memory(f"s3://{bucket}/cache", verbose=0, backend_options={
        "s3_additional_kwargs": {"Metadata": {"team": "vision"}}})
    cached = memory.cache(fresh(square))
    cached(2)
    key = stored_key(s3_client, bucket)
    stored = s3_client.head_object(Bucket=bucket, Key=key)
    assert stored["Metadata"] == {
        "team": "vision", "code-digest": joblib_store._code_digest(cached.func_code_info[0]),
        "result-id": result_id_in_metadata(s3_client, bucket, key)}
    assert cached(2) == 4 and CALLS == [2]


def test_a_function_keeps_the_code_digest_of_its_first_reading(
        location, s3_client, bucket, tmp_path, monkeypatch):
    # joblib reads the source again for each new MemorizedFunc; a module
    # edited on disk but not reloaded still runs its old code.
    (tmp_path / "edited.py").write_text("def f(x):\n    return ('old', x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "edited", raising=False)
    import edited

    memory = Memory(location, verbose=0)
    assert memory.cache(edited.f)(1) == ("old", 1)
    (tmp_path / "edited.py").write_text("def f(x):\n    return ('new', x)\n")
    assert memory.cache(edited.f)(2) == ("old", 2)  # wrapped again, the old code runs
    results = [k for k in keys_in(s3_client, bucket) if k.endswith("/output.pkl")]
    digests = {s3_client.head_object(Bucket=bucket, Key=k)["Metadata"]["code-digest"]
               for k in results}
    assert len(results) == 2 and len(digests) == 1
    # With func_code.py gone, the new code never gets a result of the old.
    s3_client.delete_object(Bucket=bucket, Key=stored_key(s3_client, bucket, "func_code.py"))
    program = f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import edited, joblib_store
        from joblib import Memory
        cached = Memory({location!r}, verbose=0).cache(edited.f)
        cached(5)
        print(cached(2))
        """
    assert run_python(program, PYTHONDONTWRITEBYTECODE="1").strip() == "('new', 2)"


def test_a_module_edited_after_its_import_stores_no_result_of_its_old_code(
        location, s3_client, bucket, tmp_path, monkeypatch):
    # Edited before the function's first cached call, joblib reads the new
    # source while the old code runs: a result stored then would be served
    # to the new code everywhere.
    module = tmp_path / "stale.py"
    module.write_text("def f(x):\n    return ('old', x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "stale", raising=False)
    import stale
    module.write_text("def f(x):\n    return ('new', x)  # the file changed\n")

    cached = Memory(location, verbose=0).cache(stale.f)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [cached(1), cached(1)] == [("old", 1), ("old", 1)]
        assert cached.check_call_in_cache(1) is False
        with pytest.raises(KeyError):  # as for any result that was not stored
            cached.call_and_shelve(2).get()
    assert cache_warnings(caught) == [
        "stale.f runs other code than its source file now holds (the file changed after it "
        "was imported): its results are neither served nor stored in this process until "
        "the module is reloaded"]
    assert not [k for k in keys_in(s3_client, bucket) if k.endswith("/output.pkl")]
    program = f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import stale, joblib_store
        from joblib import Memory
        print(Memory({location!r}, verbose=0).cache(stale.f)(1))
        """
    assert run_python(program, PYTHONDONTWRITEBYTECODE="1").strip() == "('new', 1)"
    # Reloaded, the module runs its source again, and is cached.
    importlib.reload(stale)
    assert Memory(location, verbose=0).cache(stale.f)(1) == ("new", 1)


CHANGING_PROGRAM = """
    import sys
    sys.path.insert(0, {folder!r})
    import changing
    from joblib import Memory
    import joblib_store
    memory = Memory({location!r}, verbose=0, mmap_mode={mmap_mode!r},
                    backend_options={{"local_cache_dir": {copies!r}}})
    cached = memory.cache(changing.f)
    print(cached.check_call_in_cache(1))
    print([int(cached(1)), int(cached(2))])
    """


@pytest.mark.parametrize("mmap_mode", [None, "r"], ids=["plain", "local copies"])
def test_results_of_other_code_are_misses_whatever_func_code_py_says(
        location, s3_client, bucket, tmp_path, mmap_mode):
    program = CHANGING_PROGRAM.format(folder=str(tmp_path), location=location,
                                      mmap_mode=mmap_mode, copies=str(tmp_path / "copies"))
    module = tmp_path / "changing.py"
    module.write_text("def f(x):\n    return x + 1\n")
    assert run_python(program).split("\n")[:2] == ["False", "[2, 3]"]
    assert run_python(program).split("\n")[:2] == ["True", "[2, 3]"]
    # func_code.py now holds the code of f(x) = x + 100, and the results of
    # x + 1 are still beside it (as a writer whose clear failed, or one
    # racing another, can leave them).
    module.write_text("def f(x):\n    return x + 100\n")
    key = stored_key(s3_client, bucket, "func_code.py")
    code = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3_client.put_object(Bucket=bucket, Key=key, Body=code.replace(b"x + 1\n", b"x + 100\n"))
    environment = {"PYTHONDONTWRITEBYTECODE": "1"}
    assert run_python(program, **environment).split("\n")[:2] == ["False", "[101, 102]"]
    assert run_python(program, **environment).split("\n")[:2] == ["True", "[101, 102]"]


TWO_CACHES_PROGRAM = """
    import sys
    sys.path.insert(0, {folder!r})
    import changing
    from joblib import Memory
    import joblib_store
    for location in {locations!r}:
        cached = Memory(location, verbose=0).cache(changing.f)
        print([cached(1), cached(1)])
    """


def test_a_cache_where_joblib_wrote_no_code_serves_each_code_its_own_results(
        location, s3_client, bucket, tmp_path):
    # joblib writes func_code.py only in the first cache a function meets in
    # a process: in the second, results of two codes could meet unchecked.
    first, second = location + "/first", location + "/second"

    def run(*locations):
        program = TWO_CACHES_PROGRAM.format(folder=str(tmp_path), locations=locations)
        return run_python(program, PYTHONDONTWRITEBYTECODE="1").split()

    module = tmp_path / "changing.py"
    module.write_text("def f(x):\n    return x + 1\n")
    assert run(first, second) == ["[2,", "2]", "[2,", "2]"]
    assert [k for k in keys_in(s3_client, bucket) if k.endswith("/func_code.py")] == [
        k for k in keys_in(s3_client, bucket) if "/first/" in k and k.endswith("/func_code.py")]
    module.write_text("def f(x):\n    return x + 100\n")
    assert run(second) == ["[101,", "101]"]
    module.write_text("def f(x):\n    return x + 1\n")
    # joblib checks the code only in the cache where this process wrote it.
    assert run(location + "/third", second) == ["[2,", "2]", "[2,", "2]"]


# --------------------------- the failure policy: never a wrong result, never
# a broken call


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
        ("GetObject", "reset"),
        ("GetObject", "stall"),
    ],
    ids=["get 503", "get 500", "get reset", "get timeout"],
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


def test_a_lookup_beside_the_code_that_fails_is_a_miss(location, s3_server):
    # In a process that did not write the code, the lookup goes out beside
    # the read of func_code.py; its failure, once its retries are spent, is
    # the lookup's failure: a miss, not a second round of retries.
    Memory(location, verbose=0).cache(fresh(square))(2)
    cached = Memory(location, verbose=0, backend_options=FAST_FAILURE).cache(fresh(square))
    s3_server.faults.append(lambda operation, path, query: (503, "SlowDown") if (
        operation == "GetObject" and path.endswith("/output.pkl")) else None)
    with s3_server.counting() as call, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cached(2) == 4
    assert CALLS == [2, 2]
    assert [m for m in cache_warnings(caught) if "could not check the cache" in m], caught
    assert call["GetObject"] == 3, call  # func_code.py, and the lookup's two attempts


def test_a_call_never_waits_for_a_lookup_joblib_will_not_make(location, s3_server):
    released, held_to_the_end = threading.Event(), []

    def hold_the_lookup(operation, path, query):
        if operation == "GetObject" and path.endswith("/output.pkl"):
            held_to_the_end.append(not released.wait(timeout=10))
        return None

    s3_server.faults.append(hold_the_lookup)
    cached = Memory(location, verbose=0).cache(fresh(square))
    assert cached(2) == 4  # a first miss: no func_code.py, so no lookup follows
    changed = fresh(cube)
    changed.__name__ = changed.__qualname__ = "square"  # square's func_id, other code
    other = Memory(location, verbose=0).cache(changed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joblib warns of the changed code
        assert other(2) == 8
    released.set()
    deadline = time.monotonic() + 5
    while len(held_to_the_end) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held_to_the_end == [False, False]


def test_a_lookup_whose_body_breaks_off_is_read_again(location, s3_server):
    # A small result comes whole with the lookup's GET: its body is read
    # again rather than the function run again.
    cached = Memory(location, verbose=0).cache(fresh(identity))
    value = np.arange(1000)
    cached(value)
    fault = one_fault("GetObject", "cut")
    s3_server.faults.append(fault)
    with warnings.catch_warnings():
        warnings.simplefilter("error", joblib_store.CacheWarning)
        np.testing.assert_array_equal(cached(value), value)
    assert fault.fired and CALLS == [1]


@pytest.mark.parametrize("how", ["call", "get"])
@pytest.mark.parametrize("compress", [0, 3], ids=["raw", "zlib"])
def test_a_result_rewritten_during_its_load_is_loaded_again(
        location, s3_server, s3_client, bucket, compress, how):
    options = {"part_size": 5 * MiB}
    cached = Memory(location, verbose=0, compress=compress,
                    backend_options=options).cache(fresh(identity))
    first, second = (np.random.RandomState(seed).rand(2 * MiB) for seed in (1, 2))
    cached(first)
    key = stored_key(s3_client, bucket)
    Memory(f"s3://{bucket}/other", verbose=0, compress=compress,
           backend_options=options).cache(fresh(identity))(second)
    other_key = next(k for k in keys_in(s3_client, bucket)
                     if k.startswith("other/") and k.endswith("output.pkl"))
    gets = []

    def rewrite_after_the_lookup(operation, path, query):
        # Another writer replaces the result between the lookup and the ranges.
        if operation == "GetObject" and path.endswith(key):
            gets.append(path)
            if len(gets) == 2:
                s3_client.copy_object(Bucket=bucket, Key=key,
                                      CopySource={"Bucket": bucket, "Key": other_key})
        return None

    s3_server.faults.append(rewrite_after_the_lookup)
    with warnings.catch_warnings():
        warnings.simplefilter("error", joblib_store.CacheWarning)
        result = cached(first) if how == "call" else cached.call_and_shelve(first).get()
    np.testing.assert_array_equal(result, second)  # the new version, whole
    assert CALLS == [1, 1]  # loaded again, never recomputed


@pytest.mark.parametrize("how", ["call", "get"])
def test_a_range_answered_404_loads_the_result_again(location, s3_server, how):
    # A range's 404 means the version being read is gone (deleted, maybe
    # stored again; moto answers 404 while it replaces an object): the load
    # starts again rather than take the result for missing.
    cached = Memory(location, verbose=0).cache(fresh(identity))
    value = np.random.RandomState(0).rand(16 * MiB // 8)
    cached(value)
    gets = []

    def a_range_not_found(operation, path, query):
        # The first GET of the hit is its lookup; the second is a range.
        if operation == "GetObject" and path.endswith("output.pkl"):
            gets.append(path)
            if len(gets) == 2:
                return (404, "NoSuchKey")
        return None

    s3_server.faults.append(a_range_not_found)
    with warnings.catch_warnings():
        warnings.simplefilter("error", joblib_store.CacheWarning)
        result = cached(value) if how == "call" else cached.call_and_shelve(value).get()
    np.testing.assert_array_equal(result, value)
    assert len(gets) >= 3 and CALLS == [1]  # loaded again, never recomputed


@pytest.mark.parametrize("answer", ["cut", (503, "SlowDown"), "reset"],
                         ids=["body cut off", "503", "reset"])
def test_a_range_that_fails_is_read_again(location, s3_server, answer):
    cached = Memory(location, verbose=0).cache(fresh(random_array))
    size = 16 * MiB // 8
    expected = cached(size)
    ranges = []

    def third_get(operation, path, query):
        # The first GET of the hit is its lookup; the second is a range.
        if operation == "GetObject" and path.endswith("output.pkl"):
            ranges.append(path)
            if len(ranges) == 3:
                return answer
        return None

    s3_server.faults.append(third_get)
    with warnings.catch_warnings():
        warnings.simplefilter("error", joblib_store.CacheWarning)
        np.testing.assert_array_equal(cached(size), expected)
    assert len(ranges) >= 4  # the range was asked for again


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
    ],
    ids=["truncated result", "garbage result"],
)
def test_a_corrupt_result_is_recomputed_and_overwritten(
        location, s3_server, s3_client, bucket, name, corrupt, caplog):
    memory = Memory(location, verbose=0)
    cached = memory.cache(fresh(random_array))
    expected = cached(1000)
    key = next(k for k in keys_in(s3_client, bucket) if k.endswith("/" + name))
    stored = s3_client.get_object(Bucket=bucket, Key=key)
    good = stored["Body"].read()
    # Corrupt, but of the same code: the digest of the code stays.
    s3_client.put_object(Bucket=bucket, Key=key, Body=corrupt(good), Metadata=stored["Metadata"])
    np.testing.assert_array_equal(cached(1000), expected)
    assert s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() == good
    loading_errors = [r for r in caplog.records if "Exception while loading" in r.getMessage()]
    assert len(loading_errors) == 1
    # The entry is whole again: the next call hits and writes nothing.
    with s3_server.counting() as hit:
        np.testing.assert_array_equal(cached(1000), expected)
    assert hit == Counter({"GetObject": 1}), hit


@pytest.mark.parametrize("garbage", [b"\x00garbage\xff", b"# first line: x\ncode"],
                         ids=["not text", "bad first line"])
def test_garbage_function_code_reads_as_other_code(location, s3_client, bucket, garbage):
    memory = Memory(location, verbose=0)
    memory.cache(fresh(square))(4)
    key = next(k for k in keys_in(s3_client, bucket) if k.endswith("/func_code.py"))
    good = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3_client.put_object(Bucket=bucket, Key=key, Body=garbage)
    cached = memory.cache(fresh(square))  # a new function object reads it again
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joblib may warn of a possible collision
        assert cached(4) == 16
    # Its results were cleared as those of other code, then computed again.
    assert CALLS == [4, 4]
    assert s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() == good
    assert cached(4) == 16 and CALLS == [4, 4]


def test_garbage_metadata_does_not_spoil_a_hit(location, s3_client, bucket):
    cached = Memory(location, verbose=0).cache(fresh(square))
    cached(4)
    key = next(k for k in keys_in(s3_client, bucket) if k.endswith("/metadata.json"))
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"{not json")
    assert cached(4) == 16 and CALLS == [4]
    assert cached.call_and_shelve(4).get() == 16


CODE_CHANGE_REQUESTS = {
    "get func_code": lambda operation, path, query: (
        operation == "GetObject" and path.endswith("/func_code.py")),
    "put func_code": lambda operation, path, query: (
        operation == "PutObject" and path.endswith("/func_code.py")),
    "list to clear": lambda operation, path, query: (
        operation == "ListObjectsV2" and "changing%2Ff" in query),
    "delete to clear": lambda operation, path, query: operation == "DeleteObjects",
}


CODE_CHANGE_PROGRAM = """
    import sys, warnings
    sys.path.insert(0, {folder!r})
    from joblib import Memory
    import joblib_store
    import changing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        memory = Memory({location!r}, verbose=0, backend_options={options!r})
        cached = memory.cache(changing.f)
        print([cached(1), cached(2), cached(1)])
    print(len([w for w in caught if issubclass(w.category, joblib_store.CacheWarning)]))
    """


def old_results_then_new_code(location, folder, s3_client=None, bucket=None):
    """Cache f(x) = x + 1 for x = 1 and 2, then change it to x + 100 (with
    s3_client, its func_code.py goes too, as a lifecycle rule would do)."""
    module = folder / "changing.py"
    program = CODE_CHANGE_PROGRAM.format(folder=str(folder), location=location,
                                         options=FAST_FAILURE)
    module.write_text("def f(x):\n    return x + 1\n")
    assert run_python(program).split("\n")[0] == "[2, 3, 2]"
    module.write_text("def f(x):\n    return x + 100\n")
    if s3_client is not None:
        s3_client.delete_object(Bucket=bucket, Key=stored_key(s3_client, bucket, "func_code.py"))
    return program


@pytest.mark.parametrize("answer", [(503, "SlowDown"), "reset", "stall"],
                         ids=["503", "reset", "stall"])
@pytest.mark.parametrize("request_name", list(CODE_CHANGE_REQUESTS))
def test_changed_code_under_faults_never_returns_old_results(
        location, s3_server, tmp_path, request_name, answer):
    # A request of the code-change path fails past the retries.
    program = old_results_then_new_code(location, tmp_path)
    matches = CODE_CHANGE_REQUESTS[request_name]
    s3_server.faults.append(
        lambda operation, path, query: answer if matches(operation, path, query) else None)
    with s3_server.recording() as requests:
        during = run_python(program, PYTHONDONTWRITEBYTECODE="1").split("\n")
    assert any(matches(r.operation, r.path, r.query) for r in requests), (
        "no fault injected", during, [(r.operation, r.path) for r in requests])
    assert during[:2] == ["[101, 102, 101]", "1"]  # and one warning
    s3_server.faults.clear()
    after = run_python(program, PYTHONDONTWRITEBYTECODE="1").split("\n")
    assert after[:2] == ["[101, 102, 101]", "0"]


@pytest.mark.parametrize("request_name", [None, "list to clear", "delete to clear", "put func_code"])
def test_results_left_without_their_code_are_never_served_to_new_code(
        location, s3_server, s3_client, bucket, tmp_path, request_name):
    program = old_results_then_new_code(location, tmp_path, s3_client, bucket)
    if request_name is not None:
        matches = CODE_CHANGE_REQUESTS[request_name]
        s3_server.faults.append(
            lambda operation, path, query: (503, "SlowDown") if matches(operation, path, query)
            else None)
    during = run_python(program, PYTHONDONTWRITEBYTECODE="1").split("\n")
    assert during[0] == "[101, 102, 101]"
    s3_server.faults.clear()
    assert run_python(program, PYTHONDONTWRITEBYTECODE="1").split("\n")[:2] == [
        "[101, 102, 101]", "0"]


def forked_f(x):
    return FORKED["cached"](x)


def test_forked_workers_keep_a_function_off_while_its_parent_does(
        location, s3_server, tmp_path, monkeypatch):
    old_results_then_new_code(location, tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "changing", raising=False)
    import changing

    s3_server.faults.append(
        lambda operation, path, query: (503, "SlowDown") if operation == "DeleteObjects" else None)
    FORKED["cached"] = Memory(location, verbose=0, backend_options=FAST_FAILURE).cache(changing.f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [forked_f(1), forked_f(2)] == [101, 102]  # the cache is off here
        with multiprocessing.get_context("fork").Pool(2) as pool:
            assert pool.map(forked_f, [1, 2, 1, 2]) == [101, 102, 101, 102]


@contextmanager
def uploading_in_another_process(s3_server, bucket, code):
    """Run code in another Python process; enter once its upload has begun.

    The server holds the upload's later parts back until the block ends, so
    what the block does to the process lands mid-upload, however loaded the
    machine."""
    released = threading.Event()

    def hold_later_parts(operation, path, query):
        if (operation == "UploadPart" and bucket in path
                and urllib.parse.parse_qs(query).get("partNumber") != ["1"]):
            released.wait(60)

    s3_server.faults.append(hold_later_parts)
    seen = len(s3_server.requests)
    writer = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys\nfrom joblib import Memory\n"
         "import test_joblib_store as t\n" + textwrap.dedent(code)],
        cwd=HERE, env={**os.environ, "PYTHONPATH": HERE},
    )
    try:
        deadline = time.monotonic() + 60
        while not any(request.operation == "UploadPart" and bucket in request.path
                      for request in s3_server.requests[seen:]):
            assert time.monotonic() < deadline and writer.poll() is None, "no upload started"
            time.sleep(0.01)
        yield writer
        time.sleep(0.5)  # for a signal to land before the upload may go on
    finally:
        released.set()
        s3_server.faults.remove(hold_later_parts)


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupted_store_publishes_nothing(location, s3_server, s3_client, bucket, signal_name):
    size = 64 * MiB // 8
    with uploading_in_another_process(s3_server, bucket, f"""
            # As on a spot instance being reclaimed: SIGTERM ends the program.
            signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(1))
            memory = Memory({location!r}, verbose=0,
                            backend_options={{"part_size": 5 * 2**20, "max_concurrency": 2}})
            memory.cache(t.random_array)({size})
            """) as writer:
        writer.send_signal(getattr(signal, signal_name))
    assert writer.wait(timeout=60) != 0
    assert not any(key.endswith("output.pkl") for key in keys_in(s3_client, bucket))
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    cached = Memory(location, verbose=0).cache(random_array)
    assert not cached.check_call_in_cache(size)


class Interrupting:
    """Pickling it is interrupted, as by Ctrl-C."""

    def __reduce__(self):
        raise KeyboardInterrupt


def array_then_interrupt(size):
    return [np.ones(size), Interrupting()]


def test_an_interrupt_while_pickling_publishes_nothing(location, s3_client, bucket):
    memory = Memory(location, verbose=0, backend_options={"part_size": 5 * MiB})
    cached = memory.cache(fresh(array_then_interrupt))
    with pytest.raises(KeyboardInterrupt):
        cached(32 * MiB // 8)
    assert not any(key.endswith("output.pkl") for key in keys_in(s3_client, bucket))
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert not cached.check_call_in_cache(32 * MiB // 8)


def test_an_upload_nobody_commits_is_aborted(location, s3_client, bucket):
    # Garbage collection, then interpreter exit: neither publishes anything.
    store = Memory(location, verbose=0, backend_options={"part_size": 5 * MiB}).store_backend
    writer = joblib_store._MultipartWriter(store._client, "cache/joblib/f/dropped", 5 * MiB, 2, print)
    writer.write(b"x" * (12 * MiB))
    del writer  # collected at once, and so aborted
    joblib_store._wait_for_background_requests()
    run_python(f"""
        from joblib import Memory
        import joblib_store
        store = Memory({location!r}, verbose=0).store_backend
        writer = joblib_store._MultipartWriter(store._client, "cache/joblib/f/exit", 5 * 2**20, 2, print)
        writer.write(b"x" * (12 * 2**20))
        """)
    assert keys_in(s3_client, bucket) == []
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


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


def test_a_writer_killed_mid_upload_leaves_nothing_to_load(location, s3_server, s3_client, bucket):
    size = 64 * MiB // 8
    with uploading_in_another_process(s3_server, bucket, f"""
            Memory({location!r}, verbose=0).cache(t.random_array)({size})
            """) as writer:
        writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert not any(key.endswith("output.pkl") for key in keys_in(s3_client, bucket))
    cached = Memory(location, verbose=0).cache(random_array)
    assert not cached.check_call_in_cache(size)
    np.testing.assert_array_equal(cached(size), random_array(size))
    assert cached.check_call_in_cache(size)


def test_a_single_write_larger_than_a_part_is_split_into_valid_parts(
        location, s3_server, monkeypatch):
    # As with a write of more than 5 GiB and S3's 5 GiB limit per part, at
    # a smaller scale: parts of at most 8 MiB, sizes doubling every 2 parts.
    monkeypatch.setattr(joblib_store, "_MAX_PART_SIZE", 8 * MiB)
    monkeypatch.setattr(joblib_store, "_PARTS_PER_SIZE", 2)
    store = Memory(location, verbose=0, backend_options={"part_size": 5 * MiB}).store_backend
    value = np.random.RandomState(1).bytes(45 * MiB)  # pickled with one write
    with s3_server.recording() as requests:
        store.dump_item(["f", "a" * 32], value)
    parts = [request.size for request in sorted(
        (r for r in requests if r.operation == "UploadPart"),
        key=lambda r: int(re.search(r"partNumber=(\d+)", r.query).group(1)))]
    assert parts[:5] == [5 * MiB, 5 * MiB, 8 * MiB, 8 * MiB, 8 * MiB], parts
    assert max(parts) <= 8 * MiB and sum(parts) > 45 * MiB
    assert store.load_item(["f", "a" * 32]) == value


def test_what_waits_for_the_next_part_holds_only_its_own_bytes(location, s3_client, bucket):
    # joblib writes an array in 16 MiB buffers after a header of a few
    # bytes, so parts straddle buffers. Were the header-sized rest of a
    # buffer a view, it would keep the whole buffer in memory until the next
    # part was uploaded.
    store = Memory(location, verbose=0).store_backend
    writer = joblib_store._MultipartWriter(store._client, "cache/joblib/f/straddle", 5 * MiB, 2, print)
    writer.write(b"h" * 100)
    writer.write(b"x" * (10 * MiB))  # parts: the header and 5 MiB - 100 bytes, then 5 MiB
    assert [(len(piece), len(piece.obj)) for piece in writer._pieces] == [(100, 100)]
    # A large rest is not copied: the caller may hold its buffer anyway.
    large = b"z" * (12 * MiB)
    writer.write(large)  # parts: the 100 bytes and 5 MiB - 100, then 5 MiB; 2 MiB + 100 left
    assert [piece.obj is large for piece in writer._pieces] == [True]
    writer.write(b"y" * 100)
    writer.commit().result()
    body = s3_client.get_object(Bucket=bucket, Key="cache/joblib/f/straddle")["Body"].read()
    assert body == b"h" * 100 + b"x" * (10 * MiB) + large + b"y" * 100


GENERATIONS = []


def generation(x):
    GENERATIONS.append(x)
    return len(GENERATIONS)


def large_generation(x):
    GENERATIONS.append(x)
    return np.full(6 * MiB // 8, len(GENERATIONS))  # parts of 5 and 1 MiB, at once


@needs_joblib_13
@pytest.mark.filterwarnings("ignore:Persisting input arguments took")  # joblib's, on the retries
@pytest.mark.parametrize("delete", ["works", "fails"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_a_refresh_whose_upload_fails_does_not_date_the_older_result_as_new(
        location, s3_server, delete, size):
    # The metadata goes out beside a small result, and beside the Complete
    # of a large one: when only the result fails, the older result must not
    # look as young as the new metadata.
    from joblib.memory import expires_after

    GENERATIONS.clear()
    options = {**FAST_FAILURE, "part_size": 5 * MiB}
    cached = Memory(location, verbose=0, backend_options=options).cache(
        fresh(generation if size == "small" else large_generation),
        cache_validation_callback=expires_after(seconds=3))
    first_written = time.time()
    assert np.all(cached(1) == 1)
    time.sleep(2.0)
    last_request = "PutObject" if size == "small" else "CompleteMultipartUpload"
    s3_server.faults.append(lambda operation, path, query: (500, "InternalError")
                            if operation == last_request and path.endswith("/output.pkl") else None)
    if delete == "fails":
        s3_server.faults.append(lambda operation, path, query: (500, "InternalError")
                                if operation == "DeleteObject" else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cached.call(1)
    assert np.all((result[0] if isinstance(result, tuple) else result) == 2)
    messages = cache_warnings(caught)
    assert any("could not store a result" in message for message in messages), messages
    s3_server.faults.clear()
    if delete == "fails":  # it is said, and the pair's ids tell them apart
        assert any("could not take back the metadata" in message for message in messages)
    # The first result expired; the new metadata (written after 2 s) did not.
    time.sleep(max(0.0, first_written + 3.3 - time.time()))
    assert np.all(cached(1) == 3)


def rewrite_metadata(s3_client, bucket, change):
    """Rewrite the one metadata.json in the bucket as change(its JSON)."""
    key = stored_key(s3_client, bucket, "metadata.json")
    written = json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
    s3_client.put_object(Bucket=bucket, Key=key, Body=json.dumps(change(written)).encode())


def without_result_id(metadata):
    return {name: value for name, value in metadata.items()
            if name != "joblib_store_result_id"}


@needs_joblib_13
@pytest.mark.parametrize("local_copies", [False, True], ids=["s3", "local copy"])
@pytest.mark.parametrize("written", ["its own id", "another id", "no id"])
def test_metadata_beside_another_result_dates_it_by_the_older_time(
        location, s3_client, bucket, tmp_path, written, local_copies):
    # A metadata.json that landed without its result (its result's PUT
    # failed, or a writer stopped between them) must not make the result it
    # stands beside look younger than it is; through a local copy S3 answers
    # 304, with no user metadata: the copy's name carries the id.
    from joblib.memory import expires_after

    options = {"local_cache_dir": str(tmp_path)} if local_copies else {}
    cached = Memory(location, verbose=0, mmap_mode="r" if local_copies else None,
                    backend_options=options).cache(
        fresh(square), cache_validation_callback=expires_after(seconds=2))
    cached(2)
    assert cached(2) == 4 and CALLS == [2]
    time.sleep(2.2)  # the result is older than the callback accepts
    now = time.time()
    if written == "its own id":
        rewrite_metadata(s3_client, bucket, lambda metadata: {**metadata, "time": now})
    elif written == "another id":
        rewrite_metadata(s3_client, bucket, lambda metadata: {
            **metadata, "time": now, "joblib_store_result_id": uuid.uuid4().hex})
    else:
        rewrite_metadata(s3_client, bucket, lambda metadata: {
            **without_result_id(metadata), "time": now})
    with no_warnings():
        assert cached(2) == 4
    assert CALLS == ([2] if written == "its own id" else [2, 2])


@needs_joblib_13
def test_metadata_of_another_write_older_than_the_result_keeps_it_a_hit(
        location, s3_client, bucket):
    # Writers of one call that overlap leave, for a moment, a result beside
    # the metadata of the write before it: dated by that older metadata, it
    # stays a hit while that time is young enough.
    seen = []

    def younger_than_a_minute(metadata):
        seen.append(metadata["time"])
        return time.time() - metadata["time"] < 60

    cached = Memory(location, verbose=0).cache(
        fresh(square), cache_validation_callback=younger_than_a_minute)
    cached(2)
    earlier = time.time() - 30
    rewrite_metadata(s3_client, bucket, lambda metadata: {
        **metadata, "time": earlier, "joblib_store_result_id": uuid.uuid4().hex})
    with no_warnings():
        assert cached(2) == 4
    assert CALLS == [2] and seen[-1] == earlier


@needs_joblib_13
@pytest.mark.parametrize("rewriter", ["another process", "this process"])
def test_a_local_copy_of_bytes_stored_again_under_a_new_id_stays_a_hit(
        location, s3_server, tmp_path, rewriter):
    # The same bytes stored again keep their ETag, so S3 confirms the local
    # copy current (304) while the copy's name carries the older id: S3 is
    # asked again, and the copy is written anew under the id stored.
    from joblib.memory import expires_after

    here = Memory(location, verbose=0, backend_options={"local_cache_dir": str(tmp_path)}).cache(
        fresh(square), cache_validation_callback=expires_after(minutes=5))
    elsewhere = Memory(location, verbose=0).cache(
        fresh(square), cache_validation_callback=expires_after(minutes=5))
    here(2)
    assert here(2) == 4 and len(local_copies(tmp_path)) == 1
    (elsewhere if rewriter == "another process" else here).call(2)
    assert CALLS == [2, 2]
    with no_warnings():
        assert here(2) == 4
        with s3_server.counting() as hit:
            assert here(2) == 4
    assert CALLS == [2, 2]
    assert hit == Counter({"GetObject": 2}), hit  # the 304 and the metadata


class ReprCallsACachedFunction:
    """An argument whose repr, which joblib writes into metadata.json
    between storing the result and its metadata, makes a cached call."""

    inner = None

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        self.inner(self.value + 100)
        return f"ReprCallsACachedFunction({self.value})"

    def __reduce__(self):
        return ReprCallsACachedFunction, (self.value,)


def value_of(argument):
    CALLS.append(argument.value)
    return argument.value


@needs_joblib_13
def test_a_cached_call_between_a_store_and_its_metadata_keeps_the_result_id(
        location, monkeypatch):
    from joblib.memory import expires_after

    memory = Memory(location, verbose=0)
    monkeypatch.setattr(ReprCallsACachedFunction, "inner", memory.cache(fresh(square)))
    cached = memory.cache(fresh(value_of), cache_validation_callback=expires_after(minutes=5))
    with no_warnings():
        for _ in range(3):
            assert cached(ReprCallsACachedFunction(3)) == 3
    assert CALLS == [3, 103], CALLS  # each function computed once


@needs_joblib_13
def test_a_validation_callback_sees_the_metadata_joblib_wrote(location):
    seen = []
    cached = Memory(location, verbose=0).cache(
        fresh(square), cache_validation_callback=lambda metadata: seen.append(dict(metadata)) or True)
    cached(2)
    assert cached(2) == 4 and CALLS == [2]
    assert seen and all(set(metadata) == {"duration", "input_args", "time"} for metadata in seen)


@needs_joblib_13
def test_a_pair_written_without_result_ids_is_taken_as_it_is(location, s3_client, bucket):
    # Entries written before results carried an id stay hits.
    from joblib.memory import expires_after

    cached = Memory(location, verbose=0).cache(
        fresh(square), cache_validation_callback=expires_after(minutes=5))
    cached(2)
    key = stored_key(s3_client, bucket)
    user_metadata = s3_client.head_object(Bucket=bucket, Key=key)["Metadata"]
    del user_metadata["result-id"]
    s3_client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": key},
                          Metadata=user_metadata, MetadataDirective="REPLACE")
    rewrite_metadata(s3_client, bucket, without_result_id)
    with no_warnings():
        assert cached(2) == 4
    assert CALLS == [2]


@needs_joblib_13
@pytest.mark.parametrize("damage", ["missing", "garbled", "late"])
def test_unreadable_metadata_with_a_validation_callback_is_a_miss(
        location, s3_server, s3_client, bucket, damage):
    from joblib.memory import expires_after

    cached = Memory(location, verbose=0).cache(
        fresh(square), cache_validation_callback=expires_after(minutes=5))
    cached(2)
    key = next(k for k in keys_in(s3_client, bucket) if k.endswith("/metadata.json"))
    if damage == "missing":
        s3_client.delete_object(Bucket=bucket, Key=key)
    elif damage == "garbled":
        s3_client.put_object(Bucket=bucket, Key=key, Body=b"{not json")
    else:  # a writer between its result's PUT and its metadata's PUT
        s3_server.faults.append(one_fault("GetObject", (404, "NoSuchKey"), "metadata.json"))
    with no_warnings():
        if damage != "late":
            # For a function with a validation callback, an entry whose
            # metadata cannot be read is a miss, whatever joblib asks.
            assert cached.check_call_in_cache(2) is False
        assert cached(2) == 4
    assert CALLS == [2, 2]  # computed again, and stored again
    assert "time" in json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert cached(2) == 4 and CALLS == [2, 2]


@pytest.mark.parametrize("local_copies", [False, True], ids=["plain", "local copies"])
def test_a_shelved_result_is_read_when_it_is_got(location, tmp_path, local_copies):
    options = {"local_cache_dir": str(tmp_path)} if local_copies else {}
    memory = Memory(location, verbose=0, backend_options=options)
    cached = memory.cache(fresh(square))
    cached(3)
    cached(3)
    shelved = cached.call_and_shelve(3)  # a hit: its lookup loads nothing
    other = S3StoreBackend()  # another process of the same code rewrites the result
    other.configure(memory.store_backend.location)
    with serving_a_call_of(cached, other):
        other.dump_item([shelved.func_id, shelved.args_id], 99)
    assert shelved.get() == 99


@pytest.mark.parametrize("kind", ["reset", "stall"])
def test_an_outage_costs_each_call_a_bounded_delay_and_recovery_is_immediate(
        location, s3_server, kind):
    cached = Memory(location, verbose=0, backend_options=FAST_FAILURE).cache(fresh(square))
    cached(1)  # stored before the outage
    s3_server.outage = kind
    delays = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cached(2) == 4  # the first failure is detected here
            for x in range(3, 8):
                started = time.monotonic()
                assert cached(x) == x * x
                delays.append(time.monotonic() - started)
    finally:
        s3_server.outage = None
    assert max(delays) <= 2.0, delays
    messages = cache_warnings(caught)
    assert 1 <= len(messages) <= 3, messages  # once per kind of failure
    assert all(s3_server.url in message for message in messages)
    # The first call after the endpoint is back is a hit.
    assert cached(1) == 1 and CALLS.count(1) == 1
    assert cached(9) == 81 and cached(9) == 81 and CALLS.count(9) == 1


def test_maintenance_commands_raise_every_time_they_fail(location, s3_server, bucket):
    memory = Memory(location, verbose=0, backend_options=FAST_FAILURE)
    cached = memory.cache(fresh(square))
    cached(1)
    s3_server.faults.append(
        lambda operation, path, query: (403, "AccessDenied")
        if (operation == "ListObjectsV2" and "max-keys=1000" in query)
        or operation == "DeleteObjects" else None
    )
    for _ in range(2):
        for command in (lambda: memory.clear(warn=False), lambda: cached.clear(warn=False),
                        lambda: reduce_size(memory, items_limit=0)):
            with pytest.raises(OSError) as raised:
                command()
            assert f"'{bucket}'" in str(raised.value) and s3_server.url in str(raised.value)
    for _ in range(2):
        for arguments in (["prune", location, "--items-limit", "0"], ["clear", location, "--yes"]):
            result = run_cli(*arguments)
            assert result.returncode == 1, result.stderr
            assert f"'{bucket}'" in result.stderr and s3_server.url in result.stderr
            assert "Traceback" not in result.stderr
    with no_warnings():
        assert cached(1) == 1 and CALLS == [1]  # cached calls never raise


# ----------------------------------- processes, threads and event loops

FORKED = {}  # what the fork tests set up before their workers fork


def counted_square(x):
    """x * x, noting each computation in a file that processes share."""
    with open(os.environ["JOBLIB_STORE_TEST_COUNTER"], "a") as counter:
        counter.write(f"{x}\n")
    return x * x


def forked_call(x):
    """In a forked worker: the cached value, the pid, and any warning but
    joblib's on a slow metadata write (as no_warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = FORKED["cached"](x)
    return value, os.getpid(), [
        f"{w.category.__name__}: {w.message}" for w in caught
        if not str(w.message).startswith("Persisting input arguments took")
    ]


def fork_pool(inputs):
    with multiprocessing.get_context("fork").Pool(2) as pool:
        return pool.map(forked_call, inputs)


def fork_executor(inputs):
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as executor:
        return list(executor.map(forked_call, inputs))


def fork_parallel(inputs):
    from joblib import Parallel, delayed

    return Parallel(n_jobs=2, backend="multiprocessing")(delayed(forked_call)(x) for x in inputs)


@pytest.mark.parametrize("run_forked", [fork_pool, fork_executor, fork_parallel],
                         ids=["multiprocessing.Pool", "ProcessPoolExecutor",
                              "Parallel multiprocessing"])
def test_forked_workers_hit_and_store_without_warnings(
        location, tmp_path, monkeypatch, run_forked):
    counter = tmp_path / "computed"
    monkeypatch.setenv("JOBLIB_STORE_TEST_COUNTER", str(counter))
    # Python 3.14 no longer forks by default; these tests ask for fork.
    monkeypatch.setattr(joblib.parallel, "DEFAULT_MP_CONTEXT",
                        multiprocessing.get_context("fork"), raising=False)
    cached = Memory(location, verbose=0).cache(fresh(counted_square))
    FORKED["cached"] = cached
    assert [cached(1), cached(2)] == [1, 4]  # the store is in use before the fork
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
        results = run_forked([1, 2, 3, 4])
    assert [value for value, _, _ in results] == [1, 4, 9, 16]
    assert all(pid != os.getpid() for _, pid, _ in results)
    assert [caught for _, _, caught in results] == [[], [], [], []]
    # 1 and 2 were hits in the workers; 3 and 4 were computed there once.
    assert sorted(counter.read_text().split()) == ["1", "2", "3", "4"]
    assert [cached(3), cached(4)] == [9, 16]  # the parent hits them
    assert sorted(counter.read_text().split()) == ["1", "2", "3", "4"]


@pytest.mark.parametrize("variant", ["plain", "mmap", "local copies"])
def test_threads_share_one_memory(location, tmp_path, variant, caplog):
    from joblib import Parallel, delayed

    # Local copies under a limit that evicts at every download.
    options = {} if variant == "plain" else {
        "local_cache_dir": str(tmp_path), "local_cache_bytes_limit": 1}
    memory = Memory(location, verbose=0, mmap_mode="r" if variant == "mmap" else None,
                    backend_options=options)
    cached = memory.cache(fresh(random_array))
    cached(1000), cached(2000)
    inputs = [1000, 2000, 3000, 4000, 5000] * 5
    with no_warnings():
        results = Parallel(n_jobs=8, backend="threading")(delayed(cached)(n) for n in inputs)
    for size, result in zip(inputs, results):
        np.testing.assert_array_equal(result, random_array(size))
        assert isinstance(result, np.memmap) == (variant == "mmap")
    # No hit failed to load (joblib logs it, then computes again).
    assert not [r for r in caplog.records if "Exception while loading" in r.getMessage()]


def test_a_call_from_s3fs_event_loop_thread_raises_instead_of_hanging(location):
    import fsspec.asyn

    cached = Memory(location, verbose=0).cache(fresh(square))
    cached(2)

    async def on_the_loop():
        return cached(2)

    with pytest.raises(RuntimeError, match="event loop thread"):
        fsspec.asyn.sync(cached.store_backend.fs.loop, on_the_loop, timeout=30)
    assert cached(2) == 4 and CALLS == [2]  # the store and s3fs still work


def test_a_call_from_a_users_event_loop_works(location):
    cached = Memory(location, verbose=0).cache(fresh(square))

    async def main():
        first = cached(3)  # blocks this loop for the call, and works
        second = await asyncio.to_thread(cached, 3)
        return first, second

    assert asyncio.run(main()) == (9, 9) and CALLS == [3]


@needs_joblib_14
def test_async_functions_are_cached(location):
    async def coroutine_square(x):
        CALLS.append(x)
        await asyncio.sleep(0)
        return x * x

    cached = Memory(location, verbose=0).cache(coroutine_square)

    async def main():
        first = await asyncio.gather(*(cached(x) for x in (4, 5)))
        again = await asyncio.gather(*(cached(x) for x in (4, 5, 4)))
        shelved = await cached.call_and_shelve(5)
        return first, again, shelved.get()

    assert asyncio.run(main()) == ([16, 25], [16, 25, 16], 25)
    assert sorted(CALLS) == [4, 5]


@needs_joblib_14
def test_async_functions_with_mmap_map_a_local_copy(location, tmp_path):
    async def coroutine_array(size):
        CALLS.append(size)
        return random_array(size)

    memory = Memory(location, verbose=0, mmap_mode="r",
                    backend_options={"local_cache_dir": str(tmp_path)})
    cached = memory.cache(coroutine_array)
    first = asyncio.run(cached(1000))
    second = asyncio.run(cached(1000))
    for result in (first, second):
        assert isinstance(result, np.memmap)
        np.testing.assert_array_equal(result, random_array(1000))
    assert CALLS == [1000]


# ------------------------------------------------------ least recently used
# The records and eviction run on moto and on s3rver.


def test_reduce_size_evicts_the_least_recently_used(site_memory, site, site_bucket):
    memory = site_memory(backend_options={"access_interval": 0})
    cached = store_spaced_items(memory, 3)  # stores 0, 1, 2 in that order
    time.sleep(1.05)
    assert cached(0) == 0  # a hit on the oldest
    joblib_store._wait_for_background_requests()
    reduce_size(memory, items_limit=2)
    assert cached_inputs(memory, cached, 3) == [0, 2]
    # The evicted result's objects are gone, its access record with them.
    keys = keys_in(site.client, site_bucket)
    folders = {key.split("/")[-2] for key in keys if not key.endswith("func_code.py")}
    assert len(folders) == 2
    assert sum(key.endswith("/last_access") for key in keys) == 1


def test_age_limit_counts_from_the_last_access(site_memory):
    memory = site_memory(backend_options={"access_interval": 0})
    cached = store_spaced_items(memory, 2)
    time.sleep(3.2)  # ages are the server's: its Date and LastModified have 1 s steps
    assert cached(0) == 0
    joblib_store._wait_for_background_requests()
    reduce_size(memory, age_limit=datetime.timedelta(seconds=2))
    assert cached_inputs(memory, cached, 2) == [0]


def test_an_access_record_is_one_empty_put_per_interval(location, s3_server, s3_client, bucket):
    memory = Memory(location, verbose=0, backend_options={"access_interval": 2})
    cached = memory.cache(fresh(square))
    cached(1)
    [key] = [k for k in keys_in(s3_client, bucket) if k.endswith("output.pkl")]
    written = s3_client.head_object(Bucket=bucket, Key=key)
    with s3_server.counting() as fresh_entry:
        cached(1)  # written less than 2 s ago: that is its last access
        joblib_store._wait_for_background_requests()
    time.sleep(2.2)
    with s3_server.recording() as due:
        cached(1)
        joblib_store._wait_for_background_requests()
    with s3_server.counting() as just_recorded:
        cached(1)
        joblib_store._wait_for_background_requests()
    assert fresh_entry == just_recorded == Counter({"GetObject": 1})
    assert [(r.operation, r.path.rsplit("/", 1)[1], r.size) for r in due] == [
        ("GetObject", "output.pkl", 0), ("PutObject", "last_access", 0)]
    # The result itself is untouched.
    accessed = s3_client.head_object(Bucket=bucket, Key=key)
    assert (accessed["ETag"], accessed["LastModified"]) == (written["ETag"], written["LastModified"])
    assert CALLS == [1]


def test_a_reader_that_may_not_write_records_nothing_after_the_first_denial(
        location, s3_server):
    memory = Memory(location, verbose=0, backend_options={"access_interval": 0})
    cached = memory.cache(fresh(square))
    cached(1), cached(2)
    s3_server.faults.append(
        lambda operation, path, query: (403, "AccessDenied")
        if operation == "PutObject" and path.endswith("/last_access") else None)
    time.sleep(1.05)
    with s3_server.counting() as first, no_warnings():
        cached(1)
        joblib_store._wait_for_background_requests()
    time.sleep(0.05)
    with s3_server.counting() as later, no_warnings():
        cached(2), cached(1)
        joblib_store._wait_for_background_requests()
    assert first == Counter({"GetObject": 1, "PutObject": 1})
    assert later == Counter({"GetObject": 2})


@pytest.mark.parametrize("reader_encryption", [
    {}, {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/key-b"}],
    ids=["no encryption", "another key"])
def test_a_hit_never_changes_a_results_encryption(location, s3_client, bucket, reader_encryption):
    writer_encryption = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/key-a"}
    writer = Memory(location, verbose=0, backend_options={
        "s3_additional_kwargs": writer_encryption, "skip_instance_cache": True})
    writer.cache(fresh(square))(3)
    [key] = [k for k in keys_in(s3_client, bucket) if k.endswith("output.pkl")]
    written = s3_client.head_object(Bucket=bucket, Key=key)
    time.sleep(1.05)
    reader = Memory(location, verbose=0, backend_options={
        "s3_additional_kwargs": reader_encryption, "access_interval": 0,
        "skip_instance_cache": True})
    assert reader.cache(fresh(square))(3) == 9 and CALLS == [3]
    joblib_store._wait_for_background_requests()
    after = s3_client.head_object(Bucket=bucket, Key=key)
    assert after["ServerSideEncryption"] == "aws:kms"
    assert after["SSEKMSKeyId"] == written["SSEKMSKeyId"] and "key-a" in after["SSEKMSKeyId"]
    assert (after["ETag"], after["LastModified"]) == (written["ETag"], written["LastModified"])
    assert any(k.endswith("/last_access") for k in keys_in(s3_client, bucket))


def test_hits_add_no_version_of_a_result_in_a_versioned_bucket(location, s3_client, bucket):
    s3_client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    memory = Memory(location, verbose=0, backend_options={"access_interval": 0})
    cached = memory.cache(fresh(random_array))
    cached(1000)
    for _ in range(3):
        time.sleep(1.05)
        cached(1000)
        joblib_store._wait_for_background_requests()
    versions = s3_client.list_object_versions(Bucket=bucket)["Versions"]
    by_name = Counter(version["Key"].rsplit("/", 1)[1] for version in versions)
    assert by_name["output.pkl"] == 1
    assert by_name["last_access"] == 3  # empty objects: the cost of the records
    assert all(v["Size"] == 0 for v in versions if v["Key"].endswith("last_access"))
    # Tidy up every version, so the bucket can go.
    for version in versions:
        s3_client.delete_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])
    for marker in s3_client.list_object_versions(Bucket=bucket).get("DeleteMarkers", ()):
        s3_client.delete_object(Bucket=bucket, Key=marker["Key"], VersionId=marker["VersionId"])


# ------------------------------------------- local copies, memory-mapped hits


def local_copies(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*.pkl"))


@pytest.mark.parametrize("order", ["C", "F"])
def test_mmap_hits_map_a_local_copy_fetched_once(site_memory, tmp_path, order):
    memory = site_memory(mmap_mode="r", backend_options={"local_cache_dir": str(tmp_path)})
    cached = memory.cache(fresh(identity))
    value = np.asarray(np.arange(300_000.0).reshape(600, 500), order=order)
    first = cached(value)
    second = cached(value)
    for result in (first, second):
        assert isinstance(result, np.memmap) and result.mode == "r"
        np.testing.assert_array_equal(result, value)
        assert result.flags.f_contiguous == (order == "F")
    assert len(local_copies(tmp_path)) == 1 and CALLS == [1]
    assert all(copy.startswith("joblib-store-copies/") for copy in local_copies(tmp_path))


def test_a_hit_on_a_machine_with_the_copy_moves_no_byte(location, s3_server, tmp_path):
    memory = Memory(location, verbose=0, mmap_mode="r",
                    backend_options={"local_cache_dir": str(tmp_path)})
    cached = memory.cache(fresh(random_array))
    with s3_server.recording() as miss:
        cached(100_000)  # the copy is written from the bytes just uploaded
    with s3_server.recording() as hit:
        result = cached(100_000)
    assert isinstance(result, np.memmap)
    # The miss uploads the result and keeps the bytes it produced: no GET
    # but the lookup beside the read of func_code.py, which finds nothing.
    assert [(r.operation, r.status) for r in miss if r.path.endswith("output.pkl")] == [
        ("GetObject", 404), ("PutObject", 200)]
    # One GET, answered "not modified": the copy is the version S3 holds.
    assert [(r.operation, r.status) for r in hit] == [("GetObject", 304)]


def test_a_shelved_result_maps_the_local_copy_without_a_download(location, s3_server, tmp_path):
    memory = Memory(location, verbose=0, mmap_mode="r",
                    backend_options={"local_cache_dir": str(tmp_path)})
    cached = memory.cache(fresh(random_array))
    cached(100_000)
    shelved = cached.call_and_shelve(100_000)
    with s3_server.recording() as got:
        result = shelved.get()
    assert isinstance(result, np.memmap)
    np.testing.assert_array_equal(result, random_array(100_000))
    assert [(r.operation, r.status) for r in got] == [("GetObject", 304)]


def test_copies_are_keyed_by_the_result_not_the_endpoint(location, s3_server, tmp_path):
    options = {"local_cache_dir": str(tmp_path), "skip_instance_cache": True}
    by_address = Memory(location, verbose=0, mmap_mode="r",
                        backend_options={**options, "endpoint_url": s3_server.url})
    by_address.cache(fresh(random_array))(100_000)
    by_name = Memory(location, verbose=0, mmap_mode="r", backend_options={
        **options, "endpoint_url": s3_server.url.replace("127.0.0.1", "localhost")})
    with s3_server.recording() as hit:
        np.testing.assert_array_equal(by_name.cache(fresh(random_array))(100_000),
                                      random_array(100_000))
    assert [(r.operation, r.status) for r in hit if r.path.endswith("output.pkl")] == [
        ("GetObject", 304)]


def test_mmap_uses_a_per_user_folder_found_where_the_store_is_used(
        location, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "here"))
    cached = Memory(location, verbose=0, mmap_mode="c").cache(random_array)
    assert isinstance(cached(1000), np.memmap)
    assert len(local_copies(tmp_path / "here" / "joblib_store")) == 1
    assert cached.store_backend.options.local_cache_dir is None
    # A worker with another home finds its own folder.
    out = run_python(
        f"""
        import pickle, numpy
        cached = pickle.loads({pickle.dumps(cached)!r})
        print(type(cached(1000)).__name__)
        """,
        XDG_CACHE_HOME=str(tmp_path / "there"),
    )
    assert out.strip() == "memmap"
    assert len(local_copies(tmp_path / "there" / "joblib_store")) == 1


def test_a_rewritten_result_is_downloaded_again(site_memory, tmp_path, monkeypatch):
    memory = site_memory(mmap_mode="r", backend_options={"local_cache_dir": str(tmp_path)})
    cached = memory.cache(fresh(random_array))
    cached(1000)
    np.testing.assert_array_equal(cached(1000), random_array(1000))
    # Another process of the same code rewrites the result (same key, new content).
    other = S3StoreBackend()
    other.configure(memory.store_backend.location, backend_options=memory.store_backend.options.storage_options)
    [item] = other.get_items()
    call_id = item.path[len(other.location) + 1:].rsplit("/", 1)
    with serving_a_call_of(cached, other):
        other.dump_item(call_id, np.zeros(1000))
    np.testing.assert_array_equal(cached(1000), np.zeros(1000))
    assert len(local_copies(tmp_path)) == 1


def test_local_copies_stay_under_their_limit_least_recently_used_first(
        site_memory, tmp_path):
    memory = site_memory(mmap_mode="r", backend_options={
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
    assert all((tmp_path / copy).stat().st_size < 10_000 for copy in copies)
    names = {copy.split("/")[1] for copy in copies}
    cached(1000)
    assert {copy.split("/")[1] for copy in local_copies(tmp_path)} == names  # kept
    cached(1001)
    assert len(local_copies(tmp_path)) == 2  # fetched again, another went


def test_clear_and_reduce_size_drop_local_copies_and_nothing_else(site_memory, tmp_path):
    (tmp_path / "model.pkl").write_bytes(b"a user's file")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "model.pkl").write_bytes(b"another one")
    memory = site_memory(mmap_mode="r", backend_options={
        "local_cache_dir": str(tmp_path), "local_cache_bytes_limit": 10})
    memory.cache(fresh(square))(0)
    time.sleep(1.05)  # S3 times have 1 s steps: square(0) is the oldest
    cached_array = memory.cache(fresh(random_array))
    cached_array(10), cached_array(11), cached_array(10)
    reduce_size(memory, items_limit=2)
    reduce_size(memory, items_limit=1)
    memory.clear(warn=False)
    assert [p for p in local_copies(tmp_path) if "joblib-store-copies" in p] == []
    assert (tmp_path / "model.pkl").read_bytes() == b"a user's file"
    assert (tmp_path / "project" / "model.pkl").read_bytes() == b"another one"


def test_a_local_cache_serves_plain_hits_too(location, s3_server, tmp_path):
    memory = Memory(location, verbose=0,
                    backend_options={"local_cache_dir": str(tmp_path)})
    cached = memory.cache(fresh(random_array))
    cached(5000)
    cached(5000)
    with s3_server.recording() as hit:
        result = cached(5000)
    assert not isinstance(result, np.memmap)
    np.testing.assert_array_equal(result, random_array(5000))
    assert [(r.operation, r.status) for r in hit] == [("GetObject", 304)]


def unusable_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return str(blocker / "copies")


@pytest.mark.parametrize("folder", ["cannot be created", "others may write", "another owner"])
def test_an_unusable_local_folder_means_plain_loads_and_one_warning(location, tmp_path, folder):
    if folder == "cannot be created":
        local_cache_dir = unusable_folder(tmp_path)
    else:
        local_cache_dir = str(tmp_path)
        root = tmp_path / "joblib-store-copies"
        root.mkdir()
        if folder == "others may write":
            root.chmod(0o777)
        elif os.geteuid() != 0:
            pytest.skip("only root can give a folder to another user")
        else:
            os.chown(root, 12345, 12345)
    memory = Memory(location, verbose=0, mmap_mode="r",
                    backend_options={"local_cache_dir": local_cache_dir})
    cached = memory.cache(fresh(random_array))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [cached(1000), cached(1000), cached(2000)]  # miss (joblib reloads), hit, miss
    for result, size in zip(results, [1000, 1000, 2000]):
        np.testing.assert_array_equal(result, random_array(size))
    messages = cache_warnings(caught)
    assert len(messages) == 1 and "local copies" in messages[0], messages
    assert not any(p.suffix == ".pkl" for p in tmp_path.rglob("*"))


def test_a_copy_evicted_between_lookup_and_open_is_fetched_again(
        location, tmp_path, monkeypatch):
    memory = Memory(location, verbose=0, mmap_mode="r",
                    backend_options={"local_cache_dir": str(tmp_path)})
    cached = memory.cache(fresh(random_array))
    cached(1000)
    held = joblib_store._LocalCopies.held
    vanished = []

    def evicted_first(self, path):
        if not vanished:
            vanished.append(path)
            os.unlink(path)  # as another process's eviction would
        return held(self, path)

    monkeypatch.setattr(joblib_store._LocalCopies, "held", evicted_first)
    with no_warnings():
        result = cached(1000)
    assert vanished and isinstance(result, np.memmap)
    np.testing.assert_array_equal(result, random_array(1000))


def test_a_copy_from_another_user_is_not_trusted(location, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    memory = Memory(location, verbose=0, mmap_mode="r",
                    backend_options={"local_cache_dir": str(tmp_path)})
    cached = memory.cache(fresh(random_array))
    cached(1000)
    [copy] = local_copies(tmp_path)
    os.chown(tmp_path / copy, 12345, 12345)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(cached(1000), random_array(1000))
    assert len(cache_warnings(caught)) == 1


def test_leftovers_of_interrupted_downloads_are_removed(location, tmp_path):
    memory = Memory(location, verbose=0, mmap_mode="r",
                    backend_options={"local_cache_dir": str(tmp_path)})
    cached = memory.cache(fresh(random_array))
    cached(1000)
    [copy] = local_copies(tmp_path)
    folder = (tmp_path / copy).parent
    stale = folder / f"new.pkl.{uuid.uuid4().hex}.part"
    recent = folder / f"new.pkl.{uuid.uuid4().hex}.part"
    stale.write_bytes(b"x"), recent.write_bytes(b"y")
    os.utime(stale, (time.time() - 600, time.time() - 600))
    cached(2000)  # a download, after which the copies are tidied
    assert not stale.exists() and recent.exists()


def hammer(location, local_cache_dir, sizes, rounds):
    """Hits on several results, under a limit that evicts at every turn."""
    memory = Memory(location, verbose=0, mmap_mode="r", backend_options={
        "local_cache_dir": local_cache_dir, "local_cache_bytes_limit": 1})
    cached = memory.cache(random_array)
    for _ in range(rounds):
        for size in sizes:
            result = cached(size)
            assert isinstance(result, np.memmap)
            np.testing.assert_array_equal(result, random_array(size))


def test_evictions_in_threads_and_processes_never_break_a_hit(location, tmp_path):
    sizes = [1000, 2000, 3000]
    hammer(location, str(tmp_path), sizes, 1)  # stored
    other = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import warnings
            warnings.simplefilter("error")
            import test_joblib_store as t
            t.hammer({location!r}, {str(tmp_path)!r}, {sizes!r}, 15)
            """)],
        cwd=HERE, env={**os.environ, "PYTHONPATH": HERE},
    )
    with no_warnings():
        threads = [threading.Thread(target=hammer, args=(location, str(tmp_path), sizes, 15))
                   for _ in range(4)]
        errors = []
        for thread in threads:
            thread.run = (lambda run: lambda: _record_errors(run, errors))(thread.run)
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert other.wait(timeout=120) == 0


def _record_errors(run, errors):
    try:
        run()
    except BaseException as error:  # reported by the test
        errors.append(error)


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


def test_a_negative_limit_is_refused_not_taken_for_zero(location, filled_cache):
    for limits in ({"items_limit": -1}, {"bytes_limit": -1}):
        with pytest.raises(ValueError, match="is negative"):
            reduce_size(filled_cache, **limits)
    assert len(filled_cache.store_backend.get_items()) == 3


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
        (["prune", "s3://b-x/c", "--age-limit", "soon"], 2, "age 'soon' is not like 30d"),
        (["prune", "s3://b-x/c", "--items-limit", "-1"], 2, "count '-1' is not a whole number"),
        (["prune", "s3://b-x/c", "--bytes-limit", "lots"], 2, "size 'lots' is not like 10G"),
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




# ------------------------------------- what goes wrong around local copies


def stored_key(s3_client, bucket, name="output.pkl"):
    [key] = [k for k in keys_in(s3_client, bucket) if k.endswith("/" + name)]
    return key


def result_id_in_metadata(s3_client, bucket, output_key):
    """The result id in the metadata.json beside output_key (a 32-digit hex)."""
    metadata_key = output_key.rsplit("/", 1)[0] + "/metadata.json"
    body = s3_client.get_object(Bucket=bucket, Key=metadata_key)["Body"].read()
    result_id = json.loads(body)["joblib_store_result_id"]
    assert re.fullmatch("[0-9a-f]{32}", result_id)
    return result_id


def test_a_hit_just_before_reduce_size_counts(location, s3_server):
    memory = Memory(location, verbose=0, backend_options={"access_interval": 0})
    cached = store_spaced_items(memory, 3)
    time.sleep(1.05)

    def slow_record(operation, path, query):
        if operation == "PutObject" and path.endswith("/last_access"):
            time.sleep(0.5)
        return None

    s3_server.faults.append(slow_record)
    assert cached(0) == 0
    reduce_size(memory, items_limit=2)  # at once: the record is still in flight
    assert cached_inputs(memory, cached, 3) == [0, 2]


@pytest.mark.parametrize("failure", ["cannot touch", "removed before the load", "cannot load"])
def test_a_local_copy_that_fails_means_a_load_from_s3_never_a_recompute(
        location, s3_server, tmp_path, monkeypatch, failure):
    memory = Memory(location, verbose=0, mmap_mode="r",
                    backend_options={"local_cache_dir": str(tmp_path)})
    cached = memory.cache(fresh(identity))
    value = np.arange(50_000.0)
    cached(value)
    if failure == "cannot touch":  # a read-only folder
        def utime(*args, **kwargs):
            raise PermissionError("read-only file system")
        monkeypatch.setattr(os, "utime", utime)
    elif failure == "removed before the load":  # by a cleaner, not by the store
        held = joblib_store._LocalCopies.held

        @contextmanager
        def held_then_removed(self, path):
            with held(self, path) as there:
                os.unlink(path)
                yield there
        monkeypatch.setattr(joblib_store._LocalCopies, "held", held_then_removed)
    else:  # truncated by something else
        [copy] = local_copies(tmp_path)
        with open(tmp_path / copy, "r+b") as copy_file:
            copy_file.truncate(100)
    with s3_server.recording() as hit, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(cached(value), value)
    assert CALLS == [1]  # not computed again
    # nor written again
    assert [r.path for r in hit if r.operation == "PutObject"] == [], cache_warnings(caught)
    assert len([m for m in cache_warnings(caught) if "local copies" in m]) <= 1


def test_a_copy_removed_before_joblibs_reload_after_a_miss_returns_the_result(
        location, tmp_path, monkeypatch):
    publish = joblib_store._NewCopy.publish

    def published_then_removed(self, *args):
        path = publish(self, *args)
        os.unlink(path)
        return path

    monkeypatch.setattr(joblib_store._NewCopy, "publish", published_then_removed)
    memory = Memory(location, verbose=0, mmap_mode="r",
                    backend_options={"local_cache_dir": str(tmp_path)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(memory.cache(fresh(random_array))(1000), random_array(1000))
    assert len(cache_warnings(caught)) == 1


def test_a_full_disk_loses_the_local_copy_not_the_result(location, s3_client, bucket, tmp_path,
                                                         monkeypatch):
    class FullDisk:
        def write(self, data):
            raise OSError(28, "No space left on device")

        def close(self):
            raise OSError(28, "No space left on device")

    new = joblib_store._LocalCopies.new

    def on_a_full_disk(self, key):
        copy = new(self, key)
        copy.file.close()
        copy.file = FullDisk()
        return copy

    monkeypatch.setattr(joblib_store._LocalCopies, "new", on_a_full_disk)
    memory = Memory(location, verbose=0, mmap_mode="r",
                    backend_options={"local_cache_dir": str(tmp_path)})
    cached = memory.cache(fresh(random_array))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(cached(1000), random_array(1000))  # a miss
        np.testing.assert_array_equal(cached(1000), random_array(1000))  # a hit
    assert len(cache_warnings(caught)) == 1
    assert any(key.endswith("output.pkl") for key in keys_in(s3_client, bucket))
    assert list(tmp_path.rglob("*.part")) == [] and local_copies(tmp_path) == []


def test_a_load_never_mixes_two_versions_even_where_if_match_is_ignored(
        location, s3_server, s3_client, bucket):
    s3_server.ignore_if_match = True
    cached = Memory(location, verbose=0).cache(fresh(identity))
    size = 16 * MiB // 8
    cached(np.ones(size))
    key = stored_key(s3_client, bucket)
    rewritten = []

    def rewrite_between_ranges(operation, path, query):
        if operation == "GetObject" and path.endswith("output.pkl") and not rewritten:
            rewritten.append(path)  # another process rewrites it after the first range
            twos = S3StoreBackend()
            twos.configure(f"s3://{bucket}/cache/joblib")
            folder = key.split("/")
            threading.Thread(target=twos.dump_item, args=(
                [ "/".join(folder[2:-2]), folder[-2]], np.full(size, 2.0))).start()
            time.sleep(0.5)
        return None

    s3_server.faults.append(rewrite_between_ranges)
    result = cached(np.ones(size))
    assert rewritten
    assert len(np.unique(result)) == 1  # all of one version, never a mix


def test_a_folder_that_others_could_swap_is_refused(location, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: anyone could rename what is inside
    memory = Memory(location, verbose=0, mmap_mode="r",
                    backend_options={"local_cache_dir": str(shared / "cache")})
    cached = memory.cache(fresh(random_array))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [cached(1000), cached(1000)]
    for result in results:
        np.testing.assert_array_equal(result, random_array(1000))
        assert not isinstance(result, np.memmap)
    messages = cache_warnings(caught)
    assert len(messages) == 1 and "others may write" in messages[0]


def test_a_relative_local_folder_is_found_where_the_store_is_used(location, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    memory = Memory(location, verbose=0, mmap_mode="r", backend_options={"local_cache_dir": "rel"})
    assert isinstance(memory.cache(fresh(random_array))(1000), np.memmap)
    assert len(local_copies(tmp_path / "rel")) == 1


def test_a_link_inside_the_copies_folder_is_never_followed(location, s3_client, bucket, tmp_path):
    import hashlib

    memory = Memory(location, verbose=0, mmap_mode="r",
                    backend_options={"local_cache_dir": str(tmp_path / "copies")})
    cached = memory.cache(fresh(random_array))
    cached(1000)
    key = stored_key(s3_client, bucket)
    folder = tmp_path / "copies" / "joblib-store-copies" / hashlib.sha256(
        f"{bucket}\n{key}".encode()).hexdigest()[:32]
    shutil.rmtree(folder)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / f"{'ab' * 16}.{'cd' * 16}.pkl").write_bytes(b"a user's file")
    folder.symlink_to(outside)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(cached(1000), random_array(1000))
        memory.clear(warn=False)
    assert [p.name for p in outside.iterdir()] == [f"{'ab' * 16}.{'cd' * 16}.pkl"]
    assert len(cache_warnings(caught)) <= 1


# ------------------------------------------ what goes wrong around processes


def noisy_array(size):
    """A different array at every call, as a simulation with no seed."""
    return np.random.rand(size)


def test_concurrent_misses_of_one_key_never_fail_a_hit(location, caplog):
    from joblib import Parallel, delayed

    cached = Memory(location, verbose=0).cache(fresh(noisy_array))
    size = 8 * MiB // 8
    with no_warnings():
        results = Parallel(n_jobs=8, backend="threading")(
            delayed(cached)(size) for _ in range(24))
    assert all(result.shape == (size,) for result in results)
    assert not [r for r in caplog.records if "Exception while loading" in r.getMessage()]


def test_shelved_misses_hold_no_file_open(location, tmp_path):
    memory = Memory(location, verbose=0, mmap_mode="r", backend_options={
        "local_cache_dir": str(tmp_path), "local_cache_bytes_limit": 1})
    cached = memory.cache(fresh(random_array))
    before = len(os.listdir("/proc/self/fd"))
    shelved = [cached.call_and_shelve(size) for size in range(1000, 1020)]
    assert len(os.listdir("/proc/self/fd")) - before < 5
    assert len(local_copies(tmp_path)) <= 1  # the limit could evict them all
    np.testing.assert_array_equal(shelved[3].get(), random_array(1003))


def test_a_store_from_a_location_alone_never_pickles_anothers_credentials(
        location, s3_server):
    Memory(location, verbose=0, backend_options={
        "endpoint_url": s3_server.url, "key": "testing", "secret": "testing",
        "token": SENTINEL_TOKEN})
    direct = MemorizedFunc(square, location + "/joblib", backend="s3", verbose=0)
    assert direct(4) == 16
    assert SENTINEL_TOKEN.encode() not in pickle.dumps(direct)
    assert SENTINEL_TOKEN.encode() not in pickle.dumps(Memory(location, verbose=0))


def test_a_forked_child_reaches_the_bucket_as_its_parent_did(location, s3_server, monkeypatch):
    # Credentials given in backend_options only, none in the environment.
    Memory(location, verbose=0, backend_options={
        "endpoint_url": s3_server.url, "key": "testing", "secret": "testing",
        "token": "testing"})
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    reader, writer = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
        child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        try:
            value = MemorizedFunc(abs, location + "/joblib", backend="s3", verbose=0)(-3)
            os.write(writer, str(value).encode())
        finally:
            os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    assert os.read(reader, 100) == b"3"


def test_a_shelved_result_cleared_while_it_loads_is_a_key_error(location, s3_server):
    cached = Memory(location, verbose=0).cache(fresh(random_array))
    size = 16 * MiB // 8
    cached(size)
    shelved = cached.call_and_shelve(size)
    gets = []

    def cleared_after_the_first_range(operation, path, query):
        if operation == "GetObject" and path.endswith("output.pkl"):
            gets.append(path)
            if len(gets) > 1:
                return (404, "NoSuchKey")
        return None

    s3_server.faults.append(cleared_after_the_first_range)
    with pytest.raises(KeyError):
        shelved.get()


def test_memory_built_on_s3fs_event_loop_thread_raises_instead_of_hanging(location, bucket):
    import fsspec.asyn

    loop = Memory(location, verbose=0).store_backend.fs.loop

    async def on_the_loop():
        return Memory(f"s3://{bucket}/elsewhere", verbose=0,
                      backend_options={"skip_instance_cache": True})

    with pytest.raises(RuntimeError, match="event loop thread"):
        fsspec.asyn.sync(loop, on_the_loop, timeout=30)


# ------------------------------------------ what goes wrong around failures


def test_a_failed_part_found_at_the_commit_never_fails_the_call(
        location, s3_server, s3_client, bucket):
    # The first part fails while the last is being sent, at the commit.
    options = {**FAST_FAILURE, "part_size": 5 * MiB, "max_concurrency": 2}
    cached = Memory(location, verbose=0, backend_options=options).cache(fresh(random_array))
    s3_server.faults.append(
        lambda operation, path, query: (500, "InternalError")
        if operation == "UploadPart" and "partNumber=1&" in query + "&" else None)
    size = 12 * MiB // 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(cached(size), random_array(size))
    assert any("store a result" in message for message in cache_warnings(caught))
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert not cached.check_call_in_cache(size)


def test_func_clear_raises_every_time_it_cannot_write_the_code(location, s3_server):
    cached = Memory(location, verbose=0, backend_options=FAST_FAILURE).cache(fresh(square))
    cached(2)
    s3_server.faults.append(
        lambda operation, path, query: (403, "AccessDenied")
        if operation == "PutObject" and path.endswith("/func_code.py") else None)
    for _ in range(2):
        with pytest.raises(PermissionError):
            cached.clear(warn=False)
    s3_server.faults.clear()
    cached.clear(warn=False)  # and once it can, the cache is back on
    assert cached(2) == 4 and cached(2) == 4 and CALLS == [2, 2]


def test_an_outage_costs_a_bounded_delay_for_large_results_too(location, s3_server):
    options = {**FAST_FAILURE, "part_size": 5 * MiB, "max_concurrency": 2}
    cached = Memory(location, verbose=0, backend_options=options).cache(fresh(random_array))
    size = 12 * MiB // 8
    cached(size)
    s3_server.outage = "reset"
    delays = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cached(size + 1)  # the first failure is detected here
            for extra in range(2, 5):
                started = time.monotonic()
                np.testing.assert_array_equal(cached(size + extra), random_array(size + extra))
                delays.append(time.monotonic() - started)
    finally:
        s3_server.outage = None
    assert max(delays) <= 2.0, delays
    assert not any("abort" in message for message in cache_warnings(caught))
    np.testing.assert_array_equal(cached(size), random_array(size))


@needs_joblib_13
@pytest.mark.parametrize("written", ['"x"', "null", "[1]", "{}", "true", "NaN", "Infinity",
                                     "-Infinity", "1e400", "1" + "0" * 400],
                         ids=["string", "null", "list", "object", "bool", "NaN", "inf",
                              "-inf", "1e400", "huge int"])
def test_metadata_whose_time_is_not_a_number_is_a_miss(location, s3_client, bucket, written):
    from joblib.memory import expires_after

    cached = Memory(location, verbose=0).cache(
        fresh(square), cache_validation_callback=expires_after(minutes=5))
    cached(2)
    key = stored_key(s3_client, bucket, "metadata.json")
    s3_client.put_object(Bucket=bucket, Key=key,
                         Body=f'{{"duration": 1, "input_args": {{}}, "time": {written}}}'.encode())
    with no_warnings():
        assert cached.check_call_in_cache(2) is False
        assert cached(2) == 4
    assert CALLS == [2, 2]


def test_metadata_with_odd_input_args_never_breaks_a_verbose_load(location, s3_client, bucket):
    cached = Memory(location, verbose=10).cache(fresh(square))
    cached(2)
    key = stored_key(s3_client, bucket, "metadata.json")
    s3_client.put_object(Bucket=bucket, Key=key, Body=b'{"time": 1, "input_args": [1, 2]}')
    assert cached.call_and_shelve(2).get() == 4


def test_urls_in_the_errors_shown_lose_their_credentials():
    # botocore repeats whole a URL it refuses, as from AWS_ENDPOINT_URL.
    error = ValueError(f"Custom endpoint `http://u:{SENTINEL_SECRET[:8]}/{SENTINEL_SECRET[8:]}"
                       f"@127.0.0.1:99999` was not a valid URI")
    said = joblib_store._said(error)
    assert "SENTINEL" not in said and "`http://127.0.0.1:99999`" in said, said


# ------------------------------- where the store cannot see joblib's frames
# A shelved result, a function without source, a store unpickled while
# others are in use, and joblib releases whose private names or base
# classes differ from today's.

def always(operation_name, answer, path_end):
    """A fault that answers every matching request."""
    def fault(operation, path, query):
        return answer if operation == operation_name and path.endswith(path_end) else None

    return fault


FAULTS_BEYOND_RETRIES = {"503": (503, "SlowDown"), "reset": "reset", "cut": "cut"}


def other_code_of(func):
    """A function with func's joblib id and other code (cube for square)."""
    changed = fresh(cube)
    changed.__name__ = changed.__qualname__ = func.__name__
    return changed


@pytest.mark.parametrize("failing, fault", [
    *(("the code's read", fault) for fault in FAULTS_BEYOND_RETRIES),
    ("the result's put", "503"), ("the result's put", "reset"),  # a PUT's answer has no body
])
def test_a_shelved_result_of_changed_code_is_never_the_old_result(
        location, s3_server, s3_client, bucket, failing, fault):
    memory = Memory(location, verbose=0, backend_options=FAST_FAILURE)
    assert memory.cache(fresh(square))(3) == 9
    # Gone (a lifecycle rule, say): new code is written without a clear,
    # and the old result stays where the new one is to be stored.
    s3_client.delete_object(Bucket=bucket, Key=stored_key(s3_client, bucket, "func_code.py"))
    changed = memory.cache(other_code_of(square))
    if failing == "the code's read":
        s3_server.faults.append(always("GetObject", FAULTS_BEYOND_RETRIES[fault], "/func_code.py"))
    else:
        s3_server.faults.append(always("PutObject", FAULTS_BEYOND_RETRIES[fault], "/output.pkl"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shelved = changed.call_and_shelve(3)
        try:
            value = shelved.get()
        except KeyError as error:
            value = error
    assert isinstance(value, KeyError), f"{value!r}: the result of the old code"
    s3_server.faults.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert changed.call_and_shelve(3).get() == 27


@pytest.mark.parametrize("fault", ["404 cut off", "503 beyond retries", "reset"])
def test_get_raises_only_a_key_error_naming_bucket_and_endpoint(
        location, s3_server, s3_client, bucket, fault):
    cached = Memory(location, verbose=0, backend_options=FAST_FAILURE).cache(fresh(square))
    shelved = cached.call_and_shelve(4)
    if fault == "404 cut off":
        s3_client.delete_object(Bucket=bucket, Key=stored_key(s3_client, bucket))
        s3_server.faults.append(always("GetObject", "cut", "/output.pkl"))
    else:
        answer = (503, "SlowDown") if fault.startswith("503") else "reset"
        s3_server.faults.append(always("GetObject", answer, "/output.pkl"))
        s3_server.faults.append(always("HeadObject", answer, "/output.pkl"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyError) as raised:
            shelved.get()
        assert cached.check_call_in_cache(4) is False
    message = str(raised.value)
    assert f"'{bucket}'" in message and s3_server.url in message, message


class CallableSquare:
    def __call__(self, x):
        CALLS.append(x)
        return x * x


class WithAMethod:
    def square(self, x):
        CALLS.append(x)
        return x * x


def power(x, exponent):
    CALLS.append(x)
    return x ** exponent


def functools_partial_of_power():
    import functools

    return functools.partial(power, exponent=2)


FUNCTIONS_WITHOUT_SOURCE = {
    "named function": lambda: fresh(square),
    "lambda": lambda: (lambda x: CALLS.append(x) or x * x),
    "numpy ufunc": lambda: np.square,
    "partial": functools_partial_of_power,
    "callable object": CallableSquare,
    "bound method": lambda: WithAMethod().square,
}


@pytest.mark.parametrize("fault", list(FAULTS_BEYOND_RETRIES))
@pytest.mark.parametrize("kind", list(FUNCTIONS_WITHOUT_SOURCE))
def test_a_function_turned_off_by_its_first_code_read_recovers(
        location, s3_server, s3_client, bucket, kind, fault):
    func = FUNCTIONS_WITHOUT_SOURCE[kind]()
    cached = Memory(location, verbose=0, backend_options=FAST_FAILURE).cache(func)
    answered = []

    def first_reads_fail(operation, path, query):
        if operation == "GetObject" and path.endswith("/func_code.py") and len(answered) < 2:
            answered.append(path)
            return FAULTS_BEYOND_RETRIES[fault]
        return None

    s3_server.faults.append(first_reads_fail)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = [cached(3) for _ in range(6)]
    assert answered, "no fault injected"
    assert [int(v) for v in values] == [9] * 6
    assert any(key.endswith("/output.pkl") for key in keys_in(s3_client, bucket)), (
        "nothing was stored after five healthy calls")
    with s3_server.counting() as hit:
        assert int(cached(3)) == 9
    assert hit["PutObject"] == 0, hit  # a hit, not another miss


def unpickle_stores_while_hitting(location, rounds):
    """Threads make hits (each one recording an access in the background)
    while this thread unpickles stores of settings the process has not
    connected yet; return the hits made."""
    import pickle

    memory = Memory(location, verbose=0, backend_options={"access_interval": 0})
    cached = memory.cache(square)
    cached(2)
    stop, hits = threading.Event(), []

    def hit():
        while not stop.is_set():
            assert cached(2) == 4
            hits.append(1)

    threads = [threading.Thread(target=hit, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    import dataclasses

    from aiobotocore.session import AioSession

    session = AioSession()  # one botocore session: its models are read once
    try:
        for index in range(rounds):
            # A store of settings this process never connected, as a dask
            # worker receives one.
            copy = pickle.loads(pickle.dumps(memory.store_backend))
            copy.options = dataclasses.replace(copy.options, storage_options={
                "session": session, "config_kwargs": {"connect_timeout": 10 + index}})
            assert copy.endpoint  # builds its connection in this process
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    return len(hits)


def test_threads_hitting_while_others_unpickle_stores_never_hang(location):
    # In a process of its own: a hang would hang the suite.
    program = f"""
        import faulthandler, os
        import test_joblib_store as t
        faulthandler.dump_traceback_later(60, exit=True)
        print(t.unpickle_stores_while_hitting({location!r}, 200), flush=True)
        os._exit(0)  # not the teardown of 200 connections
    """
    result = run_python(program, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) > 0


def joblib_copy(tmp_path, rewrites):
    """A copy of the installed joblib whose source is rewritten as in
    rewrites ({file: [(pattern, replacement), ...]}); return the folder to
    put first on a process's PYTHONPATH."""
    folder = tmp_path / "joblib-copy"
    shutil.copytree(os.path.dirname(joblib.__file__), folder / "joblib",
                    ignore=shutil.ignore_patterns("__pycache__", "test"))
    for name, pairs in rewrites.items():
        path = folder / "joblib" / name
        text = path.read_text()
        for pattern, replacement in pairs:
            text, count = re.subn(pattern, replacement, text)
            assert count, (name, pattern)
        path.write_text(text)
    return str(folder)


def run_on_joblib_copy(folder, code, **env):
    """run_python with the copy of joblib in folder imported first."""
    program = textwrap.dedent(f"""
        import joblib
        assert joblib.__file__.startswith({folder!r}), joblib.__file__
    """) + textwrap.dedent(code)
    return run_python(program, check=False, PYTHONPATH=f"{folder}{os.pathsep}{HERE}", **env)


# The private names the store must not depend on, as joblib 1.2 to 1.6
# spell them, renamed in the copy; the last two compute an args_id.
PRIVATE_NAMES = ("_cached_call", "_after_call", "_is_in_cache_and_valid",
                 "_check_previous_func_code", "_get_args_id", "_get_argument_hash")


@pytest.fixture
def renamed_joblib(tmp_path):
    source = open(os.path.join(os.path.dirname(joblib.__file__), "memory.py")).read()
    present = [name for name in PRIVATE_NAMES if re.search(rf"\bdef {name}\b", source)]
    assert len(present) >= 3, present
    return joblib_copy(tmp_path, {"memory.py": [
        (rf"\b{name}\b", f"{name}_renamed") for name in present]})


RENAMED_JOBLIB_CASES = {
    # Old code's results, then new code: the old must never be served.
    "func_code.py deleted": """
        from joblib import Memory
        memory = Memory(LOCATION, verbose=0)
        assert memory.cache(t.fresh(t.square))(3) == 9
        s3 = boto3.client("s3", endpoint_url=ENDPOINT)
        s3.delete_object(Bucket=BUCKET, Key=t.stored_key(s3, BUCKET, "func_code.py"))
        values = [memory.cache(t.other_code_of(t.square))(3)]
        values.append(memory.cache(t.other_code_of(t.square)).call_and_shelve(3).get())
        assert values == [27, 27], values
    """,
    "two locations": """
        from joblib import Memory
        old = Memory(LOCATION + "/second", verbose=0).cache(t.fresh(t.square))
        assert old(3) == 9
        changed = t.other_code_of(t.square)
        assert Memory(LOCATION + "/first", verbose=0).cache(changed)(3) == 27
        second = Memory(LOCATION + "/second", verbose=0).cache(changed)
        values = [second(3), second.call_and_shelve(3).get(), second.check_call_in_cache(3)]
        assert values == [27, 27, True], values
    """,
    "missing metadata and expires_after": """
        from joblib import Memory
        from joblib.memory import expires_after
        memory = Memory(LOCATION, verbose=0)
        cached = memory.cache(t.fresh(t.square), cache_validation_callback=expires_after(seconds=600))
        assert cached(3) == 9
        s3 = boto3.client("s3", endpoint_url=ENDPOINT)
        s3.delete_object(Bucket=BUCKET, Key=t.stored_key(s3, BUCKET, "metadata.json"))
        assert cached(3) == 9 and cached.check_call_in_cache(3) in (True, False)
        assert cached(3) == 9
    """,
    "refused deletes while clearing changed code": """
        from joblib import Memory
        memory = Memory(LOCATION, verbose=0)
        assert memory.cache(t.fresh(t.square))(3) == 9
        changed = memory.cache(t.other_code_of(t.square))
        assert [changed(3), changed(3)] == [27, 27]
        try:  # the cache is off for it in this process: nothing to get
            got = changed.call_and_shelve(3).get()
        except KeyError:
            got = 27
        assert got == 27, got
    """,
}


@pytest.mark.parametrize("case", list(RENAMED_JOBLIB_CASES))
def test_a_joblib_with_other_private_names_never_serves_other_code(
        location, bucket, s3_server, renamed_joblib, case):
    if case == "missing metadata and expires_after" and JOBLIB_VERSION < (1, 3):
        pytest.skip(f"joblib {joblib.__version__} has no cache_validation_callback")
    if case.startswith("refused deletes"):
        s3_server.faults.append(always("DeleteObjects", (403, "AccessDenied"), ""))
    program = f"""
        import warnings
        import boto3
        import test_joblib_store as t
        LOCATION, BUCKET, ENDPOINT = {location!r}, {bucket!r}, {s3_server.url!r}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
    """ + textwrap.indent(textwrap.dedent(RENAMED_JOBLIB_CASES[case]), " " * 12) + """
        import joblib_store
        print("warnings:", [str(w.message) for w in caught
                            if issubclass(w.category, joblib_store.CacheWarning)])
    """
    result = run_on_joblib_copy(renamed_joblib, program)
    assert result.returncode == 0, result.stderr[-3000:]
    [shown] = [line for line in result.stdout.splitlines() if line.startswith("warnings:")]
    messages = eval(shown[len("warnings:"):])
    about_joblib = [m for m in messages if "MemorizedFunc" in m]
    assert len(about_joblib) == 1, messages


def test_a_mixin_that_subclasses_the_base_still_imports_and_works(tmp_path, location):
    # As joblib's SQL store proposal has it: the mixin becomes a subclass of
    # the base, and joblib's own backend lists the mixin alone.
    folder = joblib_copy(tmp_path, {"_store_backends.py": [
        (r"class StoreBackendMixin\(object\):", "class StoreBackendMixin(StoreBackendBase):"),
        (r"class FileSystemStoreBackend\(StoreBackendBase, StoreBackendMixin\):",
         "class FileSystemStoreBackend(StoreBackendMixin):"),
    ]})
    result = run_on_joblib_copy(folder, f"""
        import joblib._store_backends as backends
        assert issubclass(backends.StoreBackendMixin, backends.StoreBackendBase)
        import subprocess, sys
        sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                  "-k", "moto and (open_item or item_exists or move_item or clear_location"
                                        " or dump_load or metadata_round_trip or func_code_and_paths"
                                        " or get_items_reports or clear_empties or miss_then_hit)"
                                        " or test_check_call_in_cache or test_call_and_shelve_gives"
                                        " or test_memory_clear_and",
                                  {os.path.join(HERE, "test_joblib_store.py")!r}]))
    """)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-2000:]


def test_a_store_used_outside_joblibs_calls_serves_only_the_code_of_func_code_py(
        location, s3_server, s3_client, bucket):
    memory = Memory(location, verbose=0)
    assert memory.cache(fresh(square))(3) == 9
    store = memory.store_backend
    [item] = store.get_items()
    call_id = item.path[len(store.location) + 1:].rsplit("/", 1)
    # No joblib call to say which code it serves: func_code.py says it, read
    # beside each request. A hit costs two round trips, not one.
    with s3_server.counting() as hit:
        assert store.contains_item(call_id)
        assert store.load_item(call_id) == 9
    assert hit == Counter({"HeadObject": 1, "GetObject": 3}), hit
    # Another code's func_code.py (a writer whose clear failed).
    s3_client.put_object(Bucket=bucket, Key=stored_key(s3_client, bucket, "func_code.py"),
                         Body=b"# first line: 1\ndef square(x):\n    return x ** 3\n")
    assert not store.contains_item(call_id)
    with pytest.raises(KeyError):
        store.load_item(call_id)


@pytest.mark.parametrize("failure", list(joblib_store._Failure), ids=lambda f: f.name)
def test_every_failure_does_what_the_policy_table_says(location, bucket, s3_server, failure, caplog):
    Outcome = joblib_store._Outcome
    assert set(joblib_store._FAILURE_POLICY) == set(joblib_store._Failure)
    outcome = joblib_store._FAILURE_POLICY[failure]
    store = Memory(location, verbose=0).store_backend
    func_id = f"walk/{failure.name.lower()}"
    error = ConnectionResetError("injected by the test")
    returned = None
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, "joblib_store"):
        warnings.simplefilter("always")
        if outcome in (Outcome.RAISE, Outcome.RAISE_AND_OFF):
            with pytest.raises(OSError) as raised:
                store._on_failure(failure, error, func_id)
            assert f"'{bucket}'" in str(raised.value) and s3_server.url in str(raised.value)
        else:
            returned = store._on_failure(failure, error, func_id)
    assert joblib_store._PROCESS.function(store.location, func_id).off is (
        outcome in (Outcome.OFF, Outcome.RAISE_AND_OFF))
    assert isinstance(returned, KeyError) is (outcome is Outcome.KEY_ERROR)
    if outcome is Outcome.KEY_ERROR:
        assert f"'{bucket}'" in str(returned) and s3_server.url in str(returned)
    warned = cache_warnings(caught)
    expected = {Outcome.RAISE: 0, Outcome.KEY_ERROR: 0, Outcome.QUIET: 0}.get(outcome, 1)
    assert len(warned) == expected, warned
    assert any(failure.value in record.getMessage() for record in caplog.records)


def test_the_log_says_each_request_and_decision_and_never_a_credential(
        location, bucket, s3_server, caplog):
    options = {"key": "AKIASENTINEL", "secret": SENTINEL_SECRET, "token": SENTINEL_TOKEN}
    with caplog.at_level(logging.DEBUG, "joblib_store"):
        memory = Memory(location, verbose=0, backend_options=options)
        cached = memory.cache(fresh(square))
        assert cached(2) == 4 and cached(2) == 4
        changed = memory.cache(other_code_of(square))
        store = memory.store_backend
        store._client.put(store._key_of_call(["test_joblib_store/square"], "func_code.py"),
                          b"garbage, not joblib's code")
        s3_server.faults.append(always("DeleteObjects", (403, "AccessDenied"), ""))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert changed(2) == 8
    lines = [record.getMessage() for record in caplog.records]
    requests = [line for line in lines if re.match(r"(GetObject|PutObject|HeadObject|ListObjectsV2|"
                                                   r"DeleteObjects) \S+ \S+ \d+ bytes [\d.]+ ms \d+ retries",
                                                   line)]
    assert any(line.startswith("GetObject test_joblib_store/square/func_code.py 404")
               for line in requests), lines
    assert any(line.startswith("PutObject test_joblib_store/square/") and " 200 " in line
               for line in requests), lines
    assert any("the cache is off for test_joblib_store/square" in line for line in lines), lines
    text = "\n".join(lines)
    assert SENTINEL_SECRET not in text and SENTINEL_TOKEN not in text


# ------------------------------------- odd servers, maintenance and clocks

def test_a_put_answered_without_an_etag_never_fails_an_mmap_call(location, s3_server, tmp_path):
    cached = Memory(location, verbose=0, mmap_mode="r",
                    backend_options={"local_cache_dir": str(tmp_path)}).cache(fresh(random_array))
    s3_server.faults.append(always("PutObject", "no etag", "/output.pkl"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(cached(1000), random_array(1000))
    assert any("ETag" in message for message in cache_warnings(caught)), cache_warnings(caught)
    opened = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
              if os.path.islink(f"/proc/self/fd/{fd}")]
    assert not [path for path in opened if path.startswith(str(tmp_path))], opened
    s3_server.faults.clear()
    np.testing.assert_array_equal(cached(1000), random_array(1000))


def serve_html_to_everything():
    """An HTTP server on 127.0.0.1 that answers 200 and a web page to any
    request, as a misnamed endpoint (a console, a proxy's page) does."""
    import http.server

    class Page(http.server.BaseHTTPRequestHandler):
        def answer(self):
            body = b"<html><body>Welcome</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_an_endpoint_that_is_not_s3_is_named_at_memory():
    server = serve_html_to_everything()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ConnectionError) as raised:
            Memory("s3://some-bucket/cache", verbose=0, backend_options={"endpoint_url": url})
    finally:
        server.shutdown()
        server.server_close()
    message = str(raised.value)
    assert url in message and "not S3's answer" in message and "text/html" in message, message


def test_a_slow_bucket_check_says_it_timed_out_and_how_to_wait_longer(bucket, s3_server):
    answer = threading.Event()  # the listing answers once the test has its error
    s3_server.faults.append(lambda operation, path, query: answer.wait(60) and None if (
        operation == "ListObjectsV2" and "max-keys=1&" in query + "&") else None)
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionError) as raised:
            Memory(f"s3://{bucket}/slow", verbose=0,
                   backend_options={"skip_instance_cache": True})
    finally:
        answer.set()
    assert time.monotonic() - started < 60  # it gave up instead of waiting for the answer
    message = str(raised.value)
    assert "within 8 s" in message and "read_timeout" in message, message
    assert "check that the server is up" not in message


def test_old_results_go_whatever_young_leftovers_stand_beside_them(
        location, s3_client, bucket):
    memory = Memory(location, verbose=0)
    cached = store_spaced_items(memory, 2)
    time.sleep(2.5)  # server times have 1 s steps
    # An access record that landed after a clear: a folder without a result.
    [first, *_] = [k for k in keys_in(s3_client, bucket) if k.endswith("/output.pkl")]
    function_folder = posixpath.dirname(posixpath.dirname(first))
    s3_client.put_object(Bucket=bucket, Key=f"{function_folder}/{'f' * 32}/last_access", Body=b"")
    reduce_size(memory, age_limit=datetime.timedelta(seconds=1))
    assert cached_inputs(memory, cached, 2) == []
    left = [k for k in keys_in(s3_client, bucket) if "/" + "f" * 32 + "/" in k]
    assert left == [f"{function_folder}/{'f' * 32}/last_access"]  # young: it stays
    time.sleep(2.5)
    reduce_size(memory, age_limit=datetime.timedelta(seconds=1))
    assert not [k for k in keys_in(s3_client, bucket) if "/" + "f" * 32 + "/" in k]


def test_a_reader_denied_records_stops_no_writers_records(location, s3_server):
    writer = Memory(location, verbose=0, backend_options={"access_interval": 0})
    cached = writer.cache(fresh(square))
    cached(1)
    reader = Memory(location, verbose=0, backend_options={
        "access_interval": 0, "key": "reader", "secret": "reader", "token": "reader"})
    read = reader.cache(fresh(square))
    s3_server.faults.append(lambda operation, path, query: (403, "AccessDenied") if (
        operation == "PutObject" and path.endswith("/last_access")
        and s3_server.requests[-1].token == "reader") else None)
    time.sleep(1.05)
    assert read(1) == 1
    joblib_store._wait_for_background_requests()
    time.sleep(1.05)
    with s3_server.counting() as hit:
        assert cached(1) == 1
        joblib_store._wait_for_background_requests()
    assert hit == Counter({"GetObject": 1, "PutObject": 1}), hit  # the writer still records


def test_cli_clear_of_a_short_name_two_functions_share_refuses(location, s3_client, bucket):
    memory = Memory(location, verbose=0)
    first, second = fresh(square), fresh(square)
    first.__module__, second.__module__ = "moda", "modb"
    first.__qualname__ = second.__qualname__ = first.__name__ = second.__name__ = "f"
    memory.cache(first)(1)
    memory.cache(second)(2)
    refused = run_cli("clear", location, "--function", "f", "--yes")
    assert refused.returncode == 2, refused.stderr
    assert "moda/f" in refused.stderr and "modb/f" in refused.stderr
    assert len([k for k in keys_in(s3_client, bucket) if k.endswith("/output.pkl")]) == 2
    done = run_cli("clear", location, "--function", "moda/f", "--yes")
    assert done.returncode == 0 and "moda/f" in done.stdout, done.stderr
    assert [k.split("/")[2] for k in keys_in(s3_client, bucket) if k.endswith("/output.pkl")] == [
        "modb"]


class ShiftedClock:
    """The time and datetime modules as a process whose clock is off by
    offset seconds sees them: only the local clock moves, not the server's."""

    def __init__(self, offset):
        import datetime as real_datetime

        self.offset = offset
        outer = self

        class ShiftedDatetime(real_datetime.datetime):
            @classmethod
            def now(cls, tz=None):
                return real_datetime.datetime.now(tz) + real_datetime.timedelta(seconds=outer.offset)

        self.time = types.SimpleNamespace(**{
            name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
        self.time.time = lambda: time.time() + offset
        self.datetime = types.SimpleNamespace(**{
            name: getattr(real_datetime, name) for name in dir(real_datetime)
            if not name.startswith("__")})
        self.datetime.datetime = ShiftedDatetime


@pytest.mark.parametrize("offset", [3600, -7200], ids=["1 h ahead", "2 h behind"])
def test_a_client_whose_clock_is_off_keeps_what_is_used(location, s3_server, monkeypatch, offset):
    clock = ShiftedClock(offset)
    monkeypatch.setattr(joblib_store, "time", clock.time)
    monkeypatch.setattr(joblib_store, "datetime", clock.datetime)
    memory = Memory(location, verbose=0, backend_options={"access_interval": 1})
    cached = store_spaced_items(memory, 2)
    time.sleep(1.5)
    with s3_server.counting() as hit:
        assert cached(0) == 0  # used a moment ago: recorded, by the server's clock
        joblib_store._wait_for_background_requests()
    assert hit["PutObject"] == 1, hit
    reduce_size(memory, age_limit=datetime.timedelta(minutes=30))
    assert cached_inputs(memory, cached, 2) == [0, 1]
    time.sleep(2.5)  # server times have 1 s steps
    assert cached(1) == 1
    joblib_store._wait_for_background_requests()
    reduce_size(memory, age_limit=datetime.timedelta(seconds=1.5))
    assert cached_inputs(memory, cached, 2) == [1]


def test_incomplete_uploads_older_than_leftover_age_are_aborted(location, s3_server, s3_client, bucket):
    # The first answer to CreateMultipartUpload is cut off after moto made
    # the upload: botocore asks again, and the first upload is left behind.
    options = {"part_size": 5 * MiB, "leftover_age": 1}
    memory = Memory(location, verbose=0, backend_options=options)
    cached = memory.cache(fresh(random_array))
    s3_server.faults.append(one_fault("CreateMultipartUpload", "cut", ""))
    size = 12 * MiB // 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(cached(size), random_array(size))
    assert len(s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1
    reduce_size(memory, items_limit=10)
    assert len(s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1  # young
    time.sleep(2.5)  # server times have 1 s steps
    dry = run_cli("prune", location, "--items-limit", "10", "--leftover-age", "1s", "--dry-run")
    assert dry.returncode == 0 and "would abort the incomplete upload" in dry.stdout, dry.stderr
    reduce_size(memory, items_limit=10)
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert cached.check_call_in_cache(size)


# ------------------------------------------------------------ compute once

needs_conditional_writes = pytest.mark.skipif(
    not joblib_store._botocore_writes_conditionally(),
    reason="this botocore's PutObject takes no IfNoneMatch nor IfMatch: compute_once "
           "is not available with it (and says so)")


def slow_square(x):
    """Note each computation in COMPUTED_LOG (shared by processes), then
    take SLOW_SECONDS; raise instead of returning if SLOW_FAILS is set.
    (Not arguments: a call must be the same call in every process.)"""
    with open(os.environ["COMPUTED_LOG"], "a") as log:
        log.write(f"{os.getpid()} {x}\n")
    time.sleep(float(os.environ.get("SLOW_SECONDS", "1")))
    if os.environ.get("SLOW_FAILS"):
        raise ValueError(f"slow_square({x}) failed")
    return x * x


def computations(log):
    return [line.split()[1] for line in log.read_text().splitlines()]


@pytest.fixture
def computed_log(tmp_path, monkeypatch):
    log = tmp_path / "computed.log"
    log.write_text("")
    monkeypatch.setenv("COMPUTED_LOG", str(log))
    return log


def dogpile_worker(location, options, calls, seed):
    """One process of a dogpile: the calls in an order of its own."""
    import random

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached = Memory(location, verbose=0, backend_options=options).cache(slow_square)
        order = list(calls)
        random.Random(seed).shuffle(order)
        return [(x, cached(x)) for x in order]


@needs_conditional_writes
def test_a_dogpile_of_processes_computes_each_call_once(location, computed_log):
    # 4 spawned processes call the same 5 slow calls, each in its own order.
    options = {"compute_once": 20}
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(dogpile_worker, [(location, options, range(5), seed)
                                                for seed in range(4)])
    assert all(value == x * x for result in results for x, value in result), results
    assert sorted(computations(computed_log)) == ["0", "1", "2", "3", "4"]


@needs_conditional_writes
def test_threads_that_miss_at_once_compute_once_and_wait_without_a_request(
        location, s3_server, computed_log):
    cached = Memory(location, verbose=0, backend_options={"compute_once": 20}).cache(slow_square)
    assert cached(1) == 1  # the function's code is stored, the probe made
    joblib_store._wait_for_background_requests()
    values, threads = [], []
    with s3_server.recording() as made, no_warnings():
        for index in range(4):
            threads.append(threading.Thread(target=lambda: values.append(cached(3))))
            threads[-1].start()
            while computations(computed_log) != ["1", "3"]:  # the others miss meanwhile
                time.sleep(0.01)
        for thread in threads:
            thread.join()
    assert values == [9] * 4 and computations(computed_log) == ["1", "3"]
    # The holder's miss: its lookup, the lease, the result and its metadata,
    # the lease marked done. The others: a lookup (a miss), then after the
    # wait a lookup (a hit); no request while they waited.
    lease = Counter(r.operation for r in made if r.path.endswith("/lease"))
    assert lease == Counter({"PutObject": 2}), lease
    assert Counter(r.operation for r in made) == Counter({"GetObject": 7, "PutObject": 4})


@needs_conditional_writes
def test_a_miss_with_compute_once_costs_the_leases_two_puts_and_a_hit_nothing(
        location, s3_server, computed_log, monkeypatch):
    monkeypatch.setenv("SLOW_SECONDS", "0")
    cached = Memory(location, verbose=0, backend_options={"compute_once": 20}).cache(slow_square)
    plain = Memory(location, verbose=0).cache(slow_square)
    assert cached(1) == 1 and plain(2) == 4  # code stored, probe made
    joblib_store._wait_for_background_requests()
    with s3_server.recording() as miss:
        assert cached(5) == 25
        joblib_store._wait_for_background_requests()  # the lease, marked done
    with s3_server.recording() as plain_miss:
        assert plain(6) == 36
    leases = [r for r in miss if r.path.endswith("/lease")]
    assert [r.operation for r in leases] == ["PutObject", "PutObject"], leases
    assert Counter(r.operation for r in miss if r not in leases) == Counter(
        r.operation for r in plain_miss)
    with s3_server.counting() as hit:
        assert cached(5) == 25 and cached.check_call_in_cache(7) is False
    assert hit == Counter({"GetObject": 1, "HeadObject": 1}), hit


def holder_computing(location, log, seconds):
    """Another process that computes slow_square(4), with 2 s leases, for
    seconds; returned once its computation began."""
    program = f"""
        import os
        os.environ["COMPUTED_LOG"] = {str(log)!r}
        from joblib import Memory
        import test_joblib_store as t
        os.environ["SLOW_SECONDS"] = "{seconds}"
        cached = Memory({location!r}, verbose=0, backend_options={{"compute_once": 2}}).cache(
            t.slow_square)
        cached(4)
    """
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(program)],
                              cwd=HERE, env={**os.environ, "PYTHONPATH": HERE})
    deadline = time.monotonic() + 60
    while computations(log) != ["4"]:
        if time.monotonic() > deadline or holder.poll() is not None:
            holder.kill()
            raise AssertionError("no computation began")
        time.sleep(0.05)
    return holder


@needs_conditional_writes
def test_a_holder_killed_mid_computation_is_taken_over_after_its_lifetime(
        location, s3_server, computed_log, monkeypatch):
    holder = holder_computing(location, computed_log, 60)
    os.kill(holder.pid, signal.SIGKILL)  # as a lost spot instance: nothing runs after
    holder.wait(30)
    monkeypatch.setenv("SLOW_SECONDS", "0.1")
    cached = Memory(location, verbose=0, backend_options={"compute_once": 2}).cache(slow_square)
    started = time.monotonic()
    with no_warnings():
        assert cached(4) == 16
    waited = time.monotonic() - started
    assert 1.0 < waited < 8, waited  # for the lease to expire (2 s, by the server's clock)
    assert computations(computed_log) == ["4", "4"]


@needs_conditional_writes
def test_a_lease_that_expired_after_its_result_landed_is_not_computed_again(
        location, s3_server, computed_log):
    # The holder stores its result, but cannot renew its lease nor mark it
    # done: the waiter looks for the result before it takes the lease over.
    def fault(operation, path, query):
        renews = s3_server.answering.request.if_match  # or marks done, or takes over
        return (503, "SlowDown") if LEASE_REQUESTS["take"](operation, path, query) and renews else None

    s3_server.faults.append(fault)
    holder = holder_computing(location, computed_log, 1)
    cached = Memory(location, verbose=0, backend_options={"compute_once": 2}).cache(slow_square)
    try:
        with no_warnings():
            assert cached(4) == 16
    finally:
        holder.wait(60)
    assert computations(computed_log) == ["4"]


@needs_conditional_writes
def test_threads_waiting_for_a_long_computation_elsewhere_wait_while_it_is_renewed(
        location, computed_log, monkeypatch):
    # Another process computes for 3 lifetimes and renews its lease; here one
    # thread looks at that lease, and the others wait for that one.
    holder = holder_computing(location, computed_log, 6)
    try:
        cached = Memory(location, verbose=0, backend_options={"compute_once": 2}).cache(
            slow_square)
        with no_warnings(), ThreadPoolExecutor(3) as pool:
            assert list(pool.map(cached, [4, 4, 4])) == [16, 16, 16]
    finally:
        holder.wait(60)
    assert holder.returncode == 0
    assert computations(computed_log) == ["4"]


@needs_conditional_writes
def test_a_holder_whose_computation_raises_lets_waiters_compute_at_once(
        location, computed_log, monkeypatch):
    cached = Memory(location, verbose=0, backend_options={"compute_once": 60}).cache(slow_square)
    monkeypatch.setenv("SLOW_SECONDS", "0")
    assert cached(0) == 0
    monkeypatch.setenv("SLOW_SECONDS", "1")
    monkeypatch.setenv("SLOW_FAILS", "1")
    raised, waited = [], []

    def holder():
        with pytest.raises(ValueError):
            cached(5)
        raised.append(time.monotonic())

    def waiter():
        time.sleep(0.3)
        started = time.monotonic()
        with pytest.raises(ValueError):
            cached(5)
        waited.append(time.monotonic() - started)

    threads = [threading.Thread(target=holder), threading.Thread(target=waiter)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert raised and waited and waited[0] < 5, waited  # not the lease's 60 s
    # (about the holder's 1 s, then its own 1 s)
    assert computations(computed_log) == ["0", "5", "5"]  # the waiter saw it raise itself


@needs_conditional_writes
def test_a_holder_in_another_process_that_raises_releases_its_lease_at_once(
        location, computed_log, monkeypatch):
    program = f"""
        import os
        os.environ["COMPUTED_LOG"] = {str(computed_log)!r}
        from joblib import Memory
        import test_joblib_store as t
        os.environ.update(SLOW_SECONDS="1.5", SLOW_FAILS="1")
        cached = Memory({location!r}, verbose=0, backend_options={{"compute_once": 60}}).cache(
            t.slow_square)
        try:
            cached(6)
        except ValueError:
            print("raised")
    """
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(program)], cwd=HERE,
                              env={**os.environ, "PYTHONPATH": HERE}, stdout=subprocess.PIPE,
                              text=True)
    deadline = time.monotonic() + 60
    while computations(computed_log) != ["6"]:
        assert time.monotonic() < deadline and holder.poll() is None
        time.sleep(0.05)
    monkeypatch.setenv("SLOW_SECONDS", "0.1")
    monkeypatch.setenv("SLOW_FAILS", "1")
    cached = Memory(location, verbose=0, backend_options={"compute_once": 60}).cache(slow_square)
    started = time.monotonic()
    with pytest.raises(ValueError):
        cached(6)
    assert time.monotonic() - started < 10
    assert holder.communicate(timeout=60)[0].strip() == "raised"
    assert computations(computed_log) == ["6", "6"]


LEASE_REQUESTS = {
    "take": lambda operation, path, query: operation == "PutObject" and path.endswith("/lease"),
    "look": lambda operation, path, query: operation == "GetObject" and path.endswith("/lease"),
}


def alternately(answers):
    """503 beyond retries, then a reset, then 503 again..., one per request."""
    count = itertools.count()
    return lambda: answers[next(count) % len(answers)]


@needs_conditional_writes
@pytest.mark.parametrize("request_name", ["take", "look", "renew and release"])
def test_lease_faults_never_fail_a_call_nor_give_a_wrong_value(
        location, s3_server, computed_log, monkeypatch, request_name):
    answer = alternately([(503, "SlowDown"), "reset"])
    options = {"compute_once": 3, **FAST_FAILURE}
    cached = Memory(location, verbose=0, backend_options=options).cache(slow_square)
    monkeypatch.setenv("SLOW_SECONDS", "0")
    assert cached(0) == 0
    monkeypatch.setenv("SLOW_SECONDS", "1.5")
    joblib_store._wait_for_background_requests()
    if request_name == "renew and release":
        matches = LEASE_REQUESTS["take"]
        taken = []

        def fault(operation, path, query):
            # The lease is taken, then every later PUT of it fails.
            if matches(operation, path, query):
                taken.append(path)
                return answer() if len(taken) > 1 else None
            return None
    else:
        matches = LEASE_REQUESTS[request_name]

        def fault(operation, path, query):
            return answer() if matches(operation, path, query) else None

    s3_server.faults.append(fault)
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        threads = [threading.Thread(target=lambda: values.append(cached(7))) for _ in range(2)]
        other = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import os, warnings
            os.environ["COMPUTED_LOG"] = {str(computed_log)!r}
            warnings.simplefilter("ignore")
            from joblib import Memory
            import test_joblib_store as t
            cached = Memory({location!r}, verbose=0, backend_options={options!r}).cache(t.slow_square)
            print(cached(7))
        """)], cwd=HERE, env={**os.environ, "PYTHONPATH": HERE}, stdout=subprocess.PIPE, text=True)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert other.communicate(timeout=60)[0].strip() == "49"
    assert values == [49, 49]
    assert 1 <= computations(computed_log).count("7") <= 3  # at worst, each computes
    s3_server.faults.clear()
    assert cached(7) == 49


@needs_conditional_writes
def test_threads_behind_a_call_that_could_not_take_its_lease_wait_for_it(
        location, s3_server, computed_log, monkeypatch):
    options = {"compute_once": 20, **FAST_FAILURE}
    cached = Memory(location, verbose=0, backend_options=options).cache(slow_square)
    monkeypatch.setenv("SLOW_SECONDS", "0")
    assert cached(0) == 0  # the function's code is stored, the probe made
    monkeypatch.setenv("SLOW_SECONDS", "1")
    joblib_store._wait_for_background_requests()
    take = LEASE_REQUESTS["take"]
    s3_server.faults.append(
        lambda operation, path, query: (503, "SlowDown") if take(operation, path, query) else None)
    with warnings.catch_warnings(), ThreadPoolExecutor(4) as pool:
        warnings.simplefilter("ignore")
        assert list(pool.map(cached, [6] * 4)) == [36] * 4
    assert computations(computed_log) == ["0", "6"]


@needs_conditional_writes
def test_a_lease_whose_answer_was_lost_is_taken_at_once_not_waited_for(
        location, s3_server, computed_log, monkeypatch):
    # The PUT landed; botocore sends it again and meets its own lease (412).
    cached = Memory(location, verbose=0, backend_options={"compute_once": 20}).cache(slow_square)
    monkeypatch.setenv("SLOW_SECONDS", "0")
    assert cached(0) == 0
    joblib_store._wait_for_background_requests()
    s3_server.faults.append(one_fault("PutObject", "lost", path_part="/lease"))
    with s3_server.recording() as requests, no_warnings():
        assert cached(5) == 25
        joblib_store._wait_for_background_requests()  # the lease, marked done
    lease_requests = [(r.operation, r.status) for r in requests if r.path.endswith("/lease")]
    assert lease_requests == [("PutObject", None), ("PutObject", 412), ("GetObject", 200),
                              ("PutObject", 200), ("PutObject", 200)]  # taken back, then done
    assert computations(computed_log) == ["0", "5"]


@needs_conditional_writes
def test_an_expired_entry_is_computed_once_by_the_threads_that_find_it(
        location, computed_log, monkeypatch):
    if JOBLIB_VERSION < (1, 3):
        pytest.skip(f"joblib {joblib.__version__} has no cache_validation_callback")
    from joblib.memory import expires_after

    cached = Memory(location, verbose=0, backend_options={"compute_once": 20}).cache(
        slow_square, cache_validation_callback=expires_after(seconds=2))
    monkeypatch.setenv("SLOW_SECONDS", "0")
    assert cached(2) == 4
    time.sleep(2.5)
    monkeypatch.setenv("SLOW_SECONDS", "1")
    values = []
    threads = [threading.Thread(target=lambda: values.append(cached(2))) for _ in range(3)]
    with no_warnings():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert values == [4] * 3 and computations(computed_log) == ["2", "2"]


@needs_conditional_writes
def test_compute_once_where_writes_are_not_conditional_warns_once_and_caches(
        site_memory, site, computed_log, monkeypatch):
    monkeypatch.setenv("SLOW_SECONDS", "0")
    memory = site_memory(backend_options={"compute_once": 10})
    cached = memory.cache(slow_square)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = [cached(x) for x in (1, 2, 1, 2)]
    assert values == [1, 4, 1, 4] and computations(computed_log) == ["1", "2"]
    about = [m for m in cache_warnings(caught) if "compute_once is not available" in m]
    assert len(about) == (1 if site.name == "s3rver" else 0), cache_warnings(caught)
