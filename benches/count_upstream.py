#!/usr/bin/env python3
"""A counting upstream for benches/flood.sh: answers every UDP query with
NXDOMAIN (with TC set when the first label starts with "tc"), every TCP
query with NXDOMAIN, and prints one line per second: the Unix second and the
packets (UDP and TCP queries) received in it. Binds 127.0.0.1 only."""
import socket
import struct
import sys
import threading
import time

port = int(sys.argv[1])
counts = {}
lock = threading.Lock()


def count():
    sec = int(time.time())
    with lock:
        counts[sec] = counts.get(sec, 0) + 1


def answer(q, tc):
    end = 12
    while end < len(q) and q[end] != 0:
        end += q[end] + 1
    end += 5
    flags = 0x8183 | (0x0200 if tc else 0)
    return q[:2] + struct.pack(">HHHHH", flags, 1, 0, 0, 0) + q[12:end]


def ticker():
    while True:
        time.sleep(1 - time.time() % 1 + 0.05)
        sec = int(time.time()) - 1
        with lock:
            n = counts.pop(sec, 0)
        print(sec, n, flush=True)


def serve_tcp(c):
    try:
        while True:
            head = c.recv(2, socket.MSG_WAITALL)
            if len(head) < 2:
                return
            q = c.recv(struct.unpack(">H", head)[0], socket.MSG_WAITALL)
            count()
            a = answer(q, False)
            c.sendall(struct.pack(">H", len(a)) + a)
    except OSError:
        pass
    finally:
        c.close()


def tcp(t):
    while True:
        c, _ = t.accept()
        threading.Thread(target=serve_tcp, args=(c,), daemon=True).start()


u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
u.bind(("127.0.0.1", port))
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", port))
t.listen(256)
threading.Thread(target=ticker, daemon=True).start()
threading.Thread(target=tcp, args=(t,), daemon=True).start()
while True:
    q, peer = u.recvfrom(4096)
    count()
    u.sendto(answer(q, len(q) > 14 and q[13:15] == b"tc"), peer)
