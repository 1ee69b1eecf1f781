"""The transport under the Core API's collectives (`allgather`, `gather`,
`broadcast`): the chief of a group listens on TCP, every other member
connects to it, and Python objects cross as pickled frames.

A pickle runs code when it is loaded, so a frame is loaded only once it is
known to come from a member of this incarnation: every frame carries an
HMAC-SHA256 keyed with the secret the node gives each of the trial's
processes (`RESOLUTE_COLLECTIVES_SECRET`, derived from the cluster's key:
every node of a gang has the same one, no other incarnation has it). The
MAC covers a nonce the chief draws per connection, the direction, the
member's rank and a frame counter, so a frame cannot be replayed onto
another connection, reflected back or reordered. A peer that fails the
handshake is dropped and the chief keeps waiting for the real member.

Standard library only."""

import hashlib
import hmac
import logging
import os
import pickle
import secrets
import socket
import struct
import time

logger = logging.getLogger("determined.core")

# Largest frame (one pickled object) either side sends or accepts, in bytes.
FRAME_BYTES_MAX = 1 << 30
# How long a member keeps trying to reach its chief, and how long a chief
# waits for all its members, in seconds: the processes of a gang start on
# different nodes at different times.
CONNECT_WAIT_S = 600
# How long one connection may take to prove it is a member, in seconds.
HANDSHAKE_WAIT_S = 10
# Pause between two tries to reach the chief, in seconds.
RETRY_PAUSE_S = 0.2
NONCE_BYTES = 16
MAC_BYTES = hashlib.sha256().digest_size
_LEN = struct.Struct(">Q")
_RANK = struct.Struct(">I")
# What a member sends first and the chief answers (inside MAC'd frames).
_HELLO = "resolute-collectives-hello"
_WELCOME = "resolute-collectives-welcome"


class CollectivesError(RuntimeError):
    """The processes of a trial could not meet, or a peer broke the protocol."""


def secret_from_env():
    """The incarnation's secret, from the node."""
    text = os.environ.get("RESOLUTE_COLLECTIVES_SECRET", "")
    if not text:
        raise CollectivesError(
            "RESOLUTE_COLLECTIVES_SECRET is not set: on a Resolute cluster the node sets it for "
            "every process of a trial; off a cluster, set it to the same string in every process"
        )
    return text.encode()


def _read_exact(sock, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise CollectivesError("the peer closed the connection")
        got += k
    return bytes(buf)


class Channel:
    """One authenticated connection between the chief and member `rank`.
    `outgoing`/`incoming` name the directions (b"c": chief to member, b"m":
    member to chief), so a frame never verifies in the other direction."""

    def __init__(self, sock, key, nonce, rank, outgoing, incoming):
        self._sock = sock
        self._key = key
        self._nonce = nonce
        self.rank = rank
        self._out = outgoing
        self._in = incoming
        self._sent = 0
        self._received = 0

    def _mac(self, direction, counter, payload):
        h = hmac.new(self._key, digestmod=hashlib.sha256)
        h.update(self._nonce)
        h.update(direction)
        h.update(_RANK.pack(self.rank))
        h.update(_LEN.pack(counter))
        h.update(payload)
        return h.digest()

    def send_bytes(self, payload):
        if len(payload) > FRAME_BYTES_MAX:
            raise CollectivesError(
                "an object of {} bytes pickled is over the collectives' limit of {} bytes".format(
                    len(payload), FRAME_BYTES_MAX
                )
            )
        mac = self._mac(self._out, self._sent, payload)
        self._sent += 1
        self._sock.sendall(_LEN.pack(len(payload)) + mac)
        self._sock.sendall(payload)

    def send(self, obj):
        self.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def recv(self):
        (n,) = _LEN.unpack(_read_exact(self._sock, _LEN.size))
        if n > FRAME_BYTES_MAX:
            raise CollectivesError("rank {} sent a frame of {} bytes (over the limit)".format(self.rank, n))
        mac = _read_exact(self._sock, MAC_BYTES)
        payload = _read_exact(self._sock, n)
        if not hmac.compare_digest(mac, self._mac(self._in, self._received, payload)):
            raise CollectivesError("a frame from rank {} failed authentication".format(self.rank))
        self._received += 1
        return pickle.loads(payload)

    def close(self):
        try:
            self._sock.close()
        except OSError:
            pass


class Server:
    """The chief's end: waits for the members `ranks` to connect to
    `host:port` (port 0: any free port, see `port`)."""

    def __init__(self, host, port, ranks, key):
        self._key = key
        self._expected = set(ranks)
        self._channels = {}
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError as e:
            self._listener.close()
            raise CollectivesError("the chief cannot listen on {}:{} for the collectives: {}".format(host, port, e))
        self._listener.listen(max(8, len(self._expected)))
        self.port = self._listener.getsockname()[1]

    def accept_all(self):
        """Returns once every member proved itself (CollectivesError after
        `CONNECT_WAIT_S`)."""
        deadline = time.monotonic() + CONNECT_WAIT_S
        while set(self._channels) != self._expected:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(self._expected - set(self._channels))
                raise CollectivesError(
                    "rank(s) {} did not reach the chief within {} s".format(missing, CONNECT_WAIT_S)
                )
            self._listener.settimeout(left)
            try:
                sock, peer = self._listener.accept()
            except socket.timeout:
                continue
            ch = self._handshake(sock, peer)
            if ch is not None:
                self._channels[ch.rank] = ch
        self._listener.close()

    def _handshake(self, sock, peer):
        try:
            sock.settimeout(HANDSHAKE_WAIT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nonce = secrets.token_bytes(NONCE_BYTES)
            sock.sendall(nonce)
            (rank,) = _RANK.unpack(_read_exact(sock, _RANK.size))
            if rank not in self._expected or rank in self._channels:
                raise CollectivesError("rank {} is not awaited".format(rank))
            ch = Channel(sock, self._key, nonce, rank, b"c", b"m")
            if ch.recv() != _HELLO:
                raise CollectivesError("no hello")
            ch.send(_WELCOME)
            sock.settimeout(None)
            return ch
        except (OSError, CollectivesError, pickle.UnpicklingError, EOFError) as e:
            logger.warning("collectives: dropped a connection from %s: %s", peer, e)
            sock.close()
            return None

    def gather(self):
        """One object from every member, in rank order."""
        return [self._channels[r].recv() for r in sorted(self._channels)]

    def broadcast(self, obj):
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        for r in sorted(self._channels):
            self._channels[r].send_bytes(payload)

    def close(self):
        for ch in self._channels.values():
            ch.close()
        self._channels = {}
        try:
            self._listener.close()
        except OSError:
            pass


def connect(host, port, rank, key):
    """A member's end: the channel to the chief at `host:port`, once both
    proved they hold `key` (tries again until `CONNECT_WAIT_S`: the chief may
    not listen yet, or another process may hold the port for a while)."""
    deadline = time.monotonic() + CONNECT_WAIT_S
    last = None
    while time.monotonic() < deadline:
        try:
            sock = socket.create_connection((host, port), timeout=HANDSHAKE_WAIT_S)
        except OSError as e:
            last = e
            time.sleep(RETRY_PAUSE_S)
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nonce = _read_exact(sock, NONCE_BYTES)
            sock.sendall(_RANK.pack(rank))
            ch = Channel(sock, key, nonce, rank, b"m", b"c")
            ch.send(_HELLO)
            if ch.recv() != _WELCOME:
                raise CollectivesError("no welcome")
            sock.settimeout(None)
            return ch
        except (OSError, CollectivesError, pickle.UnpicklingError, EOFError) as e:
            last = e
            sock.close()
            time.sleep(RETRY_PAUSE_S)
    raise CollectivesError(
        "rank {} could not reach its chief at {}:{} within {} s: {}".format(rank, host, port, CONNECT_WAIT_S, last)
    )
