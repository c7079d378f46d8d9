"""A loopback TCP forwarder that can go dark and come back: a real network outage.

Put it between fsrecrypt and the moto server to make S3, KMS or DynamoDB
unreachable (connections refused and cut) while moto keeps its buckets, keys
and tables. Shared by the daemon outage tests and the branch key tests.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.moto import free_port


class TcpProxy:
    """A loopback TCP forwarder that can go dark (refuse and cut connections) and come back.

    It stands between the daemon and moto, so "S3 and KMS unreachable" is a real
    network failure while moto keeps its buckets and keys.
    """

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", self.port))
        lsock.listen(64)
        self._listener = lsock
        threading.Thread(target=self._accept, args=(lsock,), daemon=True).start()

    def down(self) -> None:
        lsock, self._listener = self._listener, None
        if lsock is not None:
            with contextlib.suppress(OSError):
                lsock.shutdown(socket.SHUT_RDWR)
            lsock.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                client, _ = lsock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
