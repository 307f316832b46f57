#!/usr/bin/env python3
"""The modules of src/ import one way: print every `crate::` edge between
top-level modules that closes a cycle, and exit non-zero when there is one.

A module is a file or directory directly under src/ (`guard`, `server`, ...).
An edge A -> B is any `crate::B` path (use, type or call) in A's files,
doc comments and comments excluded. `#[cfg(test)]` modules are included:
tests beside the code follow the same direction.
"""
import os
import re
import sys
from collections import defaultdict

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
ROOTS = {"lib.rs", "main.rs"}


def module_of(path):
    rel = os.path.relpath(path, SRC)
    head = rel.split(os.sep)[0]
    return head[:-3] if head.endswith(".rs") else head


def edges():
    found = defaultdict(lambda: defaultdict(list))
    for dirpath, _, files in os.walk(SRC):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(dirpath, name)
            if os.path.relpath(path, SRC) in ROOTS:
                continue
            here = module_of(path)
            with open(path, encoding="utf-8") as f:
                for no, line in enumerate(f, 1):
                    code = line.split("//", 1)[0]
                    # `use crate::{a, b::c}` names several modules at once.
                    for group in re.findall(r"crate::\{([^}]*)\}", code):
                        for part in group.split(","):
                            m = re.match(r"\s*([a-z_][a-z0-9_]*)", part)
                            if m and m.group(1) != here:
                                found[here][m.group(1)].append(f"{os.path.relpath(path, SRC)}:{no}")
                    for m in re.finditer(r"crate::([a-z_][a-z0-9_]*)", code):
                        if m.group(1) != here:
                            found[here][m.group(1)].append(f"{os.path.relpath(path, SRC)}:{no}")
    return found


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def main():
    graph = edges()
    bad = cycles(graph)
    if "-v" in sys.argv:
        for a in sorted(graph):
            print(f"{a} -> {', '.join(sorted(graph[a]))}")
    for comp in bad:
        print("import cycle between: " + ", ".join(comp))
        for a in comp:
            for b in comp:
                if b in graph.get(a, {}):
                    print(f"  {a} -> {b}: {', '.join(graph[a][b][:3])}")
    if bad:
        sys.exit(1)
    print(f"modules import one way ({len(graph)} modules with crate:: imports)")


if __name__ == "__main__":
    main()
