"""One TCP stream of a given number of bytes, to check the shaping of the emulated links (``netns.py``).

    python netns_transfer.py receive ADDRESS PORT BYTES   # prints the bit/s it received at
    python netns_transfer.py send ADDRESS PORT BYTES

The receiver times from the first byte to the last, so that connection set-up is not counted.
"""

from __future__ import annotations

import socket
import sys
import time


def receive(address: str, port: int, nbytes: int) -> float:
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((address, port))
        server.listen(1)
        print("listening", flush=True)
        connection, _ = server.accept()
        with connection:
            got, start = 0, None
            while got < nbytes:
                chunk = connection.recv(1 << 20)
                if not chunk:
                    break
                start = start or time.perf_counter()
                got += len(chunk)
            return got * 8 / max(time.perf_counter() - (start or time.perf_counter()), 1e-9)


def send(address: str, port: int, nbytes: int) -> None:
    deadline = time.monotonic() + 30
    while True:  # the receiver may not listen yet
        try:
            connection = socket.create_connection((address, port), timeout=30)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with connection:
        block, sent = b"\0" * (1 << 20), 0
        while sent < nbytes:
            connection.sendall(block[: nbytes - sent])
            sent += min(len(block), nbytes - sent)


if __name__ == "__main__":
    mode, address, port, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if mode == "receive":
        print(f"{receive(address, port, nbytes):.6g}")
    else:
        send(address, port, nbytes)
