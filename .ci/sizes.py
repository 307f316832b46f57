#!/usr/bin/env python3
"""No Rust source file of the project over 600 lines (src, tests, benches,
examples, fuzz targets): a file that grows past it holds more than one
concern and is split."""
import os
import sys

LIMIT = 600
top = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
over = []
for root in ("src", "tests", "benches", "examples", "fuzz/fuzz_targets"):
    for dirpath, _, files in os.walk(os.path.join(top, root)):
        for name in files:
            if name.endswith(".rs"):
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    n = sum(1 for _ in f)
                if n > LIMIT:
                    over.append((n, os.path.relpath(path, top)))
for n, path in sorted(over, reverse=True):
    print(f"{path}: {n} lines (at most {LIMIT})")
if over:
    sys.exit(1)
print(f"every source file within {LIMIT} lines")
