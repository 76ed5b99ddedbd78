"""The device-state data path between two agents.

Control goes over gRPC; device state goes source agent -> target agent
over a dedicated TCP connection per session, pumped by the native core. A
connection opens with a one-line hello naming the session and carrying its
token; the target accepts a stream only for a session it prepared, with the
right token, once. Then the bytes are devmig's own stream format
(versioned header, sequence-numbered CRC32C frames, digest trailer), which
the target's native sink verifies before the device may leave RESUMING.
The trailer is the stream's keyed MAC (stream.h), keyed with a key both
ends derive from the session's token (``stream_key``): with TLS the token
is secret and the MAC proves the stream came from the session's source;
without TLS the token crosses the wire in the hello, so the MAC then only
does what a digest does (catches corruption), as this mode is for trusted
networks.

With TLS configured (the chart's certificates), the connection opens with
mutual TLS. When both agents can seal (AES-NI), the hello and its answer
also carry 32 random bytes from each end; both derive the stream key from
them (``seal_key``), which therefore only the two certified ends know, shut
TLS down on the connection (close_notify both ways) and move the stream onto
the plain TCP socket, sealed by the native pump (stream.h: AES-256-CTR and
the MAC, under that key). TLS's own record layer in Python cost several
times the copy (about 2 CPU seconds per GiB through the relay below). An
agent that cannot seal, or predates sealing, answers a plain "OK": then the
stream stays on TLS, bridged to the pump's plain fd through a local
socketpair by a relay thread. Without TLS (loopback tests, labs) the pump
writes to the TCP socket directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import devmig_native
from devmig_agent import security
from devmig_agent.sessions import Progress, Session, token_matches

log = logging.getLogger(__name__)

HELLO_VERSION = 1
# A hello is one JSON line of a few hundred bytes; 4 KiB bounds what a
# hostile peer can make us buffer before we refuse it.
MAX_HELLO = 4096
# Seconds a peer has to send its hello, and a source to connect: generous
# for a loaded node, short enough that a stuck peer does not hold a slot.
HELLO_TIMEOUT_S = 10.0
# Wait at a pre-copy temporary end before asking the device again, ms: the
# device has nothing more until its workload dirties pages; 50 ms bounds
# the lag of what a round sends behind what was dirtied, and costs one
# PRECOPY_INFO ioctl per round.
ROUND_INTERVAL_MS = 50
# Relay buffer for TLS bridging, bytes: a few socket buffers' worth.
RELAY_CHUNK = 1 << 20
# How long a finished pump waits for its TLS relay to forward the rest,
# seconds: at most a socket buffer and RELAY_CHUNK are left (milliseconds);
# 30 s tells a dead peer, whose sockets are then closed, from a slow one.
RELAY_DRAIN_S = 30.0
# Forward once this much has gathered, bytes: a quarter of the buffer keeps
# writes large (64 TLS records) while the rest of the buffer still fills.
RELAY_FLUSH = RELAY_CHUNK // 4

Done = Callable[[Session, Exception | None], None]

STREAM_KEY_LABEL = b"devmig stream key v1\0"
SEAL_LABEL = b"devmig stream seal v1\0"
# Each end's share of a sealed stream's key, bytes: 256 random bits from
# each, so that neither end alone picks the key.
SEAL_SHARE = 32


def can_seal() -> bool:
    """Whether this CPU can seal streams (AES-NI; see aes.c)."""
    return devmig_native.aes_impl() != "none"


def seal_key(session_id: str, token: str, source_share: bytes, target_share: bytes) -> bytes:
    """A sealed stream's key: HMAC-SHA-256 under both ends' random shares
    (exchanged inside mutual TLS, so secret) of the session id and token."""
    msg = SEAL_LABEL + session_id.encode() + b"\0" + token.encode()
    return hmac.new(source_share + target_share, msg, hashlib.sha256).digest()


def stream_key(session_id: str, token: str) -> bytes:
    """The stream MAC's key for a session: HMAC-SHA-256 of the session id
    under its token. Both agents hold the token (the operator gave it to
    both); the session id binds the key to this session alone."""
    return hmac.new(token.encode(), STREAM_KEY_LABEL + session_id.encode(), hashlib.sha256).digest()


def _share(v: object) -> bytes | None:
    """A key share from a hello or its answer: SEAL_SHARE bytes in hex, or
    None for anything else (no share: the stream is not sealed)."""
    if not isinstance(v, str) or len(v) != 2 * SEAL_SHARE:
        return None
    try:
        return bytes.fromhex(v)
    except ValueError:
        return None


def _read_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("peer closed during hello")
        buf += chunk
        if len(buf) > MAX_HELLO:
            raise ConnectionError("hello too long")
    return buf


def _relay(src: Any, dst: Any) -> None:
    """Copy until EOF, then half-close ``dst``.

    Reads gather into one reused buffer and go out in large writes: a TLS
    socket returns at most one record (16 KiB) per read, and a Python-level
    send per record, with a fresh bytes object each, cost more than the
    encryption. ``src`` is read non-blocking so that whatever has arrived is
    forwarded as soon as nothing more is ready: a partial buffer never waits
    for the next round's data.

    Sending into TLS, the relay also watches the peer: the receiver sends
    nothing after its "OK", so the TLS socket turning readable is either a
    TLS 1.3 session ticket (taken and dropped) or the peer hanging up. Then
    the relay ends and shuts ``src`` down, so the pump on the other end of
    the socketpair sees the hang-up too, even between pre-copy rounds."""
    buf = bytearray(RELAY_CHUNK)
    view = memoryview(buf)
    filled = 0
    watch = [src, dst] if isinstance(dst, ssl.SSLSocket) else [src]
    try:
        src.setblocking(False)
        while True:
            try:
                n = src.recv_into(view[filled:])
            except (ssl.SSLWantReadError, BlockingIOError):
                if filled:
                    dst.sendall(view[:filled])
                    filled = 0
                ready, _, _ = select.select(watch, [], [])
                if dst in ready and _peer_hung_up(dst):
                    raise ConnectionResetError("the peer closed the data connection") from None
                continue
            if not n:
                break
            filled += n
            if filled >= RELAY_FLUSH:
                dst.sendall(view[:filled])
                filled = 0
        if filled:
            dst.sendall(view[:filled])
    except (OSError, ValueError):
        # A cancelled transfer shuts the sockets down under the relay; a
        # peer that went away ends it too. Either way the other end of
        # the socketpair must see the end.
        with contextlib.suppress(OSError, ValueError):
            src.shutdown(socket.SHUT_RDWR)
    finally:
        view.release()
        try:
            if isinstance(dst, ssl.SSLSocket):
                dst.unwrap()
            else:
                dst.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):
            pass  # already closed: nothing to half-close


def _peer_hung_up(conn: ssl.SSLSocket) -> bool:
    """Read what made a TLS socket readable without blocking: True at its
    end (or an error), False for TLS-internal records (session tickets)."""
    conn.setblocking(False)
    try:
        conn.recv(RELAY_CHUNK)
        return True  # its end, or data the protocol never sends: either way done
    except ssl.SSLWantReadError:
        return False
    except OSError:
        return True
    finally:
        conn.setblocking(True)


def _plain_fd(conn: socket.socket, direction: str) -> tuple[int, list[Any]]:
    """An fd the native code can use for ``conn``: the socket itself, or for
    a TLS socket one end of a socketpair relayed to it. Returns the fd and
    what to keep alive."""
    if not isinstance(conn, ssl.SSLSocket):
        return conn.fileno(), [conn]
    a, b = socket.socketpair()
    if direction == "send":
        t = threading.Thread(target=_relay, args=(b, conn), daemon=True, name="tls-relay-out")
    else:
        t = threading.Thread(target=_relay, args=(conn, b), daemon=True, name="tls-relay-in")
    t.start()
    return a.fileno(), [conn, a, b, t]


class _Sink:
    """Target side of one session: the native receiver on a thread."""

    def __init__(
        self, session: Session, conn: socket.socket, done: Done, key: bytes, seal: bool = False
    ) -> None:
        self.session = session
        self._key = key
        self.seal = seal
        # A sealed stream runs on the plain socket TLS was shut down on.
        self._keep: list[Any]
        self.fd, self._keep = (conn.fileno(), [conn]) if seal else _plain_fd(conn, "receive")
        self._received = devmig_native.LoadCounter()
        self._cancelled = False
        self._thread = threading.Thread(
            target=self._run, args=(done,), daemon=True, name=f"sink-{session.id}"
        )
        self._thread.start()

    def _run(self, done: Done) -> None:
        err: Exception | None = None
        try:
            # Releases the GIL; verifies the whole stream before the device
            # leaves RESUMING, and resets it on any failure.
            self.session.device.handle.receive_stream(self.fd, self._received, self._key, self.seal)
        except (devmig_native.DevmigError, OSError) as e:
            err = e
        finally:
            for k in self._keep:
                if isinstance(k, socket.socket):
                    k.close()
        if not self._cancelled:
            done(self.session, err)

    def progress(self) -> Progress:
        return dataclasses.replace(self.session.progress, bytes_received=self._received.value)

    def cancel(self) -> None:
        self._cancelled = True
        for k in self._keep:
            if isinstance(k, socket.socket):
                with contextlib.suppress(OSError):
                    k.shutdown(socket.SHUT_RDWR)


class DataPath:
    """Listens for device-state streams and connects to peers."""

    def __init__(
        self,
        host: str,
        port: int,
        done: Done,
        tls: security.TlsFiles | None = None,
        advertise_host: str = "",
        seal: bool = True,
    ) -> None:
        self._done = done
        self._tls = tls
        # Offer and accept sealed streams: with TLS, on a CPU that can.
        self.seal = seal and tls is not None and can_seal()
        self._lock = threading.Lock()
        self._pending: dict[str, Session] = {}
        self._active: dict[str, Any] = {}
        self._listener = socket.create_server((host, port), reuse_port=False)
        self.port = self._listener.getsockname()[1]
        self.advertise = f"{advertise_host or host}:{self.port}"
        self._server_ctx: ssl.SSLContext | None = None
        self._client_ctx: ssl.SSLContext | None = None
        if tls is not None:
            self._server_ctx, self._client_ctx = _contexts(tls)
        self._stopping = False
        threading.Thread(target=self._accept_loop, daemon=True, name="datapath-accept").start()

    def _transport(self, sealed: bool) -> str:
        """How a stream travels, for logs."""
        return "sealed" if sealed else "tls relay" if self._tls else "plain"

    def shutdown(self) -> None:
        self._stopping = True
        self._listener.close()

    # ------------------------------------------------------------ target

    def open_receiver(self, session: Session) -> str:
        with self._lock:
            self._pending[session.id] = session
        return self.advertise

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._hello, args=(conn, peer), daemon=True).start()

    def _hello(self, raw: socket.socket, peer: Any) -> None:
        conn: socket.socket = raw
        taken = ""  # the session this connection took from the pending ones
        try:
            raw.settimeout(HELLO_TIMEOUT_S)
            if self._server_ctx is not None:
                conn = self._server_ctx.wrap_socket(raw, server_side=True)
            hello = json.loads(_read_line(conn))
            if not isinstance(hello, dict) or hello.get("v") != HELLO_VERSION:
                raise ConnectionError(f"unsupported hello {hello!r:.80}")
            sid, token = str(hello.get("session", "")), str(hello.get("token", ""))
            source_share = _share(hello.get("seal")) if self.seal else None
            with self._lock:
                s = self._pending.get(sid)
                if s is None or not token_matches(token, s.token_sha256):
                    raise ConnectionError(f"no prepared session {sid!r} with that token")
                del self._pending[sid]  # one stream per session
                # Taken but not yet running: a close() from now on finds
                # no sink to cancel, so it removes this mark instead, and
                # the sink is cancelled below once it exists.
                self._active[sid] = None
                taken = sid
            if source_share is not None and isinstance(conn, ssl.SSLSocket):
                target_share = os.urandom(SEAL_SHARE)
                conn.sendall(b"OK SEAL " + target_share.hex().encode() + b"\n")
                key = seal_key(sid, token, source_share, target_share)
                conn = conn.unwrap()  # both ends' close_notify; then the plain socket
                conn.settimeout(None)
                sink = _Sink(s, conn, self._done, key, seal=True)
            else:
                conn.sendall(b"OK\n")
                conn.settimeout(None)
                sink = _Sink(s, conn, self._done, stream_key(sid, token))
            with self._lock:
                closed = sid not in self._active
                if not closed:
                    self._active[sid] = sink
            if closed:
                # The session was closed (aborted, or the agent is going
                # down) while its stream was being accepted: nothing may go
                # on loading into the device. Cancelling wakes the loader,
                # which refuses the cut stream and resets the device.
                log.info("session %s: closed while its stream was accepted", sid)
                sink.cancel()
                return
            s.transfer = sink
            log.info(
                "session %s: receiving from %s (%s)",
                sid,
                peer,
                self._transport(sink.seal),
            )
        except (OSError, ValueError, ConnectionError) as e:
            with self._lock:
                if taken in self._active and self._active[taken] is None:
                    del self._active[taken]  # its mark: no sink will come
            log.warning("data connection from %s refused: %s", peer, e)
            with contextlib.suppress(OSError):
                conn.sendall(f"ERR {e}\n".encode()[:MAX_HELLO])
            conn.close()

    # ------------------------------------------------------------ source

    def start_sender(self, session: Session, endpoint: str, bandwidth: int) -> Any:
        host, _, port = endpoint.rpartition(":")
        raw = socket.create_connection((host.strip("[]"), int(port)), timeout=HELLO_TIMEOUT_S)
        conn: socket.socket = raw
        hello: dict[str, object] = {
            "v": HELLO_VERSION,
            "session": session.id,
            "token": session.token,
        }
        source_share = os.urandom(SEAL_SHARE) if self.seal else None
        if self._client_ctx is not None:
            conn = self._client_ctx.wrap_socket(raw, server_hostname=None)
            if source_share is not None:
                hello["seal"] = source_share.hex()
        conn.sendall(json.dumps(hello).encode() + b"\n")
        reply = _read_line(conn)
        target_share = None
        if source_share is not None and reply.startswith(b"OK SEAL "):
            target_share = _share(reply[8:].strip().decode(errors="replace"))
        if reply != b"OK\n" and target_share is None:
            conn.close()
            raise ConnectionRefusedError(reply.decode(errors="replace").strip())
        if source_share is not None and target_share is not None:
            key = seal_key(session.id, session.token, source_share, target_share)
            assert isinstance(conn, ssl.SSLSocket)
            conn = conn.unwrap()  # both ends' close_notify; then the plain socket
            conn.settimeout(None)
            fd, keep = conn.fileno(), [conn]
        else:
            key = stream_key(session.id, session.token)
            conn.settimeout(None)
            fd, keep = _plain_fd(conn, "send")
        pump = devmig_native.Pump(
            session.device.handle,
            fd,
            bandwidth,
            ROUND_INTERVAL_MS,
            mac_key=key,
            seal=target_share is not None,
        )
        log.info(
            "session %s: sending to %s (%s)",
            session.id,
            endpoint,
            self._transport(target_share is not None),
        )
        sender = _Sender(session, pump, fd, keep, self._done)
        with self._lock:
            self._active[session.id] = sender
        return sender

    def close(self, session: Session) -> None:
        with self._lock:
            self._pending.pop(session.id, None)
            t = self._active.pop(session.id, None)
        if t is not None:
            t.cancel()


class _Sender:
    """Source side of one session: the native pump, and a thread that
    reports its end."""

    def __init__(
        self, session: Session, pump: devmig_native.Pump, fd: int, keep: list[Any], done: Done
    ) -> None:
        self.session = session
        self.pump = pump
        self._fd = fd
        self._keep = keep
        self._cancelled = False
        threading.Thread(
            target=self._wait, args=(done,), daemon=True, name=f"pump-{session.id}"
        ).start()

    def _wait(self, done: Done) -> None:
        err: Exception | None = None
        try:
            self.pump.wait(None)
            self.pump.result()
        except (devmig_native.DevmigError, OSError) as e:
            err = e
        finally:
            self._drain()
            for k in self._keep:
                if isinstance(k, socket.socket):
                    k.close()
        if not self._cancelled:
            done(self.session, err)

    def _drain(self) -> None:
        """With a TLS relay, the stream is complete only once the relay
        forwarded what the pump left in the socketpair: close the pump's
        end (the relay reads EOF, sends the rest and closes the TLS stream)
        and wait for it, then close the rest."""
        relays = [k for k in self._keep if isinstance(k, threading.Thread)]
        if not relays:
            return
        for k in self._keep:
            if isinstance(k, socket.socket) and k.fileno() == self._fd:
                k.close()
        for t in relays:
            t.join(RELAY_DRAIN_S)

    def stop_copy(self) -> None:
        self.pump.stop_copy()

    def quiesce_p2p(self) -> None:
        self.pump.quiesce_p2p()

    def progress(self) -> Progress:
        p = self.pump.progress()
        return Progress(
            bytes_sent=p.bytes_sent,
            remaining_bytes=p.remaining_bytes,
            dirty_rate_bytes_per_second=p.dirty_rate_bps,
            throughput_bytes_per_second=p.throughput_bps,
            pre_copy_iterations=p.rounds,
        )

    @property
    def stopped_at_ns(self) -> int:
        return self.pump.progress().stopped_at_ns

    def stream_complete(self) -> bool:
        """The pump sent the whole stream, trailer included: the target may
        verify it and commit."""
        p = self.pump.progress()
        return p.done and p.error == 0

    def cancel(self) -> None:
        """Stop the pump and wait for it, so the device is free again."""
        self._cancelled = True
        self.pump.cancel()
        for k in self._keep:
            if isinstance(k, socket.socket):
                with contextlib.suppress(OSError):
                    k.shutdown(socket.SHUT_RDWR)
        self.pump.wait(None)


def _contexts(tls: security.TlsFiles) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Mutual-TLS contexts from the chart's files. Peers are dialled by IP
    and share one certificate, so the client checks the chain (the CA), not
    a host name."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for name, data in (("ca.crt", tls.ca), ("tls.crt", tls.cert), ("tls.key", tls.key)):
            p = os.path.join(d, name)
            with open(p, "wb") as f:
                f.write(data)
            paths[name] = p
        srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        srv.load_cert_chain(paths["tls.crt"], paths["tls.key"])
        srv.load_verify_locations(paths["ca.crt"])
        srv.verify_mode = ssl.CERT_REQUIRED
        cli = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cli.load_cert_chain(paths["tls.crt"], paths["tls.key"])
        cli.load_verify_locations(paths["ca.crt"])
        cli.check_hostname = False
        cli.verify_mode = ssl.CERT_REQUIRED
    return srv, cli
