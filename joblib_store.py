"""Cache joblib.Memory results in Amazon S3 and S3-compatible object stores.

joblib_store is one file: install it with pip, or copy ``joblib_store.py``
into your project. It gives joblib a store backend that keeps the cache in a
bucket, so every process and every machine pointing at that bucket shares it::

    import joblib_store
    joblib_store.register_s3_store_backend()
    memory = joblib.Memory("s3://my-bucket/cache", compress=True)

It needs joblib >= 1.2 and s3fs. Credentials and the endpoint come from the
usual AWS chain (environment, ``~/.aws``, instance role, ``AWS_ENDPOINT_URL``)
unless given in ``backend_options``; see ``S3StoreBackend.configure``.

``python -m joblib_store --help`` lists commands to inspect (``ls``), prune
(``prune``) and clear (``clear``) a cache, and a self-contained ``demo``.

Cached values are pickles: whoever can write the bucket can run code in every
process that reads it. Use a bucket that only your jobs can write.

The module reads top to bottom, in these parts:

1. What the installed joblib offers (search "Breakpoint").
2. The layout of a cache in a bucket.
3. Options: what ``configure`` receives, parsed and validated into one
   immutable ``_StoreOptions``.
4. The bucket client: every request, the translation of errors into the
   exceptions users see, outages and warnings. Nothing joblib-specific.
5. Transfers: streaming readers and the multipart writer, the one place
   where byte ranges, parts and their concurrency live.
6. Local copies of results, and access records for least-recently-used
   eviction, each a small class owned by the store.
7. The store, ``S3StoreBackend``: joblib's backend contract on top of the
   parts above, and the failure policy, stated and applied in one place.
8. Registration with joblib.
9. The command line.

Copyright (c) 2026, the joblib-store developers. BSD 3-clause licence.
"""

__all__ = ["S3StoreBackend", "register_s3_store_backend"]
__version__ = "0.1.0"

import asyncio
import collections
import dataclasses
import datetime
import functools
import hashlib
import inspect
import io
import json
import os
import posixpath
import queue
import re
import shutil
import sys
import threading
import time
import uuid
import warnings
import zlib
from pickle import PicklingError

import joblib
import joblib.memory
from joblib import numpy_pickle
from joblib.disk import memstr_to_bytes
from joblib._store_backends import (
    CacheItemInfo,
    StoreBackendBase,
    StoreBackendMixin,
)
from joblib.logger import format_time

# --------------------------------------------------------------------------
# 1. What the installed joblib offers. Each check is made once, here; search
# for "Breakpoint" to find every difference between the joblib releases we
# support (1.2 to 1.6).
# --------------------------------------------------------------------------

try:
    from joblib._store_backends import CacheWarning
except ImportError:  # Breakpoint: joblib < 1.3 had no CacheWarning.

    class CacheWarning(Warning):
        """A cache operation failed; the result was computed anyway."""


# Breakpoint: joblib < 1.4 calls load_item(path, verbose, msg) with a ready
# message; later releases call load_item(call_id, verbose, timestamp, metadata).
_LOAD_ITEM_TAKES_MSG = (
    "msg" in inspect.signature(StoreBackendMixin.load_item).parameters
)

# Breakpoint: joblib < 1.3 evicts with reduce_store_size(bytes_limit); later
# releases with enforce_store_limits(bytes_limit, items_limit, age_limit).
_HAS_ENFORCE_STORE_LIMITS = hasattr(StoreBackendMixin, "enforce_store_limits")

# --------------------------------------------------------------------------
# 2. Layout of a cache in a bucket. It is joblib's folder layout, one object
# per file: <prefix>/<func_id>/func_code.py and <prefix>/<func_id>/<args_id>/
# {output.pkl, metadata.json}, where func_id may itself contain slashes.
# --------------------------------------------------------------------------

OUTPUT = "output.pkl"
METADATA = "metadata.json"
FUNC_CODE = "func_code.py"
_ITEM_NAMES = (OUTPUT, METADATA)
_ARGS_ID = re.compile(r"[a-f0-9]{32}")
_CONTENT_ID = "joblib-store-id"  # user metadata naming one written result

# --------------------------------------------------------------------------
# 3. Options. Everything configure receives is validated here, once, into a
# _StoreOptions; an error says what to fix.
# --------------------------------------------------------------------------

# S3's rules for bucket names: 3 to 63 lowercase letters, digits, dots and
# hyphens, starting and ending with a letter or a digit.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

_MiB = 2**20
# S3 takes 5 MiB to 5 GiB per part.
_MIN_PART_SIZE = 5 * _MiB
DEFAULT_PART_SIZE = 8 * _MiB
DEFAULT_MAX_CONCURRENCY = 3
DEFAULT_ACCESS_INTERVAL = 3600  # seconds between two access records of a result
DEFAULT_LOCAL_CACHE_BYTES_LIMIT = 10 * 2**30

# Options of ours, next to joblib's own (compress, mmap_mode) and the
# keywords of s3fs.S3FileSystem, which are read from s3fs itself.
_STORE_OPTIONS = (
    "bucket",
    "fs",
    "storage_options",
    "create_bucket",
    "part_size",
    "max_concurrency",
    "access_interval",
    "local_cache_dir",
    "local_cache_bytes_limit",
)
_JOBLIB_OPTIONS = ("compress", "mmap_mode")
_MMAP_MODES = (None, "r", "r+", "w+", "c")


def _s3fs():
    """Import s3fs on first use, so importing this module stays cheap."""
    import s3fs

    return s3fs


@functools.lru_cache(maxsize=None)
def _s3fs_option_names():
    """The keywords ``s3fs.S3FileSystem`` takes, from its signature."""
    s3fs = _s3fs()
    parameters = inspect.signature(s3fs.S3FileSystem.__init__).parameters
    names = {
        name
        for name, parameter in parameters.items()
        if parameter.kind is parameter.POSITIONAL_OR_KEYWORD and name != "self"
    }
    # Handled by its **kwargs: the AWS profile and fsspec's caching flags.
    names.update(
        ["profile", "skip_instance_cache", "use_listings_cache",
         "listings_expiry_time", "max_paths"]
    )
    # Threads and loops are ours to choose.
    names.difference_update(["asynchronous", "loop"])
    return frozenset(names)


@dataclasses.dataclass(frozen=True)
class _StoreOptions:
    """What a store was configured with, validated.

    ``storage_options`` (keywords for ``s3fs.S3FileSystem``, credentials
    among them) is left out of the repr.
    """

    bucket: str
    prefix: str
    compress: object = False
    mmap_mode: object = None
    storage_options: dict = dataclasses.field(default_factory=dict, repr=False)
    fs: object = dataclasses.field(default=None, repr=False)
    create_bucket: bool = False
    part_size: int = DEFAULT_PART_SIZE
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    access_interval: float = DEFAULT_ACCESS_INTERVAL
    local_cache_dir: object = None
    local_cache_bytes_limit: int = DEFAULT_LOCAL_CACHE_BYTES_LIMIT

    @property
    def location(self):
        """The cache's URL, ``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{self.prefix}"

    @classmethod
    def parse(cls, location, backend_options=None):
        """Validate what ``S3StoreBackend.configure`` received.

        Raises TypeError or ValueError with a message that says what to fix.
        """
        options = dict(backend_options or {})
        ours = {name: options.pop(name) for name in _STORE_OPTIONS + _JOBLIB_OPTIONS
                if name in options}
        unknown = sorted(set(options) - _s3fs_option_names())
        if unknown:
            valid = sorted(
                set(_STORE_OPTIONS) | set(_JOBLIB_OPTIONS) | _s3fs_option_names()
            )
            raise TypeError(
                f"unknown backend_options for the S3 store: {', '.join(unknown)}. "
                f"Valid options are: {', '.join(valid)}"
            )
        storage_options = ours.pop("storage_options", None) or {}
        if not isinstance(storage_options, dict):
            raise TypeError(
                f"storage_options must be a dict, not {type(storage_options).__name__}"
            )
        # s3fs keywords given directly join those in storage_options.
        storage_options = {**storage_options, **options}
        fs = ours.pop("fs", None)
        if fs is not None and storage_options:
            raise TypeError(
                "give either a ready S3FileSystem as fs, or options to build "
                f"one ({', '.join(sorted(storage_options))}), not both"
            )
        if fs is not None and not isinstance(fs, _s3fs().S3FileSystem):
            raise TypeError(f"fs must be an s3fs.S3FileSystem, not {type(fs).__name__}")
        compress = ours.pop("compress", False)
        _check_compress(compress)
        mmap_mode = ours.pop("mmap_mode", None)
        if mmap_mode not in _MMAP_MODES:
            raise ValueError(
                f"mmap_mode={mmap_mode!r} is not valid: use one of {_MMAP_MODES}"
            )
        part_size = ours.pop("part_size", DEFAULT_PART_SIZE)
        _check_positive_int("part_size", part_size, _MIN_PART_SIZE)
        max_concurrency = ours.pop("max_concurrency", DEFAULT_MAX_CONCURRENCY)
        _check_positive_int("max_concurrency", max_concurrency, 1)
        access_interval = _seconds(
            ours.pop("access_interval", DEFAULT_ACCESS_INTERVAL)
        )
        bytes_limit = ours.pop("local_cache_bytes_limit", DEFAULT_LOCAL_CACHE_BYTES_LIMIT)
        if isinstance(bytes_limit, str):
            bytes_limit = memstr_to_bytes(bytes_limit)
        _check_positive_int("local_cache_bytes_limit", bytes_limit, 0)
        local_cache_dir = ours.pop("local_cache_dir", None)
        if local_cache_dir is not None:
            local_cache_dir = os.fspath(local_cache_dir)
        elif mmap_mode is not None:
            local_cache_dir = _default_local_cache_dir()
        bucket, prefix = _parse_location(location, ours.pop("bucket", None))
        return cls(
            bucket=bucket,
            prefix=prefix,
            compress=compress,
            mmap_mode=mmap_mode,
            storage_options=storage_options,
            fs=fs,
            create_bucket=bool(ours.pop("create_bucket", False)),
            part_size=part_size,
            max_concurrency=max_concurrency,
            access_interval=access_interval,
            local_cache_dir=local_cache_dir,
            local_cache_bytes_limit=bytes_limit,
        )


def _parse_location(location, bucket=None):
    """Split a cache location into a bucket and a key prefix.

    Parameters
    ----------
    location : str
        ``s3://bucket/prefix``, or with ``bucket`` given, a prefix inside it
        (a leading slash is dropped, so ``/abs/cache`` stays in that bucket).
    bucket : str, optional
        The bucket named in ``backend_options``.

    Returns
    -------
    bucket, prefix : str
        The prefix has no leading or trailing slash.
    """
    if not isinstance(location, str):
        raise TypeError(
            f"an S3 cache location is a string such as 's3://bucket/prefix', "
            f"not {type(location).__name__}"
        )
    if bucket is not None and not isinstance(bucket, str):
        raise TypeError(f"the bucket option must be a str, not {type(bucket).__name__}")
    if location.lower().startswith("s3://"):
        url_bucket, _, prefix = location[5:].partition("/")
        if bucket is not None and url_bucket != bucket:
            raise ValueError(
                f"location {location!r} names bucket {url_bucket!r} but the "
                f"bucket option says {bucket!r}: give the bucket once"
            )
        if not url_bucket:
            raise ValueError(
                f"location {location!r} names no bucket: write it as "
                f"'s3://BUCKET/PREFIX'"
            )
        bucket = url_bucket
    elif bucket is None:
        raise ValueError(
            f"location {location!r} is not an S3 URL: write it as "
            f"'s3://BUCKET/PREFIX', or give backend_options={{'bucket': ...}}"
        )
    else:
        prefix = location
    if not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"bucket name {bucket!r} is not valid: S3 bucket names have 3 to "
            f"63 lowercase letters, digits, dots or hyphens"
        )
    prefix = "/".join(part for part in prefix.split("/") if part)
    if not prefix:
        # joblib.Memory appends "/joblib" to every string location, so an
        # empty prefix means the bucket itself came from "s3://" or similar.
        raise ValueError(
            f"location {location!r} has no bucket and prefix: write it as "
            f"'s3://BUCKET/PREFIX' (Memory('s3://') reads 'joblib' as the "
            f"bucket name)"
        )
    return bucket, prefix


def _check_compress(compress):
    """Raise a clear error now for a compress joblib would refuse later."""
    if not isinstance(compress, (bool, int, str, tuple)):
        raise TypeError(
            f"compress={compress!r} has the wrong type: use False, True, an "
            f"int level 0-9, a method name such as 'zlib', or a tuple such "
            f"as ('zlib', 3)"
        )
    try:
        numpy_pickle.dump(None, io.BytesIO(), compress=compress)
    except ValueError as error:
        raise ValueError(
            f"compress={compress!r} is not valid: use False, True, an int "
            f"level 0-9, a method name such as 'zlib', or a tuple such as "
            f"('zlib', 3) ({error})"
        ) from None


def _check_positive_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}={value} is too small: the minimum is {minimum}")


def _seconds(access_interval):
    """access_interval as seconds, from a number or a timedelta."""
    if isinstance(access_interval, datetime.timedelta):
        access_interval = access_interval.total_seconds()
    if isinstance(access_interval, bool) or not isinstance(access_interval, (int, float)):
        raise TypeError(
            f"access_interval must be seconds or a timedelta, not "
            f"{type(access_interval).__name__}"
        )
    if access_interval < 0:
        raise ValueError(f"access_interval={access_interval} must not be negative")
    return access_interval


def _default_local_cache_dir():
    """``$XDG_CACHE_HOME/joblib_store``, else ``~/.cache/joblib_store``."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return os.path.join(cache_home, "joblib_store")

# --------------------------------------------------------------------------
# 4. The bucket client. Every request goes through _BucketClient, which runs
# s3fs's aiobotocore client on s3fs's event loop thread and translates errors
# into the OSError subclasses joblib and users expect.
# --------------------------------------------------------------------------

_DELETE_BATCH = 1000  # keys per DeleteObjects request, S3's maximum
_LIST_PAGE = 1000  # keys per ListObjectsV2 page, S3's maximum
_SMALL_OBJECT = 1 * _MiB  # objects up to this size are read in one piece
_READ_CHUNK = 1 * _MiB
_BUCKET_CHECK_TIMEOUT = 8  # seconds, for the one check made by configure
_OFFLINE_PAUSE = 5.0  # seconds without requests after the endpoint was unreachable


def _error_code(error):
    response = getattr(error, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status


def _is_missing(error):
    code, status = _error_code(error)
    return status == 404 or code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound")


def _is_denied(error):
    code, status = _error_code(error)
    return status == 403 or code in ("403", "AccessDenied", "Forbidden")


def _is_unreachable(error):
    """Whether the endpoint could not be reached (after botocore's retries)."""
    botocore_exceptions = sys.modules.get("botocore.exceptions")
    if isinstance(error, (asyncio.TimeoutError, ConnectionError)):
        return True
    return botocore_exceptions is not None and isinstance(
        error,
        (botocore_exceptions.ConnectionError, botocore_exceptions.HTTPClientError),
    )


def _is_no_credentials(error):
    botocore_exceptions = sys.modules.get("botocore.exceptions")
    return botocore_exceptions is not None and isinstance(
        error,
        (
            botocore_exceptions.NoCredentialsError,
            botocore_exceptions.PartialCredentialsError,
        ),
    )


def _make_filesystem(storage_options):
    """An s3fs filesystem, retrying transient faults with backoff."""
    s3fs = _s3fs()
    options = dict(storage_options)
    config_kwargs = dict(options.get("config_kwargs") or {})
    # botocore's "standard" mode retries throttling, 5xx and dropped
    # connections with jittered backoff, and unlike its legacy mode it does
    # not spend minutes on an endpoint that refuses connections.
    config_kwargs.setdefault("retries", {"total_max_attempts": 4, "mode": "standard"})
    options["config_kwargs"] = config_kwargs
    return s3fs.S3FileSystem(**options)


# Buckets this process has already checked, and the filesystem each was
# reached with, so that a store configured from a location alone (joblib
# does that) reaches the cache the same way as the first one.
_CHECKED_BUCKETS = set()
_FILESYSTEM_BY_BUCKET = {}


class _BucketClient:
    """Requests to one bucket, with errors users can act on.

    Parameters
    ----------
    fs : s3fs.S3FileSystem
        Its aiobotocore client and event loop carry the requests.
    bucket : str
    location : str
        The cache's URL, named in warnings.
    """

    def __init__(self, fs, bucket, location):
        self.fs = fs
        self.bucket = bucket
        self.location = location
        self._warned = set()
        self._offline_until = 0.0

    @classmethod
    def for_options(cls, options, previous=None):
        """The client a store configured with options uses.

        A store configured from a location alone (as joblib does) reaches
        the bucket the way the last store configured for it in this process
        did; ``previous``, the store's own client, is kept as is.
        """
        fs = options.fs
        if fs is None:
            if options.storage_options:
                fs = _make_filesystem(options.storage_options)
            elif previous is not None and previous.bucket == options.bucket:
                fs = previous.fs
            else:
                fs = _FILESYSTEM_BY_BUCKET.get(options.bucket) or _make_filesystem({})
        return cls(fs, options.bucket, options.location)

    def __getstate__(self):
        # The filesystem pickles as its options (fsspec re-creates it), so
        # the store works in a joblib worker without being configured again.
        state = self.__dict__.copy()
        state["_warned"] = set()
        state["_offline_until"] = 0.0
        return state

    @property
    def endpoint(self):
        """The URL requests go to (never with credentials)."""
        try:
            return self.fs.s3.meta.endpoint_url
        except Exception:
            return self.fs.endpoint_url or "the default AWS endpoint"

    @property
    def loop(self):
        """The event loop the requests run on."""
        return self.fs.loop

    def url(self, key):
        return f"s3://{self.bucket}/{key}"

    # ------------------------------------------------------------ the bucket

    def check_bucket(self, prefix, create_bucket):
        """Fail early and clearly when the bucket cannot be used."""
        checked = (self.endpoint, self.bucket)
        if checked not in _CHECKED_BUCKETS:
            try:
                self.call("head_bucket", timeout=_BUCKET_CHECK_TIMEOUT)
            except Exception as error:
                if _is_missing(error) and create_bucket:
                    self._create_bucket(prefix)
                else:
                    raise self.bucket_error(error, prefix) from None
            _CHECKED_BUCKETS.add(checked)
        _FILESYSTEM_BY_BUCKET[self.bucket] = self.fs

    def _create_bucket(self, prefix):
        region = self.fs.s3.meta.region_name
        configuration = {}
        if region and region != "us-east-1":
            configuration = {
                "CreateBucketConfiguration": {"LocationConstraint": region}
            }
        try:
            self.call("create_bucket", **configuration)
        except Exception as error:
            raise self.bucket_error(error, prefix) from None

    def bucket_error(self, error, prefix):
        """The exception that tells a user why the bucket cannot be used."""
        where = f"bucket {self.bucket!r} at endpoint {self.endpoint}"
        if _is_missing(error):
            return FileNotFoundError(
                f"{where} does not exist: create it (for example with "
                f"'aws s3 mb s3://{self.bucket}'), correct the name, or pass "
                f"backend_options={{'create_bucket': True}}"
            )
        if _is_denied(error):
            return PermissionError(
                f"access to {where} is denied: use credentials that may list "
                f"and write s3://{self.bucket}/{prefix} (an AWS profile, "
                f"the AWS_* environment variables, or the key and secret options)"
            )
        if _is_no_credentials(error):
            return PermissionError(
                f"no AWS credentials were found for {where}: set "
                f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, use a profile, "
                f"or pass anon=True for a public bucket"
            )
        if _is_unreachable(error):
            return ConnectionError(
                f"cannot reach {where}: check endpoint_url (or "
                f"AWS_ENDPOINT_URL) and that the server is up"
            )
        return OSError(f"cannot use {where}: {error}")

    # -------------------------------------------------------------- requests

    async def _request(self, method, **kwargs):
        client = await self.fs.set_session()
        bound = getattr(client, method)
        # s3fs adds its s3_additional_kwargs (encryption, requester pays) to
        # every request, keeping only those this method accepts.
        kwargs = self.fs._get_s3_method_kwargs(bound, Bucket=self.bucket, **kwargs)
        return await bound(**kwargs)

    def run(self, coroutine, timeout=None):
        """Run a coroutine on s3fs's loop, pausing requests while offline.

        After the endpoint proved unreachable (botocore has already retried),
        requests fail at once for a few seconds instead of each waiting out
        its own retries, so that an outage slows a computation only once.
        """
        if time.monotonic() < self._offline_until:
            coroutine.close()
            raise ConnectionError(f"the S3 endpoint {self.endpoint} was unreachable moments ago")
        if timeout is not None:
            coroutine = asyncio.wait_for(coroutine, timeout)
        try:
            result = asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()
        except Exception as error:
            if _is_unreachable(error):
                self._offline_until = time.monotonic() + _OFFLINE_PAUSE
            raise
        if self._offline_until:
            # Back online: warn again about the next outage.
            self._offline_until = 0.0
            self._warned.clear()
        return result

    def submit(self, method, **kwargs):
        """Start one request on s3fs's loop; return a concurrent future."""
        return asyncio.run_coroutine_threadsafe(
            self._request(method, **kwargs), self.loop
        )

    def call(self, method, timeout=None, **kwargs):
        """Make one request and wait for its response."""
        return self.run(self._request(method, **kwargs), timeout=timeout)

    async def _get_body(self, key):
        response = await self._request("get_object", Key=key)
        body = response.pop("Body")
        if response.get("ContentLength", 0) <= _SMALL_OBJECT:
            try:
                return io.BytesIO(await body.read()), response
            finally:
                body.close()
        return body, response

    def get(self, key):
        """Open one object for reading with a single GET.

        A small object is read at once; a large one is streamed. A missing
        key raises FileNotFoundError.

        Returns
        -------
        stream, response
            A binary file object, and the response's headers (size, ETag,
            LastModified, Metadata).
        """
        try:
            body, response = self.run(self._get_body(key))
        except Exception as error:
            if _is_missing(error):
                raise FileNotFoundError(f"{self.url(key)} does not exist") from None
            raise
        if not isinstance(body, io.BytesIO):
            reader = _StreamingReader(self.loop, body, prefetch=4 * _READ_CHUNK)
            body = io.BufferedReader(reader, buffer_size=_READ_CHUNK)
        return body, response

    def put(self, key, data, metadata=None):
        extra = {"Metadata": metadata} if metadata else {}
        return self.call("put_object", Key=key, Body=data, **extra)

    def head(self, key):
        """HEAD one key: its response, or None when it does not exist."""
        try:
            return self.call("head_object", Key=key)
        except Exception as error:
            if _is_missing(error):
                return None
            raise

    def any_under(self, prefix):
        """Whether any object's key starts with prefix (one request)."""
        page = self.call("list_objects_v2", Prefix=prefix, MaxKeys=1)
        return bool(page.get("KeyCount", 0))

    def list(self, prefix):
        """Every object under a key prefix, one request per 1000 keys."""
        objects = []
        kwargs = {"Prefix": prefix, "MaxKeys": _LIST_PAGE}
        while True:
            page = self.call("list_objects_v2", **kwargs)
            objects.extend(page.get("Contents", ()))
            if not page.get("IsTruncated"):
                return objects
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def delete(self, keys):
        """Delete keys, 1000 per request; a missing key is not an error."""
        keys = list(keys)
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start:start + _DELETE_BATCH]
            response = self.call(
                "delete_objects",
                Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
            )
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise OSError(
                    f"could not delete {len(errors)} of {len(batch)} objects in "
                    f"s3://{self.bucket}, first {self.url(first.get('Key'))}: "
                    f"{first.get('Code')} {first.get('Message')}"
                )

    def copy(self, source_key, key, **kwargs):
        """Copy an object inside the bucket (no byte leaves S3)."""
        return self.call(
            "copy_object", Key=key,
            CopySource={"Bucket": self.bucket, "Key": source_key}, **kwargs
        )

    # -------------------------------------------------------------- warnings

    def warn_failure(self, operation, error, stacklevel=4):
        """Warn once per kind of failure; the computation goes on."""
        kind = (operation, "unreachable" if _is_unreachable(error) else type(error).__name__)
        if kind in self._warned:
            return
        self._warned.add(kind)
        warnings.warn(
            f"joblib_store could not {operation} in {self.location} (endpoint "
            f"{self.endpoint}): {type(error).__name__}: {error}. The result "
            f"is still computed and returned.",
            CacheWarning,
            stacklevel=stacklevel,
        )

# --------------------------------------------------------------------------
# 5. Transfers: results stream to and from S3 as they are pickled and
# unpickled, with bounded memory. Byte ranges, parts and their concurrency
# live here and nowhere else.
# --------------------------------------------------------------------------

# S3 takes up to 5 GiB per part and 10 000 parts per upload.
_MAX_PART_SIZE = 5 * 2**30
_MAX_PARTS = 10_000
# Part sizes double every 1000 parts, so that 8 MiB parts still reach
# several TiB within S3's part count, while small results stay cheap.
_PARTS_PER_SIZE = 1000
_ZLIB_STEP = 1 * _MiB  # bytes compressed or inflated per zlib call
_INFLATE_AHEAD = 8  # inflated steps kept ready for the unpickler
_ZLIB_PREFIX = b"\x78"  # how joblib recognises a zlib-compressed pickle


def _zlib_level(compress):
    """The zlib level joblib would use for compress, or None if not zlib."""
    if compress is True:
        return 3  # joblib's default level for zlib
    if isinstance(compress, tuple):
        method, level = compress
        if method == "zlib" and level:
            return level
        return 3 if method == "zlib" and level is None else None
    if compress == "zlib":
        return 3
    if isinstance(compress, int) and not isinstance(compress, bool) and compress > 0:
        return compress
    return None


def _dump(item, writer, compress):
    """Pickle item into writer as joblib would with compress.

    zlib is done here, a step at a time, so compressing overlaps the upload;
    other methods are joblib's own.
    """
    zlib_level = _zlib_level(compress)
    if zlib_level is None:
        numpy_pickle.dump(item, writer, compress=compress)
    else:
        deflating = _DeflatingWriter(writer, zlib_level)
        numpy_pickle.dump(item, deflating, compress=0)
        deflating.finish()


def _load(stream):
    """Unpickle a result from a stream; a large zlib one inflates aside."""
    if isinstance(stream, io.BufferedReader) and stream.peek(1)[:1] == _ZLIB_PREFIX:
        stream = io.BufferedReader(_InflatingReader(stream), buffer_size=_MiB)
    with stream:
        return numpy_pickle.load(stream)


class _StreamingReader(io.RawIOBase):
    """Read the body of one GET while the next bytes are still arriving.

    A task on s3fs's event loop pulls the body into a queue of at most
    ``prefetch`` bytes, and ``readinto`` takes from it: unpickling overlaps
    the transfer, and memory stays bounded whatever the object's size.
    """

    def __init__(self, loop, body, prefetch):
        super().__init__()
        self._loop = loop
        self._body = body
        self._prefetch = prefetch
        self._chunks = collections.deque()
        self._buffered = 0
        self._position = 0
        self._finished = False
        self._error = None
        self._changed = threading.Condition()
        self._room = None
        self._task = asyncio.run_coroutine_threadsafe(self._pump(), loop)

    async def _pump(self):
        self._room = asyncio.Event()
        try:
            while not self.closed:
                chunk = await self._body.read(_READ_CHUNK)
                with self._changed:
                    if chunk:
                        self._chunks.append(memoryview(chunk))
                        self._buffered += len(chunk)
                    else:
                        self._finished = True
                    self._changed.notify_all()
                    full = self._buffered >= self._prefetch
                    if full:
                        self._room.clear()
                if not chunk:
                    return
                if full:
                    await self._room.wait()
        except BaseException as error:  # handed to the reading thread
            with self._changed:
                self._error = error
                self._finished = True
                self._changed.notify_all()
            if not isinstance(error, Exception):
                raise

    def readable(self):
        return True

    def readinto(self, buffer):
        target = memoryview(buffer).cast("B")
        filled = 0
        with self._changed:
            while not self._chunks and not self._finished:
                self._changed.wait()
            if self._error is not None and not self._chunks:
                raise OSError(f"reading from S3 failed: {self._error}") from self._error
            while self._chunks and filled < len(target):
                chunk = self._chunks[0]
                size = min(len(chunk), len(target) - filled)
                target[filled:filled + size] = chunk[:size]
                filled += size
                if size == len(chunk):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = chunk[size:]
            self._buffered -= filled
        self._position += filled
        if self._room is not None:
            self._loop.call_soon_threadsafe(self._room.set)
        return filled

    def tell(self):
        return self._position

    def close(self):
        if not self.closed:
            super().close()
            if not self._task.done():
                self._loop.call_soon_threadsafe(self._task.cancel)
                if self._room is not None:
                    self._loop.call_soon_threadsafe(self._room.set)
            # Closing releases the connection, also when unread bytes remain.
            self._loop.call_soon_threadsafe(self._body.close)


class _DeflatingWriter(io.RawIOBase):
    """Compress into a zlib stream that joblib reads, a step at a time.

    joblib's own zlib file compresses each 16 MiB chunk of an array in one
    call, holding the chunk and its compressed copy at once; here each call
    takes 1 MiB, so the compressed bytes flow to the upload as they come.
    The stream is the one joblib writes for ("zlib", level).
    """

    def __init__(self, raw, level):
        super().__init__()
        self._raw = raw
        self._compressor = zlib.compressobj(
            level, zlib.DEFLATED, zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL, 0
        )
        self._position = 0

    def writable(self):
        return True

    def tell(self):
        # The uncompressed position, as joblib's file reports it: the
        # pickler aligns arrays on it.
        return self._position

    def write(self, data):
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _ZLIB_STEP):
            compressed = self._compressor.compress(view[start:start + _ZLIB_STEP])
            if compressed:
                self._raw.write(compressed)
        self._position += len(view)
        return len(view)

    def finish(self):
        """Write the end of the zlib stream."""
        self._raw.write(self._compressor.flush())


class _InflatingReader(io.RawIOBase):
    """Inflate a zlib stream in a thread of its own, ahead of the reader.

    zlib releases the GIL, so downloading (on s3fs's loop), inflating (here)
    and unpickling (in the caller) overlap; at most ``_INFLATE_AHEAD`` steps
    wait in between.
    """

    def __init__(self, raw):
        super().__init__()
        self._raw = raw
        self._ready = queue.Queue(maxsize=_INFLATE_AHEAD)
        self._pending = memoryview(b"")
        self._finished = False
        self._thread = threading.Thread(target=self._inflate, daemon=True)
        self._thread.start()

    def _hand_over(self, item):
        while not self.closed:
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _inflate(self):
        inflater = zlib.decompressobj(zlib.MAX_WBITS)
        try:
            while not inflater.eof:
                compressed = self._raw.read(_ZLIB_STEP)
                if not compressed:
                    raise EOFError("the compressed result ends before its end")
                while compressed:
                    data = inflater.decompress(compressed, _ZLIB_STEP)
                    if data and not self._hand_over(data):
                        return
                    compressed = inflater.unconsumed_tail
            self._hand_over(None)
        except BaseException as error:  # handed to the reading thread
            self._hand_over(error)

    def readable(self):
        return True

    def readinto(self, buffer):
        target = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(target):
            if not self._pending:
                if self._finished:
                    break
                if filled and self._ready.empty():
                    break  # return what is here rather than wait
                item = self._ready.get()
                if item is None:
                    self._finished = True
                    break
                if isinstance(item, BaseException):
                    self._finished = True
                    raise OSError(f"reading a compressed result failed: {item}") from item
                self._pending = memoryview(item)
            size = min(len(self._pending), len(target) - filled)
            target[filled:filled + size] = self._pending[:size]
            self._pending = self._pending[size:]
            filled += size
        return filled

    def close(self):
        if not self.closed:
            super().close()
            self._raw.close()


class _PartBody(io.RawIOBase):
    """The bytes of one uploaded part, read in place.

    Given bytes, aiohttp would write a part in one go, and asyncio would keep
    a second copy of what the socket did not take at once; read from a file
    object, it is sent in small pieces.
    """

    def __init__(self, data):
        super().__init__()
        self._view = memoryview(data)
        self._position = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer):
        start = self._position
        size = max(0, min(len(buffer), len(self._view) - start))
        buffer[:size] = self._view[start:start + size]
        self._position += size
        return size

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}
        self._position = base[whence] + offset
        return self._position

    def tell(self):
        return self._position

    def __len__(self):
        return len(self._view)


class _MultipartWriter(io.RawIOBase):
    """Write one S3 object as it is produced, never holding all of it.

    Bytes gather until a part is full; then the part uploads in the
    background while the writer goes on (so compression and transfer
    overlap), with at most ``max_concurrency`` parts' worth of bytes in
    flight (joblib hands over arrays 16 MiB at a time, so a part can be
    larger than ``part_size``). A result
    smaller than one part costs a single PUT. Nothing is visible in the
    bucket until ``close`` completes the upload; ``abort`` (or an error)
    aborts it, so no parts are left billed.
    """

    def __init__(self, client, key, part_size, max_concurrency, metadata=None):
        super().__init__()
        self._client = client
        self._key = key
        self._metadata = {"Metadata": metadata} if metadata else {}
        self._part_size = part_size
        self._max_concurrency = max_concurrency
        self._chunks = []
        self._buffered = 0
        self._written = 0
        self._upload_id = None
        self._in_flight = collections.deque()
        self._in_flight_bytes = 0
        self._parts = []

    def writable(self):
        return True

    def tell(self):
        return self._written

    def write(self, data):
        if self.closed:
            raise ValueError("write to a closed S3 object")
        # bytes(...) is free for bytes, and copies buffers the caller may reuse.
        chunk = data if isinstance(data, bytes) else bytes(data)
        if chunk:
            self._chunks.append(chunk)
            self._buffered += len(chunk)
            self._written += len(chunk)
            if self._buffered >= self._current_part_size():
                self._send_part()
        return len(chunk)

    def _current_part_size(self):
        doublings = len(self._parts) // _PARTS_PER_SIZE
        return min(self._part_size << doublings, _MAX_PART_SIZE)

    def _take_buffer(self):
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = []
        self._buffered = 0
        return data

    def _send_part(self):
        client = self._client
        if self._upload_id is None:
            response = client.call(
                "create_multipart_upload", Key=self._key, **self._metadata
            )
            self._upload_id = response["UploadId"]
        part_number = len(self._parts) + 1
        if part_number > _MAX_PARTS:
            raise OSError(
                f"the result is too large for one S3 object with "
                f"part_size={self._part_size}: raise part_size"
            )
        data = self._take_buffer()
        # At most max_concurrency parts' worth of bytes in flight (joblib
        # writes arrays 16 MiB at a time, so parts may be larger than asked).
        budget = self._max_concurrency * self._current_part_size()
        while self._in_flight and self._in_flight_bytes + len(data) > budget:
            self._finish_oldest_part()
        self._parts.append(None)
        future = client.submit(
            "upload_part",
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=part_number,
            Body=_PartBody(data),
        )
        self._in_flight.append((part_number, len(data), future))
        self._in_flight_bytes += len(data)

    def _finish_oldest_part(self):
        part_number, size, future = self._in_flight.popleft()
        self._in_flight_bytes -= size
        response = future.result()
        self._parts[part_number - 1] = {
            "PartNumber": part_number,
            "ETag": response["ETag"],
        }

    def close(self):
        """Make the object visible in the bucket, or abort on any error."""
        if self.closed:
            return
        try:
            if self._upload_id is None:
                self._client.call(
                    "put_object",
                    Key=self._key,
                    Body=self._take_buffer() if self._chunks else b"",
                    **self._metadata,
                )
            else:
                if self._chunks:
                    self._send_part()
                while self._in_flight:
                    self._finish_oldest_part()
                self._client.call(
                    "complete_multipart_upload",
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
        except BaseException:
            self.abort()
            raise
        super().close()

    def abort(self):
        """Forget what was written; nothing of it stays in the bucket."""
        if self.closed:
            return
        super().close()
        self._chunks = []
        for _, _, future in self._in_flight:
            future.cancel()
        for _, _, future in self._in_flight:
            try:
                future.result()
            except BaseException:
                pass
        self._in_flight.clear()
        if self._upload_id is not None:
            try:
                self._client.call(
                    "abort_multipart_upload", Key=self._key, UploadId=self._upload_id
                )
            except Exception as error:
                self._client.warn_failure("abort a multipart upload", error)


# --------------------------------------------------------------------------
# 6. Local copies of results, and access records. Each is a small part the
# store owns; neither knows about joblib.
# --------------------------------------------------------------------------


def _version_of(response):
    """The name of the result version in a HEAD or GET response."""
    version = (response.get("Metadata") or {}).get(_CONTENT_ID) or response["ETag"]
    return re.sub(r"[^A-Za-z0-9-]", "", version)


def _remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


class _LocalCopies:
    """Local files holding results, for memory-mapped and read-through hits.

    A copy is used only while it is the object S3 holds now: its name is the
    result's version, which every existence check returns, so a rewritten
    result is downloaded again. Downloads go to a temporary name first, so no
    half-written file is ever mapped. The copies take at most ``bytes_limit``
    bytes, the least recently used going first.
    """

    def __init__(self, client, folder, bytes_limit):
        self.client = client
        self.folder = folder
        self.bytes_limit = bytes_limit

    def fetch(self, key, head, report):
        """The path of a local copy of the object at key, and its headers.

        Parameters
        ----------
        key : str
        head : dict
            A response to a HEAD (or GET) of key, made just now.
        report : callable
            ``report(size, started)`` is called after a download.
        """
        folder = self._folder(key)
        path = os.path.join(folder, _version_of(head) + ".pkl")
        if os.path.exists(path):
            os.utime(path)  # the local copies are evicted least recently used
            return path, head
        os.makedirs(folder, mode=0o700, exist_ok=True)
        started = time.perf_counter()
        stream, response = self.client.get(key)
        # Named after what was downloaded, should it have changed since.
        path = os.path.join(folder, _version_of(response) + ".pkl")
        partial = f"{path}.{uuid.uuid4().hex}.part"
        try:
            with stream, open(partial, "wb") as local_file:
                shutil.copyfileobj(stream, local_file, _MiB)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        report(response.get("ContentLength", 0), started)
        for name in os.listdir(folder):
            if name != os.path.basename(path) and not name.endswith(".part"):
                _remove_quietly(os.path.join(folder, name))
        self.evict(keep=path)
        return path, response

    def _folder(self, key):
        where = f"{self.client.endpoint}\n{self.client.bucket}\n{key}".encode("utf-8")
        return os.path.join(self.folder, hashlib.sha256(where).hexdigest()[:32])

    def evict(self, keep=None):
        """Keep the local copies under the bytes limit, LRU first."""
        copies = []
        with os.scandir(self.folder) as folders:
            for folder in folders:
                if not folder.is_dir():
                    continue
                with os.scandir(folder.path) as files:
                    for entry in files:
                        if entry.name.endswith(".pkl"):
                            stat = entry.stat()
                            copies.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in copies)
        for _, size, path in sorted(copies):
            if total <= self.bytes_limit:
                break
            if path != keep:
                _remove_quietly(path)
                total -= size

    def drop(self, keys):
        """Forget the copies of the results at keys (they were deleted)."""
        for key in keys:
            if key.endswith("/" + OUTPUT):
                shutil.rmtree(self._folder(key), ignore_errors=True)


_RECORDABLE = 5 * 2**30  # CopyObject's limit: larger results keep their write time


class _AccessRecords:
    """Note in S3 when results are used, for least-recently-used eviction.

    S3 keeps no access time, so a hit refreshes the result's LastModified by
    copying the object onto itself, inside S3 (no byte travels), in the
    background, at most once per ``interval`` seconds: the GET that loaded
    the result tells when it last changed. Listing then gives every result's
    last access for free, and results written by anything else count as
    accessed when written. The copy is made only if the object is still the
    one loaded (its ETag).
    """

    def __init__(self, client, interval):
        self.client = client
        self.interval = interval

    def record(self, key, response):
        """Record a hit on the result at key, loaded with response, if due."""
        last_modified = response.get("LastModified")
        size = response.get("ContentLength", 0)
        if last_modified is None or size > _RECORDABLE:
            return
        if time.time() - last_modified.timestamp() < self.interval:
            return
        metadata = dict(response.get("Metadata") or {})
        metadata["joblib-store-accessed"] = str(int(time.time()))
        future = self.client.submit(
            "copy_object",
            Key=key,
            CopySource={"Bucket": self.client.bucket, "Key": key},
            CopySourceIfMatch=response["ETag"],
            MetadataDirective="REPLACE",
            Metadata=metadata,
            ContentType=response.get("ContentType") or "binary/octet-stream",
        )
        _track_background_request(future)


_BACKGROUND_REQUESTS = set()
_BACKGROUND_LOCK = threading.Lock()
_EXIT_WAIT_REGISTERED = False
_EXIT_WAIT = 5.0  # seconds the interpreter waits at exit for access records


def _track_background_request(future):
    """Keep a request that nobody waits for, so that exit waits for it."""
    global _EXIT_WAIT_REGISTERED
    with _BACKGROUND_LOCK:
        if not _EXIT_WAIT_REGISTERED:
            import atexit

            atexit.register(_wait_for_background_requests)
            _EXIT_WAIT_REGISTERED = True
        _BACKGROUND_REQUESTS.add(future)

    def forget(done):
        with _BACKGROUND_LOCK:
            _BACKGROUND_REQUESTS.discard(done)
        if not done.cancelled():
            done.exception()  # a lost access record is not worth a warning

    future.add_done_callback(forget)


def _wait_for_background_requests(timeout=_EXIT_WAIT):
    """Wait for pending access records (at exit, or in tests)."""
    import concurrent.futures

    with _BACKGROUND_LOCK:
        pending = list(_BACKGROUND_REQUESTS)
    concurrent.futures.wait(pending, timeout=timeout)

# --------------------------------------------------------------------------
# 7. The store: joblib's StoreBackendBase and StoreBackendMixin on top of
# the parts above.
# --------------------------------------------------------------------------

_BIG_TRANSFER = 8 * _MiB  # at verbose >= 10, transfers above this are reported


class _LazyMetadata(dict):
    """The metadata of one cached call, downloaded when first read.

    joblib asks for an item's metadata on every cache hit but reads it only
    when a ``cache_validation_callback`` is set, so a hit without one costs
    no request for it. It behaves as a plain dict, and pickles as one.
    """

    def __init__(self, fetch):
        super().__init__()
        self._fetch = fetch

    def _load(self):
        fetch, self._fetch = self._fetch, None
        if fetch is not None:
            dict.update(self, fetch())

    def __reduce__(self):
        self._load()
        return dict, (dict(self.items()),)


def _loading_first(name):
    method = getattr(dict, name)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self._load()
        return method(self, *args, **kwargs)

    return wrapper


for _name in (
    "__getitem__", "__contains__", "__iter__", "__len__", "__repr__",
    "__eq__", "__ne__", "__setitem__", "__delitem__", "get", "keys",
    "values", "items", "copy", "update", "setdefault", "pop", "popitem",
    "clear",
):
    setattr(_LazyMetadata, _name, _loading_first(_name))
del _name



class S3StoreBackend(StoreBackendBase, StoreBackendMixin):
    """A joblib store backend that keeps the cache in an S3 bucket.

    Results are written straight to their final key (an S3 PUT is atomic), as
    one PUT or a streamed multipart upload, and read with one streamed GET.
    A cache hit costs a HEAD and a GET; see the README for every operation.
    """

    location = None
    verbose = 0
    compress = False
    mmap_mode = None

    # ---------------------------------------------------------------- setup

    def configure(self, location, verbose=0, backend_options=None):
        """Point the backend at a bucket and prefix, and check the bucket.

        Parameters
        ----------
        location : str
            ``s3://bucket/prefix``; or a prefix, with the ``bucket`` option.
        verbose : int
            joblib's verbosity.
        backend_options : dict, optional
            ``bucket``; ``storage_options`` (a dict for
            ``s3fs.S3FileSystem``) or any of its keywords given directly
            (``endpoint_url``, ``key``, ``secret``, ``token``, ``profile``,
            ``anon``, ``client_kwargs``, ``config_kwargs``,
            ``s3_additional_kwargs``, ...); ``fs``, a ready
            ``S3FileSystem``; ``create_bucket`` (default False);
            ``part_size`` (bytes per uploaded part, default 8 MiB) and
            ``max_concurrency`` (parts' worth of bytes in flight, default 3);
            ``access_interval`` (seconds or a timedelta, default one hour:
            how stale a result's last-access time may get before a hit
            records it again; see ``_AccessRecords``); ``local_cache_dir``, a
            folder for local copies of results (used for every hit when given,
            and for memory-mapped hits, under ``$XDG_CACHE_HOME/joblib_store``
            by default, when ``mmap_mode`` is set); ``local_cache_bytes_limit``
            (default 10 GiB, or a string such as '500M'); and joblib's own
            ``compress`` and ``mmap_mode``.
        """
        options = _StoreOptions.parse(location, backend_options)
        client = _BucketClient.for_options(options, self.__dict__.get("_client"))
        client.check_bucket(options.prefix, options.create_bucket)
        self.options = options
        self.location = options.location
        self.compress = options.compress
        self.mmap_mode = options.mmap_mode
        self.verbose = verbose
        self._client = client
        self._local_copies = None
        if options.local_cache_dir is not None:
            self._local_copies = _LocalCopies(
                client, options.local_cache_dir, options.local_cache_bytes_limit
            )
        self._access_records = _AccessRecords(client, options.access_interval)

    @property
    def bucket(self):
        return self.options.bucket

    @property
    def prefix(self):
        return self.options.prefix

    @property
    def fs(self):
        """The s3fs filesystem that carries the requests."""
        return self._client.fs

    @property
    def endpoint(self):
        """The URL requests go to (never with credentials)."""
        return self._client.endpoint

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_heads", None)
        return state

    # ------------------------------------------------------- failure policy

    def _on_failure(self, operation, error):
        """Apply the failure policy to a failed S3 operation.

        A cached call never fails because of the store: whatever the store
        could not do (check, store, clear) is skipped with a CacheWarning,
        once per kind of failure, and the call computes and returns its
        result. Every path of the store that meets a failure comes here.
        """
        self._client.warn_failure(operation, error)

    # ---------------------------------------------------------------- keys

    def _key_of_url(self, url):
        """The key of an object named by its URL in this bucket."""
        store_root = f"s3://{self.bucket}/"
        if not url.startswith(store_root):
            raise ValueError(f"{url!r} is not in s3://{self.bucket}")
        return url[len(store_root):]

    def _key_of_call(self, call_id, *names):
        """The key of a file of a cached call (or function), by joblib's id."""
        return posixpath.join(self.prefix, *call_id, *names)

    # ----------------------------------------- StoreBackendBase primitives

    def _open_item(self, f, mode):
        """Open the object at a URL for reading ('rb') or writing ('wb')."""
        if mode == "rb":
            return self._client.get(self._key_of_url(f))[0]
        if mode == "wb":
            return io.BufferedWriter(
                _MultipartWriter(
                    self._client, self._key_of_url(f),
                    self.options.part_size, self.options.max_concurrency,
                ),
                buffer_size=_MiB,
            )
        raise ValueError(f"mode must be 'rb' or 'wb', not {mode!r}")

    def _item_exists(self, location):
        """Whether the object at a location, or any under a folder, exists."""
        return self._key_exists(self._key_of_url(location).rstrip("/"))

    def _key_exists(self, key):
        if posixpath.basename(key) in (OUTPUT, METADATA, FUNC_CODE):
            return self._client.head(key) is not None
        return self._client.any_under(key + "/")

    def _move_item(self, src, dst):
        """S3 has no rename: copy then delete (only for joblib's own callers)."""
        src_key, dst_key = self._key_of_url(src), self._key_of_url(dst)
        self._client.copy(src_key, dst_key)
        self._delete([src_key])

    def create_location(self, location):
        """Nothing to do: S3 has no folders."""

    def clear_location(self, location):
        """Delete every object under a location."""
        self._clear_prefix(self._key_of_url(location).rstrip("/"))

    def _clear_prefix(self, key_prefix):
        self._delete(obj["Key"] for obj in self._client.list(key_prefix + "/"))

    def _delete(self, keys):
        """Delete keys, and the local copies of the results among them."""
        keys = list(keys)
        if self._local_copies is not None:
            self._local_copies.drop(keys)
        self._client.delete(keys)

    def get_items(self):
        """Every cached result, as ``CacheItemInfo(path, size, last_access)``.

        One listing request per 1000 keys, nothing per item.
        """
        return [item for item, _ in self._list_items()]

    def _list_items(self):
        """Cached results and their keys, from one listing of the cache."""
        folders = collections.defaultdict(list)
        for obj in self._client.list(self.prefix + "/"):
            folder, _, name = obj["Key"].rpartition("/")
            if _ARGS_ID.fullmatch(posixpath.basename(folder)) and name in _ITEM_NAMES:
                folders[folder].append(obj)
        items = []
        for folder, objects in folders.items():
            size = sum(obj["Size"] for obj in objects)
            written = max(obj["LastModified"] for obj in objects)
            last_access = datetime.datetime.fromtimestamp(written.timestamp())
            item = CacheItemInfo(self._client.url(folder), size, last_access)
            items.append((item, [obj["Key"] for obj in objects]))
        return items

    # ------------------------------------------------------------ fast paths
    # Each overrides a StoreBackendMixin method where S3 can do better than
    # the generic code built on the primitives above.

    def contains_item(self, call_id):
        # One HEAD of the result; a missing key is a miss, never a listing.
        key = self._key_of_call(call_id, OUTPUT)
        try:
            head = self._client.head(key)
        except Exception as error:
            self._on_failure("check the cache", error)
            return False
        if head is not None and self._local_copies is not None:
            # The load that follows checks its local copy against this.
            self._remember_head(key, head)
        return head is not None

    def _remember_head(self, key, head):
        # Per thread, and only the latest check: older ones may be stale.
        if "_heads" not in self.__dict__:
            self._heads = threading.local()
        self._heads.latest = (key, head)

    def _fresh_head(self, key):
        """The HEAD this thread's last existence check got for key, once."""
        latest = getattr(self.__dict__.get("_heads"), "latest", None)
        if latest is None or latest[0] != key:
            return None
        self._heads.latest = None
        return latest[1]

    def _load_output(self, call_id):
        # No existence check before the GET: contains_item has just made it,
        # and a 404 says the same. (A local copy is checked against the
        # version that check returned.)
        key = self._key_of_call(call_id, OUTPUT)
        started = time.perf_counter()
        try:
            if self._local_copies is not None:
                head = self._fresh_head(key) or self._client.head(key)
                if head is None:
                    raise FileNotFoundError(key)
                path, response = self._local_copies.fetch(
                    key, head, functools.partial(self._report_transfer, "Loaded", key=key)
                )
                item = numpy_pickle.load(path, mmap_mode=self.mmap_mode)
            else:
                stream, response = self._client.get(key)
                item = _load(stream)
                self._report_transfer(
                    "Loaded", response.get("ContentLength", 0), started, key
                )
        except FileNotFoundError:
            # The words of joblib's own backend.
            raise KeyError(
                f"Non-existing item (may have been cleared).\n"
                f"File {self._client.url(key)} does not exist"
            ) from None
        self._access_records.record(key, response)
        return item

    def _report_transfer(self, verb, size, started, key):
        # At verbose >= 10, big transfers say how long they took.
        if self.verbose >= 10 and size > _BIG_TRANSFER:
            elapsed = max(time.perf_counter() - started, 1e-9)
            print(
                f"[Memory] {verb} {size / _MiB:.1f} MiB in {format_time(elapsed)} "
                f"({size / _MiB / elapsed:.1f} MiB/s): {self._client.url(key)}"
            )

    if _LOAD_ITEM_TAKES_MSG:
        # Breakpoint: joblib < 1.4 passes a path list and a ready message.
        def load_item(self, path, verbose=1, msg=None):
            """Load a cached result with one GET."""
            if verbose > 1:
                if verbose < 10:
                    print(f"{msg}...")
                else:
                    print(f"{msg} from {self._client.url(self._key_of_call(path))}")
            return self._load_output(path)

    else:

        def load_item(self, call_id, verbose=1, timestamp=None, metadata=None):
            """Load a cached result with one GET."""
            if verbose > 1:
                print(self._load_message(call_id, verbose, timestamp, metadata))
            return self._load_output(call_id)

        def _load_message(self, call_id, verbose, timestamp, metadata):
            # The same words as joblib's own backend.
            elapsed = ""
            if timestamp is not None:
                elapsed = "{: <16}".format(format_time(time.time() - timestamp))
            signature = posixpath.basename(call_id[0])
            if metadata is not None and "input_args" in metadata:
                arguments = ", ".join(
                    f"{name}={value}"
                    for name, value in metadata["input_args"].items()
                )
                signature += f"({arguments})"
            message = f"[Memory]{elapsed}: Loading {signature}"
            if verbose < 10:
                return f"{message}..."
            return f"{message} from {self._client.url(self._key_of_call(call_id))}"

    def dump_item(self, call_id, item, verbose=1):
        # Streamed straight to the final key: no temporary object, no copy.
        key = self._key_of_call(call_id, OUTPUT)
        if verbose > 10:
            print(f"Persisting in {self._client.url(posixpath.dirname(key))}")
        started = time.perf_counter()
        stream = _MultipartWriter(
            self._client, key, self.options.part_size, self.options.max_concurrency,
            # Names this very result, so local copies can tell versions apart
            # (an ETag changes when an access record copies the object).
            metadata={_CONTENT_ID: uuid.uuid4().hex},
        )
        try:
            _dump(item, stream, self.compress)
            stream.close()
            self._report_transfer("Stored", stream.tell(), started, key)
        except PicklingError as error:
            stream.abort()
            warnings.warn(
                f"Unable to cache to S3: the result cannot be pickled ({error}). "
                f"It is returned but not stored.",
                CacheWarning,
                stacklevel=2,
            )
        except Exception as error:
            stream.abort()
            self._on_failure("store a result", error)

    def get_metadata(self, call_id):
        # Fetched only if read: a hit without a validation callback skips it.
        key = self._key_of_call(call_id, METADATA)

        def fetch():
            try:
                stream, _ = self._client.get(key)
                with stream:
                    return json.loads(stream.read().decode("utf-8"))
            except Exception:
                return {}

        return _LazyMetadata(fetch)

    def store_metadata(self, call_id, metadata):
        try:
            self._client.put(
                self._key_of_call(call_id, METADATA), json.dumps(metadata).encode("utf-8")
            )
        except Exception as error:
            self._on_failure("store metadata", error)

    def clear_item(self, call_id):
        # The names are known: one DeleteObjects, no listing.
        try:
            self._delete(self._key_of_call(call_id, name) for name in _ITEM_NAMES)
        except Exception as error:
            self._on_failure("clear a result", error)

    def contains_path(self, call_id):
        # joblib's generic version calls a method that does not exist.
        return self._key_exists(self._key_of_call(call_id))

    def clear_path(self, call_id):
        # No existence check first: listing an empty prefix answers that.
        try:
            self._clear_prefix(self._key_of_call(call_id))
        except Exception as error:
            self._on_failure("clear a function's results", error)

    def store_cached_func_code(self, call_id, func_code=None):
        # Without code joblib only asks for a folder, which S3 does not need.
        if func_code is None:
            return
        try:
            self._client.put(self._key_of_call(call_id, FUNC_CODE), func_code.encode("utf-8"))
        except Exception as error:
            self._on_failure("store function code", error)

    def get_cached_func_code(self, call_id):
        # joblib treats any OSError as "no code stored yet", so every failure
        # becomes one: a cache that cannot be read is an empty cache.
        key = self._key_of_call(call_id, FUNC_CODE)
        try:
            stream, _ = self._client.get(key)
            with stream:
                return stream.read().decode("utf-8")
        except FileNotFoundError:
            raise
        except Exception as error:
            self._on_failure("read function code", error)
            raise OSError(f"cannot read {self._client.url(key)}: {error}") from error

    def clear(self):
        try:
            self._clear_prefix(self.prefix)
        except Exception as error:
            self._on_failure("clear the cache", error)

    def enforce_store_limits(self, bytes_limit, items_limit=None, age_limit=None):
        """Delete the least recently used results beyond the limits.

        One listing and one DeleteObjects per 1000 keys, whatever the number
        of items.
        """
        self._evict(bytes_limit, items_limit, age_limit)

    def _evict(self, bytes_limit=None, items_limit=None, age_limit=None, dry_run=False):
        """Delete (or with dry_run only find) the items beyond the limits."""
        if isinstance(bytes_limit, str):
            bytes_limit = memstr_to_bytes(bytes_limit)
        if age_limit is not None and age_limit.total_seconds() < 0:
            raise ValueError("age_limit has to be a positive timedelta")
        listed = self._list_items()
        listed.sort(key=lambda entry: entry[0].last_access)
        total_size = sum(item.size for item, _ in listed)
        extra_items = 0 if items_limit is None else len(listed) - items_limit
        extra_bytes = 0 if bytes_limit is None else total_size - bytes_limit
        deadline = None if age_limit is None else datetime.datetime.now() - age_limit

        doomed = []
        for item, keys in listed:
            too_old = deadline is not None and item.last_access < deadline
            if extra_items <= 0 and extra_bytes <= 0 and not too_old:
                break
            if self.verbose > 10:
                print(f"Deleting item {item}")
            doomed.append((item, keys))
            extra_items -= 1
            extra_bytes -= item.size
        if not dry_run:
            self._delete(key for _, keys in doomed for key in keys)
        return [item for item, _ in doomed]

    if not _HAS_ENFORCE_STORE_LIMITS:
        # Breakpoint: joblib < 1.3 calls reduce_store_size(bytes_limit).
        def reduce_store_size(self, bytes_limit):
            """Delete the least recently used results beyond bytes_limit."""
            self.enforce_store_limits(bytes_limit)


# --------------------------------------------------------------------------
# 8. Registration
# --------------------------------------------------------------------------


def _route_s3_urls(factory):
    """Wrap joblib's backend factory so 's3://' locations need no backend=."""

    @functools.wraps(factory)
    def store_backend_factory(backend, location, *args, **kwargs):
        if (
            backend == "local"
            and isinstance(location, str)
            and location[:5].lower() == "s3://"
        ):
            backend = "s3"
        return factory(backend, location, *args, **kwargs)

    store_backend_factory.routes_s3_urls = True
    return store_backend_factory


def register_s3_store_backend():
    """Register the S3 store with joblib; calling it again does nothing.

    Afterwards ``Memory("s3://bucket/prefix")`` and
    ``Memory(..., backend="s3")`` cache in S3. Local paths are untouched.
    """
    joblib.register_store_backend("s3", S3StoreBackend)
    factory = joblib.memory._store_backend_factory
    if not getattr(factory, "routes_s3_urls", False):
        # joblib picks a backend by name only; this one routes s3:// URLs.
        joblib.memory._store_backend_factory = _route_s3_urls(factory)


# --------------------------------------------------------------------------
# 9. Command line: python -m joblib_store ls | prune | clear | demo
# --------------------------------------------------------------------------


def _start_local_server():
    """Start moto's S3 server on 127.0.0.1; return it and its URL."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise SystemExit(
            "the demo's local S3 server needs moto: pip install 'joblib-store[demo]', "
            "or give --endpoint-url or an s3:// location of your own"
        ) from None
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def _demo(location, endpoint_url):
    import numpy as np

    from joblib import Memory

    server = None
    if location is None and endpoint_url is None:
        server, endpoint_url = _start_local_server()
        # moto accepts any credentials; these never leave this machine.
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.setdefault(name, "demo")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        print(f"Started a local S3 server (moto) at {endpoint_url}")
    location = location or "s3://joblib-store-demo/joblib_cache"
    options = {} if endpoint_url is None else {"endpoint_url": endpoint_url}
    try:
        register_s3_store_backend()
        memory = Memory(
            location, verbose=0, compress=True,
            backend_options={**options, "create_bucket": server is not None},
        )
        store = memory.store_backend
        print(f"Cache: {store.location} (endpoint {store.endpoint})")
        multiply = memory.cache(np.multiply)
        values = np.arange(10000)
        for run in (1, 2):
            hit = multiply.check_call_in_cache(values, values)
            started = time.perf_counter()
            result = multiply(values, values)
            elapsed = time.perf_counter() - started
            assert result[-1] == 9999 * 9999
            print(f"Run {run}: {'loaded from' if hit else 'computed and stored in'} "
                  f"the cache in {elapsed * 1000:.1f} ms")
        print("Keys in the bucket:")
        for obj in store._client.list(store.prefix + "/"):
            print(f"  s3://{store.bucket}/{obj['Key']}  ({obj['Size']} bytes)")
    finally:
        if server is not None:
            server.stop()
            print("Stopped the local S3 server")


def _parse_age(text):
    """'30d', '12h', '45m' or '90s' as a timedelta."""
    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([dhms])", text.strip())
    if not match:
        raise ValueError(f"age {text!r} is not like 30d, 12h, 45m or 90s")
    return datetime.timedelta(**{units[match.group(2)]: float(match.group(1))})


def _parse_bytes(text):
    """'10G', '500M', '50K' or a plain number of bytes."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        return memstr_to_bytes(text.upper())
    except Exception:
        raise ValueError(f"size {text!r} is not like 10G, 500M, 50K or 1000000") from None


def _open_store(url, arguments):
    """The store behind a Memory location given on the command line."""
    options = {}
    if arguments.endpoint_url:
        options["endpoint_url"] = arguments.endpoint_url
    if arguments.profile:
        options["profile"] = arguments.profile
    location = url.rstrip("/")
    if not location.endswith("/joblib"):
        location += "/joblib"  # where Memory(url) keeps its cache
    store = S3StoreBackend()
    store.configure(location, backend_options=options)
    return store


def _function_of(store, item):
    return item.path[len(store.location) + 1:].rpartition("/")[0]


def _progress(message):
    # Long runs tell where they are, on a terminal only.
    if sys.stderr.isatty():
        print(message, file=sys.stderr)


def _command_ls(arguments):
    store = _open_store(arguments.location, arguments)
    _progress(f"listing {store.location} ...")
    functions = collections.defaultdict(list)
    for item in store.get_items():
        functions[_function_of(store, item)].append(item)
    rows = [
        {
            "function": name,
            "items": len(items),
            "bytes": sum(item.size for item in items),
            "oldest_access": min(item.last_access for item in items).isoformat(" ", "seconds"),
            "newest_access": max(item.last_access for item in items).isoformat(" ", "seconds"),
        }
        for name, items in sorted(functions.items())
    ]
    if arguments.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'items':>6} {'bytes':>12}  {'oldest access':<19}  {'newest access':<19}  function")
    for row in rows:
        print(f"{row['items']:>6} {row['bytes']:>12}  {row['oldest_access']:<19}  "
              f"{row['newest_access']:<19}  {row['function']}")
    print(f"{sum(r['items'] for r in rows):>6} {sum(r['bytes'] for r in rows):>12}  "
          f"in {store.location}")


def _command_prune(arguments):
    if arguments.bytes_limit is None and arguments.items_limit is None and arguments.age_limit is None:
        raise _UsageError("prune needs --bytes-limit, --items-limit or --age-limit")
    store = _open_store(arguments.location, arguments)
    removed = store._evict(
        bytes_limit=arguments.bytes_limit,
        items_limit=arguments.items_limit,
        age_limit=arguments.age_limit,
        dry_run=arguments.dry_run,
    )
    verb = "would remove" if arguments.dry_run else "removed"
    for item in removed:
        print(f"{verb} {item.path} ({item.size} bytes, last access "
              f"{item.last_access.isoformat(' ', 'seconds')})")
    print(f"{verb} {len(removed)} items, {sum(item.size for item in removed)} bytes")


def _command_clear(arguments):
    store = _open_store(arguments.location, arguments)
    items = store.get_items()
    if arguments.function:
        items = [
            item for item in items
            if _function_of(store, item) == arguments.function
            or _function_of(store, item).rpartition("/")[2] == arguments.function
        ]
        functions = sorted({_function_of(store, item) for item in items})
        if not functions:
            raise _UsageError(f"no cached function named {arguments.function!r} in {store.location}")
        target = ", ".join(functions)
    else:
        target = store.location
    if not arguments.yes:
        if not sys.stdin.isatty():
            raise _UsageError("clear asks for confirmation: run it on a terminal, or pass --yes")
        answer = input(f"Delete {len(items)} items ({sum(i.size for i in items)} bytes) "
                       f"of {target}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return
    if arguments.function:
        for name in functions:
            _progress(f"clearing {name} ...")
            store.clear_location(f"{store.location}/{name}")
    else:
        _progress(f"clearing {store.location} ...")
        store.clear_location(store.location)
    print(f"deleted {len(items)} items of {target}")


class _UsageError(Exception):
    """A command line that cannot be carried out as given (exit status 2)."""


def _main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m joblib_store",
        description="joblib's Memory cache in Amazon S3 and S3-compatible stores. "
        "LOCATION is the URL given to Memory, such as s3://bucket/prefix.",
    )
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--endpoint-url", help="an S3-compatible endpoint")
    shared.add_argument("--profile", help="an AWS profile for the credentials")
    commands = parser.add_subparsers(dest="command", required=True)

    listing = commands.add_parser("ls", parents=[shared],
                                  help="one line per cached function")
    listing.add_argument("location")
    listing.add_argument("--json", action="store_true", help="print JSON for scripts")

    prune = commands.add_parser(
        "prune", parents=[shared],
        help="remove the least recently used results, as Memory.reduce_size")
    prune.add_argument("location")
    prune.add_argument("--bytes-limit", type=_parse_bytes, help="such as 10G, 500M or 1000000")
    prune.add_argument("--items-limit", type=int)
    prune.add_argument("--age-limit", type=_parse_age, help="such as 30d, 12h or 45m")
    prune.add_argument("--dry-run", action="store_true", help="only print what would go")

    clear = commands.add_parser("clear", parents=[shared], help="delete cached results")
    clear.add_argument("location")
    clear.add_argument("--function", help="only this function (its name or full id)")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    demo = commands.add_parser(
        "demo", parents=[shared],
        help="cache a computation in S3 twice: a miss, then a hit",
        description="Run the README example twice. Without a location or "
        "--endpoint-url it starts moto's S3 server on 127.0.0.1 and needs no "
        "AWS account.",
    )
    demo.add_argument("location", nargs="?", help="s3://bucket/prefix to use")

    arguments = parser.parse_args(argv)
    command = {"ls": _command_ls, "prune": _command_prune, "clear": _command_clear}
    try:
        if arguments.command == "demo":
            _demo(arguments.location, arguments.endpoint_url)
        else:
            command[arguments.command](arguments)
    except _UsageError as error:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, BrokenPipeError):
        return 1
    except Exception as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
