#!/usr/bin/env python3
"""RFC 8484 GET URIs (one query of type A, RD set) on a loopback listener,
one per line, for h2load -i.

    uris.py PORT NAME           one URI, for NAME
    uris.py PORT PREFIX COUNT   COUNT URIs, for PREFIX0.example.test,
                                PREFIX1.example.test, ... (unique names:
                                each a cache miss the first time)
"""
import base64
import struct
import sys


def uri(port, name):
    labels = b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    q = struct.pack(">HHHHHH", 0, 0x0100, 1, 0, 0, 0) + labels + struct.pack(">HH", 1, 1)
    return f"https://127.0.0.1:{port}/dns-query?dns=" + base64.urlsafe_b64encode(q).decode().rstrip("=")


def main(args):
    if len(args) == 2:
        names = [args[1]]
    elif len(args) == 3:
        names = (f"{args[1]}{i}.example.test" for i in range(int(args[2])))
    else:
        sys.exit(__doc__)
    port = args[0]
    sys.stdout.write("".join(uri(port, n) + "\n" for n in names))


if __name__ == "__main__":
    main(sys.argv[1:])
