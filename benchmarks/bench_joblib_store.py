"""Benchmark joblib_store against raw s3fs and joblib's local backend.

Starts moto's S3 server on 127.0.0.1 in its own process (behind a layer that
counts requests by operation), then times every phase in fresh processes:

* store: ``dump_item`` of a result, against the floor ``joblib.dump`` into
  memory followed by s3fs ``pipe_file`` of those bytes;
* load: ``load_item`` of that result, against s3fs ``cat_file`` of the same
  bytes (transfer alone);
* the calls joblib users make on a tiny result (miss, hit, hit in a fresh
  process), counted in requests;

for a tiny result, 1 MiB and 256 MiB float64 arrays, uncompressed and with
compress=3. joblib's local backend (to a temporary folder) is shown beside.

    python benchmarks/bench_joblib_store.py [--runs 5] [--sizes tiny,1MiB,256MiB]

Times are medians over the runs; memory is the growth of the process's peak
resident set during the phase (Linux), beyond what it held before.
"""

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
MiB = 2**20
SIZES = {"tiny": None, "1MiB": 1 * MiB, "256MiB": 256 * MiB}
ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


# ----------------------------------------------------------------- server


def keep_objects_in_memory():
    """Make moto read an object's bytes once, not at every GET.

    moto keeps each object in a temporary file and reads all of it for every
    GET, ranged or not: about 0.12 s for a 256 MiB object on this machine,
    per request. S3 does no such thing, and it would penalise every client
    that reads in ranges (s3fs's cat_file, boto3's download_file and
    joblib_store alike). The benchmark's moto keeps the bytes of an object
    in memory once read; nothing else changes.
    """
    from moto.s3.models import FakeKey

    stored = FakeKey.value

    def read(key):
        value = key.__dict__.get("_benchmark_value")
        if value is None:
            value = key.__dict__["_benchmark_value"] = stored.fget(key)
        return value

    def write(key, value):
        key.__dict__.pop("_benchmark_value", None)
        stored.fset(key, value)

    FakeKey.value = property(read, write)


def checksum_multipart_objects_part_by_part():
    """Make moto checksum a whole multipart object as its parts come.

    At the Complete of an upload that names no checksum algorithm (boto3
    names CRC32 and is spared), moto copies every part into one buffer,
    copies that into bytes and runs a CRC32 over it: about 0.1 s for
    64 MiB on this machine, charged to that client alone. S3 combines the
    checksums of the parts instead. The benchmark's moto computes the same
    value a part at a time, without the copies; other checksums are moto's.
    """
    import base64
    import binascii

    from moto.s3 import models, utils

    builder = models.MultipartChecksumBuilder
    add_part, build = builder.addPart, builder.build

    def is_a_whole_object_crc32(self):
        return self.checksum_type == "FULL_OBJECT" and (
            self.checksum_algorithm == "CRC32"
            or (self.checksum_algorithm == "CRC64NVME" and not utils.HAS_CRT))

    def streamed_add_part(self, part):
        if not is_a_whole_object_crc32(self):
            return add_part(self, part)
        self.running_crc32 = binascii.crc32(part, getattr(self, "running_crc32", 0))
        self.part_count += 1

    def streamed_build(self):
        if not is_a_whole_object_crc32(self):
            return build(self)
        crc = getattr(self, "running_crc32", 0).to_bytes(4, "big")
        return self.checksum_type, base64.b64encode(crc).decode(), 1

    builder.addPart, builder.build = streamed_add_part, streamed_build


def serve(port_file):
    """Run moto's S3 server, counting requests; GET /__requests__ reads them."""
    import logging

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    sys.path.insert(0, os.path.dirname(HERE))
    from test_joblib_store import s3_operation

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    keep_objects_in_memory()
    checksum_multipart_objects_part_by_part()
    moto = DomainDispatcherApplication(create_backend_app)
    counts = Counter()
    lock = threading.Lock()

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/__requests__":
            with lock:
                body = json.dumps(counts).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        with lock:
            counts[s3_operation(environ)] += 1
        return moto(environ, start_response)

    server = make_server("127.0.0.1", 0, app, threaded=True,
                         request_handler=MotoRequestHandler)
    with open(port_file + ".part", "w") as file:
        file.write(str(server.server_port))
    os.replace(port_file + ".part", port_file)  # whole, for start_server
    server.serve_forever()


def start_server():
    """Start serve() in its own process; return the process and its port."""
    folder = tempfile.mkdtemp()
    port_file = os.path.join(folder, "port")
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", port_file],
                              env={**os.environ, **ENVIRONMENT})
    while not os.path.exists(port_file):
        if server.poll() is not None:
            raise RuntimeError("the S3 server did not start")
        time.sleep(0.1)
    with open(port_file) as file:
        port = int(file.read())
    shutil.rmtree(folder)
    return server, port


def server_counts(endpoint):
    from urllib.request import urlopen

    with urlopen(endpoint + "/__requests__") as response:
        return Counter(json.loads(response.read()))


# ------------------------------------------------------- one measurement


def make_payload(size):
    """Random float64 numbers (size bytes), built without a second copy."""
    import numpy as np

    if size is None:
        return {"result": 42, "label": "tiny"}
    count = size // 8
    array = np.empty(count)
    random = np.random.RandomState(0)
    step = 1 << 20
    for start in range(0, count, step):
        stop = min(start + step, count)
        array[start:stop] = random.random_sample(stop - start)
    return array


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak():
    # Linux >= 4.0: writing 5 resets the peak resident set size (VmHWM).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(spec):
    """Run one phase in this process; return time, memory and requests."""
    import joblib
    import numpy as np
    from joblib._store_backends import FileSystemStoreBackend

    import joblib_store

    joblib_store.register_s3_store_backend()
    endpoint, bucket = spec["endpoint"], spec["bucket"]
    compress = spec["compress"]
    options = {"endpoint_url": endpoint}
    store = joblib_store.S3StoreBackend()
    store.configure(f"s3://{bucket}/bench/joblib", backend_options={**options, "compress": compress})
    fs = store.fs
    call_id = ("bench/f", spec["args_id"])
    key = f"s3://{bucket}/bench/joblib/bench/f/{spec['args_id']}/output.pkl"
    local_dir = spec.get("local_dir")
    local = FileSystemStoreBackend()
    mmap_mode = "r" if spec["phase"] == "mmap hit" else None
    if local_dir:
        local.configure(local_dir, backend_options={"compress": compress,
                                                    "mmap_mode": mmap_mode})
    if spec["phase"] in ("mmap hit", "local-copy hit"):
        # A hit on a machine that already holds a local copy of the result.
        store = joblib_store.S3StoreBackend()
        store.configure(f"s3://{bucket}/bench/joblib", backend_options={
            **options, "compress": compress, "mmap_mode": mmap_mode,
            "local_cache_dir": os.path.join(local_dir, "s3-copies")})
        store.load_item(call_id, verbose=0)
    value = None
    if spec["phase"] == "store":
        value = make_payload(spec["size"])

    def operation():
        phase, implementation = spec["phase"], spec["implementation"]
        if phase == "store" and implementation == "joblib_store":
            store.dump_item(call_id, value, verbose=0)
        elif phase == "store" and implementation == "s3fs floor":
            buffer = io.BytesIO()
            joblib.dump(value, buffer, compress=compress)
            fs.pipe_file(key + ".floor", buffer.getvalue())
        elif phase == "store" and implementation == "local backend":
            local.dump_item(call_id, value, verbose=0)
        elif phase == "load" and implementation == "joblib_store":
            return store.load_item(call_id, verbose=0)
        elif phase == "load" and implementation == "s3fs floor":
            return fs.cat_file(key)
        elif phase in ("load", "mmap hit") and implementation == "local backend":
            return local.load_item(call_id, verbose=0)
        elif phase in ("mmap hit", "local-copy hit") and implementation == "joblib_store":
            # The backend's own methods, called outside a joblib call: the
            # lookup cannot hand its GET over, so this is a HEAD and then the
            # GET (answered 304). Through Memory, such a hit is the one GET.
            assert store.contains_item(call_id)
            return store.load_item(call_id, verbose=0)
        else:
            raise ValueError(spec)

    import gc

    gc.collect()
    before = resident_bytes()
    reset_peak()
    requests_before = server_counts(endpoint)
    started = time.perf_counter()
    result = operation()
    seconds = time.perf_counter() - started
    requests = server_counts(endpoint) - requests_before
    requests["__requests__"] = 0
    growth = peak_bytes() - before
    if spec["phase"] != "store" and spec["implementation"] != "s3fs floor" and spec["size"]:
        assert isinstance(result, np.ndarray) and result.nbytes == spec["size"]
    return {"seconds": seconds, "growth": growth, "requests": dict(+requests)}


def measure_calls(spec):
    """The calls a joblib user makes on a tiny result, by requests."""
    from joblib import Memory

    import joblib_store

    joblib_store.register_s3_store_backend()
    endpoint = spec["endpoint"]
    results = {}

    def counted(name, function):
        before = server_counts(endpoint)
        started = time.perf_counter()
        function()
        seconds = time.perf_counter() - started
        results[name] = {"seconds": seconds,
                         "requests": dict(+(server_counts(endpoint) - before))}

    location = f"s3://{spec['bucket']}/calls"
    options = {"endpoint_url": endpoint}
    holder = {}
    counted("Memory(...) + cache(f)", lambda: holder.update(
        f=Memory(location, verbose=0, compress=spec["compress"],
                 backend_options=options).cache(tiny_function)))
    cached = holder["f"]
    if spec["fresh_process_hit"]:
        counted("hit in a fresh process", lambda: cached(1))
        counted("later hit in that process", lambda: cached(1))
    else:
        counted("first miss of a new function", lambda: cached(1))
        counted("miss", lambda: cached(2))
        counted("warm hit", lambda: cached(2))
    return results


def tiny_function(x):
    return {"x": x}


# ----------------------------------------------------------- orchestration


def run_fresh(kind, spec, script=__file__):
    """Run ``script kind spec`` in a fresh process; return its last line's JSON."""
    output = subprocess.run(
        [sys.executable, script, kind, json.dumps(spec)],
        capture_output=True, text=True, check=False,
        env={**os.environ, **ENVIRONMENT},
    )
    if output.returncode:
        raise RuntimeError(output.stderr)
    return json.loads(output.stdout.strip().splitlines()[-1])


def requests_text(requests):
    return ", ".join(f"{count} {name}" for name, count in sorted(requests.items())) or "0"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default=",".join(SIZES))
    arguments = parser.parse_args()
    os.environ.update(ENVIRONMENT)

    server, port = start_server()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        print(f"moto S3 server at {endpoint}; {arguments.runs} fresh processes per figure;"
              f" {os.cpu_count()} CPUs; Python {sys.version.split()[0]}")
        report_calls(endpoint, bucket)
        for size_name in arguments.sizes.split(","):
            for compress in (0, 3):
                report_transfers(endpoint, bucket, size_name, compress, arguments.runs)
    finally:
        server.terminate()
        server.wait()


def report_calls(endpoint, bucket):
    print("\nRequests of the calls a user makes (tiny result, joblib "
          f"{__import__('joblib').__version__})")
    print(f"{'compress':>8}  {'operation':<32} {'requests':<48} {'time':>8}")
    for compress in (0, 3):
        spec = {"endpoint": endpoint, "bucket": f"{bucket}", "compress": compress,
                "fresh_process_hit": False}
        calls_bucket = f"{bucket}"
        results = run_fresh("--calls", spec)
        results.update(run_fresh("--calls", {**spec, "fresh_process_hit": True}))
        for name, result in results.items():
            print(f"{compress:>8}  {name:<32} {requests_text(result['requests']):<48} "
                  f"{result['seconds'] * 1000:7.1f}ms")
        # Leave the next compress setting a cache of its own.
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=calls_bucket, Prefix="calls/"):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", ())]
            if keys:
                client.delete_objects(Bucket=calls_bucket, Delete={"Objects": keys})


def report_transfers(endpoint, bucket, size_name, compress, runs):
    size = SIZES[size_name]
    label = f"{size_name}, compress={compress}"
    print(f"\n{label}")
    print(f"{'phase':<6} {'implementation':<14} {'median':>9} {'vs floor':>9} "
          f"{'peak growth':>12} {'vs payload':>10}  requests")
    local_dir = tempfile.mkdtemp()
    args_id = uuid.uuid4().hex
    base = {"endpoint": endpoint, "bucket": bucket, "compress": compress,
            "size": size, "args_id": args_id, "local_dir": local_dir}
    for phase in ("store", "load"):
        medians = {}
        for implementation in ("s3fs floor", "joblib_store", "local backend"):
            results = [run_fresh("--measure", {**base, "phase": phase,
                                               "implementation": implementation})
                       for _ in range(runs)]
            median = statistics.median(r["seconds"] for r in results)
            growth = statistics.median(r["growth"] for r in results)
            medians[implementation] = median
            ratio = median / medians["s3fs floor"]
            versus_payload = f"{growth / size:9.2f}x" if size else f"{'':>10}"
            print(f"{phase:<6} {implementation:<14} {median * 1000:7.1f}ms {ratio:8.2f}x "
                  f"{growth / MiB:9.1f}MiB {versus_payload}  {requests_text(results[0]['requests'])}")
    if compress == 0 and size and size > MiB:
        print(f"\n{label}: hits on a machine that holds a local copy")
        print(f"{'phase':<15} {'implementation':<14} {'median':>9} {'peak growth':>12}  requests")
        for phase, implementations in (("mmap hit", ("joblib_store", "local backend")),
                                       ("local-copy hit", ("joblib_store",))):
            for implementation in implementations:
                results = [run_fresh("--measure", {**base, "phase": phase,
                                                   "implementation": implementation})
                           for _ in range(runs)]
                median = statistics.median(r["seconds"] for r in results)
                growth = statistics.median(r["growth"] for r in results)
                print(f"{phase:<15} {implementation:<14} {median * 1000:7.1f}ms "
                      f"{growth / MiB:9.1f}MiB  {requests_text(results[0]['requests'])}")
    import shutil

    shutil.rmtree(local_dir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "--measure":
        print(json.dumps(measure(json.loads(sys.argv[2]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--calls":
        print(json.dumps(measure_calls(json.loads(sys.argv[2]))))
    else:
        main()
