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

1. What the installed joblib offers (search "Breakpoint"), and which of its
   public methods the store scopes its calls by.
2. The layout of a cache in a bucket, code digests and result ids.
3. Options: what ``configure`` receives, validated into one immutable
   ``_StoreOptions``.
4. Per-process state: checked buckets, outages, functions whose cache is
   off; a forked child starts afresh.
5. The bucket client: every request, its log line, the translation of
   errors into the exceptions users see, outages and warnings. Nothing
   joblib-specific.
6. Transfers: the ranged reader, the multipart writer and zlib, the one
   place where byte ranges, parts and their concurrency live.
7. Local copies of results, and access records for least-recently-used
   eviction, each a small class owned by the store.
8. The store: the failure policy, lookups and loads of results, one joblib
   call (``_Call``), the write of a result (``_Write``), leases for
   ``compute_once``, eviction, then ``S3StoreBackend``, joblib's backend
   contract on top of them.
9. Registration with joblib, and the call scopes.
10. The command line.

Words used here in a sense of their own:

call
    One joblib call (a cached call, ``call_and_shelve``, ``get()``, ...),
    from the public method that began it to its end: a ``_Call``.
lookup
    The request that answers "is this result stored?": a GET of its first
    range where a load follows (the same GET serves the load), else a HEAD.
beside
    Sent at the same time as another request, in one round trip.
code digest
    A digest of the code that computed a result, carried by the result.
result id
    A random id a result and its metadata.json both carry, so that metadata
    is never taken for another result's.
let go
    Given up without being waited for: a lookup joblib will not use is
    cancelled, and what it opened closed.
off
    A function whose cache is off in this process: it computes without the
    cache until a check of its stored code succeeds.
lease
    With ``compute_once``, the right to compute one call, held by one writer.

Copyright (c) 2026, the joblib-store developers. BSD 3-clause licence.
"""

__all__ = ["S3StoreBackend", "register_s3_store_backend"]
__version__ = "0.3.0"

import asyncio
import bisect
import collections
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import datetime
import enum
import functools
import hashlib
import importlib.machinery
import inspect
import io
import itertools
import json
import logging
import math
import os
import posixpath
import queue
import random
import re
import stat
import sys
import threading
import time
import types
import uuid
import warnings
import weakref
import zlib

import joblib
import joblib.func_inspect
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

# Silent unless configured: one line per S3 request at DEBUG, and at INFO
# each decision a user may wonder about (a miss for other code, a function
# turned off or on, an outage). Never a credential.
_log = logging.getLogger("joblib_store")

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

# Breakpoint: joblib's proposed SQL store makes StoreBackendMixin a subclass
# of StoreBackendBase. Listed mixin first, the bases have one order in both.
_STORE_BASES = (StoreBackendMixin, StoreBackendBase)

# joblib's backend API does not say which call a backend call serves. The
# store learns it from joblib's public methods instead, which registration
# wraps in a call scope (see _Call): MemorizedFunc's __call__, call,
# call_and_shelve, check_call_in_cache and clear (and AsyncMemorizedFunc's),
# MemorizedResult's get and clear, and Memory's clear and reduce_size. A
# public method of MemorizedFunc this module does not know is wrapped too, as
# a call that never raises and loads nothing ahead.
_SCOPED_METHODS = {
    joblib.memory.MemorizedFunc: {
        "__call__": "CALL", "call_and_shelve": "SHELVE",
        "check_call_in_cache": "CHECK", "call": "FORCE", "clear": "CLEAR",
    },
    joblib.memory.MemorizedResult: {"get": "GET", "clear": "MAINTENANCE"},
    joblib.memory.Memory: {"clear": "MAINTENANCE", "reduce_size": "MAINTENANCE"},
}
# Breakpoint: joblib < 1.4 has no AsyncMemorizedFunc.
_ASYNC_MEMORIZED_FUNC = getattr(joblib.memory, "AsyncMemorizedFunc", None)
if _ASYNC_MEMORIZED_FUNC is not None:
    _SCOPED_METHODS[_ASYNC_MEMORIZED_FUNC] = _SCOPED_METHODS[joblib.memory.MemorizedFunc]

# One speed-up needs a private name: the args_id of a call, which joblib
# computes before it checks the function's code, lets the lookup go out
# beside the read of func_code.py (one round trip for a hit in a process
# that did not write the code, instead of two), and lets compute_once take
# a lease where joblib writes the code and computes without a lookup.
# Breakpoint: joblib < 1.4 names it _get_argument_hash, later _get_args_id.
# Where neither exists, both are lost, with one warning, and nothing else.
_ARGS_ID_METHOD = next(
    (name for name in ("_get_args_id", "_get_argument_hash")
     if inspect.isfunction(getattr(joblib.memory.MemorizedFunc, name, None))),
    None,
)
# Breakpoint: joblib < 1.4 keeps no func_id on a MemorizedFunc.
_build_func_identifier = getattr(joblib.memory, "_build_func_identifier", None)


# --------------------------------------------------------------------------
# 2. Layout of a cache in a bucket. It is joblib's folder layout, one object
# per file: <prefix>/<func_id>/func_code.py and <prefix>/<func_id>/<args_id>/
# {output.pkl, metadata.json}, where func_id may itself contain slashes,
# plus an empty <args_id>/last_access whose LastModified is the last hit,
# and with compute_once an <args_id>/lease.
# --------------------------------------------------------------------------

OUTPUT = "output.pkl"
METADATA = "metadata.json"
FUNC_CODE = "func_code.py"
LAST_ACCESS = "last_access"
LEASE = "lease"  # who computes the call, with compute_once (see _Leases)
_ITEM_NAMES = (OUTPUT, METADATA, LAST_ACCESS, LEASE)
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
# S3 takes 5 MiB to 5 GiB per part, and up to 10 000 parts per upload.
_MIN_PART_SIZE = 5 * _MiB
_MAX_PART_SIZE = 5 * 2**30
DEFAULT_PART_SIZE = 8 * _MiB
DEFAULT_MAX_CONCURRENCY = 8
DEFAULT_ACCESS_INTERVAL = 3600  # seconds between two access records of a result
DEFAULT_LOCAL_CACHE_BYTES_LIMIT = 10 * 2**30
DEFAULT_LEFTOVER_AGE = 86400  # seconds before eviction removes leftovers
DEFAULT_LEASE_LIFETIME = 60  # seconds, for compute_once=True
_MOST_LEASE_LIFETIME = 86400  # seconds: longer leases would only delay a takeover

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
    "compute_once",
    "leftover_age",
)
_JOBLIB_OPTIONS = ("compress", "mmap_mode")
_MMAP_MODES = (None, "r", "r+", "w+", "c")
# The s3fs keywords whose type a mistake would otherwise reach botocore
# with (as a bare TypeError or ValueError), or reach S3 as something else.
_STORAGE_OPTION_TYPES = {
    "endpoint_url": str, "key": str, "secret": str, "token": str, "profile": str,
    "anon": bool, "requester_pays": bool, "use_ssl": bool, "version_aware": bool,
    "cache_regions": bool, "skip_instance_cache": bool, "use_listings_cache": bool,
    "client_kwargs": dict, "config_kwargs": dict, "s3_additional_kwargs": dict,
}


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
    among them) is left out of the repr; ``compute_once`` is the lease's
    lifetime in seconds, or None.
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
    compute_once: object = None
    leftover_age: float = DEFAULT_LEFTOVER_AGE

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

        Raises TypeError or ValueError with a message that says what to fix
        (and never shows a credential).
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
        # s3fs keywords given directly join those in storage_options.
        storage_options = _checked_storage_options(ours.pop("storage_options", None), options)
        fs = _checked_filesystem(ours.pop("fs", None))
        if fs is not None and storage_options:
            raise TypeError(
                "give either a ready S3FileSystem as fs, or options to build "
                f"one ({', '.join(sorted(storage_options))}), not both"
            )
        bucket, prefix = _parse_location(location, ours.pop("bucket", None))
        return cls(bucket=bucket, prefix=prefix, storage_options=storage_options, fs=fs,
                   **_checked_tuning(ours))


def _checked_tuning(ours):
    """Our options and joblib's, checked, as fields of _StoreOptions."""
    bytes_limit = ours.get("local_cache_bytes_limit", DEFAULT_LOCAL_CACHE_BYTES_LIMIT)
    if isinstance(bytes_limit, str):
        try:
            bytes_limit = memstr_to_bytes(bytes_limit)
        except ValueError:
            raise ValueError(
                f"local_cache_bytes_limit={bytes_limit!r} is not a size: give a number of "
                f"bytes, or a string such as '500M' or '2G'") from None
    mmap_mode = ours.get("mmap_mode")
    if mmap_mode not in _MMAP_MODES:
        raise ValueError(f"mmap_mode={mmap_mode!r} is not valid: use one of {_MMAP_MODES}")
    return dict(
        compress=_check_compress(ours.get("compress", False)),
        mmap_mode=mmap_mode,
        create_bucket=_check_bool("create_bucket", ours.get("create_bucket", False)),
        part_size=_check_int("part_size", ours.get("part_size", DEFAULT_PART_SIZE),
                             _MIN_PART_SIZE, _MAX_PART_SIZE),
        max_concurrency=_check_int(
            "max_concurrency", ours.get("max_concurrency", DEFAULT_MAX_CONCURRENCY), 1),
        access_interval=_seconds(
            "access_interval", ours.get("access_interval", DEFAULT_ACCESS_INTERVAL)),
        # The default folder is found where the store is used, not here.
        local_cache_dir=_checked_folder(ours.get("local_cache_dir")),
        local_cache_bytes_limit=_check_int("local_cache_bytes_limit", bytes_limit, 0),
        compute_once=_lease_lifetime(ours.get("compute_once", False)),
        leftover_age=_seconds("leftover_age", ours.get("leftover_age", DEFAULT_LEFTOVER_AGE)),
    )


def _checked_storage_options(given, direct):
    """storage_options and the s3fs keywords given directly, in one dict;
    a value of the wrong type is named by its option, never shown."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise TypeError(f"storage_options must be a dict, not {type(given).__name__}")
    storage_options = {**given, **direct}
    for name, value in storage_options.items():
        wanted = _STORAGE_OPTION_TYPES.get(name)
        if wanted is not None and value is not None and not isinstance(value, wanted):
            raise TypeError(f"{name} must be a {wanted.__name__}, not {type(value).__name__}")
    client_kwargs = storage_options.get("client_kwargs") or {}
    for endpoint in (storage_options.get("endpoint_url"), client_kwargs.get("endpoint_url")):
        if endpoint is not None and not (
                isinstance(endpoint, str) and endpoint.startswith(("http://", "https://"))):
            shown = _without_userinfo(endpoint) if isinstance(endpoint, str) else type(endpoint).__name__
            raise ValueError(
                f"endpoint_url {shown!r} is not an http:// or https:// URL: write it as "
                f"'https://host[:port]'")
        if endpoint is not None and "@" in endpoint:
            # Never echoed: what stands before the "@" may be a key and secret.
            raise ValueError(
                "endpoint_url cannot carry credentials ('http://...@host'): give them "
                "as key and secret in backend_options, or through the AWS chain")
    return storage_options


def _checked_filesystem(fs):
    if fs is not None and not isinstance(fs, _s3fs().S3FileSystem):
        raise TypeError(f"fs must be an s3fs.S3FileSystem, not {type(fs).__name__}")
    if fs is not None and fs.asynchronous:
        raise TypeError(
            "fs must be made with asynchronous=False: joblib calls the "
            "store from ordinary code, and the store runs s3fs's loop"
        )
    return fs


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
        bucket, prefix = _split_s3_url(location, bucket)
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


def _split_s3_url(location, bucket):
    """The bucket and prefix of an s3:// URL (bucket: the option's, if given)."""
    url_bucket, _, prefix = location[5:].partition("/")
    if "@" in url_bucket or ":" in url_bucket:
        # A bucket name holds no ":", but a secret key may hold a "/".
        # Never echoed: what stands before the "@" may be a key and secret.
        raise ValueError(
            "an s3:// location cannot carry credentials ('...@bucket'): give them "
            "as key and secret in backend_options, or through the AWS chain "
            "(environment, ~/.aws, an instance role)"
        )
    if bucket is not None and url_bucket != bucket:
        raise ValueError(
            f"location {location!r} names bucket {url_bucket!r} but the "
            f"bucket option says {bucket!r}: give the bucket once"
        )
    if not url_bucket:
        raise ValueError(
            f"location {location!r} names no bucket: write it as 's3://BUCKET/PREFIX'"
        )
    return url_bucket, prefix


def _check_compress(compress):
    """compress, if joblib takes it; else a clear error now, not later."""
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
    return compress


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__}")
    return value


def _check_int(name, value, minimum, maximum=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}={value} is too small: the minimum is {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} is too large: the maximum is {maximum} "
                         f"(S3 takes parts of up to 5 GiB; a store holds up to "
                         f"max_concurrency parts in memory)")
    return value


def _seconds(name, value):
    """A duration option as seconds, from a number or a timedelta."""
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be seconds or a timedelta, not {type(value).__name__}")
    if not _is_a_time(value) or value < 0:
        raise ValueError(f"{name}={value} must be a finite number of seconds, 0 or more")
    return value


def _checked_folder(folder):
    """local_cache_dir as a str path, or None."""
    if folder is None:
        return None
    try:
        path = os.fspath(folder)
    except TypeError:
        raise TypeError(
            f"local_cache_dir must be a path (str or os.PathLike), not "
            f"{type(folder).__name__}") from None
    if not isinstance(path, str):
        raise TypeError("local_cache_dir must be a str path, not bytes: decode it first")
    if not path:
        raise ValueError("local_cache_dir is empty: give a folder, or leave it out")
    return os.path.expanduser(path)


def _lease_lifetime(compute_once):
    """compute_once as the lease's lifetime in seconds, or None (off)."""
    if compute_once is False or compute_once is None:
        return None
    if compute_once is True:
        return float(DEFAULT_LEASE_LIFETIME)
    if isinstance(compute_once, bool) or not isinstance(
            compute_once, (int, float, datetime.timedelta)):
        raise TypeError(f"compute_once must be True, False, or a lease's lifetime in "
                        f"seconds, not {type(compute_once).__name__}")
    lifetime = _seconds("compute_once", compute_once)
    if not 1 <= lifetime <= _MOST_LEASE_LIFETIME:
        raise ValueError(
            f"compute_once={compute_once} is out of range: a lease lives 1 s to one day "
            f"({_MOST_LEASE_LIFETIME} s; a holder renews it for as long as it computes)")
    return float(lifetime)


def _is_a_time(value):
    """Whether value is a time as joblib writes it: a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


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


class _ProcessState:
    """Everything one process knows beyond the stores' own options.

    ``lock`` guards these tables and nothing else: it is held for a lookup
    or an update, never while waiting for s3fs's event loop, whose own
    callbacks take it.
    """

    def __init__(self):
        self.lock = threading.Lock()
        # (bucket, endpoint, credentials digest) that passed the check.
        self.checked_buckets = set()
        # (bucket, endpoint) -> the options of the last store configured there.
        self.options_by_bucket = {}
        self.parts = weakref.WeakKeyDictionary()  # store -> _StoreParts
        self.outages = {}  # (endpoint, loop) -> _Outage
        self.warned = set()
        self.functions = {}  # (location, func_id) -> _FunctionState
        self.recorded = {}  # (bucket, key) -> when this process last recorded a hit
        # (bucket, endpoint, credentials digest) that may not write records.
        self.denied_records = set()
        self.pending = set()  # writes nobody waits for yet
        self.writers = weakref.WeakSet()  # uploads neither committed nor aborted
        self.conditional_writes = {}  # (bucket, endpoint) -> whether honoured
        self.local_leases = {}  # lease key -> _LocalLease of a thread computing it
        self.exit_hook = False

    def function(self, location, func_id):
        with self.lock:
            return self.functions.setdefault((location, func_id), _FunctionState())

    def ensure_exit_hook(self):
        with self.lock:
            if self.exit_hook:
                return
            self.exit_hook = True
        import atexit

        atexit.register(_finish_at_exit)

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
    # Breakpoint: fsspec < 2025.3.1 keeps, in a forked child, the parent's
    # event loop, whose thread the child does not have: its first request
    # would wait for ever. Later releases start afresh by themselves.
    fsspec_asyn = sys.modules.get("fsspec.asyn")
    if fsspec_asyn is not None and not hasattr(fsspec_asyn, "reset_after_fork"):
        fsspec_asyn.loop[0] = fsspec_asyn.iothread[0] = None
        fsspec_asyn.reset_lock()
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


def _server_time_of(response):
    """The server's time when it answered (its Date header), as an aware
    datetime; the local clock's where the answer has none."""
    headers = (response or {}).get("ResponseMetadata", {}).get("HTTPHeaders", {})
    try:
        from email.utils import parsedate_to_datetime

        return parsedate_to_datetime(headers["date"])
    except (KeyError, TypeError, ValueError, IndexError):
        return datetime.datetime.now(datetime.timezone.utc)


def _age_of(response):
    """Seconds since the object of a GET's or HEAD's answer was written, by
    the server's clock alone, or None."""
    written = response.get("LastModified")
    if not isinstance(written, datetime.datetime):
        return None
    if written.tzinfo is None:
        written = written.replace(tzinfo=datetime.timezone.utc)
    return (_server_time_of(response) - written).total_seconds()


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
        if self.down:
            _log.info("the endpoint %s answers again", client.endpoint)
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
        self._prefix = location[len(f"s3://{bucket}/"):] + "/"
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
        started = time.perf_counter()
        try:
            response = await self._send(method, **kwargs)
        except Exception as error:
            self._log(method, kwargs, error, started)
            if _is_unreachable(error) and not outage.down:
                outage.down = True
                _log.info("the endpoint %s stopped answering (%s: %s): requests wait for "
                          "a sign of life first", self.endpoint, type(error).__name__, error)
            raise
        self._log(method, kwargs, response, started)
        return response

    def _log(self, method, kwargs, answer, started):
        """One line at DEBUG per request: operation, key (relative to the
        cache), status, bytes, milliseconds and retries."""
        if not _log.isEnabledFor(logging.DEBUG):
            return
        milliseconds = (time.perf_counter() - started) * 1000
        if isinstance(answer, BaseException):
            metadata = (getattr(answer, "response", None) or {}).get("ResponseMetadata", {})
            status = metadata.get("HTTPStatusCode") or type(answer).__name__
            size = 0
        else:
            metadata = answer.get("ResponseMetadata", {})
            status = metadata.get("HTTPStatusCode")
            body = kwargs.get("Body")
            size = len(body) if body is not None else answer.get("ContentLength", 0)
        key = kwargs.get("Key") or kwargs.get("Prefix") or ""
        if key.startswith(self._prefix):
            key = key[len(self._prefix):]
        _log.debug("%s %s %s %s bytes %.1f ms %d retries",
                   "".join(part.title() for part in method.split("_")), key or "-",
                   status, size, milliseconds, metadata.get("RetryAttempts", 0))

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
        timeout = self._check_timeout()
        try:
            page = self.call("list_objects_v2", Prefix=prefix + "/", MaxKeys=1, timeout=timeout)
        except _WrongThreadError:
            raise
        except asyncio.TimeoutError:
            raise ConnectionError(
                f"bucket {self.bucket!r} at endpoint {self.endpoint} did not answer the "
                f"bucket check within {timeout:g} s. If it is only slow, give it longer: "
                f"the check waits for connect_timeout + read_timeout of config_kwargs, "
                f"8 s at least (for example config_kwargs={{'read_timeout': 30}})"
            ) from None
        except Exception as error:
            if not (_is_missing(error) and create_bucket):
                raise self.bucket_error(error, prefix) from None
            self._create_bucket(prefix)
            return
        if "IsTruncated" not in page and "Name" not in page:
            headers = page.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            raise ConnectionError(
                f"the endpoint {self.endpoint} answered the bucket check of "
                f"{self.bucket!r} with something that is not S3's answer (HTTP "
                f"{page.get('ResponseMetadata', {}).get('HTTPStatusCode')}, "
                f"{headers.get('content-type', 'no content type')}): check endpoint_url "
                f"(or AWS_ENDPOINT_URL); it must be the S3 API's URL, not a web page"
            )

    def _check_timeout(self):
        """How long the bucket check waits: what config_kwargs give a request
        to connect and answer, or _BUCKET_CHECK_TIMEOUT."""
        config = getattr(self.fs, "config_kwargs", None) or {}
        given = [config.get(name) for name in ("connect_timeout", "read_timeout")]
        given = [value for value in given if isinstance(value, (int, float))]
        return max(_BUCKET_CHECK_TIMEOUT, sum(given)) if given else _BUCKET_CHECK_TIMEOUT

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
        return OSError(f"cannot use {where}: {_said(error)}")

    def error(self, operation, error):
        """The exception a maintenance command raises for a failed request."""
        message = (
            f"could not {operation} in {self.location} (bucket {self.bucket!r} "
            f"at endpoint {self.endpoint}): {_said(error)}"
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
        return self.listing(prefix)[0]

    def listing(self, prefix):
        """Every object under a key prefix, and the server's time when it
        listed them (by its own clock, which dates the objects)."""
        return self.run(self._list_all(prefix))

    async def _list_all(self, prefix):
        objects = []
        kwargs = {"Prefix": prefix, "MaxKeys": _LIST_PAGE}
        while True:
            page = await self.request("list_objects_v2", **kwargs)
            objects.extend(page.get("Contents", ()))
            if not page.get("IsTruncated"):
                return objects, _server_time_of(page)
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def incomplete_uploads(self, prefix):
        """The multipart uploads under a key prefix never completed nor
        aborted, and the server's time; ([], None) where the server does not
        list uploads (s3rver)."""
        return self.run(self._list_uploads(prefix))

    async def _list_uploads(self, prefix):
        uploads, kwargs = [], {"Prefix": prefix}
        while True:
            try:
                page = await self.request("list_multipart_uploads", **kwargs)
            except Exception as error:
                if _error_code(error)[1] in (400, 404, 405, 501):
                    _log.info("%s lists no multipart uploads (%s)", self.endpoint, error)
                    return [], None
                raise
            uploads.extend(page.get("Uploads", ()))
            if not page.get("IsTruncated"):
                return uploads, _server_time_of(page)
            kwargs.update(KeyMarker=page.get("NextKeyMarker"),
                          UploadIdMarker=page.get("NextUploadIdMarker"))

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
        _warn_once((self.location, self.endpoint, kind), message, stacklevel + 1)

    def forget_warnings(self):
        with _PROCESS.lock:
            _PROCESS.warned = {
                warned for warned in _PROCESS.warned if warned[1] != self.endpoint
            }


def _warn_once(key, message, stacklevel):
    """A CacheWarning, unless one of the same key was given already."""
    with _PROCESS.lock:
        if key in _PROCESS.warned:
            return
        _PROCESS.warned.add(key)
    warnings.warn(message, CacheWarning, stacklevel=stacklevel + 1)


_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^\s@'\"`]*@", re.IGNORECASE)


def _said(error):
    """An error as a message may show it: without the user and password of
    any URL in its text (botocore repeats a URL it refuses, whole)."""
    return _USERINFO.sub(r"\1", f"{type(error).__name__}: {error}")


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

_MAX_PARTS = 10_000  # per upload
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
    ``on_abort_failure(error)`` is told of an abort that failed; ``copy_to``,
    a file, receives every byte as well; ``metadata`` is the object's S3
    user metadata.
    """

    def __init__(self, client, key, part_size, max_concurrency, on_abort_failure,
                 copy_to=None, metadata=None):
        super().__init__()
        self._client = client
        self._on_abort_failure = on_abort_failure
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
            self._on_abort_failure(error)

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


_Copy = collections.namedtuple("_Copy", "etag path code_digest result_id")


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
        """The newest copy of key here, as a _Copy, or None.

        With ``code_digest``, only a copy of a result of that code is found.
        """
        copies = []
        for entry in _entries(self._folder(key)):
            named = _COPY_NAME.fullmatch(entry.name)
            if named and code_digest is not None and named.group(2) != code_digest:
                continue
            status = _stat_quietly(entry) if named else None
            if status is not None and stat.S_ISREG(status.st_mode):
                copies.append((status.st_mtime, entry.path, named.group(1),
                               named.group(2), named.group(3)))
        if not copies:
            return None
        _, path, etag, digest, result_id = max(copies)
        return _Copy(f'"{etag}"', path, digest, result_id)

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

    def __init__(self, client, interval, credentials, on_failure):
        self.client = client
        self.interval = interval
        self._on_failure = on_failure
        # Denied once, these credentials (a digest of them) are denied for
        # every store of the process that reaches this bucket with them.
        self._denied_key = (client.bucket, client.endpoint, credentials)

    def record(self, item_key, age=None):
        """Record a hit on the result under item_key, if due.

        ``age`` is the seconds since the result was written, by the server's
        clock, if the hit's answer said it; this process's own records are
        timed by its monotonic clock. So no local clock is ever compared
        with the server's.
        """
        if self._denied_key in _PROCESS.denied_records:
            return
        now = time.monotonic()
        recorded_key = (self.client.bucket, item_key)
        with _PROCESS.lock:
            latest = _PROCESS.recorded.get(recorded_key)
            if latest is not None and now - latest < self.interval:
                return
            if age is not None and age < self.interval:
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
            _PROCESS.recorded[(self.client.bucket, item_key)] = time.monotonic()

    def _check_denied(self, future):
        error = None if future.cancelled() else future.exception()
        if error is not None:
            if _is_denied(error):
                _PROCESS.denied_records.add(self._denied_key)
            self._on_failure(error)

# --------------------------------------------------------------------------
# 8. The store: the failure policy, lookups and loads of results, one
# joblib call (_Call) and the write of one result (_Write), then joblib's
# StoreBackendBase and StoreBackendMixin on top of them.
# --------------------------------------------------------------------------

_BIG_TRANSFER = 8 * _MiB  # at verbose >= 10, transfers above this are reported
_SMALL_RESULT = 1 * _MiB  # uploads this small take a round trip, not bandwidth
_COMPLETE_BESIDE_METADATA = 80 * _MiB  # the largest upload completed in store_metadata
_LOAD_ATTEMPTS = 3  # loads of a result that writers keep replacing meanwhile


class _Outcome(enum.Enum):
    """What a failure does."""

    MISS = "the call goes on without the cache, with one warning per kind"
    OFF = "the cache is off for the function in this process, with one warning"
    RAISE = "a maintenance command raises an error naming bucket and endpoint"
    RAISE_AND_OFF = "it raises, and the function is off until its code is stored"
    KEY_ERROR = "a load raises KeyError: joblib recomputes, or get() raises it"
    LOCAL = "loads go to S3 instead of local copies, with one warning"
    EACH_FUNCTION = "a warning for each function; the result is returned"
    QUIET = "nothing changes but a line in the log"


class _Failure(enum.Enum):
    """Every failure the store meets, by what it could not do."""

    LOOK_UP = "check the cache"
    LOAD = "load a result"
    STORE_RESULT = "store a result"
    PICKLE_RESULT = "pickle a result"
    STORE_METADATA = "store metadata"
    TAKE_BACK_METADATA = "take back the metadata of a result not stored"
    READ_METADATA = "read metadata"
    CLEAR_EXPIRED = "clear an entry that failed validation"
    READ_CODE = "read function code"
    CLEAR_CHANGED_CODE = "clear the results of changed code"
    STORE_CODE = "store function code"
    RECHECK_CODE = "check the stored code of a function that is off"
    STORE_CODE_AFTER_CLEAR = "store function code after a clear"
    CLEAR_FUNCTION = "clear a function's results"
    CLEAR_RESULT = "clear a result"
    CLEAR_CACHE = "clear the cache"
    LIST = "list the cache"
    EVICT = "evict results"
    ABORT_UPLOAD = "abort an upload"
    USE_LOCAL_COPIES = "use local copies of results"
    RECORD_ACCESS = "record an access"
    TAKE_LEASE = "take a lease on a call (compute_once)"
    RENEW_LEASE = "renew a lease"
    RELEASE_LEASE = "release a lease"


# The failure policy: what each failure does, decided here alone and applied
# by S3StoreBackend._on_failure. A cached call never raises because of S3:
# its failures are misses, or turn the function off where what is stored is
# in doubt. Maintenance commands raise, every time they fail.
_FAILURE_POLICY = {
    _Failure.LOOK_UP: _Outcome.MISS,
    _Failure.LOAD: _Outcome.KEY_ERROR,
    _Failure.STORE_RESULT: _Outcome.MISS,
    _Failure.PICKLE_RESULT: _Outcome.EACH_FUNCTION,
    _Failure.STORE_METADATA: _Outcome.MISS,
    # Left, it would date an older result as new for a validation callback.
    _Failure.TAKE_BACK_METADATA: _Outcome.MISS,
    _Failure.READ_METADATA: _Outcome.MISS,
    _Failure.CLEAR_EXPIRED: _Outcome.MISS,
    # Whatever leaves in doubt which code the stored results belong to: the
    # function runs without the cache in this process, until a check of its
    # stored code succeeds (its next read of func_code.py, or its next call).
    # Results carry their code's digest, so none of other code is served
    # meanwhile either way; this keeps joblib's own record straight.
    _Failure.READ_CODE: _Outcome.OFF,
    _Failure.CLEAR_CHANGED_CODE: _Outcome.OFF,
    _Failure.STORE_CODE: _Outcome.OFF,
    _Failure.RECHECK_CODE: _Outcome.QUIET,  # it stays off
    _Failure.STORE_CODE_AFTER_CLEAR: _Outcome.RAISE_AND_OFF,
    _Failure.CLEAR_FUNCTION: _Outcome.RAISE,
    _Failure.CLEAR_RESULT: _Outcome.RAISE,
    _Failure.CLEAR_CACHE: _Outcome.RAISE,
    _Failure.LIST: _Outcome.RAISE,
    _Failure.EVICT: _Outcome.RAISE,
    # A lifecycle rule for incomplete uploads removes what is left.
    _Failure.ABORT_UPLOAD: _Outcome.MISS,
    _Failure.USE_LOCAL_COPIES: _Outcome.LOCAL,
    # A hit that cannot record its access still hits; denied once, these
    # credentials record nothing more in this process.
    _Failure.RECORD_ACCESS: _Outcome.QUIET,
    # compute_once: a lease that fails is a call computed without one. At
    # worst, the call is computed twice; never does anyone wait for ever.
    _Failure.TAKE_LEASE: _Outcome.MISS,
    _Failure.RENEW_LEASE: _Outcome.QUIET,  # others take over after its lifetime
    _Failure.RELEASE_LEASE: _Outcome.MISS,
}


# What a user reads after "could not ..." where it is not "The result is
# still computed and returned."
_WHAT_FOLLOWS = {
    _Failure.ABORT_UPLOAD: "A lifecycle rule for incomplete multipart uploads removes its parts.",
    _Failure.READ_METADATA: "joblib sees no metadata for that result.",
    _Failure.TAKE_LEASE: "The call computes as without compute_once.",
    _Failure.RELEASE_LEASE: "Writers waiting for it take it over once it expires.",
}


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


def _digest_of_stored_code(data):
    """The code digest of the func_code.py whose bytes are data."""
    code = _readable_func_code(data)
    return _code_digest(joblib.memory.extract_first_line(code)[0])


def _func_code_key(output_key):
    """The key of func_code.py beside <func_id>/<args_id>/output.pkl."""
    return posixpath.join(posixpath.dirname(posixpath.dirname(output_key)), FUNC_CODE)


# ---------------------------------------------------------------- lookups

@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a lookup asks S3.

    ``loads``: GET the result's first range (a load follows) rather than
    HEAD it; ``validates``: fetch metadata.json beside, for a validation
    callback; ``code_digest``: the digest the result must carry, or None to
    read func_code.py beside and take the digest of the code stored there;
    ``copy``: a local copy to confirm with If-None-Match.
    """

    loads: bool
    validates: bool = False
    code_digest: object = None
    copy: object = None


@dataclasses.dataclass
class _Found:
    """What a lookup found: a result of the right code, for the load (and
    the metadata) of the same call."""

    key: str
    code_digest: str
    result_id: object = None
    last_modified: object = None
    age: object = None  # seconds since it was written, by the server's clock
    opened: object = None  # an _OpenedObject: the first range of the result
    copy_path: str = None  # a local copy that S3 confirmed current (a 304)
    metadata: dict = None  # fetched beside, for a validation callback

    def close(self):
        if self.opened is not None:
            self.opened.close()


class _Seen(enum.Enum):
    """What the answer to a result's GET or HEAD says."""

    FOUND = "found"
    COPY_CURRENT = "the local copy is the version stored"
    MISSING = "missing"
    FAILED = "failed"


def _classify(answer):
    """The first step of a lookup: what a result's answer says, and the
    headers (or error) that say it."""
    if isinstance(answer, _OpenedObject):
        return _Seen.FOUND, answer.response
    if isinstance(answer, dict):
        return _Seen.FOUND, answer
    if _is_not_modified(answer):
        return _Seen.COPY_CURRENT, {"LastModified": _last_modified_of(answer),
                                    "ResponseMetadata": answer.response.get("ResponseMetadata")}
    if (isinstance(answer, FileNotFoundError) or _is_missing(answer)
            or _error_code(answer)[0] == "InvalidRange"):  # an empty object
        return _Seen.MISSING, None
    return _Seen.FAILED, answer


_ASK_WITHOUT_THE_COPY = object()  # see _ResultLoads._decide


class _ResultLoads:
    """Lookups and loads of results, for one store in one process.

    A lookup is one GET that answers "is it there" and starts the load of
    the same call (or a HEAD, where no load follows); a load reads ranges,
    through a local copy where the store keeps them, and starts again when
    another writer replaced the result.
    """

    def __init__(self, client, options, local_copies, warn_local):
        self._client = client
        self._part_size = options.part_size
        self._max_concurrency = options.max_concurrency
        self._mmap_mode = options.mmap_mode
        self._copies = local_copies
        self.warn_local = warn_local

    def plan(self, key, loads, validates, code_digest):
        """The plan of a lookup of key, with the local copy it may confirm
        (found here, in the caller's thread, not on s3fs's loop)."""
        copy = self.current_copy(key, code_digest) if loads else None
        return _Plan(loads, validates, code_digest, copy)

    def current_copy(self, key, code_digest):
        """The local copy of key (of a result of the code code_digest names,
        if it names one), if copies work: a _Copy, or None."""
        if self._copies is None:
            return None
        try:
            return self._copies.find(key, code_digest)
        except _LocalCopyUnusable as error:
            self.warn_local(error)
            return None

    async def look_up(self, key, plan):
        """Whether a result of the right code is stored: a _Found, or None.

        The result's GET (or HEAD), the metadata's GET for a validation
        callback, and func_code.py's where the caller's code is unknown, go
        out together; the answers are classified, then decided on.
        """
        for attempt in (plan, dataclasses.replace(plan, copy=None)):
            requests = self._requests(key, attempt)
            answers = dict(zip(requests, await asyncio.gather(
                *requests.values(), return_exceptions=True)))
            result = answers["result"]
            try:
                decision = self._decide(key, attempt, answers)
            finally:
                kept = isinstance(decision, _Found) and decision.opened is result
                if isinstance(result, _OpenedObject) and not kept:
                    result.close()
            if decision is not _ASK_WITHOUT_THE_COPY:
                return decision
        return None  # not reached: the second attempt has no copy

    def _requests(self, key, plan):
        client = self._client
        if plan.loads:
            conditions = {"IfNoneMatch": plan.copy.etag} if plan.copy else {}
            result = client.open_range(key, _first_range_length(self._part_size), **conditions)
        else:
            result = client.request("head_object", Key=key)
        requests = {"result": result}
        if plan.validates:
            requests["metadata"] = client.read(posixpath.join(posixpath.dirname(key), METADATA))
        if plan.code_digest is None:
            requests["code"] = client.read(_func_code_key(key))
        return requests

    def _decide(self, key, plan, answers):
        """The second step: a _Found, None for a miss, or
        _ASK_WITHOUT_THE_COPY; raises what failed.

        A result of other code than the caller's (or, where the caller's is
        unknown, than func_code.py's) is a miss, and so is an entry whose
        metadata cannot be read when a callback needs it. Metadata that
        stands beside another result than the one it describes dates it by
        the older of the two (see _RESULT_ID).
        """
        seen, headers = _classify(answers["result"])
        if seen is _Seen.FAILED:
            raise headers
        if seen is _Seen.MISSING:
            return None
        if seen is _Seen.COPY_CURRENT:
            digest, result_id = plan.copy.code_digest, plan.copy.result_id
        else:
            digest, result_id = _code_digest_of(headers), _result_id_of(headers)
        expected = plan.code_digest
        if expected is None:
            # The caller's code is unknown: the code stored in func_code.py
            # stands for it. Where neither that nor the result names a code
            # (both written outside joblib's calls), there is none to differ.
            expected = self._digest_in(answers["code"])
        if digest != expected:
            _log.info("%s holds a result of other code: a miss", self._client.url(key))
            return None
        found = _Found(key, digest, result_id, headers.get("LastModified"), _age_of(headers))
        if seen is _Seen.COPY_CURRENT:
            found.copy_path = plan.copy.path
        elif plan.loads:
            found.opened = answers["result"]
        if not plan.validates:
            return found
        return self._with_metadata(found, answers["metadata"], seen)

    def _digest_in(self, answer):
        """The digest of the code in func_code.py's answer (None if it is
        missing); raises its failure."""
        if isinstance(answer, FileNotFoundError):
            return None
        if isinstance(answer, BaseException):
            raise answer
        return _digest_of_stored_code(answer)

    def _with_metadata(self, found, answer, seen):
        if isinstance(answer, FileNotFoundError):
            return None  # not written (yet): a miss, recomputed and rewritten
        if isinstance(answer, BaseException):
            raise answer
        found.metadata, described = _metadata_of(answer)
        if not _is_a_time(found.metadata.get("time")):
            return None  # not what joblib writes: a miss, as above
        if described == found.result_id:
            return found
        if seen is _Seen.COPY_CURRENT:
            # The same bytes stored again keep their ETag under a new id,
            # and a 304 may carry no Last-Modified: ask S3 for the result
            # itself (the load then writes the copy anew, under the id stored).
            return _ASK_WITHOUT_THE_COPY
        written = found.last_modified
        if not isinstance(written, datetime.datetime):
            return None
        if written.tzinfo is None:
            written = written.replace(tzinfo=datetime.timezone.utc)
        # Metadata of another write: the result is dated by the older of the
        # two times, so that it never looks younger than it is.
        found.metadata["time"] = min(found.metadata["time"], written.timestamp())
        return found

    # ----------------------------------------------------------------- loads

    def load(self, key, found, code_digest):
        """Load the result at key: the item, the GET that moved its bytes (or
        None), and its age in seconds by the server's clock (if known).

        ``found`` is what the lookup of the same call learned; without it
        (``MemorizedResult.get()``, say) the load makes that lookup now, for
        a result of the code ``code_digest`` names (or, if None, that of
        func_code.py). A result rewritten meanwhile by another writer is
        loaded again, in the version now stored.
        """
        for attempt in range(_LOAD_ATTEMPTS):
            try:
                return self._load_once(key, found, code_digest)
            except _VersionChanged:
                if attempt + 1 == _LOAD_ATTEMPTS:
                    raise
                found = None

    def _load_once(self, key, found, code_digest):
        if found is None:
            plan = self.plan(key, loads=True, validates=False, code_digest=code_digest)
            found = self._client.run(self.look_up(key, plan))
            if found is None:
                raise FileNotFoundError(f"{self._client.url(key)} does not exist")
        if self._copies is not None:
            try:
                item, opened = self._load_through_copy(found)
                return item, opened, found.age
            except _LocalCopyUnusable as error:
                # Never a reason to compute again: the result is in S3.
                self.warn_local(error)
                if error.path is not None:
                    self._copies.remove(error.path)
                found.close()
                found = dataclasses.replace(found, opened=None, copy_path=None)
        opened = found.opened or self.open(found)
        with self.reader(opened) as reader:
            item = _load(reader)
        return item, opened, found.age if found.age is not None else _age_of(opened.response)

    def _load_through_copy(self, found):
        """Load from a local copy, writing it first if S3 has another version.

        Any failure of the copy raises _LocalCopyUnusable; a download that
        breaks or comes short fails the load.
        """
        if found.copy_path is not None:
            with self._copies.held(found.copy_path) as there:
                if there:
                    return self.load_copy(found.copy_path), None
            found = dataclasses.replace(found, copy_path=None)  # evicted since the lookup
        opened = found.opened or self.open(found)
        try:
            new_copy = self._copies.new(found.key)
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
                raise OSError(f"{self._client.url(found.key)}: {written} of {opened.size} bytes came")
            try:
                path = new_copy.publish(
                    opened.etag, _code_digest_of(opened.response), _result_id_of(opened.response))
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

    def open(self, found):
        """GET the first range of a result found before (of its code)."""
        client = self._client
        opened = client.run(client.open_range(found.key, _first_range_length(self._part_size)))
        if _code_digest_of(opened.response) != found.code_digest:
            # Replaced by a result of other code since the lookup: look again.
            opened.close()
            raise _VersionChanged(client.url(found.key))
        return opened

    def reader(self, opened):
        """A reader of the whole object whose first range was opened."""
        return _RangedReader(self._client, opened, self._part_size, self._max_concurrency)


# ------------------------------------------------------------------ a call

class _Kind(enum.Enum):
    """What a joblib call is, by the public method that began it."""

    CALL = "a cached call"  # MemorizedFunc.__call__: a hit is loaded at once
    SHELVE = "call_and_shelve"  # a hit is only referred to
    CHECK = "check_call_in_cache"  # nothing is computed or loaded
    FORCE = "call"  # computed and stored, never looked up
    OTHER = "another public method of MemorizedFunc"
    GET = "MemorizedResult.get"
    CLEAR = "a function's clear()"
    MAINTENANCE = "Memory.clear, Memory.reduce_size or MemorizedResult.clear"

    @property
    def maintains(self):
        """Whether failures raise: a command the user gave, not a cached call."""
        return self in (_Kind.CLEAR, _Kind.MAINTENANCE)


# The call each thread, task and nested call is in (see _Call).
_CURRENT_CALL = contextvars.ContextVar("joblib_store_call", default=None)
_UNKNOWN = object()
# The attribute of a MemorizedResult that says which code its value is of.
_SHELVED_CODE = "_joblib_store_code_digest"


class _Call:
    """One joblib call, from the public method that began it to its end.

    The call scope around that method (see _in_call_scope) makes it, and the
    backend methods that serve the call find it in _CURRENT_CALL. It owns
    what one backend call leaves for a later one: the lookup sent beside the
    read of func_code.py (``lookup``), the lookup's answer for the load and
    the metadata (``found``), the result being stored (``write``), and with
    compute_once the lease on the call (``lease``). All of it is closed, in
    that order, when the call ends.
    """

    def __init__(self, kind, owner, store):
        self.kind = kind
        self.owner = owner  # the MemorizedFunc, MemorizedResult or Memory
        self.store = store
        self.args_id = None  # once joblib has computed it
        self.clearing = False  # inside joblib's clear of changed code
        self.lookup = None  # a _Beside
        self.found = None
        self.write = None
        self.lease = None  # a _Held, with compute_once
        self.leases_off = False  # after the call ran again too often
        self._func_id = self._code_digest = _UNKNOWN

    def serves(self, store, func_id):
        """Whether a backend call of store for func_id is part of this call."""
        return store is self.store and self.func_id in (None, func_id)

    @property
    def func_id(self):
        """The id of the function called, or None (Memory's methods)."""
        if self._func_id is _UNKNOWN:
            self._func_id = getattr(self.owner, "func_id", None)
            if self._func_id is None and self.kind not in (_Kind.MAINTENANCE, _Kind.GET):
                with contextlib.suppress(Exception):
                    self._func_id = _build_func_identifier(self.owner.func)
        return self._func_id

    @property
    def validates(self):
        """Whether joblib will ask the call's validation callback."""
        return getattr(self.owner, "cache_validation_callback", None) is not None

    def code_digest(self):
        """The digest of the code whose results this call may be served:
        the function's, or the shelving call's for ``MemorizedResult.get()``;
        None where unknown."""
        if self._code_digest is _UNKNOWN:
            if self.kind is _Kind.GET:
                self._code_digest = self.owner.__dict__.get(_SHELVED_CODE)
            else:
                self._code_digest = _digest_of_function(self.owner)
        return self._code_digest

    def runs_stale_code(self):
        """Whether the call's function runs other code than its source now
        says (see _STALE_DIGESTS): no result is served to it or stored."""
        return self.kind is not _Kind.GET and self.code_digest() in _STALE_DIGESTS

    def computes_once(self):
        """Whether a miss of this call takes a lease before it computes."""
        leases = self.store._parts.leases
        return (self.kind in (_Kind.CALL, _Kind.SHELVE) and not self.leases_off
                and self.lease is None and leases is not None and leases.available())

    def lease_before_computing(self, key, seen_result_id):
        """Take the lease on the result at key, which joblib computes next
        without a lookup; where its holder finished meanwhile, run the call
        again instead (it loads the result)."""
        taken = self.store._parts.leases.take(key, seen_result_id)
        if taken is _LOOK_AGAIN:
            raise _CallAgain(key)
        self.lease = taken

    def take(self, name, key):
        """What the call holds under name for key, handed over; or None."""
        held = getattr(self, name)
        if held is None or held.key != key:
            return None
        setattr(self, name, None)
        return held

    def ended(self, result):
        """End the call that returned result; return it."""
        self.close()
        if self.kind is _Kind.SHELVE and isinstance(result, joblib.memory.MemorizedResult):
            # The value got later must be of the code that shelved it.
            digest = self.code_digest()
            if digest is not None and result.store_backend is self.store:
                result.__dict__[_SHELVED_CODE] = digest
        return result

    def close(self):
        for name in ("lookup", "found"):
            held, _ = getattr(self, name), setattr(self, name, None)
            if held is not None:
                held.close()
        write, self.write = self.write, None
        stored = None
        if write is not None:
            write.close()
            stored = write.result_id if write.stage is _Stage.DONE else None
        lease, self.lease = self.lease, None
        if lease is not None:  # after the write: done names a result that landed
            lease.close(stored)


def _digest_of_function(memorized):
    """The code digest of a MemorizedFunc's function, read once per function
    object (see _CODE_DIGESTS), or None if joblib cannot read its code."""
    func = getattr(memorized, "func", None)
    code_id = id(getattr(func, "__code__", None))
    try:
        known = _CODE_DIGESTS.get(func)
    except TypeError:  # a function that cannot be weakly referenced
        known = None
    if known is not None and known[0] == code_id:
        return known[1]
    try:
        func_code = memorized.func_code_info[0]
    except Exception:
        try:  # Breakpoint: a joblib without func_code_info
            func_code = joblib.func_inspect.get_func_code(func)[0]
        except Exception:
            return None
    digest = _code_digest(func_code) if isinstance(func_code, str) else None
    try:
        runs_its_source = digest is None or _runs_its_source(func, func_code)
    except Exception:  # an object that only looks like a function: as before
        runs_its_source = True
    if not runs_its_source:
        digest = _stale_digest(func)
    with contextlib.suppress(TypeError):
        _CODE_DIGESTS[func] = (code_id, digest)
    return digest


# A module edited on disk after its import and before a function's first
# cached call: joblib then reads the new source while the function runs the
# old bytecode, and a result of the old code would be stored under the new
# code's digest, for every process of the new code to be served (joblib's
# own local store does the same). Where the source joblib read compiles,
# and not to the code the function runs, the function's calls get a digest
# of their own instead: no result is served to them or stored from them in
# this process, until the module is reloaded.
_STALE_DIGESTS = set()


def _runs_its_source(func, source):
    """Whether the source joblib read of func is that of the code func runs;
    True where that cannot be told (no source file to read)."""
    code = getattr(func, "__code__", None)
    module = sys.modules.get(getattr(func, "__module__", None))
    if (not isinstance(code, types.CodeType) or getattr(module, "__file__", None) != code.co_filename
            or not isinstance(getattr(module, "__loader__", None), importlib.machinery.SourceFileLoader)):
        return True  # no file, or one an import hook may rewrite (pytest's asserts)
    try:  # read as joblib reads it
        with joblib.func_inspect.open_py_source(code.co_filename) as file:
            text = file.read()
    except Exception:
        return True
    # The whole file is compiled: a function compiles otherwise on its own
    # (a method, a closure, a call on a module imported beside it).
    if source not in text:
        return False  # the file changed again since joblib read it
    compiled = _compiled(code.co_filename, text)
    if compiled is None:
        return True
    return any(_same_code(namesake, code) for namesake in _codes_in(compiled)
               if namesake.co_name == code.co_name
               and namesake.co_firstlineno == code.co_firstlineno)


@functools.lru_cache(maxsize=4)
def _compiled(filename, text):
    """The code of a source file's text, or None if it does not compile."""
    try:
        return compile(text, filename, "exec", dont_inherit=True)
    except Exception:
        return None


def _codes_in(code):
    """The code objects that code holds, at any depth."""
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield constant
            yield from _codes_in(constant)


_CODE_FIELDS = ("co_code", "co_names", "co_varnames", "co_freevars", "co_cellvars",
                "co_argcount", "co_posonlyargcount", "co_kwonlyargcount")
_SET_WHEN_RUN = inspect.CO_ITERABLE_COROUTINE  # by types.coroutine, on the live code


def _same_code(one, other):
    """Whether two code objects run the same instructions on the same names
    and constants (wherever their lines are)."""
    if (any(getattr(one, field) != getattr(other, field) for field in _CODE_FIELDS)
            or one.co_flags | _SET_WHEN_RUN != other.co_flags | _SET_WHEN_RUN
            or len(one.co_consts) != len(other.co_consts)):
        return False
    for mine, theirs in zip(one.co_consts, other.co_consts):
        if isinstance(mine, types.CodeType) and isinstance(theirs, types.CodeType):
            if not _same_code(mine, theirs):
                return False
        elif _constant_key(mine) != _constant_key(theirs):
            return False
    return True


def _constant_key(constant):
    """A constant as compared: by type and value, floats by repr (so that
    -0.0 is not 0.0, nor 1.0 True, and a NaN is itself)."""
    if isinstance(constant, (tuple, frozenset)):
        return type(constant), type(constant)(_constant_key(item) for item in constant)
    if isinstance(constant, (float, complex)):
        return type(constant), repr(constant)
    if isinstance(constant, types.CodeType):
        return type(constant), id(constant)  # met beside a constant: never equal
    return type(constant), constant


def _stale_digest(func):
    """A digest no stored result carries, for a function whose source on
    disk is not the code it runs; warn once."""
    digest = uuid.uuid4().hex
    _STALE_DIGESTS.add(digest)
    name = getattr(func, "__qualname__", repr(func))
    _log.info("%s runs code older than its source on disk: not cached here", name)
    _warn_once(("stale code", name), (
        f"{getattr(func, '__module__', '')}.{name} runs other code than its source "
        f"file now holds (the file changed after it was imported): its results are "
        f"neither served nor stored in this process until the module is reloaded"),
        stacklevel=5)
    return digest


@dataclasses.dataclass
class _Beside:
    """A lookup sent beside the read of func_code.py, for the existence check
    that follows: its future ends in a _Found, None, or the lookup's error."""

    key: str
    future: object

    def answer(self):
        return self.future.result()

    def close(self):
        """Let go of a lookup nobody took: cancel it, or close what it opened."""

        def close(done):
            if not done.cancelled() and done.exception() is None and done.result() is not None:
                done.result().close()

        self.future.add_done_callback(close)
        self.future.cancel()


# ------------------------------------------------------------ one write

class _Stage(enum.Enum):
    """Where a write is; each stage follows the one above it, or the write
    ends FAILED."""

    STARTED = "pickled into an upload"
    SENT = "the result's last request sent"
    PUBLISHED = "the result is in S3"
    DONE = "its metadata is in S3 too, and its local copy named"
    FAILED = "not stored"


class _Write:
    """One result being stored, from joblib's dump_item to its call's end.

    The order, and why:

    1. The result is pickled into a streamed upload (_MultipartWriter): its
       parts go out while the rest is pickled, and a local copy takes the
       same bytes where joblib maps the result right after storing it
       (mmap_mode). The upload carries the code's digest and a new result id.
    2. Its last request publishes it: one PUT for a small result, else the
       Complete of its parts. When that is one short request (a small
       result, or parts that all went out at once and were all uploaded),
       it waits to go out beside the metadata's PUT: one round trip for
       both. Else it ends now, as joblib warns of a store_metadata longer
       than 0.5 s.
    3. The metadata (joblib's store_metadata) carries the same result id, so
       a metadata.json never dates another result as new; sent beside a
       result that then failed, it is taken back.
    4. The local copy is named after the version S3 stored, for joblib's
       reload of the result.

    A write the call ends before its metadata (a store_metadata that never
    comes) finishes its result, and lets its local copy go.
    """

    def __init__(self, store, key, call):
        self.store = store
        self.key = key
        self.func_id = store._func_id_of(key)
        self.call = call
        self.stage = _Stage.STARTED
        self.result_id = uuid.uuid4().hex
        self.item = None  # kept for joblib's reload of it
        self.new_copy = None
        self._sent = None  # a future of the result's last request
        self._started = time.perf_counter()
        self._size = 0

    @property
    def client(self):
        return self.store._client

    # 1 and 2 ------------------------------------------------------------

    def start(self, item, reloads):
        """Pickle and upload item; it ends beside the metadata if it can."""
        parts = self.store._parts
        if reloads:
            self.item = item
            self.new_copy = self._new_copy(parts)
        options = self.store.options
        writer = _MultipartWriter(
            self.client, self.key, options.part_size, options.max_concurrency,
            functools.partial(self.store._on_failure, _Failure.ABORT_UPLOAD),
            copy_to=self.new_copy.file if self.new_copy is not None else None,
            metadata=self._user_metadata(),
        )
        try:
            _dump(item, writer, options.compress)
            self._sent = writer.commit()
        except BaseException as error:
            writer.abort()
            self._fail()
            if not isinstance(error, Exception):
                raise  # an interrupt: nothing was published
            if error is writer.error:
                self.store._on_failure(_Failure.STORE_RESULT, error)
            else:  # the result itself cannot be pickled
                self.store._on_failure(_Failure.PICKLE_RESULT, error, self.func_id)
            return
        if writer.copy_error is not None and self.new_copy is not None:
            self.store._on_failure(_Failure.USE_LOCAL_COPIES, writer.copy_error)
            self._drop_copy()
        self._size = writer.tell()
        self.stage = _Stage.SENT
        _PROCESS.track(self._sent)
        if not self._ends_beside_metadata(writer):
            self._finish_result()

    def _ends_beside_metadata(self, writer):
        if self.call is None:
            return False  # no store_metadata of this call will come for it
        if self._size <= _SMALL_RESULT:
            return True
        if not writer.in_one_wave or self._size > _COMPLETE_BESIDE_METADATA:
            return False
        # Waited for here, so that a failed part is known before any
        # metadata is sent.
        return writer.parts_uploaded()

    def _user_metadata(self):
        """The result's S3 user metadata: the user's own (s3fs's
        s3_additional_kwargs), its code digest where known, its result id."""
        ours = {_RESULT_ID: self.result_id}
        digest = self.call.code_digest() if self.call is not None else None
        if digest is not None:
            ours[_CODE_DIGEST] = digest
        own = self.store.fs.s3_additional_kwargs.get("Metadata") or {}
        return {**own, **ours}

    def _new_copy(self, parts):
        """A local copy to write beside the upload, or None if none can be."""
        if parts.local_copies is None:
            return None
        try:
            return parts.local_copies.new(self.key)
        except OSError as error:
            self.store._on_failure(_Failure.USE_LOCAL_COPIES, error)
            return None

    def _finish_result(self):
        """Wait for the result's last request: PUBLISHED, or FAILED."""
        if self.stage is not _Stage.SENT:
            return
        # The function's code write, if any, went out beside the result: the
        # call returns once both have landed. Its failure turns the
        # function off, and that warning says it all.
        code_failed = self._code_failed()
        try:
            response = self._sent.result()
        except Exception as error:
            self._fail()
            if not code_failed:
                self.store._on_failure(_Failure.STORE_RESULT, error)
            return
        self.stage = _Stage.PUBLISHED
        self.store._report_transfer("Stored", self._size, self._started, self.key)
        self.store._parts.access_records.written(posixpath.dirname(self.key))
        self._name_copy(response.get("ETag"))

    def _code_failed(self):
        """Whether the function's code write, sent beside this result, failed
        (which turns the function off), once it has ended."""
        function = _PROCESS.function(self.store.location, self.func_id)
        if function.code_write is not None:
            concurrent.futures.wait([function.code_write])
        return self.store._parts.functions.is_off(self.func_id)

    # 3 and 4 ------------------------------------------------------------

    def publish_metadata(self, metadata):
        """Store the call's metadata beside (or after) its result."""
        if self.stage is _Stage.FAILED or self.store._parts.functions.is_off(self.func_id):
            self._finish_result()
            return
        metadata = {**metadata, _RESULT_ID_FIELD: self.result_id}
        metadata_key = posixpath.join(posixpath.dirname(self.key), METADATA)
        sent = self.client.submit(
            "put_object", Key=metadata_key, Body=json.dumps(metadata).encode("utf-8"))
        self._finish_result()
        try:
            sent.result()
        except Exception as error:
            if not self._code_failed():
                self.store._on_failure(_Failure.STORE_METADATA, error)
            return
        if self.stage is _Stage.FAILED:
            # Sent beside a result that was not stored: left, it would date
            # an older result as new, and a validation callback
            # (expires_after) would serve it.
            try:
                self.client.call("delete_object", Key=metadata_key)
            except Exception as error:
                self.store._on_failure(_Failure.TAKE_BACK_METADATA, error)
            return
        self.stage = _Stage.DONE

    def _name_copy(self, etag):
        if self.new_copy is None:
            return
        try:
            if not etag:  # some S3-compatible servers and proxies send none
                raise OSError("the answer to the upload carried no ETag to name its copy")
            self.new_copy.publish(etag, self.call and self.call.code_digest(), self.result_id)
        except OSError as error:
            self.store._on_failure(_Failure.USE_LOCAL_COPIES, error)
            self._drop_copy()

    def reload(self):
        """joblib's load of the result this call just stored: its new local
        copy, mapped, or else the result itself."""
        self._finish_result()
        if self.new_copy is not None and self.new_copy.path is not None:
            try:
                return self.store._parts.loads.load_copy(self.new_copy.path)
            except _LocalCopyUnusable as error:
                self.store._on_failure(_Failure.USE_LOCAL_COPIES, error)
        return self.item

    def _fail(self):
        self.stage = _Stage.FAILED
        self._drop_copy()

    def _drop_copy(self):
        if self.new_copy is not None:
            self.new_copy.close()
            self.new_copy = None

    def close(self):
        self._finish_result()
        self._drop_copy()
        self.item = None


# ------------------------------------------------------- compute once

_PROBE = ".conditional-write-probe"  # <prefix>/_PROBE: does the server honour them?
_LEASE_ATTEMPTS = 5  # rounds of taking a lease that others keep taking first
_POLL_FIRST = 0.2  # seconds before a waiter first looks at a lease again
_POLL_MOST = 10.0  # seconds between two looks, at most


class _CallAgain(Exception):
    """The result a call waited for has landed after joblib decided to
    compute it: the call scope runs the call again, which loads it."""


_LOOK_AGAIN = "look again"  # a lease's holder finished: its result may be there


@dataclasses.dataclass
class _LeaseSeen:
    """A lease as a GET of it found it: its state (computing, done or
    released), its ETag, its age by the server's clock, and what it says."""

    state: str
    etag: str
    age: float
    lifetime: float
    result_id: object = None
    mine: bool = False  # written by this process, as the answer to its PUT was lost

    @property
    def expired(self):
        return self.state == "computing" and self.age >= self.lifetime

    @property
    def stands(self):
        """Whether another writer is computing under this lease."""
        return self.state == "computing" and not self.expired and not self.mine


class _LocalLease:
    """The lease of a call that a thread of this process holds: the other
    threads wait for it here, with no request."""

    def __init__(self):
        self.ended = threading.Event()
        self.renewed = 0  # how many times the S3 lease was renewed meanwhile


class _Held:
    """A lease this call holds: renewed in the background until the call
    ends, then marked done (naming the result stored) or released."""

    def __init__(self, leases, key, etag, local):
        self.key = key
        self._leases = leases
        self._etag = etag
        self._local = local
        self._renewing = leases.client.start(self._renew())

    async def _renew(self):
        client, period = self._leases.client, self._leases.lifetime / 3
        while True:
            await asyncio.sleep(period)
            try:
                response = await client.request(
                    "put_object", Key=self.key, IfMatch=self._etag,
                    Body=self._leases.body("computing"))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if _error_code(error)[1] in (404, 412):
                    _log.info("%s was taken over: it computes anyway", client.url(self.key))
                    return  # taken over by a writer that thought this one dead
                self._leases.on_failure(_Failure.RENEW_LEASE, error)
                continue
            self._etag = response.get("ETag", self._etag)
            self._local.renewed += 1

    def close(self, result_id=None):
        """Mark the lease done (its result landed) or released, in the
        background, only if this call still holds it; wake the threads
        waiting here."""
        self._renewing.cancel()
        state = "released" if result_id is None else "done"
        body = self._leases.body(state, result_id)
        sent = self._leases.client.submit("put_object", Key=self.key, IfMatch=self._etag, Body=body)

        def told(done):
            error = None if done.cancelled() else done.exception()
            if error is not None and _error_code(error)[1] not in (404, 412):
                self._leases.on_failure(_Failure.RELEASE_LEASE, error)

        sent.add_done_callback(told)
        _PROCESS.track(sent)
        self._leases.end_local(self.key, self._local)


class _HeldHere:
    """A call that computes without the lease it could not take in S3: the
    other threads of this process still wait for it, not compute beside it."""

    def __init__(self, leases, key, local):
        self.key = key
        self._leases = leases
        self._local = local

    def close(self, result_id=None):
        self._leases.end_local(self.key, self._local)


class _Leases:
    """compute_once for one store: a miss takes a lease on its call before
    computing it, so that the writers that meet the same miss at once, in
    threads, processes or machines, compute it once.

    The lease is ``<item>/lease``, written with ``If-None-Match: *``: of the
    writers that miss at once, one PUT lands and the others answer 412.
    The holder renews it (``If-Match`` its ETag) every third of its
    lifetime, and once its result and metadata have landed marks it done,
    naming that result's id (released, if it stored none). A waiter looks at
    the lease with backoff (about 6 GETs a minute once it has waited a
    minute) until it is done, released, gone or expired (no renewal for a
    lifetime, by the server's clock), then looks for the result again, or
    takes the lease over (``If-Match``) and computes. A done lease stays:
    a writer that missed just before the result landed finds it and looks
    again, where a deleted lease would let it compute the result again.
    Threads of one process wait for each other without a request.
    """

    def __init__(self, client, prefix, lifetime, on_failure):
        self.client = client
        self.lifetime = lifetime
        self.on_failure = on_failure
        self._prefix = prefix
        self._holder = uuid.uuid4().hex

    def holder(self):
        """Who writes this process's leases (a forked child is another)."""
        return f"{self._holder}-{os.getpid()}"

    def body(self, state, result_id=None):
        lease = {"holder": self.holder(), "state": state, "lifetime": self.lifetime}
        if result_id is not None:
            lease["result_id"] = result_id
        return json.dumps(lease).encode("utf-8")

    # ----------------------------------------------------------- the server

    def available(self):
        """Whether the server honours conditional writes: probed once per
        bucket and endpoint in this process, and said once where it does not."""
        if not _botocore_writes_conditionally():
            _warn_once(("compute_once", "botocore"), (
                "compute_once needs a botocore whose PutObject takes IfNoneMatch and "
                "IfMatch (releases of late 2024 on): with this one, calls compute as "
                "without it. Upgrade aiobotocore, and so botocore, to use it."), stacklevel=6)
            return False
        checked = (self.client.bucket, self.client.endpoint)
        known = _PROCESS.conditional_writes.get(checked)
        if known is None:
            known = self._probe()
            if known is None:
                return False  # the probe failed: ask again next time
            _PROCESS.conditional_writes[checked] = known
            if not known:
                _warn_once(("compute_once",) + checked, (
                    f"compute_once is not available at {self.client.endpoint} (bucket "
                    f"{self.client.bucket!r}): it does not honour conditional writes "
                    f"(If-None-Match, If-Match). Calls that miss at once compute each "
                    f"on its own, as without it."), stacklevel=6)
        return known

    def _probe(self):
        key = f"{self._prefix}/{_PROBE}"
        client = self.client

        def refused(**condition):
            return _honours(client, "put_object", Key=key, Body=b"", **condition)

        try:
            # Refused: it stands already. Else it was just made (or a server
            # that ignores the condition wrote it): a second one must fail.
            if not refused(IfNoneMatch="*") and not refused(IfNoneMatch="*"):
                return False
            return refused(IfMatch='"not-this-one"')
        except Exception as error:
            if _is_answer(error) and _error_code(error)[1] in (400, 501):
                return False  # refuses the conditions it does not know
            self.on_failure(_Failure.TAKE_LEASE, error)
            return None

    # ---------------------------------------------------------------- take

    def take(self, key, seen_result_id, looked_again=False):
        """Take the lease on the call whose result is key, before computing
        it: a _Held, _LOOK_AGAIN (its holder finished: look for its result),
        or a _HeldHere (compute without a lease in S3: taking it failed).

        ``seen_result_id`` names the result the caller's lookup found (one
        that failed validation), or None if it found none; ``looked_again``
        that the caller looked again for the result of a lease done or
        expired, in vain.
        """
        lease_key = posixpath.join(posixpath.dirname(key), LEASE)
        local, mine = self._local(lease_key)
        if not mine:
            self._wait_here(local)
            return _LOOK_AGAIN
        try:
            held = self._take_in_s3(lease_key, seen_result_id, looked_again, local)
        except Exception as error:
            self.on_failure(_Failure.TAKE_LEASE, error)
            held = None
        if held is None:
            return _HeldHere(self, lease_key, local)
        if held is _LOOK_AGAIN:
            self.end_local(lease_key, local)
        return held

    def _local(self, lease_key):
        """This process's lease on lease_key, and whether this thread made it."""
        with _PROCESS.lock:
            local = _PROCESS.local_leases.get(lease_key)
            if local is not None:
                return local, False
            local = _PROCESS.local_leases[lease_key] = _LocalLease()
            return local, True

    def end_local(self, lease_key, local):
        with _PROCESS.lock:
            if _PROCESS.local_leases.get(lease_key) is local:
                del _PROCESS.local_leases[lease_key]
        local.ended.set()

    def _wait_here(self, local):
        """Wait for another thread's lease, while it is renewed."""
        renewed = -1
        while renewed != local.renewed:
            renewed = local.renewed
            if local.ended.wait(self.lifetime):
                return
        _log.info("a thread's lease went a lifetime without renewal: this one computes")

    def _take_in_s3(self, lease_key, seen_result_id, looked_again, local):
        for _ in range(_LEASE_ATTEMPTS):
            etag = self._put(lease_key, IfNoneMatch="*")
            if etag is not None:
                return _Held(self, lease_key, etag, local)
            lease = self._read(lease_key)
            if lease is None:
                continue  # gone meanwhile: try again
            if lease.stands:
                lease = self._wait(lease_key, lease, local)
                if lease is None:
                    return _LOOK_AGAIN  # gone: its result may be there
            if lease.state == "done" and lease.result_id != seen_result_id and not looked_again:
                return _LOOK_AGAIN
            if lease.expired and not looked_again:
                return _LOOK_AGAIN  # its holder may have stored the result, and died saying so
            if lease.stands:
                continue
            # Released, expired, or done with the very result found wanting;
            # or this process's own, whose PUT landed though its answer was
            # lost (the thread that holds the local lease is this one).
            etag = self._put(lease_key, IfMatch=lease.etag)
            if etag is not None:
                _log.info("%s: took over a lease %s", self.client.url(lease_key),
                          "that expired" if lease.expired else "of its own" if lease.mine
                          else lease.state)
                return _Held(self, lease_key, etag, local)
        return None

    def _put(self, lease_key, **condition):
        """PUT the lease on a condition: its ETag, or None where another
        writer's stands (412)."""
        try:
            response = self.client.call("put_object", Key=lease_key,
                                        Body=self.body("computing"), **condition)
        except Exception as error:
            if _error_code(error)[1] in (404, 409, 412):
                return None
            raise
        return response.get("ETag")

    def _read(self, lease_key):
        """The lease as it stands: a _LeaseSeen, or None where it is gone."""
        client = self.client
        try:
            response = client.call("get_object", Key=lease_key)
            data = client.run(_read_body(response["Body"]))
        except Exception as error:
            if _is_missing(error):
                return None
            raise
        try:
            lease = json.loads(data.decode("utf-8"))
            lifetime = float(lease.get("lifetime", self.lifetime))
            state = lease["state"]
        except (ValueError, KeyError, TypeError, AttributeError):
            lease, lifetime, state = {}, self.lifetime, "released"  # not one of ours
        age = _age_of(response)
        return _LeaseSeen(state, response.get("ETag"), self.lifetime if age is None else age,
                          lifetime, lease.get("result_id"), lease.get("holder") == self.holder())

    def _wait(self, lease_key, lease, local):
        """Look at another writer's lease with backoff and jitter until it
        is no longer computing, or expired; return it then (None: gone).
        A lease seen alive is progress for the threads waiting here (a
        renewal rewrites the same body, so its ETag does not change)."""
        delay = _POLL_FIRST
        while lease is not None and lease.stands:
            time.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(delay * 2, _POLL_MOST, lease.lifetime / 3)
            lease = self._read(lease_key)
            local.renewed += 1
        return lease


@functools.lru_cache(maxsize=None)
def _botocore_writes_conditionally():
    """Whether the installed botocore's PutObject takes IfNoneMatch and
    IfMatch (Breakpoint: botocore releases before late 2024 know neither)."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("s3")
    members = model.operation_model("PutObject").input_shape.members
    return "IfNoneMatch" in members and "IfMatch" in members


def _honours(client, method, **kwargs):
    """Whether a conditional request was refused (412), as it must be."""
    try:
        client.call(method, **kwargs)
    except Exception as error:
        if _error_code(error)[1] == 412:
            return True
        raise
    return False


def _load_message(call_id, verbose, timestamp, metadata, url):
    """What a load prints at verbose > 1: the words of joblib's own backend."""
    elapsed = ""
    if timestamp is not None:
        elapsed = "{: <16}".format(format_time(time.time() - timestamp))
    signature = posixpath.basename(call_id[0])
    if isinstance(metadata, dict) and isinstance(metadata.get("input_args"), dict):
        arguments = ", ".join(f"{name}={value}" for name, value in metadata["input_args"].items())
        signature += f"({arguments})"
    message = f"[Memory]{elapsed}: Loading {signature}"
    return f"{message}..." if verbose < 10 else f"{message} from {url}"


def _transfer_message(verb, size, started, url):
    """What a big transfer prints at verbose >= 10."""
    elapsed = max(time.perf_counter() - started, 1e-9)
    return (f"[Memory] {verb} {size / _MiB:.1f} MiB in {format_time(elapsed)} "
            f"({size / _MiB / elapsed:.1f} MiB/s): {url}")


class _StoreParts:
    """What a store builds from its options in one process: its client,
    local copies, access records, loads, functions and leases, and the
    failure policy they all apply (``on_failure``).

    Options that name no way to reach S3 (a location alone, as joblib gives
    for ``MemorizedFunc(f, "s3://...")``) connect as the last store
    configured in this process for the same bucket and endpoint did, or
    else through the AWS chain. What was taken from that store stays here,
    in this process: it is never pickled with the options.
    """

    def __init__(self, options):
        on_failure = self.on_failure
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
        self.access_records = _AccessRecords(
            self.client, options.access_interval, connection.credentials_fingerprint(),
            functools.partial(on_failure, _Failure.RECORD_ACCESS))
        self.loads = _ResultLoads(self.client, options, self.local_copies,
                                  functools.partial(on_failure, _Failure.USE_LOCAL_COPIES))
        self.functions = _Functions(self, options.location, on_failure)
        self.leases = None
        if options.compute_once is not None:
            self.leases = _Leases(self.client, options.prefix, options.compute_once, on_failure)

    def on_failure(self, failure, error, func_id=None):
        """Do what _FAILURE_POLICY says of a failure of this store; return
        the KeyError a failed load raises."""
        if isinstance(error, _WrongThreadError):
            raise error  # a mistake to fix in the calling code, not a failure of S3
        outcome = _FAILURE_POLICY[failure]
        client = self.client
        where = f"{client.location} (bucket {client.bucket!r} at endpoint {client.endpoint})"
        what = _said(error)
        _log.info("could not %s in %s: %s (%s)", failure.value, where, what, outcome.name)
        if outcome in (_Outcome.OFF, _Outcome.RAISE_AND_OFF):
            self.functions.turn_off(func_id, f"it could not {failure.value} in {where}: {what}")
        if outcome in (_Outcome.RAISE, _Outcome.RAISE_AND_OFF):
            raise client.error(failure.value, error) from error
        if outcome is _Outcome.KEY_ERROR:
            if isinstance(error, FileNotFoundError):  # the words of joblib's own backend
                return KeyError(f"Non-existing item (may have been cleared).\n{error} "
                                f"(bucket {client.bucket!r} at endpoint {client.endpoint})")
            return KeyError(f"could not {failure.value} from {where}: {what}")
        if outcome is _Outcome.MISS:
            kind = "unreachable" if _is_unreachable(error) else type(error).__name__
            then = _WHAT_FOLLOWS.get(failure, "The result is still computed and returned.")
            client.warn(f"joblib_store could not {failure.value} in {where}: {what}. {then}",
                        kind=(failure, kind))
        elif outcome is _Outcome.LOCAL:
            client.warn(f"joblib_store cannot use local copies of results ({error}); "
                        f"results are loaded from S3 instead.", kind=(failure,))
        elif outcome is _Outcome.EACH_FUNCTION:
            warnings.warn(f"Unable to cache {func_id} to S3: its result cannot be pickled "
                          f"({what}). It is returned but not stored.", CacheWarning, stacklevel=5)
        return None

    def read_metadata(self, key):
        """The metadata at key, as joblib wrote it; {} if it is missing or
        cannot be read."""
        try:
            return _metadata_of(self.client.run(self.client.read(key)))[0]
        except FileNotFoundError:
            return {}
        except Exception as error:
            self.on_failure(_Failure.READ_METADATA, error)
            return {}

    def delete(self, keys):
        """Delete keys, and the local copies of the results among them."""
        keys = list(keys)
        if self.local_copies is not None:
            self.local_copies.drop(keys)
        self.client.delete(keys)

    def clear_prefix(self, key_prefix):
        """Delete every object under key_prefix + '/'."""
        self.delete(obj["Key"] for obj in self.client.list(key_prefix + "/"))


class _Functions:
    """The functions of one cache, as this process knows them: whose cache
    is off, and the check of its stored code that turns it back on."""

    def __init__(self, parts, location, on_failure):
        self._parts = parts
        self._location = location
        self._on_failure = on_failure

    def state(self, func_id):
        """This process's state of a function, once its code write landed."""
        function = _PROCESS.function(self._location, func_id)
        write = function.code_write
        if write is not None and write.done():
            function.code_write = None
            error = None if write.cancelled() else write.exception()
            if error is not None:
                self._on_failure(_Failure.STORE_CODE, error, func_id)
        return function

    def is_off(self, func_id):
        return self.state(func_id).off

    def turn_off(self, func_id, why):
        _PROCESS.function(self._location, func_id).off = True
        _log.info("the cache is off for %s in this process: %s", func_id, why)
        self._parts.client.warn(
            f"joblib_store turned the cache off for {func_id} in this process: {why}. "
            f"Calls compute without the cache until its stored code can be checked.",
            kind=("off", func_id),
        )

    def turn_on(self, func_id):
        function = _PROCESS.function(self._location, func_id)
        if function.off:
            function.off = False
            _log.info("the cache is on again for %s in this process", func_id)

    def recheck(self, func_id, code_key):
        """Check an off function's stored code again, as joblib would; return
        whether its cache is back on.

        Old results go when the stored code differs, and the current code is
        written when it differs or is missing.
        """
        code = self.state(func_id).code
        if code is None:
            return False
        client = self._parts.client
        try:
            try:
                stored = _readable_func_code(client.run(client.read(code_key)))
            except FileNotFoundError:
                stored = None
            current = joblib.memory.extract_first_line(code)[0]
            if stored is not None and joblib.memory.extract_first_line(stored)[0] != current:
                self._parts.clear_prefix(posixpath.dirname(code_key))
            if stored is None or stored != code:
                client.put(code_key, code.encode("utf-8"))
        except Exception as error:
            self._on_failure(_Failure.RECHECK_CODE, error, func_id)
            return False
        self.turn_on(func_id)
        return True


_Entry = collections.namedtuple("_Entry", "item keys has_result age")
_Evicted = collections.namedtuple("_Evicted", "items leftovers uploads")


class _Eviction:
    """Least-recently-used eviction of one cache, and its leftovers.

    Ages are taken by the server's clock alone (its listing's Date against
    the objects' LastModified), so a client whose clock is off neither
    evicts a result just used nor keeps an old one. Results are evicted by
    the limits, least recently used first. Leftovers are handled on their
    own terms: an item folder without a result (an access record or
    metadata that landed after a clear, a write that failed) goes once
    ``leftover_age`` old (or age_limit, if shorter), and so does a multipart
    upload never completed nor aborted (its parts are billed meanwhile).
    """

    def __init__(self, parts, prefix, leftover_age, verbose):
        self._parts = parts
        self._prefix = prefix
        self._leftover_age = leftover_age
        self._verbose = verbose

    def entries(self):
        """Every item folder, as an _Entry: its CacheItemInfo, its keys,
        whether it holds a result, and its age in seconds.

        An item's last access is the newest LastModified among its objects,
        its access record included, given in the local clock's terms. This
        process's own pending writes and access records land first.
        """
        _wait_for_background_requests()
        objects, server_time = self._parts.client.listing(self._prefix + "/")
        folders = collections.defaultdict(list)
        for obj in objects:
            folder, _, name = obj["Key"].rpartition("/")
            if _HEX32.fullmatch(posixpath.basename(folder)) and name in _ITEM_NAMES:
                folders[folder].append(obj)
        now = datetime.datetime.now()
        entries = []
        for folder, found in folders.items():
            age = (server_time - max(obj["LastModified"] for obj in found)).total_seconds()
            item = CacheItemInfo(self._parts.client.url(folder), sum(obj["Size"] for obj in found),
                                 now - datetime.timedelta(seconds=age))
            has_result = any(obj["Key"].endswith("/" + OUTPUT) for obj in found)
            entries.append(_Entry(item, [obj["Key"] for obj in found], has_result, age))
        return entries

    def find(self, bytes_limit=None, items_limit=None, age_limit=None):
        """What the limits leave out: an _Evicted of entries and uploads."""
        entries = self.entries()
        results = sorted((e for e in entries if e.has_result), key=lambda e: -e.age)
        max_age = None if age_limit is None else age_limit.total_seconds()
        extra_items = 0 if items_limit is None else len(results) - items_limit
        extra_bytes = 0 if bytes_limit is None else sum(e.item.size for e in results) - bytes_limit
        doomed = []
        for entry in results:
            too_old = max_age is not None and entry.age > max_age
            if extra_items <= 0 and extra_bytes <= 0 and not too_old:
                break
            doomed.append(entry)
            extra_items -= 1
            extra_bytes -= entry.item.size
        leftover_age = self._leftover_age if max_age is None else min(self._leftover_age, max_age)
        leftovers = [e for e in entries if not e.has_result and e.age > leftover_age]
        uploads, server_time = self._parts.client.incomplete_uploads(self._prefix + "/")
        stale = [upload for upload in uploads if server_time is not None
                 and (server_time - upload["Initiated"]).total_seconds() > self._leftover_age]
        return _Evicted(doomed, leftovers, stale)

    def run(self, bytes_limit=None, items_limit=None, age_limit=None, dry_run=False):
        """Find what the limits leave out and, unless dry_run, delete it."""
        if isinstance(bytes_limit, str):
            bytes_limit = memstr_to_bytes(bytes_limit)
        if age_limit is not None and age_limit.total_seconds() < 0:
            raise ValueError("age_limit has to be a positive timedelta")
        for name, limit in (("bytes_limit", bytes_limit), ("items_limit", items_limit)):
            if limit is not None and limit < 0:  # would remove every result
                raise ValueError(f"{name}={limit} is negative: give 0 or more")
        try:
            doomed = self.find(bytes_limit, items_limit, age_limit)
        except Exception as error:
            self._parts.on_failure(_Failure.LIST, error)
        if not dry_run:
            try:
                self.carry_out(doomed)
            except Exception as error:
                self._parts.on_failure(_Failure.EVICT, error)
        return doomed

    def carry_out(self, doomed):
        """Delete what find() left out, and abort its uploads."""
        for entry in doomed.items + doomed.leftovers:
            if self._verbose > 10:
                print(f"Deleting item {entry.item}")
        self._parts.delete(key for entry in doomed.items + doomed.leftovers for key in entry.keys)
        client = self._parts.client
        for upload in doomed.uploads:
            try:
                client.call("abort_multipart_upload", Key=upload["Key"], UploadId=upload["UploadId"])
            except Exception as error:
                if not _is_missing(error):  # completed or aborted meanwhile
                    raise


class S3StoreBackend(*_STORE_BASES):
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
            Our options (``bucket``, ``storage_options``, ``fs``,
            ``create_bucket``, ``compute_once``, ``part_size``,
            ``max_concurrency``, ``access_interval``, ``local_cache_dir``,
            ``local_cache_bytes_limit``, ``leftover_age``: see the README),
            any keyword of ``s3fs.S3FileSystem``, and joblib's own
            ``compress`` and ``mmap_mode``.

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
            _warn_of_what_joblib_lacks()
        with _PROCESS.lock:
            _PROCESS.checked_buckets.add(checked)
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
            # Built outside the lock: connecting waits for s3fs's loop,
            # whose callbacks take the lock.
            built = _StoreParts(self.options)
            with _PROCESS.lock:
                parts = _PROCESS.parts.setdefault(self, built)
        return parts

    _client = property(lambda self: self._parts.client)
    bucket = property(lambda self: self.options.bucket, doc="The cache's bucket.")
    prefix = property(lambda self: self.options.prefix, doc="The cache's key prefix.")
    fs = property(lambda self: self._client.fs,
                  doc="The s3fs filesystem that carries this process's requests.")
    endpoint = property(lambda self: self._client.endpoint,
                        doc="The URL requests go to (never with credentials).")

    # ------------------------------------------------------- failure policy

    def _on_failure(self, failure, error, func_id=None):
        """Do what the failure policy says (see _StoreParts.on_failure)."""
        return self._parts.on_failure(failure, error, func_id)

    # ------------------------------------------------------------ the call

    def _call_of(self, call_id):
        """The joblib call a backend call for call_id serves, or None."""
        _refuse_loop_thread()
        call = _CURRENT_CALL.get()
        if call is not None and call.serves(self, call_id[0]):
            return call
        return None

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

    def _func_id_of(self, key):
        """The func_id of a key of a result, <prefix>/<func_id>/<args_id>/<name>."""
        return posixpath.dirname(posixpath.dirname(key))[len(self.prefix) + 1:]

    # ----------------------------------------- StoreBackendBase primitives

    def _open_item(self, f, mode):
        """Open the object at a URL for reading ('rb') or writing ('wb').

        A written object appears when the file is closed, unless the block
        that wrote it raised.
        """
        key = self._key_of_url(f)
        if mode == "rb":
            client = self._client
            opened = client.run(client.open_range(key, _first_range_length(self.options.part_size)))
            return io.BufferedReader(self._parts.loads.reader(opened), buffer_size=_MiB)
        if mode == "wb":
            return _ObjectFile(
                self._client, key, self.options.part_size, self.options.max_concurrency,
                functools.partial(self._on_failure, _Failure.ABORT_UPLOAD),
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
            self._on_failure(_Failure.CLEAR_CACHE, error)

    def _clear_prefix(self, key_prefix):
        self._parts.clear_prefix(key_prefix)

    def _delete(self, keys):
        self._parts.delete(keys)

    def get_items(self):
        """Every cached result, as ``CacheItemInfo(path, size, last_access)``.

        One listing request per 1000 keys, nothing per item.
        """
        try:
            return [entry.item for entry in self._eviction().entries() if entry.has_result]
        except Exception as error:
            self._on_failure(_Failure.LIST, error)

    def _eviction(self):
        return _Eviction(self._parts, self.prefix, self.options.leftover_age, self.verbose)

    # ------------------------------------------------------------ fast paths
    # Each overrides a StoreBackendMixin method where S3 can do better than
    # the generic code built on the primitives above.

    def contains_item(self, call_id):
        # One GET of the result's first range when a load follows (its
        # answer serves that load), else one HEAD; a missing key is a miss,
        # never a listing. A lookup sent beside the read of func_code.py in
        # the same call answers instead.
        call = self._call_of(call_id)
        func_id = call_id[0]
        key = self._key_of_call(call_id, OUTPUT)
        beside = call.take("lookup", key) if call is not None else None
        if call is not None and call.runs_stale_code():
            return False
        if self._parts.functions.is_off(func_id):
            if beside is not None:
                beside.close()
            beside = None
            if not self._parts.functions.recheck(func_id, self._key_of_call([func_id], FUNC_CODE)):
                return False
        try:
            found = beside.answer() if beside is not None else self._client.run(
                self._look_up(call, key))
            looked_again = False
            for _ in range(_LEASE_ATTEMPTS):
                if found is not None or call is None or not call.computes_once():
                    break
                # Before the miss is computed: its lease, or its result.
                taken = self._parts.leases.take(key, None, looked_again)
                if taken is not _LOOK_AGAIN:
                    call.lease = taken
                    break
                found, looked_again = self._client.run(self._look_up(call, key)), True
        except Exception as error:
            self._on_failure(_Failure.LOOK_UP, error)
            return False
        if found is None:
            return False
        if call is None:
            found.close()
        else:
            call.found = found
        return True

    def _look_up(self, call, key):
        """The lookup of the result at key for a call (a coroutine)."""
        loads = call is not None and call.kind is _Kind.CALL
        validates = call is not None and call.validates
        code_digest = call.code_digest() if call is not None else None
        loads_of = self._parts.loads
        return loads_of.look_up(key, loads_of.plan(key, loads, validates, code_digest))

    def get_metadata(self, call_id):
        # What the lookup of this call fetched for a validation callback, or
        # else fetched only if read: a hit without a callback skips it.
        call = self._call_of(call_id)
        found = call.found if call is not None else None
        if found is not None and found.key == self._key_of_call(call_id, OUTPUT):
            if found.metadata is not None:
                return dict(found.metadata)
        return _LazyMetadata(functools.partial(
            self._parts.read_metadata, self._key_of_call(call_id, METADATA)))

    def _load_output(self, call_id):
        call = self._call_of(call_id)
        key = self._key_of_call(call_id, OUTPUT)
        write = call.write if call is not None else None
        if write is not None and write.key == key:
            return write.reload()  # joblib maps the result this call just stored
        found = call.take("found", key) if call is not None else None
        code_digest = call.code_digest() if call is not None else None
        started = time.perf_counter()
        try:
            item, opened, age = self._parts.loads.load(key, found, code_digest)
        except Exception as error:
            raise self._on_failure(_Failure.LOAD, error) from None
        if opened is not None:
            self._report_transfer("Loaded", opened.size, started, key)
        self._parts.access_records.record(posixpath.dirname(key), age)
        return item

    def _report_transfer(self, verb, size, started, key):
        # At verbose >= 10, big transfers say how long they took.
        if self.verbose >= 10 and size > _BIG_TRANSFER:
            print(_transfer_message(verb, size, started, self._client.url(key)))

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
                url = self._client.url(self._key_of_call(call_id))
                print(_load_message(call_id, verbose, timestamp, metadata, url))
            return self._load_output(call_id)

    def _stores(self, call, func_id):
        """Whether results of func_id, in this call, are stored and looked up."""
        stale = call is not None and call.runs_stale_code()
        return not stale and not self._parts.functions.is_off(func_id)

    def dump_item(self, call_id, item, verbose=1):
        # Streamed straight to the final key: no temporary object, no copy.
        # The steps of a write, and their order, are _Write's.
        call = self._call_of(call_id)
        key = self._key_of_call(call_id, OUTPUT)
        write = _Write(self, key, call)
        if call is not None:
            if call.write is not None:
                call.write.close()
            call.write = write
        if not self._stores(call, call_id[0]):
            write.item = item if self.mmap_mode is not None else None
            write.stage = _Stage.FAILED
            return
        if verbose > 10:
            print(f"Persisting in {self._client.url(posixpath.dirname(key))}")
        # joblib maps a result right after storing it when mmap_mode is set.
        write.start(item, reloads=self.mmap_mode is not None and call is not None)

    def store_metadata(self, call_id, metadata):
        call = self._call_of(call_id)
        key = self._key_of_call(call_id, OUTPUT)
        write = call.write if call is not None else None
        if write is not None and write.key == key:
            write.publish_metadata(metadata)
            return
        if not self._stores(call, call_id[0]):
            return  # no metadata for a result that is not stored
        try:
            self._client.put(self._key_of_call(call_id, METADATA),
                             json.dumps(metadata).encode("utf-8"))
        except Exception as error:
            self._on_failure(_Failure.STORE_METADATA, error)

    def clear_item(self, call_id):
        # The names are known: one DeleteObjects, no listing.
        call = self._call_of(call_id)
        failure = _Failure.CLEAR_EXPIRED
        if call is not None and call.kind.maintains:
            failure = _Failure.CLEAR_RESULT
        key = self._key_of_call(call_id, OUTPUT)
        if call is not None and call.computes_once():
            # An entry that failed validation is computed again once: by the
            # writer that takes its lease; the others wait for its result.
            call.lease_before_computing(key, call.found and call.found.result_id)
        names = [name for name in _ITEM_NAMES if name != LEASE or call is None or not call.lease]
        try:
            self._delete(self._key_of_call(call_id, name) for name in names)
        except Exception as error:
            self._on_failure(failure, error)

    def contains_path(self, call_id):
        # joblib's generic version calls a method that does not exist.
        _refuse_loop_thread()
        return self._key_exists(self._key_of_call(call_id))

    def clear_path(self, call_id):
        # No existence check first: listing an empty prefix answers that.
        call = self._call_of(call_id)
        func_id = call_id[0]
        if call is not None and call.kind.maintains:
            failure = _Failure.CLEAR_FUNCTION
        elif self._parts.functions.is_off(func_id):
            return  # the check that turns it back on clears them
        else:
            failure = _Failure.CLEAR_CHANGED_CODE
        try:
            self._clear_prefix(self._key_of_call(call_id))
        except Exception as error:
            self._on_failure(failure, error, func_id)

    def store_cached_func_code(self, call_id, func_code=None):
        # Without code joblib only asks for a folder, which S3 does not need.
        if func_code is None:
            return
        call = self._call_of(call_id)
        func_id = call_id[0]
        functions = self._parts.functions
        function = functions.state(func_id)
        function.code = func_code
        key = self._key_of_call(call_id, FUNC_CODE)
        if call is not None and not call.kind.maintains:
            if function.off:
                return  # the check that turns it back on writes it
            # The write goes on while the function computes and its results
            # upload: they carry the digest of their code (_CODE_DIGEST), so
            # none is served to a call of other code, written or not.
            function.code_write = self._client.submit(
                "put_object", Key=key, Body=func_code.encode("utf-8"))
            _PROCESS.track(function.code_write)
            if call.args_id and call.computes_once():
                # joblib computes next, without a lookup: the lease first.
                call.lease_before_computing(
                    self._key_of_call((func_id, call.args_id), OUTPUT), None)
            return
        # func.clear() (its results are gone, now its code is written), or
        # a store used directly: the code is there when this returns.
        failure = _Failure.STORE_CODE if call is None else _Failure.STORE_CODE_AFTER_CLEAR
        try:
            self._client.put(key, func_code.encode("utf-8"))
        except Exception as error:
            self._on_failure(failure, error, func_id)
            return
        functions.turn_on(func_id)

    def get_cached_func_code(self, call_id):
        # joblib reads an OSError as "no code stored yet" and then stores
        # its code: for a failure other than a missing file, the function's
        # cache goes off first, so that code is not written next to results
        # of code nobody could check. A read that succeeds turns it on.
        call = self._call_of(call_id)
        func_id = call_id[0]
        functions = self._parts.functions
        key = self._key_of_call(call_id, FUNC_CODE)
        client = self._client
        # The lookup joblib makes next, when the code is the caller's, goes
        # out beside this read: a hit in a process that did not write the
        # code takes one round trip, not two.
        lookup = None
        if call is not None and call.args_id and call.code_digest() and self._stores(call, func_id):
            output_key = self._key_of_call((func_id, call.args_id), OUTPUT)
            lookup = _Beside(output_key, client.start(self._look_up(call, output_key)))
        try:
            code = _readable_func_code(client.run(client.read(key)))
        except Exception as error:
            if lookup is not None:
                lookup.close()
            if not isinstance(error, FileNotFoundError):
                self._on_failure(_Failure.READ_CODE, error, func_id)
                raise OSError(f"cannot read {client.url(key)}: {error}") from error
            functions.turn_on(func_id)
            raise  # no code stored yet: joblib writes its own next
        functions.turn_on(func_id)
        if lookup is not None and _digest_of_stored_code(code.encode("utf-8")) != call.code_digest():
            lookup.close()  # joblib will not look this result up
        elif lookup is not None:
            concurrent.futures.wait([lookup.future])
            call.lookup = lookup  # for the existence check that follows
        return code

    def clear(self):
        _refuse_loop_thread()
        try:
            self._clear_prefix(self.prefix)
        except Exception as error:
            self._on_failure(_Failure.CLEAR_CACHE, error)

    def enforce_store_limits(self, bytes_limit, items_limit=None, age_limit=None):
        """Delete the least recently used results beyond the limits, and the
        leftovers older than ``leftover_age`` (see _Eviction).

        One listing and one DeleteObjects per 1000 keys, whatever the number
        of items.
        """
        self._evict(bytes_limit, items_limit, age_limit)

    def _evict(self, bytes_limit=None, items_limit=None, age_limit=None, dry_run=False):
        """Delete (or with dry_run only find) what the limits leave out: an
        _Evicted."""
        _refuse_loop_thread()
        return self._eviction().run(bytes_limit, items_limit, age_limit, dry_run)

    if not _HAS_ENFORCE_STORE_LIMITS:
        # Breakpoint: joblib < 1.3 calls reduce_store_size(bytes_limit).
        def reduce_store_size(self, bytes_limit):
            """Delete the least recently used results beyond bytes_limit."""
            self.enforce_store_limits(bytes_limit)


# --------------------------------------------------------------------------
# 9. Registration: the S3 store by name and by s3:// URL, and the call
# scopes around joblib's public methods (see _Call).
# --------------------------------------------------------------------------


def _route_s3_urls(factory):
    """Wrap joblib's backend factory so 's3://' locations need no backend=."""

    @functools.wraps(factory)
    def store_backend_factory(backend, location, *args, **kwargs):
        if isinstance(location, str) and location[:3].lower() == "s3:" and (
                location[:5].lower() != "s3://"):
            # A slash missing would make a local folder named "s3:". The
            # location is not shown: it may carry a secret.
            raise ValueError(
                "a cache location that begins with 's3:' must begin with 's3://': write "
                "it as 's3://BUCKET/PREFIX'")
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


_CALL_ATTEMPTS = 3  # runs of one call whose awaited result keeps landing late


def _in_call_scope(kind, method):
    """method, run inside a _Call when its object uses an S3 store.

    A method of the same object called from inside its own call is part of
    that call when joblib makes it so: joblib < 1.4 computes a miss through
    call(), and every release clears the results of changed code through
    clear(). Anything else (a cached function calling itself) is a call of
    its own. A coroutine (AsyncMemorizedFunc) runs its whole course inside
    the call. A call whose awaited result landed after joblib decided to
    compute it (see _Leases) runs again, and loads it.
    """

    @functools.wraps(method)
    def in_call_scope(owner, *args, **kwargs):
        store = getattr(owner, "store_backend", None)
        if not isinstance(store, S3StoreBackend):
            return method(owner, *args, **kwargs)
        outer = _CURRENT_CALL.get()
        if (outer is not None and outer.owner is owner and not outer.kind.maintains
                and kind in (_Kind.FORCE, _Kind.CLEAR)):
            return _joined(outer, kind, method, owner, args, kwargs)
        for attempt in range(_CALL_ATTEMPTS):
            call = _Call(kind, owner, store)
            call.leases_off = attempt + 1 == _CALL_ATTEMPTS
            token = _CURRENT_CALL.set(call)
            try:
                result = method(owner, *args, **kwargs)
            except _CallAgain:
                call.close()
                continue
            except BaseException:
                call.close()
                raise
            finally:
                _CURRENT_CALL.reset(token)
            if inspect.iscoroutine(result) and isinstance(owner, _ASYNC_MEMORIZED_FUNC or ()):
                return _awaited_in(call, result, method, owner, args, kwargs)
            return call.ended(result)
        raise AssertionError("not reached: the last attempt takes no lease")

    in_call_scope.joblib_store_scope = kind
    return in_call_scope


def _joined(call, kind, method, owner, args, kwargs):
    clearing, call.clearing = call.clearing, call.clearing or kind is _Kind.CLEAR
    try:
        return method(owner, *args, **kwargs)
    finally:
        call.clearing = clearing


async def _awaited_in(call, awaitable, method, owner, args, kwargs):
    for attempt in range(1, _CALL_ATTEMPTS + 1):
        token = _CURRENT_CALL.set(call)
        try:
            return call.ended(await awaitable)
        except _CallAgain:
            call.close()
        except BaseException:
            call.close()
            raise
        finally:
            _CURRENT_CALL.reset(token)
        call = _Call(call.kind, owner, call.store)
        call.leases_off = attempt + 1 == _CALL_ATTEMPTS
        token = _CURRENT_CALL.set(call)
        try:
            awaitable = method(owner, *args, **kwargs)
        finally:
            _CURRENT_CALL.reset(token)
    raise AssertionError("not reached: the last attempt takes no lease")


def _noting_the_args_id(method):
    """joblib's computation of a call's args_id, noted on the call."""

    @functools.wraps(method)
    def noting_the_args_id(owner, *args, **kwargs):
        args_id = method(owner, *args, **kwargs)
        call = _CURRENT_CALL.get()
        if call is not None and call.owner is owner and isinstance(args_id, str):
            call.args_id = args_id
        return args_id

    noting_the_args_id.joblib_store_scope = "args_id"
    return noting_the_args_id


def _install_call_scopes():
    """Wrap joblib's public methods in call scopes, once."""
    memorized_func = joblib.memory.MemorizedFunc
    for cls, methods in _SCOPED_METHODS.items():
        names = dict(methods)
        if issubclass(cls, memorized_func):
            # A public method joblib adds later is a call that loads nothing
            # ahead and never raises.
            names.update({
                name: "OTHER" for name, value in vars(cls).items()
                if not name.startswith("_") and inspect.isfunction(value) and name not in names
            })
        for name, kind in names.items():
            method = vars(cls).get(name)
            if inspect.isfunction(method) and not hasattr(method, "joblib_store_scope"):
                setattr(cls, name, _in_call_scope(_Kind[kind], method))
    if _ARGS_ID_METHOD is not None:
        method = vars(memorized_func)[_ARGS_ID_METHOD]
        if not hasattr(method, "joblib_store_scope"):
            setattr(memorized_func, _ARGS_ID_METHOD, _noting_the_args_id(method))


def _warn_of_what_joblib_lacks():
    """Say once what the installed joblib costs, where it lacks what the
    store relies on for speed."""
    if _ARGS_ID_METHOD is None:
        _warn_once(("joblib", None, "args_id"), (
            f"joblib {joblib.__version__} has no MemorizedFunc._get_args_id (nor "
            f"_get_argument_hash): a hit in a process that did not write the "
            f"function's code takes two round trips instead of one. Results "
            f"stay right."), stacklevel=4)


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
    _install_call_scopes()


# Importing the module registers it: a worker that unpickles a store, a
# cached function or a MemorizedResult imports this module, and so routes
# s3:// locations to S3, and scopes joblib's calls, without a call of its own.
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


def _argument_error(message):
    """The error of a command-line value, shown as it is said."""
    import argparse  # the command line's alone: not at import

    return argparse.ArgumentTypeError(message)


def _parse_age(text):
    """'30d', '12h', '45m' or '90s' as a timedelta."""
    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([dhms])", text.strip())
    if not match:
        raise _argument_error(f"age {text!r} is not like 30d, 12h, 45m or 90s")
    return datetime.timedelta(**{units[match.group(2)]: float(match.group(1))})


def _parse_count(text):
    """A number of items: 0 or more."""
    if not text.strip().isdigit():
        raise _argument_error(f"count {text!r} is not a whole number, 0 or more")
    return int(text)


def _parse_bytes(text):
    """'10G', '500M', '50K' or a plain number of bytes."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        return memstr_to_bytes(text.upper())
    except Exception:
        raise _argument_error(f"size {text!r} is not like 10G, 500M, 50K or 1000000") from None


def _open_store(url, arguments):
    """The store behind a Memory location given on the command line."""
    options = {}
    if arguments.endpoint_url:
        options["endpoint_url"] = arguments.endpoint_url
    if arguments.profile:
        options["profile"] = arguments.profile
    if getattr(arguments, "leftover_age", None) is not None:
        options["leftover_age"] = arguments.leftover_age
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
    evicted = store._evict(
        bytes_limit=arguments.bytes_limit,
        items_limit=arguments.items_limit,
        age_limit=arguments.age_limit,
        dry_run=arguments.dry_run,
    )
    verb = "would remove" if arguments.dry_run else "removed"
    for entry in evicted.items:
        item = entry.item
        print(f"{verb} {item.path} ({item.size} bytes, last access "
              f"{item.last_access.isoformat(' ', 'seconds')})")
    for entry in evicted.leftovers:
        print(f"{verb} {entry.item.path}: no result, {entry.item.size} bytes, "
              f"{entry.age / 3600:.1f} h old")
    for upload in evicted.uploads:
        print(f"{'would abort' if arguments.dry_run else 'aborted'} the incomplete upload of "
              f"s3://{store.bucket}/{upload['Key']} (begun {upload['Initiated'].isoformat(' ', 'seconds')})")
    print(f"{verb} {len(evicted.items)} items, {sum(e.item.size for e in evicted.items)} bytes"
          + (f"; {len(evicted.leftovers)} leftovers" if evicted.leftovers else "")
          + (f"; {len(evicted.uploads)} incomplete uploads" if evicted.uploads else ""))


def _functions_named(store, items, name):
    """The cached functions a --function NAME means: the one whose full id
    it is, or else the only one whose last name it is."""
    functions = sorted({_function_of(store, item) for item in items})
    if name in functions:
        return [name]
    matching = [function for function in functions if function.rpartition("/")[2] == name]
    if not matching:
        raise _UsageError(f"no cached function named {name!r} in {store.location}")
    if len(matching) > 1:
        raise _UsageError(
            f"{name!r} names {len(matching)} cached functions: {', '.join(matching)}; "
            f"give one of these full ids")
    return matching


def _command_clear(arguments):
    store = _open_store(arguments.location, arguments)
    items = store.get_items()
    if arguments.function:
        functions = _functions_named(store, items, arguments.function)
        items = [item for item in items if _function_of(store, item) in functions]
        target = functions[0]
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
    _progress(f"clearing {target} ...")
    if arguments.function:
        store.clear_location(f"{store.location}/{target}")
    else:
        store.clear_location(store.location)
    print(f"deleted {len(items)} items of {target}")


class _UsageError(Exception):
    """A command line that cannot be carried out as given (exit status 2)."""


def _parser():
    """The command line's arguments."""
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
    prune.add_argument("--items-limit", type=_parse_count)
    prune.add_argument("--age-limit", type=_parse_age, help="such as 30d, 12h or 45m")
    prune.add_argument("--leftover-age", type=_parse_age,
                       help="remove entries without a result, and abort incomplete "
                            "uploads, older than this (default 1d)")
    prune.add_argument("--dry-run", action="store_true", help="only print what would go")

    clear = commands.add_parser("clear", parents=[shared], help="delete cached results")
    clear.add_argument("location")
    clear.add_argument("--function", help="only this function: its full id (module/name), "
                       "or its name if no other function has it")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    demo = commands.add_parser(
        "demo", parents=[shared],
        help="cache a computation in S3 twice: a miss, then a hit",
        description="Run the README example twice. Without a location or "
        "--endpoint-url it starts moto's S3 server on 127.0.0.1 and needs no "
        "AWS account.",
    )
    demo.add_argument("location", nargs="?", help="s3://bucket/prefix to use")
    return parser


def _main(argv=None):
    parser = _parser()
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
