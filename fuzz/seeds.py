#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/seeds/: real queries for the test zone
(GET query strings and POST bodies), every obsolete-draft form, upstream
answers for the names the targets use, and the example configuration."""
import base64, os, struct

here = os.path.dirname(os.path.abspath(__file__))

def name(n):
    return b"".join(bytes([len(l)]) + l.encode() for l in n.split(".")) + b"\0"

def query(n, qtype=1, qid=0x1234, edns=True, do=False):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0) + name(n) + struct.pack(">HH", qtype, 1)
    if edns:
        q += b"\0" + struct.pack(">HHIH", 41, 1232, 0x8000 if do else 0, 0)
    return q

def answer(n, qid=0x1234, edns=True, rcode=0, ttl=300, count=1):
    h = struct.pack(">HHHHHH", qid, 0x8180 | rcode, 1, count, 0, 1 if edns else 0)
    body = name(n.lower()) + struct.pack(">HH", 1, 1)
    for i in range(count):
        body += struct.pack(">HHHIH", 0xC00C, 1, 1, ttl, 4) + bytes([192, 0, 2, i + 1])
    if edns:
        body += b"\0" + struct.pack(">HHIH", 41, 1232, 0, 0)
    return h + body

def b64(b):
    return base64.urlsafe_b64encode(b).decode().rstrip("=")

def write(target, fname, data):
    d = os.path.join(here, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, fname), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())

names = ["example.test", "www.example.test", "short.example.test", "txt.example.test",
         "multi.example.test", "alias.example.test", "WwW.ExAmPlE.TeSt", "nx.example.test"]
for i, n in enumerate(names):
    for t in (1, 28, 16, 65):
        q = query(n, t, qid=i, edns=(t != 16), do=(t == 65))
        write("request", f"get-{i}-{t}", b"\0" + f"dns={b64(q)}".encode())
        write("request", f"post-{i}-{t}", b"\1" + q)
q = b64(query("www.example.test"))
for i, qs in enumerate([f"ct=application/dns-udpwireformat&dns={q}", f"body={q}",
                        f"dns={q}&content-type=application/dns-message", f"dns={q}&random_padding=abcd",
                        "name=example.test&type=A", "name=example.test&type=AAAA&do=1",
                        f"dns={q}==", f"dns={q}&dns={q}", "dns=", "dns=!!"]):
    write("request", f"draft-{i}", b"\0" + qs.encode())
for i, (edns, rcode, ttl, count) in enumerate([(True, 0, 300, 1), (False, 0, 5, 3), (True, 3, 60, 0),
                                               (True, 2, 0, 0), (False, 0, 0x80000000, 1)]):
    a = answer("www.example.test", qid=0x4242, edns=edns, rcode=rcode, ttl=ttl, count=count)
    write("answer", f"a{i}", (b"\1" if edns else b"\0") and a)
    r = answer("mixed.example.test", qid=0x4242, edns=edns, rcode=rcode, ttl=ttl, count=count)
    write("rewrite", f"r{i}", bytes([30, 10]) + r)
with open(os.path.join(here, "..", "doh-proxy.toml"), "rb") as f:
    write("config", "example", f.read())
write("config", "small", 'upstream = ["127.0.0.1:53"]\nmin_ttl = 1800\nallow = ["10.0.0.0/8"]\n')
