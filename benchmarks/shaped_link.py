"""A TCP relay that makes a loopback S3 server look like a real network link.

Benchmarks against moto's S3 server on 127.0.0.1 measure CPU, not the
network: a loopback round trip takes microseconds and bytes move at memory
speed, so code that makes too many requests, or moves data on one connection
where it could use several, looks as fast as code that does not. This relay
sits in front of the server and turns it into a scale model of S3 as seen
from a host in the same region. AWS's S3 performance guidance says small
requests take tens of milliseconds and one connection carries about
85-90 MB/s, while the host's network interface caps all connections
together. The defaults here are 20 ms round trip, 16 MB/s per connection and
128 MB/s in all (MB is 10**6 bytes): rates scaled down so that a two-core
machine running server, client and relay keeps up, keeping what decides the
design of a client: a round trip costs as much as moving hundreds of
kilobytes, and several connections together go several times faster than
one.

Every accepted connection is forwarded to the upstream server. In each
direction the relay reads up to 64 KiB at a time, paces the bytes at the
per-connection rate and at the total rate (one shared budget per direction,
like a full-duplex network interface, handed out first come first served,
which shares it evenly between busy connections), then holds them for half
the round trip before writing them on. A request and its response therefore
cost one round trip. End of stream (``shutdown(SHUT_WR)``) is forwarded
after the same delay; a reset is forwarded as a reset.

TCP backpressure is kept: each direction buffers at most the bytes in
flight over half a round trip at the per-connection rate plus two reads (at
least 256 KiB), and stops reading from its source while that is full, so a
slow reader slows the writer and the relay's memory stays small however
much is sent.

Limits of the model:

* Connection set-up is free. The client's TCP handshake is with the relay
  itself on 127.0.0.1, and the relay connects upstream at once, so the
  round trip (and TLS) a new connection costs on a real network is not
  charged; only data is delayed.
* moto's server closes the connection after each response, so every
  request opens a new one; the benefit of connection reuse cannot be
  measured (and, because set-up is free, its absence costs nothing).
* Bytes move in reads of up to 64 KiB, each delivered whole, so timing is
  right for small messages and over whole transfers but coarse within a
  read (64 KiB take 4 ms at 16 MB/s); a connection that was idle may send
  its first read at once. There is no packet loss, congestion control or
  slow start: a connection runs at its full rate from the first byte.

Use it as a command::

    python benchmarks/shaped_link.py --upstream 127.0.0.1:PORT \\
        [--listen-port 0] [--rtt 20] [--per-connection 16] [--total 128]

which prints ``listening on 127.0.0.1:NNNN`` and runs until SIGTERM or
SIGINT, or from Python, in background threads of the calling process::

    from shaped_link import ShapedLink   # with benchmarks/ on sys.path
    with ShapedLink(upstream_port, rtt_ms=20, per_connection_mbps=16,
                    total_mbps=128) as link:
        endpoint_url = f"http://127.0.0.1:{link.port}"

It uses the standard library only and runs on Linux with Python 3.9+.
"""

import argparse
import collections
import signal
import socket
import struct
import threading
import time

__all__ = ["ShapedLink", "main"]

MB = 10**6
KiB = 2**10
LISTEN_HOST = "127.0.0.1"
READ_BYTES = 64 * KiB
MIN_BUFFER_BYTES = 256 * KiB
# Kernel receive buffer of the relay's sockets. Left to autotuning, a socket
# read slowly (as the relay reads, at the shaped rate) keeps a small buffer
# that often holds less than one read, and a connection that gets short
# reads gets less than its share of the total rate. Sockets accepted from
# the listener inherit this; it is set on the upstream socket before
# connect() so the window scale covers it.
RECEIVE_BUFFER_BYTES = 4 * READ_BYTES
# A blocked send or recv wakes this often to notice that its connection was
# aborted: the only way to interrupt a thread blocked in send without first
# sending the peer a FIN.
POLL_SECONDS = 0.25
CONNECT_TIMEOUT_SECONDS = 10.0

# Items queued in a direction besides bytes: end of stream and reset.
END_OF_STREAM = "end of stream"
RESET = "reset"


class _Pacer:
    """Hand out send slots on a link of fixed rate, first come first served.

    A virtual clock: ``busy_until`` is when the link finishes sending what it
    has already accepted. Each caller holds at most one slot at a time (it
    waits for its slot before reading more), so callers sharing one pacer
    are served in turn and share the rate evenly.

    Parameters
    ----------
    bytes_per_second : float
        Rate of the link.
    burst_bytes : int
        Credit an idle link may build up. One read's worth lets a read that
        finds the link idle leave at once (so the first bytes of a transfer
        are not held back by the size of the read) and makes up for threads
        waking a little late.
    """

    def __init__(self, bytes_per_second, burst_bytes):
        self.seconds_per_byte = 1.0 / bytes_per_second
        self.burst_seconds = burst_bytes * self.seconds_per_byte
        self.busy_until = 0.0
        self.lock = threading.Lock()

    def reserve(self, byte_count, now):
        """Book ``byte_count`` bytes; return when their last byte is sent."""
        with self.lock:
            start = max(self.busy_until, now - self.burst_seconds)
            self.busy_until = start + byte_count * self.seconds_per_byte
            return self.busy_until


class _Direction:
    """One direction of a relayed connection: a reader and a writer thread.

    The reader takes bytes from ``source``, waits for their slot on both
    pacers and queues them with the time they are due at the far end; the
    writer sends each item to ``destination`` when it is due.
    """

    def __init__(self, connection, source, destination, connection_pacer,
                 shared_pacer, buffer_limit_bytes, delay_seconds):
        self.connection = connection
        self.source = source
        self.destination = destination
        self.connection_pacer = connection_pacer
        self.shared_pacer = shared_pacer
        self.buffer_limit_bytes = buffer_limit_bytes
        self.delay_seconds = delay_seconds
        self.due_items = collections.deque()  # (due time, bytes or marker)
        self.queued_bytes = 0
        self.changed = threading.Condition()

    def _queue(self, item, due):
        with self.changed:
            was_empty = not self.due_items
            if not was_empty:
                # Never overtake what is already queued (an end of stream
                # read after data must not arrive before it).
                due = max(due, self.due_items[-1][0])
            self.due_items.append((due, item))
            if isinstance(item, bytes):
                self.queued_bytes += len(item)
            if was_empty:
                # Otherwise the writer is waiting for an earlier item, which
                # this one does not change: waking it would only cost CPU.
                self.changed.notify_all()

    def read_loop(self):
        connection = self.connection
        try:
            while True:
                with self.changed:
                    # Backpressure: while the queue is full, leave the bytes
                    # in the kernel, whose buffers fill and stop the sender.
                    while (self.queued_bytes >= self.buffer_limit_bytes
                           and not connection.aborted):
                        self.changed.wait()
                if connection.aborted:
                    return
                try:
                    data = self.source.recv(READ_BYTES)
                except socket.timeout:  # TimeoutError only from Python 3.10
                    continue
                except OSError:
                    if not connection.aborted:
                        self._queue(RESET, time.monotonic() + self.delay_seconds)
                    return
                if connection.aborted:
                    return
                now = time.monotonic()
                if not data:
                    self._queue(END_OF_STREAM, now + self.delay_seconds)
                    return
                sent_at = max(now,
                              self.connection_pacer.reserve(len(data), now),
                              self.shared_pacer.reserve(len(data), now))
                # Wait for the slot before reading again, so that this
                # connection holds one slot at a time on the shared pacer.
                if sent_at > now and connection.aborted_event.wait(sent_at - now):
                    return
                self._queue(data, sent_at + self.delay_seconds)
        finally:
            connection.thread_finished()

    def write_loop(self):
        connection = self.connection
        try:
            while True:
                with self.changed:
                    while True:
                        if connection.aborted:
                            return
                        if self.due_items:
                            due, item = self.due_items[0]
                            wait_seconds = due - time.monotonic()
                            if wait_seconds <= 0:
                                break
                            self.changed.wait(wait_seconds)
                        else:
                            self.changed.wait()
                    self.due_items.popleft()
                if item is END_OF_STREAM:
                    try:
                        self.destination.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass  # the peer has gone; its reader will notice
                    return
                if item is RESET:
                    connection.abort()
                    return
                try:
                    self._send(item)
                except OSError:
                    connection.abort()
                    return
                with self.changed:
                    # Count the bytes as buffered until sent, so the bound
                    # holds while a slow destination blocks the send.
                    self.queued_bytes -= len(item)
                    self.changed.notify_all()
        finally:
            connection.thread_finished()

    def _send(self, data):
        # send() in a loop, not sendall(): after a timeout sendall cannot
        # say how much it sent, and the loop must go on where it stopped.
        view = memoryview(data)
        while view:
            try:
                view = view[self.destination.send(view):]
            except socket.timeout:
                if self.connection.aborted:
                    raise OSError("connection aborted") from None


class _Connection:
    """A client socket and its upstream socket, relayed by four threads."""

    def __init__(self, link, client_socket, upstream_socket):
        self.link = link
        self.sockets = (client_socket, upstream_socket)
        self.lock = threading.Lock()
        self.aborted = False
        self.aborted_event = threading.Event()
        self.running_threads = 0
        self.threads = []
        self.directions = (
            _Direction(self, client_socket, upstream_socket,
                       _Pacer(link.per_connection_bytes_per_second, READ_BYTES),
                       link.upload_pacer, link.buffer_limit_bytes,
                       link.one_way_delay_seconds),
            _Direction(self, upstream_socket, client_socket,
                       _Pacer(link.per_connection_bytes_per_second, READ_BYTES),
                       link.download_pacer, link.buffer_limit_bytes,
                       link.one_way_delay_seconds),
        )

    def start(self, number):
        for direction_name, direction in zip(("up", "down"), self.directions):
            for role, target in (("read", direction.read_loop),
                                 ("write", direction.write_loop)):
                self.threads.append(threading.Thread(
                    target=target, daemon=True,
                    name=f"shaped-link-{number}-{direction_name}-{role}"))
        self.running_threads = len(self.threads)
        for thread in self.threads:
            thread.start()

    def abort(self):
        """Stop relaying; both peers will see a reset."""
        with self.lock:
            if self.aborted:
                return
            self.aborted = True
        self.aborted_event.set()
        for direction in self.directions:
            with direction.changed:
                direction.changed.notify_all()
        for sock in self.sockets:
            try:
                # Linger 0: close() sends RST, not FIN, so a peer cut off
                # mid-message sees an error rather than a clean end.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                struct.pack("ii", 1, 0))
                # SHUT_RD wakes a thread blocked in recv and, on Linux,
                # sends nothing to the peer.
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def thread_finished(self):
        with self.lock:
            self.running_threads -= 1
            if self.running_threads:
                return
        for sock in self.sockets:
            sock.close()
        self.link._forget(self)


class ShapedLink:
    """Relay TCP connections to a local server through a shaped link.

    Parameters
    ----------
    upstream_port : int
        Port of the server to relay to.
    rtt_ms : float
        Round-trip time in milliseconds; each direction delays bytes by half.
    per_connection_mbps : float
        Rate of each connection in each direction, in MB/s (10**6 bytes).
    total_mbps : float
        Rate of all connections together in each direction, in MB/s.
    listen_port : int
        Port to listen on, on 127.0.0.1; 0 picks a free one.
    upstream_host : str
        Host of the server to relay to.

    Attributes
    ----------
    port : int or None
        Port the relay listens on, once started.
    accepted_connections : int
        Connections accepted so far.

    Examples
    --------
    >>> with ShapedLink(9000, rtt_ms=20) as link:   # doctest: +SKIP
    ...     url = f"http://127.0.0.1:{link.port}"
    """

    def __init__(self, upstream_port, rtt_ms=20.0, per_connection_mbps=16.0,
                 total_mbps=128.0, listen_port=0, upstream_host="127.0.0.1"):
        if rtt_ms < 0:
            raise ValueError(f"rtt_ms must be >= 0, not {rtt_ms}")
        if per_connection_mbps <= 0 or total_mbps <= 0:
            raise ValueError("per_connection_mbps and total_mbps must be > 0")
        self.upstream_address = (upstream_host, int(upstream_port))
        self.listen_port = int(listen_port)
        self.one_way_delay_seconds = rtt_ms / 2000.0
        self.per_connection_bytes_per_second = per_connection_mbps * MB
        self.upload_pacer = _Pacer(total_mbps * MB, READ_BYTES)
        self.download_pacer = _Pacer(total_mbps * MB, READ_BYTES)
        # Enough to keep the link busy over the delay (the bandwidth-delay
        # product), plus a read being paced and one being sent.
        in_flight_bytes = int(self.per_connection_bytes_per_second
                              * self.one_way_delay_seconds)
        self.buffer_limit_bytes = max(MIN_BUFFER_BYTES,
                                      in_flight_bytes + 2 * READ_BYTES)
        self.port = None
        self.accepted_connections = 0
        self._connections = set()
        self._connections_lock = threading.Lock()
        self._listener = None
        self._accept_thread = None
        self._stopping = False

    @property
    def open_connections(self):
        """Number of relayed connections not yet closed."""
        with self._connections_lock:
            return len(self._connections)

    def start(self):
        """Listen and relay in background threads; return the port."""
        if self._listener is not None:
            raise RuntimeError("ShapedLink already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                            RECEIVE_BUFFER_BYTES)
        try:
            listener.bind((LISTEN_HOST, self.listen_port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, daemon=True,
            name=f"shaped-link-accept-{self.port}")
        self._accept_thread.start()
        return self.port

    def stop(self):
        """Stop listening, reset open connections and join all threads."""
        if self._listener is None or self._stopping:
            return
        self._stopping = True
        try:
            # On Linux this wakes the thread blocked in accept().
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._accept_thread.join()
        self._listener.close()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            connection.abort()
        for connection in connections:
            for thread in connection.threads:
                thread.join()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def _forget(self, connection):
        with self._connections_lock:
            self._connections.discard(connection)

    def _accept_loop(self):
        while True:
            try:
                client_socket, _ = self._listener.accept()
            except OSError:
                if self._stopping:
                    return
                # Out of file descriptors, say: wait rather than spin.
                time.sleep(POLL_SECONDS)
                continue
            if self._stopping:
                client_socket.close()
                return
            upstream_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                upstream_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                           RECEIVE_BUFFER_BYTES)
                upstream_socket.settimeout(CONNECT_TIMEOUT_SECONDS)
                upstream_socket.connect(self.upstream_address)
            except OSError:
                upstream_socket.close()
                # Refused upstream: refuse the client too, with a reset.
                client_socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
                client_socket.close()
                continue
            for sock in (client_socket, upstream_socket):
                # The relay writes whole reads when they are due; Nagle's
                # algorithm would hold small ones back for an ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(POLL_SECONDS)
            connection = _Connection(self, client_socket, upstream_socket)
            with self._connections_lock:
                self._connections.add(connection)
                self.accepted_connections += 1
                number = self.accepted_connections
            connection.start(number)


def _parse_address(text):
    host, separator, port = text.rpartition(":")
    if not separator:
        host, port = "127.0.0.1", text
    return host or "127.0.0.1", int(port)


def main(argv=None):
    """Run the relay until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, metavar="HOST:PORT",
                        help="server to relay to, e.g. 127.0.0.1:5000")
    parser.add_argument("--listen-port", type=int, default=0, metavar="PORT",
                        help="port on 127.0.0.1 to listen on (0: any free port)")
    parser.add_argument("--rtt", type=float, default=20.0, metavar="MS",
                        help="round-trip time in milliseconds (default 20)")
    parser.add_argument("--per-connection", type=float, default=16.0,
                        metavar="MB/S",
                        help="rate of each connection, each way (default 16)")
    parser.add_argument("--total", type=float, default=128.0, metavar="MB/S",
                        help="rate of all connections, each way (default 128)")
    arguments = parser.parse_args(argv)
    upstream_host, upstream_port = _parse_address(arguments.upstream)

    stop_requested = threading.Event()

    def request_stop(signal_number, frame):
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with ShapedLink(upstream_port, arguments.rtt, arguments.per_connection,
                    arguments.total, listen_port=arguments.listen_port,
                    upstream_host=upstream_host) as link:
        print(f"listening on {LISTEN_HOST}:{link.port}", flush=True)
        stop_requested.wait()


if __name__ == "__main__":
    main()
