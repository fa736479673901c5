"""Cache joblib.Memory results in Amazon S3 and S3-compatible object stores.

joblib_store is one file: install it with pip, or copy ``joblib_store.py``
into your project. It gives joblib a store backend that keeps the cache in a
bucket, so every process and every machine pointing at that bucket shares it::

    import joblib_store
    joblib_store.register_s3_store_backend()
    memory = joblib.Memory("s3://my-bucket/cache", compress=True)

Importing the module registers the backend already (the call above is
idempotent and stays the documented one-liner), so a process that unpickles
a store, a cached function or a ``MemorizedResult`` routes ``s3://``
locations to S3 by itself.

It needs joblib >= 1.2 and s3fs. Credentials and the endpoint come from the
usual AWS chain (environment, ``~/.aws``, instance role, ``AWS_ENDPOINT_URL``)
unless given in ``backend_options``; see ``S3StoreBackend.configure``.

``python -m joblib_store --help`` lists commands to inspect (``ls``), prune
(``prune``) and clear (``clear``) a cache, and a self-contained ``demo``.

Cached values are pickles: whoever can write the bucket can run code in every
process that reads it. Use a bucket that only your jobs can write.

The module reads top to bottom, in these parts:

1. What the installed joblib offers (search "Breakpoint"), and which of
   joblib's calls a backend call serves.
2. The layout of a cache in a bucket.
3. Options: what ``configure`` receives, validated into one immutable
   ``_StoreOptions``.
4. Per-process state: checked buckets, outages, functions whose cache is
   off, and what one backend call hands to the next of the same joblib
   call; a forked child starts afresh.
5. The bucket client: every request, the translation of errors into the
   exceptions users see, outages and warnings. Nothing joblib-specific.
6. Transfers: the ranged reader, the multipart writer and zlib, the one
   place where byte ranges, parts and their concurrency live.
7. Local copies of results, and access records for least-recently-used
   eviction, each a small class owned by the store.
8. The store: lookups and loads of results (``_ResultLoads``), then
   ``S3StoreBackend``, joblib's backend contract on top of the parts above,
   and the failure policy, stated and applied in one place.
9. Registration with joblib.
10. The command line.

Copyright (c) 2026, the joblib-store developers. BSD 3-clause licence.
"""

__all__ = ["S3StoreBackend", "register_s3_store_backend"]
__version__ = "0.3.0"

import asyncio
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import inspect
import io
import itertools
import json
import math
import os
import posixpath
import queue
import re
import stat
import sys
import threading
import time
import uuid
import warnings
import weakref
import zlib

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

try:
    import fcntl
except ImportError:  # Windows: local copies are used without file locks.
    fcntl = None

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

# joblib's backend API does not say what a call is for: whether a load will
# follow an existence check in the same call (it does for a hit, not for
# call_and_shelve or check_call_in_cache), whether a clear is a user's
# func.clear() or joblib's reaction to changed code, whether a validation
# callback will read the metadata, nor which code and arguments a call has.
# The frames of MemorizedFunc's methods say it (with its func_code_info and
# the args_id of _cached_call); these names hold from joblib 1.2 to 1.6, and
# a name a release lacks (Breakpoint: _after_call is new in 1.4,
# _is_in_cache_and_valid in 1.3) is left out. Where none is found, the store
# takes the safe side: nothing is handed from one backend call to the next,
# no result is looked up ahead, and failures do not raise.
_CALL_FRAMES = {
    getattr(joblib.memory.MemorizedFunc, name).__code__: name
    for name in ("_cached_call", "call", "_after_call", "check_call_in_cache",
                 "_is_in_cache_and_valid", "_check_previous_func_code")
    if hasattr(joblib.memory.MemorizedFunc, name)
}
_ENTRY_FRAMES = ("_cached_call", "check_call_in_cache")
_FRAMES_SEARCHED = 8


@dataclasses.dataclass(frozen=True)
class _JoblibCall:
    """Which joblib call a backend call serves, read from the stack.

    ``anchors`` are the ids of the frames of that call still running (two
    backend calls serve the same joblib call when they share one);
    ``memorized`` is the MemorizedFunc; ``loads_a_hit`` says that a hit
    found now is loaded right away; ``shelves_a_miss`` that a result just
    computed is shelved, not loaded again (Breakpoint: joblib < 1.4 loads
    it with mmap_mode even when shelving); ``checking_code`` that joblib is
    comparing the function's code; ``validating`` that it is deciding
    whether a stored call is valid; ``args_id`` names the call's arguments
    (None where joblib's frame does not hold it).
    """

    anchors: frozenset
    memorized: object
    loads_a_hit: bool
    shelves_a_miss: bool
    checking_code: bool
    validating: bool
    args_id: object = None  # of the call, in _cached_call

    def calls(self, func_id):
        """Whether this joblib call runs the function func_id (a
        ``MemorizedResult.get()`` made inside another cached function is
        found in that function's frames, and is not a call of it)."""
        memorized = self.memorized
        try:
            # Breakpoint: joblib < 1.4 keeps no func_id on a MemorizedFunc.
            own_id = getattr(memorized, "func_id", None)
            if own_id is None:
                own_id = joblib.memory._build_func_identifier(memorized.func)
        except Exception:
            return False
        return own_id == func_id

    def code_digest(self, func_id):
        """The digest of the code of the function func_id this call runs,
        or None (a ``MemorizedResult.get()`` knows no code)."""
        if not self.calls(func_id):
            return None
        func = self.memorized.func
        code_id = id(getattr(func, "__code__", None))
        try:
            known = _CODE_DIGESTS.get(func)
        except TypeError:  # a function that cannot be weakly referenced
            known = None
        if known is not None and known[0] == code_id:
            return known[1]
        try:
            func_code = self.memorized.func_code_info[0]
        except Exception:
            return None
        digest = _code_digest(func_code) if isinstance(func_code, str) else None
        with contextlib.suppress(TypeError):
            _CODE_DIGESTS[func] = (code_id, digest)
        return digest


def _joblib_call(depth=2):
    """The joblib call that a backend method serves, or None.

    ``depth`` counts the frames from here to the backend method's caller.
    """
    frame = sys._getframe(depth)
    names, anchors, memorized, args_id = set(), set(), None, None
    loads_a_hit = shelves_a_miss = False
    for _ in range(_FRAMES_SEARCHED):
        if frame is None:
            break
        name = _CALL_FRAMES.get(frame.f_code)
        if name is not None:
            names.add(name)
            if memorized is None:
                memorized = frame.f_locals.get("self")
            if name in ("_cached_call", "call", "_after_call", "check_call_in_cache"):
                anchors.add(id(frame))
            if name == "_cached_call":
                loads_a_hit = not frame.f_locals.get("shelving", False)
                args_id = frame.f_locals.get("args_id")
            if name == "_after_call":
                shelves_a_miss = bool(frame.f_locals.get("shelving", False))
            if name in _ENTRY_FRAMES:
                break
        frame = frame.f_back
    if not anchors:
        return None
    return _JoblibCall(
        anchors=frozenset(anchors),
        memorized=memorized,
        loads_a_hit=loads_a_hit and "check_call_in_cache" not in names,
        shelves_a_miss=shelves_a_miss,
        checking_code="_check_previous_func_code" in names,
        validating="_is_in_cache_and_valid" in names,
        args_id=args_id if isinstance(args_id, str) else None,
    )


# --------------------------------------------------------------------------
# 2. Layout of a cache in a bucket. It is joblib's folder layout, one object
# per file: <prefix>/<func_id>/func_code.py and <prefix>/<func_id>/<args_id>/
# {output.pkl, metadata.json}, where func_id may itself contain slashes,
# plus an empty <args_id>/last_access whose LastModified is the last hit.
# --------------------------------------------------------------------------

OUTPUT = "output.pkl"
METADATA = "metadata.json"
FUNC_CODE = "func_code.py"
LAST_ACCESS = "last_access"
_ITEM_NAMES = (OUTPUT, METADATA, LAST_ACCESS)
# An args_id, a code digest and a folder of local copies: 32 hex digits.
_HEX32 = re.compile(r"[0-9a-f]{32}")

# Each output.pkl carries, as S3 user metadata, a digest of the code that
# computed it (joblib's func_code, without its "first line" header: the
# code joblib compares). A lookup serves a result only to a call whose
# code has that digest, so the results of other code are misses whatever
# happened to func_code.py: one deleted or expired beside its results, one
# rewritten by another process mid-run, or none written at all (joblib
# writes it in the first cache a function meets in a process only).
_CODE_DIGEST = "code-digest"


# The code digest of each function met in this process, by function object.
# joblib reads the source again for each new MemorizedFunc of a function,
# while the function runs the code it was loaded with (a module edited on
# disk and not reloaded, say): like joblib's own record of the functions it
# checked, the first reading stands, until the function's __code__ changes.
_CODE_DIGESTS = weakref.WeakKeyDictionary()


def _code_digest(func_code):
    """The digest a result carries of the code that computed it."""
    return hashlib.sha256(func_code.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _is_hex32(value):
    """Whether value has the form of a code digest or a result id."""
    return isinstance(value, str) and _HEX32.fullmatch(value) is not None


def _code_digest_of(response):
    """The code digest in a GET's or HEAD's response, or None."""
    return (response.get("Metadata") or {}).get(_CODE_DIGEST)


# Each output.pkl written for a joblib call also carries a random result id,
# and its metadata.json the same id. The two objects are written by separate
# requests, and either may land without the other (a failure, a retry that
# lands late, a writer stopped between them, two writers of one call), so a
# metadata.json may stand beside a result it does not describe; its time
# would then date that result, and a validation callback (expires_after)
# would serve an old result as new. A lookup for a callback reads both; a
# pair whose ids differ is dated by the older of the metadata's time and the
# result's Last-Modified, so a result never looks younger than it is (and
# writers of one call that overlap do not make each other miss). A pair
# with no id on either (from an older version of this module) is taken as
# it is.
_RESULT_ID = "result-id"  # the S3 user metadata of output.pkl
_RESULT_ID_FIELD = "joblib_store_result_id"  # the key in metadata.json


def _result_id_of(response):
    """The result id in a GET's or HEAD's response, or None."""
    return (response.get("Metadata") or {}).get(_RESULT_ID)


# --------------------------------------------------------------------------
# 3. Options. Everything configure receives is validated here, once, into a
# _StoreOptions; an error says what to fix. Nothing here touches the network.
# --------------------------------------------------------------------------

# S3's rules for bucket names: 3 to 63 lowercase letters, digits, dots and
# hyphens, starting and ending with a letter or a digit.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

_MiB = 2**20
# S3 takes 5 MiB to 5 GiB per part.
_MIN_PART_SIZE = 5 * _MiB
DEFAULT_PART_SIZE = 8 * _MiB
DEFAULT_MAX_CONCURRENCY = 8
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

    @property
    def given_endpoint(self):
        """The endpoint these options name, or that the environment names."""
        return _endpoint_named_by(self.fs.storage_options if self.fs else self.storage_options)

    @property
    def names_a_connection(self):
        """Whether these options say how to reach S3: s3fs options or a
        ready filesystem, beyond the location."""
        return bool(self.storage_options) or self.fs is not None

    @property
    def uses_local_copies(self):
        return self.local_cache_dir is not None or self.mmap_mode is not None

    def credentials_fingerprint(self):
        """A digest of every s3fs option given, credentials among them
        (never shown): stores that differ in any of them differ here."""
        given = self.fs.storage_options if self.fs else self.storage_options
        return hashlib.sha256(repr(sorted(given.items())).encode("utf-8")).hexdigest()

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
        if fs is not None and fs.asynchronous:
            raise TypeError(
                "fs must be made with asynchronous=False: joblib calls the "
                "store from ordinary code, and the store runs s3fs's loop"
            )
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
        # The default folder is found where the store is used, not here.
        local_cache_dir = ours.pop("local_cache_dir", None)
        if local_cache_dir is not None:
            local_cache_dir = os.fspath(local_cache_dir)
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


def _endpoint_named_by(storage_options):
    """The endpoint URL s3fs options name, else the one botocore reads from
    the environment, else None (AWS itself)."""
    client_kwargs = storage_options.get("client_kwargs") or {}
    endpoint = (
        storage_options.get("endpoint_url")
        or client_kwargs.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    return endpoint.rstrip("/") if endpoint else None

# --------------------------------------------------------------------------
# 4. Per-process state. Stores pickle as their options alone; what a process
# builds from them (connections, an event loop, checks made, functions
# whose cache is off) lives here, and a forked child starts afresh, since
# the parent's event loop thread and locks do not exist in the child.
# --------------------------------------------------------------------------

_EXIT_WAIT = 5.0  # seconds the interpreter waits at exit for pending writes


@dataclasses.dataclass
class _FunctionState:
    """What this process knows of one cached function in one cache.

    ``off``: the cache is off for it until a check of its stored code
    succeeds; ``code``: the code joblib asked to store, kept for that
    check; ``code_write``: a write of func_code.py still in flight, whose
    failure, once known, turns the function off.
    """

    off: bool = False
    code: object = None
    code_write: object = None


@dataclasses.dataclass
class _Handed:
    """What one backend call leaves for a later one of the same joblib call:
    ``url`` names the result, ``anchors`` the frames of that joblib call."""

    url: str
    anchors: frozenset

    def serves(self, url, call):
        return self.url == url and call is not None and bool(self.anchors & call.anchors)

    def let_go(self):
        """Release what nobody will take."""


@dataclasses.dataclass
class _Found(_Handed):
    """A lookup's answer, for the metadata and the load that follow."""

    opened: object = None  # an _OpenedObject: the first range of the result
    copy_path: str = None  # a local copy that S3 confirmed current (a 304)
    metadata: dict = None  # fetched beside it, for a validation callback
    last_modified: object = None

    def let_go(self):
        if self.opened is not None:
            self.opened.close()


@dataclasses.dataclass
class _LookedUp(_Handed):
    """A lookup made beside the read of func_code.py, for the existence
    check that follows: ``found`` is its answer (None for a miss), or
    ``error`` its failure."""

    found: dict = None
    error: Exception = None

    def let_go(self):
        _close_opened(self.found)


def _close_opened(found):
    """Close the first range a lookup's answer (a dict, or None) opened."""
    if found and found.get("opened") is not None:
        found["opened"].close()


_NO_ANSWER = object()  # no lookup went out beside a read of func_code.py, or it was let go


def _let_go_of_lookup(task):
    """Cancel a lookup nobody will use; close what it opened if it ended."""

    def close(done):
        if not done.cancelled() and done.exception() is None:
            _close_opened(done.result())

    task.add_done_callback(close)
    task.cancel()


@dataclasses.dataclass
class _Publishing(_Handed):
    """The last request of a result's upload, ended beside the metadata's PUT."""

    store: object = None
    future: object = None  # the upload's last request
    new_copy: object = None  # a local copy written beside it
    code_digest: str = None  # of the code that computed it
    result_id: str = None  # the id its metadata.json is to carry
    item: object = None  # the result, for joblib's reload of it
    started: float = 0.0
    size: int = 0

    def let_go(self):
        self.store._finish_publishing(self)


@dataclasses.dataclass
class _Stored(_Handed):
    """A result just stored, for joblib's reload of it (with mmap_mode)."""

    item: object = None
    new_copy: object = None  # held until the reload has mapped it

    def let_go(self):
        if self.new_copy is not None:
            self.new_copy.close()


@dataclasses.dataclass
class _Unstored(_Handed):
    """A result that could not be stored: its metadata is not sent."""


@dataclasses.dataclass
class _Written(_Handed):
    """The result id of a result being stored, for its metadata.json."""

    result_id: str = None


_RESULT_IDS_KEPT = 8  # ids of results whose metadata is still to be written


class _Handover(threading.local):
    """This thread's slots of handed-over work: ``looked_up``, ``found``,
    ``publishing``, ``stored`` and ``unstored``. What a later backend call
    does not take is let go.

    The result ids of results being stored (``written``, by URL) are kept
    apart, a few of them, and never let go: joblib may make other cached
    calls between a store and its metadata (in an argument's repr), and a
    lost id would leave a pair that a validation callback dates by the
    older of its two times instead of joblib's own.
    """

    looked_up = found = publishing = stored = unstored = None

    def __init__(self):
        self.written = collections.OrderedDict()

    def put_written(self, written):
        self.written.pop(written.url, None)
        self.written[written.url] = written
        while len(self.written) > _RESULT_IDS_KEPT:
            self.written.popitem(last=False)

    def take_written(self, url, call):
        """The result id the same joblib call left for url, or None."""
        written = self.written.get(url)
        if written is None or not written.serves(url, call):
            return None
        del self.written[url]
        return written.result_id

    def put(self, slot, handed):
        self._let_go(slot)
        setattr(self, slot, handed)

    def take(self, slot, url, call, keep=False):
        """What the same joblib call left in slot for url, or None."""
        handed = getattr(self, slot)
        if handed is not None and handed.serves(url, call):
            if not keep:
                setattr(self, slot, None)
            return handed
        if not keep:
            self._let_go(slot)
        return None

    def let_go_all_but(self, *slots):
        for slot in ("publishing", "looked_up", "found", "stored", "unstored"):
            if slot not in slots:
                self._let_go(slot)

    def _let_go(self, slot):
        handed = getattr(self, slot)
        if handed is not None:
            setattr(self, slot, None)
            handed.let_go()


class _ProcessState:
    """Everything one process knows beyond the stores' own options."""

    def __init__(self):
        self.lock = threading.RLock()
        # (bucket, endpoint, credentials digest) that passed the check.
        self.checked_buckets = set()
        # (bucket, endpoint) -> the options of the last store configured there.
        self.options_by_bucket = {}
        self.parts = weakref.WeakKeyDictionary()  # store -> _StoreParts
        self.outages = {}  # (endpoint, loop) -> _Outage
        self.warned = set()
        self.functions = {}  # (location, func_id) -> _FunctionState
        self.recorded = {}  # (bucket, key) -> when this process last recorded a hit
        self.denied_records = set()  # (bucket, endpoint) that may not be written
        self.pending = set()  # writes nobody waits for yet
        self.writers = weakref.WeakSet()  # uploads neither committed nor aborted
        self.handover = _Handover()
        self.exit_hook = False

    def function(self, location, func_id):
        with self.lock:
            return self.functions.setdefault((location, func_id), _FunctionState())

    def ensure_exit_hook(self):
        with self.lock:
            if not self.exit_hook:
                import atexit

                atexit.register(_finish_at_exit)
                self.exit_hook = True

    def track(self, future):
        """Keep a request that nobody waits for, so that exit waits for it."""
        self.ensure_exit_hook()
        with self.lock:
            self.pending.add(future)

        def forget(done):
            with self.lock:
                self.pending.discard(done)

        future.add_done_callback(forget)


_PROCESS = _ProcessState()


def _start_afresh():
    """In a forked child: nothing of the parent's connections, event loop,
    locks or requests. What it knew stays known: the options of its stores,
    and its functions' code states, since joblib's own record of checked
    code survives the fork. A function whose code write was still in flight
    is off until checked again."""
    global _PROCESS
    parent = _PROCESS
    _PROCESS = _ProcessState()
    _PROCESS.options_by_bucket = dict(parent.options_by_bucket)
    for name, function in parent.functions.items():
        _PROCESS.functions[name] = _FunctionState(
            off=function.off or function.code_write is not None,
            code=function.code,
        )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_start_afresh)


def _wait_for_background_requests(timeout=_EXIT_WAIT):
    """Wait for pending writes and access records (at exit, or in tests)."""
    import concurrent.futures

    with _PROCESS.lock:
        pending = list(_PROCESS.pending)
    concurrent.futures.wait(pending, timeout=timeout)


def _finish_at_exit():
    # An upload that was never committed is aborted (so no part stays
    # billed), and writes already under way get a few seconds to land.
    for writer in list(_PROCESS.writers):
        writer.abort()
    _wait_for_background_requests()

# --------------------------------------------------------------------------
# 5. The bucket client. Every request goes through _BucketClient, which runs
# s3fs's aiobotocore client on s3fs's event loop thread, holds requests back
# while the endpoint is down, and translates errors into the OSError
# subclasses joblib and users expect.
# --------------------------------------------------------------------------

_DELETE_BATCH = 1000  # keys per DeleteObjects request, S3's maximum
_LIST_PAGE = 1000  # keys per ListObjectsV2 page, S3's maximum
_BUCKET_CHECK_TIMEOUT = 8  # seconds, for the one check made by configure
# While the endpoint is down, each request first waits at most this long
# for a sign of life (any answer to a HEAD of the bucket), shared by the
# requests that wait at the same time; a cached call makes at most two such
# waits (before its lookup, and before its write), so an outage costs a
# call at most 2 s once it has been detected.
_PROBE_TIMEOUT = 0.8
_RANGE_ATTEMPTS = 3  # reads of one byte range, when its body breaks off


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


def _is_not_modified(error):
    code, status = _error_code(error)
    return status == 304 or code in ("304", "NotModified")


def _last_modified_of(error):
    """The Last-Modified an error answer (a 304) carries, or None."""
    headers = getattr(error, "response", {}).get("ResponseMetadata", {}).get("HTTPHeaders", {})
    try:
        from email.utils import parsedate_to_datetime

        return parsedate_to_datetime(headers["last-modified"])
    except (KeyError, TypeError, ValueError):
        return None


def _is_answer(error):
    """Whether the server answered (with an error status)."""
    return _error_code(error)[1] is not None


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


class _VersionChanged(OSError):
    """The object was rewritten while its ranges were being read."""

    def __init__(self, url):
        super().__init__(f"{url} was rewritten while it was being read")


class _WrongThreadError(RuntimeError):
    """A store was used from s3fs's own event loop thread, which would hang."""


def _refuse_loop_thread(loop=None):
    """Raise rather than wait forever on the loop the requests need (that of
    a client, or else s3fs's own)."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return
    fsspec_asyn = sys.modules.get("fsspec.asyn")
    if running is loop or (fsspec_asyn is not None and running is fsspec_asyn.loop[0]):
        raise _WrongThreadError(
            "joblib_store was called from s3fs's own event loop thread, "
            "where its requests would wait for themselves forever: make "
            "the call (a cached function, Memory(...)) from another thread, "
            "for example with 'await asyncio.to_thread(func, ...)'"
        )


def _make_filesystem(options):
    """The s3fs filesystem for a store's options, tuned for its transfers."""
    if options.fs is not None:
        fs = options.fs
        try:
            fs.loop  # noqa: B018 (raises in a forked child)
            return fs
        except RuntimeError:
            # A ready filesystem from the parent of a forked process: the
            # same options give the child one of its own.
            return type(fs)(**fs.storage_options, skip_instance_cache=True)
    storage_options = dict(options.storage_options)
    config_kwargs = dict(storage_options.get("config_kwargs") or {})
    # botocore's "standard" mode retries throttling, 5xx and dropped
    # connections with jittered backoff, and unlike its legacy mode it does
    # not spend minutes on an endpoint that refuses connections.
    config_kwargs.setdefault("retries", {"total_max_attempts": 4, "mode": "standard"})
    # A load and a store each keep max_concurrency requests in flight.
    config_kwargs.setdefault(
        "max_pool_connections", max(10, 2 * options.max_concurrency)
    )
    # botocore >= 1.36 adds a CRC32 to every upload, which some S3-compatible
    # stores reject or (over TLS, as aws-chunked) store inside the object;
    # TLS already guards the bytes in transit.
    # (Breakpoint: botocore < 1.36 has neither the checksums nor these options.)
    from botocore.config import Config

    for option in ("request_checksum_calculation", "response_checksum_validation"):
        if option in Config.OPTION_DEFAULTS:
            config_kwargs.setdefault(option, "when_required")
    storage_options["config_kwargs"] = config_kwargs
    return _s3fs().S3FileSystem(**storage_options)


def _drop_expect_header(request, **kwargs):
    # botocore asks for "Expect: 100-continue" on every PUT, which costs a
    # round trip before the body leaves; our bodies are a part at most.
    if "Expect" in request.headers:
        del request.headers["Expect"]


class _Outage:
    """An endpoint that stopped answering, as one event loop sees it.

    Only the loop's thread touches it. Requests wait for one shared probe
    rather than each for its own timeouts; the first answer ends the outage.
    """

    def __init__(self):
        self.down = False
        self._probe = None

    async def wait_until_up(self, client):
        if self._probe is None:
            self._probe = asyncio.ensure_future(self._answers(client))
        probe = self._probe
        try:
            up = await asyncio.shield(probe)
        finally:
            if self._probe is probe and probe.done():
                self._probe = None
        if not up:
            raise ConnectionError(
                f"the S3 endpoint {client.endpoint} is not answering"
            )

    async def _answers(self, client):
        try:
            await asyncio.wait_for(client._send("head_bucket"), _PROBE_TIMEOUT)
        except Exception as error:
            if not _is_answer(error):
                return False
        self.down = False
        client.forget_warnings()  # a later outage is news again
        return True


class _BucketClient:
    """Requests to one bucket, with errors users can act on.

    Parameters
    ----------
    fs : s3fs.S3FileSystem
        Its aiobotocore client and event loop carry the requests.
    bucket : str
    location : str
        The cache's URL, named in warnings and errors.
    """

    def __init__(self, fs, bucket, location):
        self.fs = fs
        self.bucket = bucket
        self.location = location
        self.loop = fs.loop
        self._endpoint = None
        self._tuned = False

    @property
    def endpoint(self):
        """The URL requests go to (never with credentials)."""
        if self._endpoint is None:
            try:
                self._endpoint = _without_userinfo(self.fs.s3.meta.endpoint_url)
            except Exception:
                return _without_userinfo(self.fs.endpoint_url) or "the default AWS endpoint"
        return self._endpoint

    def url(self, key):
        return f"s3://{self.bucket}/{key}"

    # -------------------------------------------------------------- requests

    async def _send(self, method, **kwargs):
        client = await self.fs.set_session()
        if not self._tuned:
            client.meta.events.register(
                "before-send.s3", _drop_expect_header,
                unique_id="joblib_store.drop_expect_header",
            )
            self._tuned = True
        bound = getattr(client, method)
        # s3fs adds its s3_additional_kwargs (encryption, requester pays) to
        # every request, keeping only those this method accepts.
        kwargs = self.fs._get_s3_method_kwargs(bound, Bucket=self.bucket, **kwargs)
        return await bound(**kwargs)

    async def request(self, method, **kwargs):
        """Make one request on the loop, unless the endpoint is down."""
        outage = _PROCESS.outages.setdefault((self.endpoint, self.loop), _Outage())
        if outage.down:
            await outage.wait_until_up(self)
        try:
            return await self._send(method, **kwargs)
        except Exception as error:
            if _is_unreachable(error):
                outage.down = True
            raise

    def run(self, coroutine, timeout=None):
        """Run a coroutine on s3fs's loop and wait for its result."""
        try:
            _refuse_loop_thread(self.loop)
        except _WrongThreadError:
            coroutine.close()
            raise
        if timeout is not None:
            coroutine = asyncio.wait_for(coroutine, timeout)
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def start(self, coroutine):
        """Start a coroutine on s3fs's loop; return a concurrent future."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def submit(self, method, **kwargs):
        """Start one request; return a concurrent future."""
        return self.start(self.request(method, **kwargs))

    def call(self, method, timeout=None, **kwargs):
        """Make one request and wait for its response."""
        return self.run(self.request(method, **kwargs), timeout=timeout)

    # ------------------------------------------------------------ the bucket

    def check_bucket(self, prefix, create_bucket):
        """Fail early and clearly when the bucket cannot be used.

        The check lists the cache's own prefix, which a policy that lets
        the credentials list only that prefix allows, unlike HeadBucket.
        """
        try:
            self.call("list_objects_v2", Prefix=prefix + "/", MaxKeys=1,
                      timeout=_BUCKET_CHECK_TIMEOUT)
        except _WrongThreadError:
            raise
        except Exception as error:
            if not (_is_missing(error) and create_bucket):
                raise self.bucket_error(error, prefix) from None
            self._create_bucket(prefix)

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
            # Created meanwhile by another of our processes: that is success.
            if _error_code(error)[0] != "BucketAlreadyOwnedByYou":
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
        if _error_code(error)[0] == "BucketAlreadyExists":
            return PermissionError(
                f"{where} belongs to another account: choose another name"
            )
        return OSError(f"cannot use {where}: {error}")

    def error(self, operation, error):
        """The exception a maintenance command raises for a failed request."""
        message = (
            f"could not {operation} in {self.location} (bucket {self.bucket!r} "
            f"at endpoint {self.endpoint}): {type(error).__name__}: {error}"
        )
        if _is_missing(error):
            return FileNotFoundError(message)
        if _is_denied(error) or _is_no_credentials(error):
            return PermissionError(message)
        if _is_unreachable(error):
            return ConnectionError(message)
        return OSError(message)

    # -------------------------------------------------------------- objects

    def head(self, key):
        """HEAD one key: its response, or None when it does not exist."""
        try:
            return self.call("head_object", Key=key)
        except Exception as error:
            if _is_missing(error):
                return None
            raise

    def put(self, key, data):
        return self.call("put_object", Key=key, Body=data)

    async def read(self, key):
        """The bytes of a small object; FileNotFoundError if it is missing."""
        try:
            response = await self.request("get_object", Key=key)
        except Exception as error:
            if _is_missing(error):
                raise FileNotFoundError(f"{self.url(key)} does not exist") from None
            raise
        return await _read_body(response["Body"])

    async def open_range(self, key, length, **conditions):
        """GET the first length bytes of an object; the body comes later.

        Returns an _OpenedObject as soon as the headers are in, while its
        bytes go on arriving. A missing key raises FileNotFoundError.
        """
        try:
            response = await self.request(
                "get_object", Key=key, Range=f"bytes=0-{length - 1}", **conditions
            )
        except Exception as error:
            if _is_missing(error):
                raise FileNotFoundError(f"{self.url(key)} does not exist") from None
            raise
        body = response.pop("Body")
        first_body = self._first_body(key, body, response["ContentLength"], response["ETag"])
        return _OpenedObject(key, response, self.start(first_body))

    async def _first_body(self, key, body, length, etag):
        """The bytes of an opened first range; one that breaks off is read
        again, from the same version."""
        try:
            data = await _read_body(body)
            if len(data) == length:
                return data
        except Exception:
            pass
        return await self.read_range(key, 0, length - 1, etag)

    async def read_range(self, key, first, last, etag):
        """The bytes first..last of the object whose ETag is etag.

        A body that breaks off is read again; a changed object raises
        _VersionChanged, so ranges never mix two versions.
        """
        for attempt in range(_RANGE_ATTEMPTS):
            try:
                response = await self.request(
                    "get_object", Key=key, Range=f"bytes={first}-{last}", IfMatch=etag
                )
            except Exception as error:
                # A 404 says the version being read is gone, not that the
                # result is: it may have been stored again meanwhile (and
                # moto answers 404 while it replaces an object). The load
                # starts again, and its first GET says whether it is there.
                if _is_missing(error) or _error_code(error)[1] == 412:
                    raise _VersionChanged(self.url(key)) from None
                raise
            if response["ETag"] != etag:  # a server that ignores If-Match
                response["Body"].close()
                raise _VersionChanged(self.url(key))
            try:
                data = await _read_body(response["Body"])
                if len(data) == last - first + 1:
                    return data
                error = OSError(f"{self.url(key)}: range {first}-{last} came short")
            except Exception as read_error:  # the body broke off
                error = read_error
            if attempt + 1 == _RANGE_ATTEMPTS:
                raise error
            await asyncio.sleep(0.1 * 2**attempt)

    def any_under(self, prefix):
        """Whether any object's key starts with prefix (one request)."""
        page = self.call("list_objects_v2", Prefix=prefix, MaxKeys=1)
        return bool(page.get("KeyCount", page.get("Contents")))

    def list(self, prefix):
        """Every object under a key prefix, one request per 1000 keys."""
        return self.run(self.list_all(prefix))

    async def list_all(self, prefix):
        objects = []
        kwargs = {"Prefix": prefix, "MaxKeys": _LIST_PAGE}
        while True:
            page = await self.request("list_objects_v2", **kwargs)
            objects.extend(page.get("Contents", ()))
            if not page.get("IsTruncated"):
                return objects
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def delete(self, keys):
        """Delete keys, 1000 per request; a missing key is not an error."""
        return self.run(self.delete_all(list(keys)))

    async def delete_all(self, keys):
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start:start + _DELETE_BATCH]
            response = await self.request(
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

    def copy(self, source_key, key):
        """Copy an object inside the bucket (no byte leaves S3)."""
        return self.call(
            "copy_object", Key=key,
            CopySource={"Bucket": self.bucket, "Key": source_key},
        )

    # -------------------------------------------------------------- warnings

    def warn(self, message, kind, stacklevel=4):
        """Warn once per kind of failure, until the endpoint answers again."""
        with _PROCESS.lock:
            if (self.location, self.endpoint, kind) in _PROCESS.warned:
                return
            _PROCESS.warned.add((self.location, self.endpoint, kind))
        warnings.warn(message, CacheWarning, stacklevel=stacklevel)

    def forget_warnings(self):
        with _PROCESS.lock:
            _PROCESS.warned = {
                warned for warned in _PROCESS.warned if warned[1] != self.endpoint
            }


def _without_userinfo(url):
    """A URL without the user and password it may carry."""
    if not url or "@" not in url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


async def _outcome(future):
    """Await a concurrent future that others share: cancelling the waiter
    (an aborted part, say) must not cancel what it waits for."""
    return await asyncio.shield(asyncio.wrap_future(future))


async def _read_body(body):
    try:
        return await body.read()
    finally:
        body.close()

# --------------------------------------------------------------------------
# 6. Transfers: results stream to and from S3 as they are pickled and
# unpickled, with bounded memory. Byte ranges, parts and their concurrency
# live here and nowhere else.
#
# A load is a GET of the first range (part_size / 2 bytes: most results come
# whole with it), then the rest in equal ranges, max_concurrency at a time,
# handed to the unpickler in order: one wave of ranges of up to a part when
# the rest fits, else waves of ranges of up to half a part. A store uploads
# parts of part_size bytes, up to max_concurrency at a time, while the next
# part is being pickled. So a transfer holds at most max_concurrency parts
# in memory, and a large load max_concurrency half-parts.
# --------------------------------------------------------------------------

# S3 takes up to 5 GiB per part and 10 000 parts per upload.
_MAX_PART_SIZE = 5 * 2**30
_MAX_PARTS = 10_000
# Part sizes double every 1000 parts, so that 8 MiB parts still reach
# several TiB within S3's part count, while small results stay cheap.
_PARTS_PER_SIZE = 1000
_MIN_RANGE = 1 * _MiB
_MAX_COPIED_REST = 1 * _MiB  # see _MultipartWriter._take
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


def _load(raw):
    """Unpickle a result from a raw stream; zlib inflates in a thread aside."""
    stream = io.BufferedReader(raw, buffer_size=_MiB)
    if stream.peek(1)[:1] == _ZLIB_PREFIX:
        stream = io.BufferedReader(_InflatingReader(stream), buffer_size=_MiB)
    with stream:
        return numpy_pickle.load(stream)


@dataclasses.dataclass
class _OpenedObject:
    """A GET of an object's first bytes: its headers, and its body to come.

    ``body`` is a concurrent future of the bytes of the first range.
    """

    key: str
    response: dict
    body: object

    @property
    def size(self):
        """The whole object's size, from Content-Range (or Content-Length)."""
        content_range = self.response.get("ContentRange")
        if content_range:
            return int(content_range.rpartition("/")[2])
        return self.response["ContentLength"]

    @property
    def etag(self):
        return self.response["ETag"]

    def close(self):
        self.body.cancel()


def _first_range_length(part_size):
    """Bytes asked for with the first GET of a result."""
    return part_size // 2


def _byte_ranges(size, part_size, max_concurrency):
    """The (first, last) byte ranges a load fetches after its first range.

    Ranges of equal length go out in waves of ``max_concurrency``, so no
    short range at the end costs a round trip of its own: what fits in one
    wave of at most a part each goes in one wave, a larger object in waves
    of ranges of at most half a part (which bounds the bytes held at once).
    """
    start = min(size, _first_range_length(part_size))
    rest = size - start
    if rest <= max_concurrency * part_size:
        count = max(1, min(max_concurrency, rest // _MIN_RANGE))
    else:
        wave = max_concurrency * _first_range_length(part_size)
        count = max_concurrency * -(-rest // wave)
    bounds = [start + rest * index // count for index in range(count + 1)]
    return [(first, end - 1) for first, end in zip(bounds, bounds[1:]) if end > first]


class _RangedReader(io.RawIOBase):
    """Read one object as concurrent byte ranges, handed over in order.

    The first range comes from an _OpenedObject; the others are fetched
    at most ``max_concurrency`` at a time, each on its own connection, and
    only from the version the first range came from (If-Match), so a
    result rewritten meanwhile fails the load instead of mixing versions.
    """

    def __init__(self, client, opened, part_size, max_concurrency):
        super().__init__()
        self._client = client
        self._key = opened.key
        self._etag = opened.etag
        self._max_concurrency = max_concurrency
        self._ranges = collections.deque(
            _byte_ranges(opened.size, part_size, max_concurrency))
        self._fetching = collections.deque([opened.body])
        self._current = memoryview(b"")
        self._fetch_more()

    def _fetch_more(self):
        while self._ranges and len(self._fetching) < self._max_concurrency:
            first, last = self._ranges.popleft()
            self._fetching.append(self._client.start(
                self._client.read_range(self._key, first, last, self._etag)
            ))

    def readable(self):
        return True

    def readinto(self, buffer):
        if not self._current:
            if not self._fetching:
                return 0
            fetched = self._fetching.popleft()
            self._fetch_more()
            self._current = memoryview(fetched.result())
        size = min(len(buffer), len(self._current))
        buffer[:size] = self._current[:size]
        self._current = self._current[size:]
        return size

    def close(self):
        if not self.closed:
            super().close()
            for fetching in self._fetching:
                fetching.cancel()
            self._fetching.clear()
            self._ranges.clear()


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
                    if isinstance(item, OSError):
                        raise item  # as a plain load raises it (a rewrite is retried)
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


class _PartBody:
    """The bytes of one uploaded part, read in place from joblib's buffers.

    botocore reads it as a file (to sign it, or to send it again after a
    failure); aiohttp iterates over it a quarter MiB at a time, waiting for
    the socket between pieces. So the pieces are never joined, asyncio never
    keeps a copy of a whole part, and no piece costs a hop to a thread, as
    it would for a file object.
    """

    _PIECE = 256 * 1024

    def __init__(self, views):
        self._views = views
        self._starts = list(itertools.accumulate([0] + [len(view) for view in views]))
        self._size = self._starts[-1]
        self._position = 0

    def _piece(self, limit):
        """The next bytes, at most limit, as a view; advance past them."""
        index = bisect.bisect_right(self._starts, self._position) - 1
        offset = self._position - self._starts[index]
        piece = self._views[index][offset:offset + limit]
        self._position += len(piece)
        return piece

    def read(self, size=-1):
        if size is None or size < 0:
            size = self._size
        pieces = []
        while size > 0 and self._position < self._size:
            pieces.append(self._piece(size))
            size -= len(pieces[-1])
        return b"".join(pieces)

    async def _pieces(self):
        while self._position < self._size:
            yield self._piece(self._PIECE)

    def __aiter__(self):
        return self._pieces()

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}
        self._position = base[whence] + offset
        return self._position

    def tell(self):
        return self._position

    def __len__(self):
        return self._size


class _MultipartWriter(io.RawIOBase):
    """Stream one S3 object as it is produced; publish it only on commit.

    Parts of ``part_size`` bytes (doubling every 1000 parts) upload in the
    background, at most ``max_concurrency`` at a time, whatever the size of
    the writes; a result smaller than one part is a single PUT at commit.
    ``commit`` makes the object visible with one request. Every other
    ending (an error, an interrupt, garbage collection, interpreter exit)
    aborts the upload, after the parts in flight, so that nothing
    half-written is ever visible or billed.
    ``copy_to``, a file, receives every byte as well; ``metadata`` is the
    object's S3 user metadata.
    """

    def __init__(self, client, key, part_size, max_concurrency, copy_to=None,
                 metadata=None):
        super().__init__()
        self._client = client
        self._key = key
        self._metadata = {"Metadata": metadata} if metadata else {}
        self._part_size = part_size
        self._max_concurrency = max_concurrency
        self.copy_to = copy_to
        self.copy_error = None
        self.error = None  # what went wrong in the upload, if anything did
        self._pieces = collections.deque()
        self._buffered = 0
        self._written = 0
        self._created = None  # future of CreateMultipartUpload's response
        self._parts = []  # futures of each part's number and ETag, in order
        self._in_flight = collections.deque()
        self._waited = False  # whether a part waited for a free slot
        self._state = "open"
        _PROCESS.ensure_exit_hook()
        _PROCESS.writers.add(self)

    def writable(self):
        return True

    def tell(self):
        return self._written

    def write(self, data):
        if self._state != "open":
            raise ValueError(f"write to an S3 object that is {self._state}")
        # bytes(...) is free for bytes, and copies buffers the caller may reuse.
        chunk = data if isinstance(data, bytes) else bytes(data)
        if not chunk:
            return 0
        if self.copy_to is not None:
            try:
                self.copy_to.write(chunk)
            except OSError as error:  # a full disk stops the copy, not the upload
                self.copy_error, self.copy_to = error, None
        self._pieces.append(memoryview(chunk))
        self._buffered += len(chunk)
        self._written += len(chunk)
        while self._buffered >= self._current_part_size():
            self._send_part(self._take(self._current_part_size()))
        return len(chunk)

    def _current_part_size(self):
        doublings = len(self._parts) // _PARTS_PER_SIZE
        return min(self._part_size << doublings, _MAX_PART_SIZE)

    def _take(self, size):
        """The next size bytes written, as views of the caller's buffers."""
        views = []
        while size:
            piece = self._pieces.popleft()
            if len(piece) > size:
                rest = piece[size:]
                if len(rest) <= _MAX_COPIED_REST and 2 * len(rest) < len(rest.obj):
                    # A view keeps all of its buffer alive: a small rest (as
                    # the few bytes of a buffer of joblib's past the pickle
                    # header's offset) is copied, so the buffer goes with
                    # the part sent now. A large one is not: the caller may
                    # well hold its buffer (a large bytes in the result).
                    rest = memoryview(bytes(rest))
                self._pieces.appendleft(rest)
                piece = piece[:size]
            views.append(piece)
            size -= len(piece)
            self._buffered -= len(piece)
        return views

    def _send_part(self, views, last=False):
        try:
            self._start_part(views, last)
        except BaseException as error:
            self.error = error  # the upload's failure, not the pickling's
            raise

    def _start_part(self, views, last):
        if len(self._parts) == _MAX_PARTS:
            raise OSError(
                f"the result is too large for one S3 object with "
                f"part_size={self._part_size}: raise part_size"
            )
        if self._created is None:
            self._created = self._client.submit(
                "create_multipart_upload", Key=self._key, **self._metadata
            )
        # The last part (often the pickle's few closing bytes) does not wait
        # for a free slot: the upload would wait for one part's time for it.
        while len(self._in_flight) >= self._max_concurrency and not last:
            oldest = self._in_flight.popleft()
            self._waited = self._waited or not oldest.done()
            oldest.result()
        future = self._client.start(_upload_part(
            self._client, self._key, self._created, len(self._parts) + 1, views
        ))
        self._parts.append(future)
        self._in_flight.append(future)

    @property
    def in_one_wave(self):
        """Whether the parts all went out at once, none waiting for a slot."""
        return bool(self._parts) and not self._waited

    def parts_uploaded(self):
        """Wait for the parts to end; whether they were all uploaded."""
        concurrent.futures.wait(self._parts)
        return not any(part.cancelled() or part.exception() for part in self._parts)

    def commit(self):
        """Make the object visible; return a future of the response."""
        if self._state != "open":
            raise ValueError(f"commit of an S3 object that is {self._state}")
        if self._created is None:
            body = b"".join(self._take(self._buffered))
            publishing = self._client.submit(
                "put_object", Key=self._key, Body=body, **self._metadata
            )
        else:
            if self._buffered:
                self._send_part(self._take(self._buffered), last=True)
            publishing = self._client.start(self._complete())
        # Only now: an interrupt before this line aborts, one after it lets
        # the complete, whole result be published.
        self._state = "committed"
        _PROCESS.writers.discard(self)
        return publishing

    async def _complete(self):
        try:
            parts = [await asyncio.wrap_future(part) for part in self._parts]
            created = await _outcome(self._created)
            return await self._client.request(
                "complete_multipart_upload", Key=self._key,
                UploadId=created["UploadId"], MultipartUpload={"Parts": parts},
            )
        except BaseException:
            await self._abort_upload()
            raise

    async def _abort_upload(self):
        for part in self._parts:
            part.cancel()
        for part in self._parts:
            with contextlib.suppress(BaseException):
                await asyncio.wrap_future(part)
        try:
            created = await _outcome(self._created)
        except Exception:
            return  # no upload was made: nothing to abort
        try:
            await self._client.request(
                "abort_multipart_upload", Key=self._key, UploadId=created["UploadId"]
            )
        except Exception as error:
            self._client.warn(
                f"joblib_store could not abort the upload of "
                f"{self._client.url(self._key)} (endpoint {self._client.endpoint}): "
                f"{type(error).__name__}: {error}. A lifecycle rule for "
                f"incomplete multipart uploads removes its parts.",
                kind=("abort", type(error).__name__),
            )

    def abort(self, wait=True):
        """Forget what was written; nothing of it stays in the bucket.

        The parts in flight end first. Without ``wait`` (garbage collection
        may run on any thread, s3fs's loop thread included), the abort goes
        on in the background, and the interpreter waits for it at exit.
        """
        if self._state != "open":
            return
        self._state = "aborted"
        _PROCESS.writers.discard(self)
        self._pieces.clear()
        if self._created is not None and not sys.is_finalizing():
            aborting = self._client.start(self._abort_upload())
            _PROCESS.track(aborting)
            if wait:
                aborting.result(timeout=_EXIT_WAIT * 6)

    def close(self):
        """Closing without a commit aborts."""
        self.abort(wait=False)
        super().close()


async def _upload_part(client, key, created, number, views):
    """Upload one part (a function, not a method: a writer dropped while its
    parts are in flight is collected, and so aborted, at once)."""
    upload = await _outcome(created)
    response = await client.request(
        "upload_part", Key=key, UploadId=upload["UploadId"],
        PartNumber=number, Body=_PartBody(views),
    )
    return {"PartNumber": number, "ETag": response["ETag"]}


class _ObjectFile(_MultipartWriter):
    """An S3 object written as a file: closing it publishes the object,
    unless the block writing it raised."""

    def close(self):
        if self._state == "open":
            self.commit().result()
        super().close()

    def __exit__(self, error_type, error, traceback):
        if error_type is not None:
            self.abort()
        self.close()

# --------------------------------------------------------------------------
# 7. Local copies of results, and access records. Each is a small part the
# store owns; neither knows about joblib.
# --------------------------------------------------------------------------

_COPIES_FOLDER = "joblib-store-copies"  # the store touches nothing else
# <ETag>.<code digest>.<result id>.<unique>.pkl (the code digest and result
# id left out for a result that carries none, as S3 answers a lookup that
# finds a copy current with no user metadata): a name is never given to
# another file, so a copy held by a reader cannot be replaced under it.
_COPY_NAME = re.compile(
    r"([A-Za-z0-9-]+)(?:\.([0-9a-f]{32})(?:\.([0-9a-f]{32}))?)?\.[0-9a-f]{32}\.pkl"
)
_PART_NAME = re.compile(r"[A-Za-z0-9-]+\.pkl\.[0-9a-f]{32}\.part")
_STALE_PART = 300  # seconds after which a download's leftover is removed


class _LocalCopyUnusable(OSError):
    """The local copies cannot be used; loads go to S3 instead.

    ``path`` names a copy that failed to load, to be removed.
    """

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


def _etag_name(etag):
    """A file name for an ETag (quotes and anything odd dropped)."""
    return re.sub(r"[^A-Za-z0-9-]", "", etag)


def _default_local_cache_dir():
    """``$XDG_CACHE_HOME/joblib_store``, else ``~/.cache/joblib_store``."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    if cache_home.startswith("~"):
        raise _LocalCopyUnusable(
            "no home folder to keep them in: give local_cache_dir, or set XDG_CACHE_HOME"
        )
    return os.path.join(cache_home, "joblib_store")


def _check_trusted(folder):
    """Refuse a folder that another user could fill, or swap for their own.

    The folder must be the user's and closed to others; each folder above it
    must belong to the user or to root and, unless it is sticky as /tmp is,
    be closed to others' writes, so that nobody can rename it away.
    """
    me = os.geteuid() if hasattr(os, "geteuid") else None
    status = os.lstat(folder)
    if not stat.S_ISDIR(status.st_mode):
        raise _LocalCopyUnusable(f"{folder} is not a folder")
    if me is None:
        return
    if status.st_uid != me or status.st_mode & 0o022:
        raise _LocalCopyUnusable(f"{folder} belongs to another user or others may write it")
    above = os.path.dirname(os.path.realpath(folder))
    while True:
        status = os.stat(above)
        if status.st_uid not in (me, 0):
            raise _LocalCopyUnusable(f"{above} belongs to another user")
        if status.st_mode & 0o022 and not status.st_mode & stat.S_ISVTX:
            raise _LocalCopyUnusable(f"others may write {above}")
        if os.path.dirname(above) == above:
            return
        above = os.path.dirname(above)


class _LocalCopies:
    """Local files holding results, for memory-mapped and read-through hits.

    Layout: ``<folder>/joblib-store-copies/<digest of bucket and key>/
    <ETag>.<unique>.pkl``. The ETag names the version: a copy is used only
    while S3 holds that version, which the GET of a hit checks with
    If-None-Match at no extra request. A name is never given to another
    file: copies are written under a temporary name and renamed. Folders
    have mode 0700 and files 0600; see _check_trusted for the folders that
    are refused. The folder is found in the process that uses it; a
    relative one is relative to that process's working folder.

    Threads and processes share the copies: a hit holds a shared lock on
    the file while it opens and maps it, and eviction removes only files
    it can lock exclusively, so no hit loses its copy half-way. A mapped
    copy stays readable after it is evicted.
    """

    def __init__(self, folder, bytes_limit, bucket):
        self.given_folder = folder
        self.bytes_limit = bytes_limit
        self.bucket = bucket
        self._root = None

    @property
    def root(self):
        """The checked folder of the copies; raises _LocalCopyUnusable."""
        if self._root is None:
            base = os.path.abspath(self.given_folder or _default_local_cache_dir())
            root = os.path.join(base, _COPIES_FOLDER)
            try:
                os.makedirs(base, mode=0o700, exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(root, 0o700)
                _check_trusted(root)
            except _LocalCopyUnusable:
                raise
            except OSError as error:
                raise _LocalCopyUnusable(f"cannot use {root}: {error}") from None
            self._root = root
        return self._root

    def _folder(self, key):
        digest = hashlib.sha256(f"{self.bucket}\n{key}".encode("utf-8"))
        return os.path.join(self.root, digest.hexdigest()[:32])

    def find(self, key, code_digest=None):
        """The ETag, path and result id of the newest copy of key here, or
        None.

        With ``code_digest``, only a copy of a result of that code is found.
        """
        copies = []
        for entry in _entries(self._folder(key)):
            named = _COPY_NAME.fullmatch(entry.name)
            if named and code_digest is not None and named.group(2) != code_digest:
                continue
            status = _stat_quietly(entry) if named else None
            if status is not None and stat.S_ISREG(status.st_mode):
                copies.append((status.st_mtime, entry.path, named.group(1), named.group(3)))
        if not copies:
            return None
        _, path, etag, result_id = max(copies)
        return f'"{etag}"', path, result_id

    @contextlib.contextmanager
    def held(self, path):
        """Hold a copy while it is opened: yields whether it is still there.

        A copy evicted between its lookup and this hold yields False; one
        that cannot be opened or is not the user's raises _LocalCopyUnusable.
        """
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            yield False
            return
        except OSError as error:
            raise _LocalCopyUnusable(f"cannot open {path}: {error}", path) from None
        try:
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                status = os.fstat(fd)
            except OSError as error:
                raise _LocalCopyUnusable(f"cannot lock {path}: {error}") from None
            if hasattr(os, "geteuid") and status.st_uid != os.geteuid():
                raise _LocalCopyUnusable(f"{path} belongs to another user")
            if status.st_nlink > 0:
                with contextlib.suppress(OSError):  # a read-only folder still serves
                    os.utime(fd)  # copies are evicted least recently used first
            yield status.st_nlink > 0
        finally:
            os.close(fd)

    def new(self, key):
        """Start a new copy of key: a _NewCopy, written under a temporary name."""
        folder = self._folder(key)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder, 0o700)
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                raise OSError(f"{folder} is not a folder")
            partial = os.path.join(folder, f"new.pkl.{uuid.uuid4().hex}.part")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as error:
            raise _LocalCopyUnusable(f"cannot write in {folder}: {error}") from None
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_SH)  # held across the rename, until close
            return _NewCopy(self, folder, partial, fd)
        except OSError as error:
            os.close(fd)
            _remove_quietly(partial)
            raise _LocalCopyUnusable(f"cannot write in {folder}: {error}") from None

    def evict(self, keep=None):
        """Keep the copies under the bytes limit, least recently used first.

        Older versions of a result go first, and leftovers of interrupted
        downloads once they are a few minutes old. Copies in use stay.
        """
        copies, now = [], time.time()
        for folder in self._folders():
            versions = []
            for entry in _entries(folder):
                status = _stat_quietly(entry)
                if status is None or not stat.S_ISREG(status.st_mode):
                    continue
                if _PART_NAME.fullmatch(entry.name):
                    if now - status.st_mtime > _STALE_PART:
                        _remove_quietly(entry.path)
                elif _COPY_NAME.fullmatch(entry.name):
                    versions.append((status.st_mtime, status.st_size, entry.path))
            versions.sort()
            for old in versions[:-1]:
                if old[2] == keep or not self.remove(old[2]):
                    copies.append(old)
            copies.extend(versions[-1:])
        total = sum(size for _, size, _ in copies)
        for _, size, path in sorted(copies):
            if total <= self.bytes_limit:
                break
            if path != keep and self.remove(path):
                total -= size

    def drop(self, keys):
        """Forget the copies of the results at keys (they were deleted)."""
        try:
            self.root
        except _LocalCopyUnusable:
            return
        for key in keys:
            if key.endswith("/" + OUTPUT):
                folder = self._folder(key)
                for entry in _entries(folder):
                    if _COPY_NAME.fullmatch(entry.name):
                        self.remove(entry.path)
                with contextlib.suppress(OSError):
                    os.rmdir(folder)

    def _folders(self):
        try:
            root = self.root
        except _LocalCopyUnusable:
            return []
        return [
            entry.path for entry in _entries(root)
            if _HEX32.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
        ]

    @staticmethod
    def remove(path):
        """Remove a copy nobody holds; return whether it went."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return False
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)


class _NewCopy:
    """A local copy being written: ``file`` takes the bytes, ``publish``
    names it after the version it holds and the code that computed it,
    ``close()`` lets it go (and removes it if it was never published)."""

    def __init__(self, copies, folder, partial, fd):
        self._copies = copies
        self._folder = folder
        self._partial = partial
        self._fd = fd
        self.file = os.fdopen(os.dup(fd), "wb")
        self.path = None

    def __del__(self):
        # A copy left by a thread that ended: its descriptor and lock go.
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def publish(self, etag, code_digest=None, result_id=None):
        """Name the copy after its version; raises OSError if it cannot."""
        self.file.close()
        # Values not of our making are left out: the copy's name must match.
        code = ""
        if _is_hex32(code_digest):
            code = f".{code_digest}"
            if _is_hex32(result_id):
                code += f".{result_id}"
        name = f"{_etag_name(etag)}{code}.{uuid.uuid4().hex}.pkl"
        path = os.path.join(self._folder, name)
        os.replace(self._partial, path)
        self.path = path
        return path

    def close(self):
        """Let the copy go; never raises (a full disk only loses the copy)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.file.close()
        if self.path is None:
            _remove_quietly(self._partial)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None
        self._copies.evict(keep=self.path)


def _entries(folder):
    """The entries of a folder of ours, or none if it is missing or a link."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return []
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:
        return []


def _stat_quietly(entry):
    try:
        return entry.stat(follow_symlinks=False)
    except OSError:
        return None


def _remove_quietly(path):
    with contextlib.suppress(OSError):
        os.unlink(path)


class _AccessRecords:
    """Note in S3 when results are used, for least-recently-used eviction.

    S3 keeps no access time, so a hit writes an empty ``last_access`` object
    beside the result, in the background, at most once per ``interval``
    seconds per result and process: listing then gives every result's last
    access for free. The result itself is never rewritten, so its
    encryption, storage class and versions stay as they were; results that
    no hit has recorded count as used when written. Credentials that may
    not write get no further attempts after the first denial.
    """

    def __init__(self, client, interval):
        self.client = client
        self.interval = interval
        # Denied once, these credentials are denied for every store of the
        # process that reaches this bucket.
        self._denied_key = (client.bucket, client.endpoint)

    def record(self, item_key, last_modified=None):
        """Record a hit on the result under item_key, if due.

        ``last_modified`` is when the result was written, if the hit's
        response said it.
        """
        if self._denied_key in _PROCESS.denied_records:
            return
        now = time.time()
        recorded_key = (self.client.bucket, item_key)
        with _PROCESS.lock:
            latest = _PROCESS.recorded.get(recorded_key, 0.0)
            if last_modified is not None:
                latest = max(latest, last_modified.timestamp())
            if now - latest < self.interval:
                return
            _PROCESS.recorded[recorded_key] = now
        future = self.client.submit(
            "put_object", Key=f"{item_key}/{LAST_ACCESS}", Body=b""
        )
        future.add_done_callback(self._check_denied)
        _PROCESS.track(future)

    def written(self, item_key):
        """A result written now counts as used now."""
        with _PROCESS.lock:
            _PROCESS.recorded[(self.client.bucket, item_key)] = time.time()

    def _check_denied(self, future):
        if not future.cancelled() and _is_denied(future.exception() or Exception()):
            _PROCESS.denied_records.add(self._denied_key)

# --------------------------------------------------------------------------
# 8. The store: joblib's StoreBackendBase and StoreBackendMixin on top of
# the parts above.
# --------------------------------------------------------------------------

_BIG_TRANSFER = 8 * _MiB  # at verbose >= 10, transfers above this are reported
_SMALL_RESULT = 1 * _MiB  # uploads this small take a round trip, not bandwidth
_COMPLETE_BESIDE_METADATA = 80 * _MiB  # the largest upload completed in store_metadata
_LOAD_ATTEMPTS = 3  # loads of a result that writers keep replacing meanwhile

# The failure policy. Every failure of S3 that a store meets goes to
# S3StoreBackend._on_failure with the name of the operation, and this table
# alone says what it does:
_MISS = "miss"  # the call goes on without the cache; a warning, once per kind
_FUNCTION_OFF = "function off"  # the cache is off for the function (below)
_RAISE = "raise"  # the caller gets an error naming bucket and endpoint
_FAILURE_POLICY = {
    # In a cached call: the call computes and returns its result.
    "check the cache": {_MISS},
    "store a result": {_MISS},
    "store metadata": {_MISS},
    # Left, it would date an older result as new for a validation callback.
    "take back the metadata of a result not stored": {_MISS},
    "clear an entry that failed validation": {_MISS},
    # Whatever leaves in doubt which code the stored results belong to: the
    # function runs without the cache in this process, with one warning,
    # until a check of its stored code succeeds (at its next calls). So no
    # result of other code is returned, and none of this code is published
    # next to old code.
    "read function code": {_FUNCTION_OFF},
    "clear the results of changed code": {_FUNCTION_OFF},
    "store function code": {_FUNCTION_OFF},
    # Maintenance commands raise, every time they fail.
    "store function code after a clear": {_RAISE, _FUNCTION_OFF},
    "clear a function's results": {_RAISE},
    "clear a result": {_RAISE},
    "clear the cache": {_RAISE},
    "list the cache": {_RAISE},
    "evict results": {_RAISE},
}
# A load that fails raises to joblib, which recomputes (a miss) for a call
# and raises for MemorizedResult.get(); a load right after a miss (joblib
# maps the result it just stored) uses what the miss produced instead.


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



def _metadata_of(data):
    """The metadata in a metadata.json ({} where it is not a JSON object),
    as joblib wrote it, and the result id written beside it (or None).

    An ``input_args`` that is not an object is left out: joblib before 1.4
    reads it with ``.items()`` to print a load's message.
    """
    try:
        metadata = json.loads(data.decode("utf-8"))
    except ValueError:
        return {}, None
    if not isinstance(metadata, dict):
        return {}, None
    if not isinstance(metadata.get("input_args", {}), dict):
        del metadata["input_args"]
    return metadata, metadata.pop(_RESULT_ID_FIELD, None)


def _dated_by_the_older(found):
    """A lookup's answer whose metadata describes another write than the
    result's: its time becomes the older of its own and the result's
    Last-Modified (S3's clock). None (a miss) if the result's is unknown."""
    written = found.get("last_modified")
    if not isinstance(written, datetime.datetime):
        return None
    if written.tzinfo is None:
        written = written.replace(tzinfo=datetime.timezone.utc)
    metadata = found["metadata"]
    metadata["time"] = min(metadata["time"], written.timestamp())
    return found


def _is_a_time(value):
    """Whether value is a time as joblib writes it: a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def _readable_func_code(data):
    """Stored function code as joblib can compare it, whatever the bytes.

    Undecodable bytes or a broken first-line marker read as other code, so
    joblib clears the function's results instead of failing the call.
    """
    text = data.decode("utf-8", errors="replace")
    try:
        joblib.memory.extract_first_line(text)
    except ValueError:
        text = "#" + text  # no longer starts with joblib's marker
    return text


class _ResultLoads:
    """Lookups and loads of results, for one store in one process.

    A lookup is one GET that answers "is it there" and starts the load of
    the same call; a load reads ranges, through a local copy where the store
    keeps them, and starts again when another writer replaced the result.
    """

    def __init__(self, client, options, local_copies):
        self._client = client
        self._part_size = options.part_size
        self._max_concurrency = options.max_concurrency
        self._mmap_mode = options.mmap_mode
        self._copies = local_copies

    def load(self, key, found, code_digest=None):
        """Load the result at key: the item, the GET that moved its bytes (or
        None), and when the result was written (if known).

        ``found`` is what the lookup of the same joblib call learned; without
        it (``MemorizedResult.get()``, say) the load makes that lookup now,
        for a result of the code ``code_digest`` names if it names one.
        A result rewritten meanwhile by another writer of the same call is
        loaded again, in the version now stored.
        """
        for attempt in range(_LOAD_ATTEMPTS):
            try:
                return self._load_once(key, found, code_digest)
            except _VersionChanged:
                if attempt + 1 == _LOAD_ATTEMPTS:
                    raise
                found = None

    def current_copy(self, key, code_digest):
        """The ETag, path and result id of a local copy of key (of a result
        of the code code_digest names, if it names one), if copies work."""
        copies = self._copies
        if copies is None:
            return None
        try:
            return copies.find(key, code_digest)
        except _LocalCopyUnusable as error:
            self.warn_local(error)
            return None

    async def look_up(self, key, loads, validates, copy, code_digest=None):
        """Whether a result is stored, and what its lookup learned.

        The result's GET (or HEAD) and, for a validation callback, the
        metadata's GET go out together. A result of code other than the one
        ``code_digest`` names is a miss, and so is an entry whose metadata
        cannot be read when a callback needs it. Metadata that stands
        beside another result than the one it describes dates it by the
        older of the two (see _RESULT_ID).
        """
        client = self._client
        if loads:
            conditions = {"IfNoneMatch": copy[0]} if copy else {}
            output = client.open_range(
                key, _first_range_length(self._part_size), **conditions
            )
        else:
            output = client.request("head_object", Key=key)
        requests = [output]
        if validates:
            requests.append(client.read(posixpath.join(posixpath.dirname(key), METADATA)))
        answers = await asyncio.gather(*requests, return_exceptions=True)
        found, error, result_id = {}, None, None
        answer = answers[0]
        if isinstance(answer, _OpenedObject):
            found["opened"] = answer
            found["last_modified"] = answer.response.get("LastModified")
            result_id = _result_id_of(answer.response)
        elif isinstance(answer, dict):
            found["last_modified"] = answer.get("LastModified")
            result_id = _result_id_of(answer)
        elif _is_not_modified(answer):
            _, found["copy_path"], result_id = copy
            found["last_modified"] = _last_modified_of(answer)
        elif isinstance(answer, FileNotFoundError) or _is_missing(answer):
            found = None
        elif _error_code(answer)[0] == "InvalidRange":
            found = None  # an empty object: no result was ever complete there
        else:
            error = answer
        if found is not None and error is None and code_digest is not None:
            # A local copy confirmed current was found for this code already.
            headers = answer.response if isinstance(answer, _OpenedObject) else answer
            if "copy_path" not in found and _code_digest_of(headers) != code_digest:
                found = None  # computed by other code: a miss, recomputed and rewritten
        if validates and found is not None and error is None:
            metadata = answers[1]
            if isinstance(metadata, FileNotFoundError):
                found = None  # not written (yet): a miss, recomputed and rewritten
            elif isinstance(metadata, BaseException):
                error = metadata
            else:
                found["metadata"], described = _metadata_of(metadata)
                if not _is_a_time(found["metadata"].get("time")):
                    found = None  # not what joblib writes: a miss, as above
                elif described != result_id:
                    if "copy_path" in found:
                        # The same bytes stored again keep their ETag under
                        # a new id, and a 304 may carry no Last-Modified:
                        # ask S3 for the result itself (the load then
                        # writes the copy anew, under the id stored).
                        return await self.look_up(key, loads, validates, None, code_digest)
                    found = _dated_by_the_older(found)
        if (found is None or error is not None) and isinstance(answer, _OpenedObject):
            answer.close()
        if error is not None:
            raise error
        return found

    def _load_once(self, key, found, code_digest):
        """One attempt of load()."""
        if found is None:
            copy = self.current_copy(key, code_digest)
            answer = self._client.run(self.look_up(key, True, False, copy, code_digest))
            if answer is None:
                raise FileNotFoundError(self._client.url(key))
            found = _Found(self._client.url(key), frozenset(), **answer)
        copies = self._copies
        if copies is not None:
            try:
                item, opened = self._load_through_copy(key, found, code_digest)
                return item, opened, found.last_modified
            except _LocalCopyUnusable as error:
                # Never a reason to compute again: the result is in S3.
                self.warn_local(error)
                if error.path is not None:
                    copies.remove(error.path)
                found.let_go()
                found = _Found(found.url, frozenset(), last_modified=found.last_modified)
        opened = found.opened or self.open(key, code_digest)
        with self.reader(opened) as reader:
            item = _load(reader)
        return item, opened, found.last_modified or opened.response.get("LastModified")

    def _load_through_copy(self, key, found, code_digest):
        """Load from a local copy, writing it first if S3 has another version.

        Any failure of the copy raises _LocalCopyUnusable; a download that
        breaks or comes short fails the load.
        """
        copies = self._copies
        if found.copy_path is not None:
            with copies.held(found.copy_path) as there:
                if there:
                    return self.load_copy(found.copy_path), None
            found = _Found(found.url, frozenset())  # evicted since the lookup: fetch it again
        opened = found.opened or self.open(key, code_digest)
        try:
            new_copy = copies.new(key)
        except _LocalCopyUnusable:
            opened.close()
            raise
        try:
            written = 0
            with self.reader(opened) as reader:
                for chunk in iter(lambda: reader.read(_MiB), b""):
                    try:
                        new_copy.file.write(chunk)
                    except OSError as error:
                        raise _LocalCopyUnusable(f"cannot write a copy: {error}") from None
                    written += len(chunk)
            if written != opened.size:
                raise OSError(
                    f"{self._client.url(key)}: {written} of {opened.size} bytes came"
                )
            try:
                path = new_copy.publish(
                    opened.etag, _code_digest_of(opened.response), _result_id_of(opened.response)
                )
            except OSError as error:
                raise _LocalCopyUnusable(f"cannot write a copy: {error}") from None
            return self.load_copy(path), opened
        finally:
            new_copy.close()

    def load_copy(self, path):
        """Unpickle (or map) a local copy held by the caller."""
        try:
            return numpy_pickle.load(path, mmap_mode=self._mmap_mode)
        except Exception as error:
            raise _LocalCopyUnusable(
                f"cannot load the local copy {path}: {type(error).__name__}: {error}", path
            ) from None

    def reload(self, stored):
        """joblib's load of the result this very call just stored: its new
        local copy, mapped, or else the result itself."""
        try:
            if stored.new_copy is not None:
                return self.load_copy(stored.new_copy.path)
        except _LocalCopyUnusable as error:
            self.warn_local(error)
        finally:
            stored.let_go()
        return stored.item

    def open(self, key, code_digest=None):
        """GET the first range of the object at key (a result of the code
        ``code_digest`` names, if it names one)."""
        client = self._client
        opened = client.run(client.open_range(key, _first_range_length(self._part_size)))
        if code_digest is not None and _code_digest_of(opened.response) != code_digest:
            # Replaced by a result of other code since the lookup: look again.
            opened.close()
            raise _VersionChanged(client.url(key))
        return opened

    def reader(self, opened):
        """A reader of the whole object whose first range was opened."""
        return _RangedReader(
            self._client, opened, self._part_size, self._max_concurrency
        )

    def warn_local(self, error):
        """Warn that local copies are not used (once, as for a failure)."""
        self._client.warn(
            f"joblib_store cannot use local copies of results ({error}); "
            f"results are loaded from S3 instead.",
            kind=("local copies",),
        )


class _StoreParts:
    """What a store builds from its options in one process.

    Options that name no way to reach S3 (a location alone, as joblib gives
    for ``MemorizedFunc(f, "s3://...")``) connect as the last store
    configured in this process for the same bucket and endpoint did, or
    else through the AWS chain. What was taken from that store stays here,
    in this process: it is never pickled with the options.
    """

    def __init__(self, options):
        connection = options
        if not options.names_a_connection:
            with _PROCESS.lock:
                known = _PROCESS.options_by_bucket.get((options.bucket, options.given_endpoint))
            if known is not None:
                connection = dataclasses.replace(
                    options, storage_options=known.storage_options, fs=known.fs
                )
        self.connection = connection
        self.client = _BucketClient(_make_filesystem(connection), options.bucket, options.location)
        self.local_copies = None
        if options.uses_local_copies:
            self.local_copies = _LocalCopies(
                options.local_cache_dir, options.local_cache_bytes_limit, options.bucket
            )
        self.access_records = _AccessRecords(self.client, options.access_interval)
        self.loads = _ResultLoads(self.client, options, self.local_copies)


class S3StoreBackend(StoreBackendBase, StoreBackendMixin):
    """A joblib store backend that keeps the cache in an S3 bucket.

    Results are written straight to their final key, as one PUT or a
    streamed multipart upload made visible by one last request, and read as
    concurrent byte ranges; each carries the digest of the code that
    computed it, and is served only to that code. A warm hit is one GET;
    see the README for every operation. The store pickles as its options
    alone: a worker that unpickles it builds its own connections.
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
            ``part_size`` (bytes per uploaded part, default 8 MiB; loads
            read ranges of up to that) and ``max_concurrency`` (requests in
            flight for one transfer, default 8); ``access_interval``
            (seconds or a timedelta, default one hour: how stale a result's
            last-access time may get before a hit records it again);
            ``local_cache_dir``, a folder for local copies of results (used
            for every hit when given, and for memory-mapped hits, under
            ``$XDG_CACHE_HOME/joblib_store`` by default, when ``mmap_mode``
            is set); ``local_cache_bytes_limit`` (default 10 GiB, or a
            string such as '500M'). joblib's own ``compress`` and
            ``mmap_mode`` come from Memory's arguments of those names.

        A location alone (joblib configures ``MemorizedFunc(f, "s3://...")``
        that way) reaches the bucket with the options of the last store
        configured in this process for the same bucket and endpoint, or
        else with the AWS chain.
        """
        _refuse_loop_thread()
        options = _StoreOptions.parse(location, backend_options)
        previous = self.__dict__.get("options")
        if options.names_a_connection or previous is None or previous.bucket != options.bucket:
            previous = None
        if previous is not None:  # configure(store.location) keeps the store as is
            options = dataclasses.replace(
                options, storage_options=previous.storage_options, fs=previous.fs
            )
        parts = _StoreParts(options)
        checked = (options.bucket, parts.client.endpoint,
                   parts.connection.credentials_fingerprint())
        if checked not in _PROCESS.checked_buckets:
            parts.client.check_bucket(options.prefix, options.create_bucket)
            with _PROCESS.lock:
                _PROCESS.checked_buckets.add(checked)
        with _PROCESS.lock:
            if options.names_a_connection:
                _PROCESS.options_by_bucket[(options.bucket, options.given_endpoint)] = options
            _PROCESS.parts[self] = parts
        self.options = options
        self.location = options.location
        self.compress = options.compress
        self.mmap_mode = options.mmap_mode
        self.verbose = verbose

    @property
    def _parts(self):
        parts = _PROCESS.parts.get(self)
        if parts is None:
            with _PROCESS.lock:
                parts = _PROCESS.parts.get(self)
                if parts is None:
                    parts = _PROCESS.parts[self] = _StoreParts(self.options)
        return parts

    @property
    def _client(self):
        return self._parts.client

    @property
    def bucket(self):
        return self.options.bucket

    @property
    def prefix(self):
        return self.options.prefix

    @property
    def fs(self):
        """The s3fs filesystem that carries this process's requests."""
        return self._client.fs

    @property
    def endpoint(self):
        """The URL requests go to (never with credentials)."""
        return self._client.endpoint

    # ------------------------------------------------------- failure policy

    def _on_failure(self, operation, error, func_id=None):
        """Apply _FAILURE_POLICY to a failed operation of this store."""
        if isinstance(error, _WrongThreadError):
            raise error  # a mistake to fix in the calling code, not a failure of S3
        outcome = _FAILURE_POLICY[operation]
        client = self._client
        what = f"{type(error).__name__}: {error}"
        if _FUNCTION_OFF in outcome:
            function = _PROCESS.function(self.location, func_id)
            function.off = True
            client.warn(
                f"joblib_store turned the cache off for {func_id} in this "
                f"process: it could not {operation} in {self.location} "
                f"(endpoint {client.endpoint}): {what}. Calls compute without "
                f"the cache until its stored code can be checked.",
                kind=("off", func_id),
            )
        if _RAISE in outcome:
            raise client.error(operation, error) from error
        if _MISS in outcome:
            kind = "unreachable" if _is_unreachable(error) else type(error).__name__
            client.warn(
                f"joblib_store could not {operation} in {self.location} "
                f"(endpoint {client.endpoint}): {what}. The result is still "
                f"computed and returned.",
                kind=(operation, kind),
            )

    def _function(self, func_id):
        """This process's state of a function, after its code write landed."""
        function = _PROCESS.function(self.location, func_id)
        write = function.code_write
        if write is not None and write.done():
            function.code_write = None
            error = None if write.cancelled() else write.exception()
            if error is not None:
                self._on_failure("store function code", error, func_id)
        return function

    def _recover(self, func_id, function):
        """Check a function's stored code again; whether its cache is back on.

        Old results go when the stored code differs, and the current code is
        written when it differs or is missing, as joblib does.
        """
        if function.code is None:
            return False
        key = self._key_of_call([func_id], FUNC_CODE)
        client = self._client
        try:
            try:
                stored = _readable_func_code(client.run(client.read(key)))
            except FileNotFoundError:
                stored = None
            current = joblib.memory.extract_first_line(function.code)[0]
            if stored is not None and joblib.memory.extract_first_line(stored)[0] != current:
                self._clear_prefix(self._key_of_call([func_id]))
            if stored is None or stored != function.code:
                client.put(key, function.code.encode("utf-8"))
        except Exception:
            return False
        function.off = False
        return True

    # ------------------------------------------------------------- handover

    def _begin(self, *takes):
        """Start a backend call: the joblib call it serves.

        What earlier backend calls of this thread left and this one does not
        take (the slots named in ``takes``) is let go.
        """
        _refuse_loop_thread()
        call = _joblib_call(depth=3)
        _PROCESS.handover.let_go_all_but(*takes)
        return call

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
        """Open the object at a URL for reading ('rb') or writing ('wb').

        A written object appears when the file is closed, unless the block
        that wrote it raised.
        """
        key = self._key_of_url(f)
        if mode == "rb":
            loads = self._parts.loads
            return io.BufferedReader(loads.reader(loads.open(key)), buffer_size=_MiB)
        if mode == "wb":
            return _ObjectFile(
                self._client, key, self.options.part_size, self.options.max_concurrency
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
        try:
            self._clear_prefix(self._key_of_url(location).rstrip("/"))
        except Exception as error:
            self._on_failure("clear the cache", error)

    def _clear_prefix(self, key_prefix):
        self._delete(obj["Key"] for obj in self._client.list(key_prefix + "/"))

    def _delete(self, keys):
        """Delete keys, and the local copies of the results among them."""
        keys = list(keys)
        if self._parts.local_copies is not None:
            self._parts.local_copies.drop(keys)
        self._client.delete(keys)

    def get_items(self):
        """Every cached result, as ``CacheItemInfo(path, size, last_access)``.

        One listing request per 1000 keys, nothing per item.
        """
        try:
            return [item for item, _, has_result in self._list_items() if has_result]
        except Exception as error:
            self._on_failure("list the cache", error)

    def _list_items(self):
        """Every item folder: its CacheItemInfo, its keys, and whether it
        holds a result (an interrupted write, or an access record that
        landed after an eviction, can leave a folder without one).

        An item's last access is the newest LastModified among its objects,
        its access record included. This process's own pending writes and
        access records land first.
        """
        _wait_for_background_requests()
        folders = collections.defaultdict(list)
        for obj in self._client.list(self.prefix + "/"):
            folder, _, name = obj["Key"].rpartition("/")
            if _HEX32.fullmatch(posixpath.basename(folder)) and name in _ITEM_NAMES:
                folders[folder].append(obj)
        items = []
        for folder, objects in folders.items():
            size = sum(obj["Size"] for obj in objects)
            used = max(obj["LastModified"] for obj in objects).timestamp()
            last_access = datetime.datetime.fromtimestamp(used)
            item = CacheItemInfo(self._client.url(folder), size, last_access)
            has_result = any(obj["Key"].endswith("/" + OUTPUT) for obj in objects)
            items.append((item, [obj["Key"] for obj in objects], has_result))
        return items

    # ------------------------------------------------------------ fast paths
    # Each overrides a StoreBackendMixin method where S3 can do better than
    # the generic code built on the primitives above.

    def contains_item(self, call_id):
        # One GET of the result's first range when a load follows (its
        # answer serves that load, and nothing later), else one HEAD; a
        # missing key is a miss, never a listing. A lookup made beside the
        # read of func_code.py in the same joblib call answers instead.
        call = self._begin("looked_up")
        func_id = call_id[0]
        function = self._function(func_id)
        key = self._key_of_call(call_id, OUTPUT)
        looked_up = _PROCESS.handover.take("looked_up", self._client.url(key), call)
        if function.off:
            if looked_up is not None:
                looked_up.let_go()
            if not self._recover(func_id, function):
                return False
            looked_up = None
        try:
            if looked_up is None:
                found = self._client.run(self._look_up(call, key))
            elif looked_up.error is not None:
                raise looked_up.error
            else:
                found = looked_up.found
        except Exception as error:
            self._on_failure("check the cache", error)
            return False
        if found is None:
            return False
        if call is not None:
            _PROCESS.handover.put("found", _Found(self._client.url(key), call.anchors, **found))
        return True

    def _look_up(self, call, key):
        """The lookup of the result at key for a joblib call (a coroutine)."""
        loads = call is not None and call.loads_a_hit
        validates = (
            call is not None and call.validating
            and getattr(call.memorized, "cache_validation_callback", None) is not None
        )
        code_digest = call.code_digest(self._func_id_of(key)) if call is not None else None
        copy = self._parts.loads.current_copy(key, code_digest) if loads else None
        return self._parts.loads.look_up(key, loads, validates, copy, code_digest)

    def get_metadata(self, call_id):
        # What the lookup of this call fetched for a validation callback, or
        # else fetched only if read: a hit without a callback skips it.
        call = self._begin("found")
        key = self._key_of_call(call_id, METADATA)
        output_url = self._client.url(self._key_of_call(call_id, OUTPUT))
        found = _PROCESS.handover.take("found", output_url, call, keep=True)
        if found is not None and found.metadata is not None:
            return dict(found.metadata)
        client = self._client

        def fetch():
            try:
                return _metadata_of(client.run(client.read(key)))[0]
            except Exception:
                return {}

        return _LazyMetadata(fetch)

    def _load_output(self, call_id):
        call = self._begin("found", "stored")
        key = self._key_of_call(call_id, OUTPUT)
        url = self._client.url(key)
        stored = _PROCESS.handover.take("stored", url, call)
        if stored is not None:
            return self._parts.loads.reload(stored)
        found = _PROCESS.handover.take("found", url, call)
        started = time.perf_counter()
        try:
            code_digest = call.code_digest(call_id[0]) if call is not None else None
            item, opened, last_modified = self._parts.loads.load(key, found, code_digest)
        except FileNotFoundError:
            # The words of joblib's own backend.
            raise KeyError(
                f"Non-existing item (may have been cleared).\n"
                f"File {url} does not exist"
            ) from None
        if opened is not None:
            self._report_transfer("Loaded", opened.size, started, key)
        self._parts.access_records.record(posixpath.dirname(key), last_modified)
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
            """Load a cached result; a hit's lookup has fetched its start."""
            if verbose > 1:
                if verbose < 10:
                    print(f"{msg}...")
                else:
                    print(f"{msg} from {self._client.url(self._key_of_call(path))}")
            return self._load_output(path)

    else:

        def load_item(self, call_id, verbose=1, timestamp=None, metadata=None):
            """Load a cached result; a hit's lookup has fetched its start."""
            if verbose > 1:
                print(self._load_message(call_id, verbose, timestamp, metadata))
            return self._load_output(call_id)

        def _load_message(self, call_id, verbose, timestamp, metadata):
            # The same words as joblib's own backend.
            elapsed = ""
            if timestamp is not None:
                elapsed = "{: <16}".format(format_time(time.time() - timestamp))
            signature = posixpath.basename(call_id[0])
            if isinstance(metadata, dict) and isinstance(metadata.get("input_args"), dict):
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
        # The upload finishes beside the metadata's PUT (store_metadata).
        call = self._begin()
        func_id = call_id[0]
        key = self._key_of_call(call_id, OUTPUT)
        url = self._client.url(key)
        anchors = call.anchors if call is not None else frozenset()
        # joblib maps a result right after storing it when mmap_mode is set.
        reloads = self.mmap_mode is not None and not (call and call.shelves_a_miss)
        reloaded = item if reloads else None
        function = self._function(func_id)
        if function.off:
            self._leave_stored(url, anchors, reloaded)
            return
        if verbose > 10:
            print(f"Persisting in {self._client.url(posixpath.dirname(key))}")
        started = time.perf_counter()
        new_copy = self._new_copy(key) if reloaded is not None else None
        code_digest = result_id = None
        if call is not None:
            code_digest, result_id = call.code_digest(func_id), uuid.uuid4().hex
        writer = _MultipartWriter(
            self._client, key, self.options.part_size, self.options.max_concurrency,
            copy_to=new_copy.file if new_copy is not None else None,
            metadata=self._metadata_with(code_digest, result_id),
        )
        try:
            _dump(item, writer, self.compress)
            committed = writer.commit()
        except BaseException as error:
            writer.abort()
            if new_copy is not None:
                new_copy.close()
            if not isinstance(error, Exception):
                raise  # an interrupt: nothing was published
            self._leave_stored(url, anchors, reloaded)
            self._leave_unstored(url, anchors)
            if error is writer.error:
                self._on_failure("store a result", error)
            else:  # the result itself: a warning for each function
                warnings.warn(
                    f"Unable to cache {func_id} to S3: its result cannot be "
                    f"pickled ({type(error).__name__}: {error}). It is "
                    f"returned but not stored.",
                    CacheWarning,
                    stacklevel=2,
                )
            return
        if writer.copy_error is not None and new_copy is not None:
            self._parts.loads.warn_local(writer.copy_error)
            new_copy.close()
            new_copy = None
        publishing = _Publishing(
            url, anchors, store=self, future=committed, new_copy=new_copy,
            code_digest=code_digest, result_id=result_id, item=reloaded,
            started=started, size=writer.tell(),
        )
        _PROCESS.track(publishing.future)
        if anchors:
            _PROCESS.handover.put_written(_Written(url, anchors, result_id=result_id))
        # What is left of the upload goes out beside the metadata's PUT,
        # which store_metadata sends next, when it is one short request: a
        # small result's PUT, or the Complete of parts that all went out at
        # once and were all uploaded (waited for here, so that a failed part
        # is reported before any metadata is sent). The result id keeps a
        # metadata.json that lands without its result from making an older
        # result look new.
        # Else the upload ends here, as joblib warns of a store_metadata
        # that takes more than 0.5 s, which the Complete of a large upload
        # may (moto's takes 0.25 s for 64 MiB).
        ends_beside = bool(anchors) and (writer.tell() <= _SMALL_RESULT or (
            writer.in_one_wave and writer.tell() <= _COMPLETE_BESIDE_METADATA
            and writer.parts_uploaded()
        ))
        if ends_beside:
            _PROCESS.handover.put("publishing", publishing)
        else:
            self._finish_publishing(publishing)

    def _metadata_with(self, code_digest, result_id):
        """The user metadata of a result: the user's own (s3fs's
        s3_additional_kwargs), the digest of its code and its result id,
        where known."""
        ours = {_CODE_DIGEST: code_digest, _RESULT_ID: result_id}
        ours = {name: value for name, value in ours.items() if value is not None}
        if not ours:
            return None
        own = self.fs.s3_additional_kwargs.get("Metadata") or {}
        return {**own, **ours}

    def _leave_unstored(self, url, anchors):
        """Note that the result of this joblib call was not stored."""
        if anchors:
            _PROCESS.handover.put("unstored", _Unstored(url, anchors))

    def _leave_stored(self, url, anchors, item, new_copy=None):
        """Leave a result just stored for joblib's reload of it (mmap_mode)."""
        if item is not None and anchors:
            _PROCESS.handover.put("stored", _Stored(url, anchors, item=item, new_copy=new_copy))
        elif new_copy is not None:
            new_copy.close()

    def _new_copy(self, key):
        """A local copy to write beside an upload, or None if none can be."""
        copies = self._parts.local_copies
        if copies is None:
            return None
        try:
            return copies.new(key)
        except OSError as error:
            self._parts.loads.warn_local(error)
            return None

    def _finish_publishing(self, publishing, metadata_write=None):
        """Wait for a result's upload (and the metadata's PUT beside it)."""
        key = self._key_of_url(publishing.url)
        func_id = self._func_id_of(key)
        try:
            response, failure = publishing.future.result(), None
        except Exception as error:
            response, failure = None, error
        # The function's code write went out beside the result's upload;
        # its failure turns the function off, and that warning says it all.
        code_write = _PROCESS.function(self.location, func_id).code_write
        if code_write is not None:
            concurrent.futures.wait([code_write])
        code_failed = self._function(func_id).off
        if failure is not None:
            self._leave_unstored(publishing.url, publishing.anchors)
            if not code_failed:
                self._on_failure("store a result", failure)
        new_copy = publishing.new_copy
        if response is not None:
            self._report_transfer("Stored", publishing.size, publishing.started, key)
            self._parts.access_records.written(posixpath.dirname(key))
        if new_copy is not None:
            try:
                if response is None:
                    raise OSError("the upload failed")
                new_copy.publish(response["ETag"], publishing.code_digest, publishing.result_id)
            except OSError as error:
                if response is not None:
                    self._parts.loads.warn_local(error)
                new_copy.close()
                new_copy = None
        if metadata_write is not None:
            try:
                metadata_write.result()
            except Exception as error:
                if not code_failed:
                    self._on_failure("store metadata", error)
            else:
                if failure is not None:
                    # The metadata went out beside a result that was not
                    # stored: left, it would date an older result as new,
                    # and a validation callback (expires_after) would serve
                    # it. Without it, that result is a miss to the callback.
                    metadata_key = posixpath.join(posixpath.dirname(key), METADATA)
                    try:
                        self._client.call("delete_object", Key=metadata_key)
                    except Exception as error:
                        self._on_failure("take back the metadata of a result not stored", error)
        # joblib maps the result next; its new copy stays held till then.
        self._leave_stored(publishing.url, publishing.anchors, publishing.item, new_copy)

    def _func_id_of(self, key):
        """The func_id of a key of a result, <prefix>/<func_id>/<args_id>/<name>."""
        return posixpath.dirname(posixpath.dirname(key))[len(self.prefix) + 1:]

    def store_metadata(self, call_id, metadata):
        call = self._begin("publishing", "stored", "unstored")
        url = self._client.url(self._key_of_call(call_id, OUTPUT))
        publishing = _PROCESS.handover.take("publishing", url, call)
        result_id = _PROCESS.handover.take_written(url, call)
        function = self._function(call_id[0])
        if function.off or _PROCESS.handover.take("unstored", url, call):
            # No metadata for a result that is not stored.
            if publishing is not None:
                self._finish_publishing(publishing)
            return
        if result_id is not None:
            metadata = {**metadata, _RESULT_ID_FIELD: result_id}
        # Beside the result's upload.
        metadata_write = self._client.submit(
            "put_object", Key=self._key_of_call(call_id, METADATA),
            Body=json.dumps(metadata).encode("utf-8"),
        )
        if publishing is not None:
            self._finish_publishing(publishing, metadata_write)
            return
        try:
            metadata_write.result()
        except Exception as error:
            if not self._function(call_id[0]).off:  # else its warning says it all
                self._on_failure("store metadata", error)

    def clear_item(self, call_id):
        # The names are known: one DeleteObjects, no listing.
        call = self._begin()
        operation = "clear a result"
        if call is not None and call.validating:
            operation = "clear an entry that failed validation"
        try:
            self._delete(self._key_of_call(call_id, name) for name in _ITEM_NAMES)
        except Exception as error:
            self._on_failure(operation, error)

    def contains_path(self, call_id):
        # joblib's generic version calls a method that does not exist.
        self._begin()
        return self._key_exists(self._key_of_call(call_id))

    def clear_path(self, call_id):
        # No existence check first: listing an empty prefix answers that.
        call = self._begin()
        func_id = call_id[0]
        if call is not None and call.checking_code:
            if self._function(func_id).off:
                return  # the check that turns it back on clears them
            operation = "clear the results of changed code"
        else:
            operation = "clear a function's results"
        try:
            self._clear_prefix(self._key_of_call(call_id))
        except Exception as error:
            self._on_failure(operation, error, func_id)

    def store_cached_func_code(self, call_id, func_code=None):
        # Without code joblib only asks for a folder, which S3 does not need.
        if func_code is None:
            return
        call = self._begin()
        func_id = call_id[0]
        function = self._function(func_id)
        function.code = func_code
        during_a_call = call is not None and call.checking_code
        if function.off and during_a_call:
            return  # the check that turns it back on writes it
        key = self._key_of_call(call_id, FUNC_CODE)
        write = self._client.submit("put_object", Key=key, Body=func_code.encode("utf-8"))
        if during_a_call:
            # The write goes on while the function computes and its results
            # upload: they carry the digest of their code (_CODE_DIGEST), so
            # none is served to a call of other code, written or not.
            function.code_write = write
            _PROCESS.track(write)
            return
        try:  # func.clear(): its results are gone, now its code is written
            write.result()
        except Exception as error:
            self._on_failure("store function code after a clear", error, func_id)
        function.off = False

    def get_cached_func_code(self, call_id):
        # joblib reads an OSError as "no code stored yet" and then stores
        # its code: for a failure other than a missing file, the function's
        # cache goes off first, so that code is not written next to results
        # of code nobody could check.
        call = self._begin()
        func_id = call_id[0]
        function = self._function(func_id)
        key = self._key_of_call(call_id, FUNC_CODE)
        client = self._client
        # The lookup joblib makes next, when the code is the caller's, goes
        # out beside this read: a hit in a process that did not write the
        # code takes one round trip, not two.
        output_key = lookup = code_digest = None
        if call is not None and call.args_id and not function.off:
            code_digest = call.code_digest(func_id)
        if code_digest is not None:
            output_key = self._key_of_call((func_id, call.args_id), OUTPUT)
            lookup = self._look_up(call, output_key)
        try:
            code, answer = client.run(self._read_code(key, lookup, code_digest))
        except FileNotFoundError:
            raise  # no code stored yet: joblib writes its own next
        except Exception as error:
            self._on_failure("read function code", error, func_id)
            raise OSError(f"cannot read {client.url(key)}: {error}") from error
        if answer is not _NO_ANSWER:
            # What it found, or its failure (which its retries did not end),
            # serves the existence check that follows.
            _PROCESS.handover.put("looked_up", _LookedUp(
                client.url(output_key), call.anchors,
                found=None if isinstance(answer, Exception) else answer,
                error=answer if isinstance(answer, Exception) else None,
            ))
        return code

    async def _read_code(self, key, lookup, code_digest):
        """func_code.py as joblib compares it, and the answer of the lookup
        (a coroutine, or None) made beside it: what it found, or its
        exception, or _NO_ANSWER. A lookup joblib will not make (the code is
        missing, unreadable, or not the caller's) is let go unawaited."""
        if lookup is None:
            return _readable_func_code(await self._client.read(key)), _NO_ANSWER
        looking = asyncio.ensure_future(lookup)
        try:
            code = _readable_func_code(await self._client.read(key))
        except BaseException:
            _let_go_of_lookup(looking)
            raise
        if _code_digest(joblib.memory.extract_first_line(code)[0]) != code_digest:
            _let_go_of_lookup(looking)
            return code, _NO_ANSWER
        try:
            return code, await looking
        except Exception as error:
            return code, error

    def clear(self):
        self._begin()
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
        self._begin()
        if isinstance(bytes_limit, str):
            bytes_limit = memstr_to_bytes(bytes_limit)
        if age_limit is not None and age_limit.total_seconds() < 0:
            raise ValueError("age_limit has to be a positive timedelta")
        try:
            listed = self._list_items()
        except Exception as error:
            self._on_failure("list the cache", error)
        # Folders without a result go first; they count as items meanwhile.
        listed.sort(key=lambda entry: (entry[2], entry[0].last_access))
        total_size = sum(item.size for item, _, _ in listed)
        extra_items = 0 if items_limit is None else len(listed) - items_limit
        extra_bytes = 0 if bytes_limit is None else total_size - bytes_limit
        deadline = None if age_limit is None else datetime.datetime.now() - age_limit

        doomed = []
        for item, keys, _ in listed:
            too_old = deadline is not None and item.last_access < deadline
            if extra_items <= 0 and extra_bytes <= 0 and not too_old:
                break
            if self.verbose > 10:
                print(f"Deleting item {item}")
            doomed.append((item, keys))
            extra_items -= 1
            extra_bytes -= item.size
        if not dry_run:
            try:
                self._delete(key for _, keys in doomed for key in keys)
            except Exception as error:
                self._on_failure("evict results", error)
        return [item for item, _ in doomed]

    if not _HAS_ENFORCE_STORE_LIMITS:
        # Breakpoint: joblib < 1.3 calls reduce_store_size(bytes_limit).
        def reduce_store_size(self, bytes_limit):
            """Delete the least recently used results beyond bytes_limit."""
            self.enforce_store_limits(bytes_limit)



# --------------------------------------------------------------------------
# 9. Registration
# --------------------------------------------------------------------------


def _route_s3_urls(factory):
    """Wrap joblib's backend factory so 's3://' locations need no backend=."""

    @functools.wraps(factory)
    def store_backend_factory(backend, location, *args, **kwargs):
        if isinstance(location, str) and location[:5].lower() == "s3://":
            if backend == "local":
                backend = "s3"
            if joblib.memory._STORE_BACKENDS.get(backend) is None:
                # Never a local folder named "s3:".
                raise ValueError(
                    f"no store backend {backend!r} is registered for "
                    f"{location!r}: call joblib_store.register_s3_store_backend()"
                )
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


# Importing the module registers it: a worker that unpickles a store, a
# cached function or a MemorizedResult imports this module, and so routes
# s3:// locations to S3 without any call of its own.
register_s3_store_backend()


# --------------------------------------------------------------------------
# 10. Command line: python -m joblib_store ls | prune | clear | demo
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
