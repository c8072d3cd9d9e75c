#!/usr/bin/env python3
"""Resolve kernel modules to a load order from modules.dep (dependencies first).

Usage: modorder.py MODULES_DIR MODULE...   (MODULES_DIR = .../lib/modules/<kver>)
Prints "<name> <path relative to MODULES_DIR>" per module to load, in order.
Module names compare with '-' == '_'. Built-in modules are skipped.
Also follows "softdep <m> pre: ..." lines of modules.softdep.
"""
import os
import sys


def norm(n):
    return n.replace("-", "_")


def modname(path):
    base = os.path.basename(path)
    for suf in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suf):
            return norm(base[: -len(suf)])
    return norm(base)


def main(mdir, wanted):
    deps, paths = {}, {}
    with open(os.path.join(mdir, "modules.dep")) as f:
        for line in f:
            if ":" not in line:
                continue
            p, rest = line.split(":", 1)
            m = modname(p)
            paths[m] = p
            deps[m] = [modname(d) for d in rest.split()]
    builtin = set()
    bp = os.path.join(mdir, "modules.builtin")
    if os.path.exists(bp):
        builtin = {modname(l.strip()) for l in open(bp) if l.strip()}
    pre = {}
    sp = os.path.join(mdir, "modules.softdep")
    if os.path.exists(sp):
        for line in open(sp):
            w = line.split()
            if len(w) >= 3 and w[0] == "softdep" and "pre:" in w:
                i = w.index("pre:")
                after = w[i + 1:]
                stop = after.index("post:") if "post:" in after else len(after)
                pre.setdefault(norm(w[1]), []).extend(norm(x) for x in after[:stop])
    order, seen = [], set()

    def visit(m, required):
        if m in seen:
            return
        seen.add(m)
        if m in builtin:
            return
        if m not in paths:
            if required:
                sys.exit(f"modorder: module {m} not found in {mdir}/modules.dep")
            return
        for d in pre.get(m, []):
            visit(d, False)
        for d in deps[m]:
            visit(d, True)
        order.append(m)

    for w in wanted:
        visit(norm(w), True)
    for m in order:
        print(m, paths[m])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
