"""Benchmark joblib_store on a link shaped like S3, against boto3 and s3fs.

moto's S3 server runs on 127.0.0.1 (the same server as in
bench_joblib_store.py, counting requests), behind shaped_link.py's relay:
by default a 20 ms round trip, 16 MB/s per connection and 128 MB/s in all,
a scale model of S3 seen from a host in its region. Every figure is the
median of fresh processes (3 by default), each a client on the far side of
the relay; in each run the implementations take turns, in another order
from run to run:

* the calls joblib users make on a tiny result (warm hit, hit in a fresh
  process, miss of a function already seen, first miss of a new function),
  in multiples of one GET of a tiny object over the same link, measured in
  the same process;
* the added cost of a miss with ``compute_once``, and a dogpile: 8
  processes calling the same 16 slow calls (1 s each) in orders of their
  own, with and without ``compute_once`` (wall time and computations);
* storing and loading a large array (64 and 256 MiB of random float64,
  compress 0 and 3): a cached call of joblib_store, against what a user
  would do by hand with boto3's TransferManager at its defaults
  (``joblib.dump`` to a file then ``upload_file``; ``download_file`` then
  ``joblib.load``) and with s3fs (``joblib.dump`` into memory then
  ``pipe_file``; ``cat_file`` then ``joblib.load``), and against the link's
  own limit, the size over the total rate.

    python benchmarks/bench_link.py [--runs 3] [--rtt 20] [--per-connection 16]
        [--total 128] [--sizes 64MiB,256MiB] [--no-calls] [--dogpile 8x16]

moto closes every connection after one response, so each request opens a
new connection, which the relay does not charge for: connection reuse
cannot be measured here.
"""

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_joblib_store  # noqa: E402
from bench_joblib_store import ENVIRONMENT, make_payload, start_server  # noqa: E402

MiB = 2**20
SIZES = {"64MiB": 64 * MiB, "256MiB": 256 * MiB}
IMPLEMENTATIONS = ("joblib_store", "boto3", "s3fs")


# ------------------------------------------------------- one measurement


def payload_function(size, run):
    """The function the cached calls run: it hands over a ready payload."""
    return PAYLOAD


PAYLOAD = None


def tiny_function(x):
    return {"x": x}


def one_get_seconds(endpoint, bucket):
    """The median time of a GET of a tiny object, in this process."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    times = []
    for _ in range(7):
        started = time.perf_counter()
        client.get_object(Bucket=bucket, Key="tiny")["Body"].read()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])  # the first one also sets up the client


def measure_calls(spec):
    """The calls a user makes, each timed once, and one GET."""
    from joblib import Memory

    import joblib_store  # noqa: F401  (registers the backend)

    endpoint, bucket = spec["endpoint"], spec["bucket"]
    one_get = one_get_seconds(endpoint, bucket)
    location = f"s3://{bucket}/calls-{spec['run']}"
    options = {"endpoint_url": endpoint}
    cached = Memory(location, verbose=0, backend_options=options).cache(tiny_function)

    def timed(function):
        started = time.perf_counter()
        function()
        return time.perf_counter() - started

    if spec["fresh_process_hit"]:
        return {"one GET": one_get, "hit in a fresh process": timed(lambda: cached(1))}
    results = {"one GET": one_get}
    results["first miss of a new function"] = timed(lambda: cached(1))
    results["miss of a function already seen"] = timed(lambda: cached(2))
    hits = [timed(lambda: cached(2)) for _ in range(5)]
    results["warm hit"] = statistics.median(hits)
    once = Memory(location, verbose=0, backend_options={**options, "compute_once": 60})
    cached_once = once.cache(tiny_function)
    cached_once(3)  # the probe of conditional writes, made once per process
    results["miss with compute_once"] = timed(lambda: cached_once(4))
    return results


def slow_function(x):
    """A call of the dogpile: 1 s, noted in DOGPILE_LOG."""
    with open(os.environ["DOGPILE_LOG"], "a") as log:
        log.write(f"{x}\n")
    time.sleep(1.0)
    return x * x


def dogpile_worker(location, options, calls, seed):
    import random

    from joblib import Memory

    import joblib_store  # noqa: F401

    cached = Memory(location, verbose=0, backend_options=options).cache(slow_function)
    order = list(range(calls))
    random.Random(seed).shuffle(order)
    return all(cached(x) == x * x for x in order)


def measure_dogpile(endpoint, bucket, processes, calls, compute_once):
    """Wall time and computations of processes calling the same calls."""
    import multiprocessing

    log = os.path.join(tempfile.mkdtemp(), "computed.log")
    open(log, "w").close()
    os.environ["DOGPILE_LOG"] = log
    options = {"endpoint_url": endpoint}
    if compute_once:
        options["compute_once"] = 60
    location = f"s3://{bucket}/dogpile-{uuid.uuid4().hex[:8]}"
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        pool.map(time.sleep, [0.5] * processes)  # the workers are up before the clock starts
        started = time.perf_counter()
        right = pool.starmap(dogpile_worker, [(location, options, calls, seed)
                                              for seed in range(processes)])
        seconds = time.perf_counter() - started
    assert all(right)
    with open(log) as computed:
        return seconds, len(computed.read().split())


def measure_transfer(spec):
    """Store or load one payload with one implementation; time it."""
    import boto3
    import joblib
    import s3fs
    from joblib import Memory

    import joblib_store  # noqa: F401

    global PAYLOAD
    endpoint, bucket, size = spec["endpoint"], spec["bucket"], spec["size"]
    compress, implementation = spec["compress"], spec["implementation"]
    key = f"by-hand/{implementation}/{size}-{compress}.pkl"
    options = {"endpoint_url": endpoint}
    cached = Memory(f"s3://{bucket}/bench", verbose=0, compress=compress,
                    backend_options=options).cache(payload_function)
    client = boto3.client("s3", endpoint_url=endpoint)
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    if spec["phase"] == "store":
        PAYLOAD = make_payload(size)
        folder = tempfile.mkdtemp()
        path = os.path.join(folder, "payload.pkl")
        started = time.perf_counter()
        if implementation == "joblib_store":
            cached(size, f"{compress}-{spec['run']}")  # a miss; computing costs nothing
        elif implementation == "boto3":
            joblib.dump(PAYLOAD, path, compress=compress)
            client.upload_file(path, bucket, key)
        else:
            buffer = io.BytesIO()
            joblib.dump(PAYLOAD, buffer, compress=compress)
            fs.pipe_file(f"{bucket}/{key}", buffer.getvalue())
        seconds = time.perf_counter() - started
        os.unlink(path) if os.path.exists(path) else None
        os.rmdir(folder)
        if implementation == "joblib_store" and spec["run"] != 0:
            # Only run 0's result is loaded: the others would pile up in
            # moto's memory and slow the runs after them.
            cached.call_and_shelve(size, f"{compress}-{spec['run']}").clear()
        return {"seconds": seconds}
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "payload.pkl")
    started = time.perf_counter()
    if implementation == "joblib_store":
        result = cached(size, f"{compress}-0")  # a hit in a fresh process
    elif implementation == "boto3":
        client.download_file(bucket, key, path)
        result = joblib.load(path)
    else:
        result = joblib.load(io.BytesIO(fs.cat_file(f"{bucket}/{key}")))
    seconds = time.perf_counter() - started
    assert result.nbytes == size
    if os.path.exists(path):
        os.unlink(path)
    os.rmdir(folder)
    return {"seconds": seconds}


# ----------------------------------------------------------- orchestration


def run_fresh(kind, spec):
    return bench_joblib_store.run_fresh(kind, spec, script=__file__)


def spread(values):
    return f"{min(values):.3f}-{max(values):.3f}"


def report_calls(endpoint, bucket, runs):
    print(f"\nCalls on a tiny result, in multiples of one GET of a tiny object "
          f"(median of {runs} fresh processes)")
    print(f"{'operation':<34} {'median':>8} {'x one GET':>10} {'range of x':>12}")
    ratios, seconds = {}, {}
    for run in range(runs):
        spec = {"endpoint": endpoint, "bucket": bucket, "run": f"{uuid.uuid4().hex[:8]}",
                "fresh_process_hit": False}
        results = run_fresh("--calls", spec)
        results.update(run_fresh("--calls", {**spec, "fresh_process_hit": True}))
        for name, value in results.items():
            seconds.setdefault(name, []).append(value)
            ratios.setdefault(name, []).append(value / results["one GET"])
    for name in ("one GET", "warm hit", "hit in a fresh process",
                 "miss of a function already seen", "first miss of a new function",
                 "miss with compute_once"):
        print(f"{name:<34} {statistics.median(seconds[name]) * 1000:6.1f}ms "
              f"{statistics.median(ratios[name]):9.2f}x {spread(ratios[name]):>12}")


def report_transfers(endpoint, bucket, runs, sizes, total_mbps, label):
    print(f"\nLarge results on {label} (median of {runs} fresh processes; link limit "
          f"= size / {total_mbps:g} MB/s)")
    print(f"{'size':<7} {'compress':>8} {'phase':<6} {'implementation':<14} {'median':>9} "
          f"{'range':>13} {'vs boto3':>9} {'vs limit':>9}")
    for size_name in sizes:
        size = SIZES[size_name]
        for compress in (0, 3):
            for phase in ("store", "load"):
                # The implementations take turns, each run in another order,
                # so that drift (moto's memory, the machine's other load)
                # and the place in the order weigh on all of them alike.
                times = {implementation: [] for implementation in IMPLEMENTATIONS}
                for run in range(runs):
                    turn = run % len(IMPLEMENTATIONS)
                    for implementation in IMPLEMENTATIONS[turn:] + IMPLEMENTATIONS[:turn]:
                        times[implementation].append(run_fresh("--transfer", {
                            "endpoint": endpoint, "bucket": bucket, "size": size,
                            "compress": compress, "phase": phase,
                            "implementation": implementation, "run": run,
                        })["seconds"])
                anchor = statistics.median(times["boto3"])
                limit = size / (total_mbps * 1e6)
                for implementation in IMPLEMENTATIONS:
                    median = statistics.median(times[implementation])
                    print(f"{size_name:<7} {compress:>8} {phase:<6} {implementation:<14} "
                          f"{median:8.3f}s {spread(times[implementation]):>13} "
                          f"{median / anchor:8.2f}x {median / limit:8.2f}x")


def report_dogpile(endpoint, bucket, runs, shape):
    processes, calls = (int(part) for part in shape.split("x"))
    print(f"\nA dogpile: {processes} processes call the same {calls} calls of 1 s each, "
          f"each in its own order (median of {runs})")
    print(f"{'compute_once':<13} {'wall':>8} {'range':>13} {'computations':>13}")
    for compute_once in (False, True):
        measured = [measure_dogpile(endpoint, bucket, processes, calls, compute_once)
                    for _ in range(runs)]
        walls = [wall for wall, _ in measured]
        print(f"{str(compute_once):<13} {statistics.median(walls):7.2f}s {spread(walls):>13} "
              f"{'/'.join(str(count) for _, count in measured):>13}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rtt", type=float, default=20.0, help="round trip, ms")
    parser.add_argument("--per-connection", type=float, default=16.0, help="MB/s")
    parser.add_argument("--total", type=float, default=128.0, help="MB/s")
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--no-calls", action="store_true")
    parser.add_argument("--dogpile", default="", help="PROCESSESxCALLS, such as 8x16")
    arguments = parser.parse_args()
    os.environ.update(ENVIRONMENT)

    import boto3
    from shaped_link import ShapedLink

    server, port = start_server()
    try:
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(
            Bucket="bench-link")
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").put_object(
            Bucket="bench-link", Key="tiny", Body=b"x" * 100)
        with ShapedLink(port, rtt_ms=arguments.rtt,
                        per_connection_mbps=arguments.per_connection,
                        total_mbps=arguments.total) as link:
            endpoint = f"http://127.0.0.1:{link.port}"
            label = (f"a link of {arguments.rtt:g} ms, {arguments.per_connection:g} MB/s "
                     f"per connection, {arguments.total:g} MB/s in all")
            print(f"moto S3 server behind {label}; {os.cpu_count()} CPUs; "
                  f"Python {sys.version.split()[0]}")
            if not arguments.no_calls:
                report_calls(endpoint, "bench-link", arguments.runs)
            if arguments.dogpile:
                report_dogpile(endpoint, "bench-link", arguments.runs, arguments.dogpile)
            sizes = [size for size in arguments.sizes.split(",") if size]
            if sizes:
                report_transfers(endpoint, "bench-link", arguments.runs, sizes,
                                 arguments.total, label)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--calls":
        print(json.dumps(measure_calls(json.loads(sys.argv[2]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--transfer":
        print(json.dumps(measure_transfer(json.loads(sys.argv[2]))))
    else:
        main()
