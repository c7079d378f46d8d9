"""The streaming relay: where a stored recording becomes audio bytes on a socket.

A full read is one GET whose frames are authenticated in batches in
gevent's thread pool while the hub moves bytes (``full_plaintext``); a
Range read decrypts only the frames that hold the range
(``fsrecrypt.pipeline.iter_plaintext_range``). Either way the response body
is an :class:`AuditedStream`: only authenticated plaintext goes out, and
one access-log row is written when the stream ends, however it ends.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import gevent
from gevent.queue import Queue

from fsrecrypt import format as esdk
from fsrecrypt import pipeline
from fsrecrypt.errors import FsrecryptError, IntegrityError, MalformedMessage

if TYPE_CHECKING:
    from fsrecrypt.pipeline import Services

log = logging.getLogger("fsrecrypt.web")

FULL_READ_BATCH = 2 << 20
"""Ciphertext per decryption batch on a full read. Each batch costs the relay
thread a thread-pool round trip (wake-ups, a futex or two) and one ``sendall``;
at 2 MiB a 60-minute recording is ~28 of them. Larger batches bought no more
in the benchmark and only delay the first byte (a batch is read and verified
before it goes out)."""


def full_plaintext(
    services: Services, recording: Any, opened_with: dict[str, Any] | None = None
) -> Iterator[bytes]:
    """The whole recording for ``/stream``: one GET, decryption overlapped with the sockets.

    Why not ``open_recording`` + ``iter_plaintext``: that costs a HEAD, a
    ranged GET for the header and then the GET of the body, one after the
    other, before the first byte. Here the body's GET starts at once (the
    HEAD, needed only for the size check, runs beside it) and the header is
    read from the body itself. The checks are those of ``open_recording``:
    the header's context must name this recording and tenant, the data key
    is unwrapped from the database's copy under that context, commitment and
    header tag are verified with it, and the object's size must give the
    row's plaintext size, all before any frame is decrypted.

    Frames are then authenticated in batches of ``FULL_READ_BATCH`` in
    gevent's thread pool (AES-GCM releases the GIL), so decryption runs
    while the hub reads S3 and writes to the client. The body is read
    straight into each batch's buffer (``IterReader`` -> the store body's
    ``readinto``), and a batch's plaintext goes to the socket as one chunk.
    A batch is released only once every frame in it verified; the output is
    also held to exactly the row's size, so a body that changed under us
    ends the stream instead of overrunning the promised Content-Length.
    ``opened_with`` receives which wrapping key opened the data key.
    """
    key = pipeline.check_readable(recording)
    store = services.store

    def head() -> Any:
        try:
            return store.head(key)
        except FsrecryptError as exc:  # handed to the reader, not printed by gevent
            return exc

    sizing = gevent.spawn(head)
    try:
        body = store.get_range(key, 0, None)
    except BaseException:
        sizing.kill()
        raise

    def data_key_for(header: Any) -> bytes:
        unwrapped = pipeline.playback.unwrap_data_key_from(services, recording, header)
        if opened_with is not None:  # which key opened it, for the audit row
            opened_with.update(pipeline.playback.opened_details(unwrapped))
        data_key = unwrapped.data_key
        info = sizing.get()
        if isinstance(info, FsrecryptError):
            raise info
        pipeline.checked_plaintext_size(recording, header, info.size)
        return data_key

    pool = gevent.get_hub().threadpool

    def submit(job: Callable[[], bytes]) -> Callable[[], bytes]:
        return pool.spawn(job).get  # type: ignore[no-any-return]

    def exactly(expected: int | None) -> Iterator[bytes]:
        sent = 0
        producer = None
        try:
            plaintext = esdk.decrypt_stream_batched(
                pipeline.IterReader(body), data_key_for, submit, batch_bytes=FULL_READ_BATCH
            )
            producer, plaintext = _read_ahead(plaintext)
            for chunk in plaintext:
                sent += len(chunk)
                if expected is not None and sent > expected:
                    raise MalformedMessage(
                        f"object {key} holds more audio than the row's {expected} bytes"
                    )
                yield chunk
            if expected is not None and sent != expected:
                raise MalformedMessage(
                    f"object {key} ended after {sent} of the row's {expected} bytes"
                )
        except FsrecryptError:
            # The object failed a read: a header cached for seeks must not outlive that.
            services.headers.drop(key)
            raise
        finally:
            if producer is not None:
                producer.kill()
            sizing.kill()
            close = getattr(body, "close", None)
            if close is not None:
                close()

    return exactly(recording.file_size_bytes)


_END = object()


def _read_ahead(chunks: Iterator[bytes]) -> tuple[Any, Iterator[bytes]]:
    """Run ``chunks`` in its own greenlet, one chunk ahead of the consumer.

    Why: in one greenlet, reading S3 and writing to the client take turns:
    while ``sendall`` waits for the client to drain a batch, nothing receives
    from S3, and while a batch is being received nothing is sent. With the
    producer in its own greenlet the hub does both as the sockets allow
    (a few percent more throughput in ``bench/bench_stream.py``, no more CPU),
    for one more batch of plaintext held per stream.

    Nothing changes in what goes out: the producer forwards only what
    ``chunks`` yields (verified plaintext), in order, then its error if it
    raised one. Returns the greenlet (kill it when done with the stream: that
    also closes ``chunks``) and the iterator to consume.
    """
    queue: Any = Queue(maxsize=1)

    def produce() -> None:
        try:
            for chunk in chunks:
                queue.put(chunk)
        except Exception as exc:  # noqa: BLE001 - not swallowed: re-raised by the consumer
            queue.put(exc)
            return
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        queue.put(_END)

    producer = gevent.spawn(produce)

    def consume() -> Iterator[bytes]:
        while True:
            item = queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    return producer, consume()


class StreamAborted(IntegrityError):
    """An integrity failure after the status line went out: the connection must be cut."""


class AuditedStream:
    """The response body: releases authenticated plaintext and writes one audit row at the end.

    The row is written when the server closes the body, whichever way it
    ends: completed, cut by the client (a seek makes browsers drop the old
    request), or aborted on an integrity failure. In the last case the error
    is re-raised as StreamAborted so the WSGI server drops the connection:
    the client sees a short body (Content-Length was promised), never
    unauthenticated bytes.
    """

    def __init__(
        self,
        first: bytes,
        rest: Iterator[bytes],
        *,
        expected: int,
        on_close: Callable[[int, str | None, bool], None],
    ) -> None:
        self._first = first
        self._rest = rest
        self._expected = expected
        self._on_close = on_close
        self._sent = 0
        self._error: str | None = None
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            if self._first:
                self._sent += len(self._first)
                yield self._first
            self._first = b""
            for chunk in self._rest:
                self._sent += len(chunk)
                yield chunk
        except FsrecryptError as exc:
            self._error = f"{type(exc).__name__}: {exc.message}"
            log.error("stream aborted after %d bytes: %s", self._sent, exc.one_line())
            self.close()
            raise StreamAborted(f"stream aborted after {self._sent} bytes: {exc.message}") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        close = getattr(self._rest, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()
        completed = self._error is None and self._sent == self._expected
        try:
            self._on_close(self._sent, self._error, completed)
        except FsrecryptError as exc:
            log.error("could not write the stream's access-log row: %s", exc.one_line())
