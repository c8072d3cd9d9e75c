#!/usr/bin/env python3
"""Host-side checker for the real-kernel VM tests (tests/vm/run.sh).

Reads the serial-console logs of the guest boots (and the host's own log of
PASS/FAIL/metric lines), collects the guest's PASS/FAIL/SKIP lines, checks the
JSON printed by `vfio-gpu-dra` inside `=== BEGIN name rc=N json=J ===` blocks,
prints every check, the metrics, and a closing line `VM: N passed, M failed`.
Exit status 1 when anything failed.

Usage: check.py LOG...
"""

import json
import re
import sys

BEGIN = re.compile(r"^=== BEGIN (\S+) rc=(-?\d+) json=([01]) ===$")
E1000E, VIRTIO, E1000, TESTDEV, EDU = (
    "0000:01:00.0", "0000:02:00.0", "0000:00:04.0", "0000:00:04.1", "0000:00:05.0")
SOURCES = {"kernel-cmdline", "modprobe", "driverctl", "driver-override", "bound-at-start", "policy"}
DEVICE_KEYS = ("pciBusID", "vendorID", "deviceID", "driver", "driverOverride", "iommuGroup",
               "functions", "keepOnVfio", "reasons")


class Block:
    def __init__(self, log, name, rc, is_json):
        self.log, self.name, self.rc, self.is_json = log, name, rc, is_json
        self.out, self.err = [], []

    @property
    def text(self):
        return "\n".join(self.out)

    def json(self):
        return json.loads(self.text)


def parse(path):
    """-> (group, lines of PASS/FAIL/SKIP, blocks by name, metrics, done?)"""
    group = re.sub(r"\.log$", "", path.rsplit("/", 1)[-1])
    results, blocks, metrics, done = [], {}, [], False
    cur, in_err = None, False
    with open(path, errors="replace") as f:
        for raw in f:
            line = raw.rstrip("\r\n").replace("\r", "")
            if cur is not None:
                if line == "=== END ===":
                    blocks[cur.name] = cur
                    cur = None
                elif line == "=== STDERR ===" and not in_err:
                    in_err = True
                else:
                    (cur.err if in_err else cur.out).append(line)
                continue
            m = BEGIN.match(line)
            if m:
                cur, in_err = Block(group, m.group(1), int(m.group(2)), m.group(3) == "1"), False
                continue
            if re.match(r"^(PASS|FAIL|SKIP) \S", line):
                results.append(line)
            elif line.startswith("METRIC ") or line.startswith("BOOT ") or line.startswith("TIME "):
                metrics.append(line)
            elif line == "=== VM DONE ===":
                done = True
    return group, results, blocks, metrics, done


class Checker:
    def __init__(self):
        self.passed = self.failed = self.skipped = 0

    def report(self, line):
        print(line)
        if line.startswith("PASS"):
            self.passed += 1
        elif line.startswith("FAIL"):
            self.failed += 1
        elif line.startswith("SKIP"):
            self.skipped += 1

    def ok(self, name, cond, detail=""):
        self.report(f"PASS {name}" if cond else f"FAIL {name}: {detail}")
        return cond


def entry_for(devs, bdf):
    return next((d for d in devs if isinstance(d, dict) and d.get("pciBusID") == bdf), None)


def reasons_of(d):
    return [r.get("source") for r in (d.get("reasons") or []) if isinstance(r, dict)]


def fn_bdfs(d):
    return sorted(f.get("pciBusID") for f in (d.get("functions") or []) if isinstance(f, dict))


def check_devices_schema(c, b, devs, want_bdf):
    n = f"{b.log}/{b.name}"
    if not c.ok(f"{n}.json-array", isinstance(devs, list), f"not a JSON array: {b.text[:200]}"):
        return None
    c.ok(f"{n}.selected-exactly-one", [d.get("pciBusID") for d in devs] == [want_bdf],
         f"--gpu-id selected {[d.get('pciBusID') for d in devs]}, want [{want_bdf}]")
    d = entry_for(devs, want_bdf)
    if d is None:
        return None
    missing = [k for k in DEVICE_KEYS if k not in d]
    c.ok(f"{n}.keys", not missing, f"missing keys {missing} in {json.dumps(d)[:300]}")
    bad = [s for s in reasons_of(d) if s not in SOURCES]
    c.ok(f"{n}.reason-sources", not bad, f"unknown reason sources {bad}")
    c.ok(f"{n}.types",
         isinstance(d.get("keepOnVfio"), bool) and isinstance(d.get("functions"), list)
         and (d.get("iommuGroup") is None or isinstance(d.get("iommuGroup"), int))
         and all(isinstance(d.get(k), (str, type(None))) for k in ("driver", "driverOverride")),
         f"wrong types in {json.dumps(d)[:300]}")
    return d


def expect(c, n, d, key, want):
    got = d.get(key)
    return c.ok(f"{n}.{key}", got == want, f"{key} is {got!r}, want {want!r}")


def check_blocks(c, group, blocks, lspci):
    def groups_from_lspci():
        g = {}
        for line in (lspci.out if lspci else []):
            parts = line.split()
            kv = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
            if parts and kv.get("group", "none").isdigit():
                g[parts[0]] = int(kv["group"])
        return g
    groups = groups_from_lspci()

    for name, b in sorted(blocks.items()):
        n = f"{group}/{name}"
        if b.is_json and b.rc == 0:
            try:
                b.json()
                c.ok(f"{n}.valid-json", True)
            except ValueError as e:
                c.ok(f"{n}.valid-json", False, f"{e}: {b.text[:200]!r}")

    def devices(name, bdf):
        b = blocks.get(name)
        if b is None or b.rc != 0:
            return None  # the guest already failed the rc check (or the step was skipped)
        try:
            devs = b.json()
        except ValueError:
            return None
        return check_devices_schema(c, b, devs, bdf)

    for src in ("kernel-cmdline", "modprobe"):
        s = f"prebound-{src}"
        d = devices(f"{s}.devices", E1000E)
        if d is not None:
            n = f"{group}/{s}.devices"
            expect(c, n, d, "keepOnVfio", True)
            expect(c, n, d, "driver", "vfio-pci")
            c.ok(f"{n}.reason-{src}", src in reasons_of(d), f"reasons {d.get('reasons')}, want source {src}")
            if src == "modprobe":
                c.ok(f"{n}.no-cmdline-reason", "kernel-cmdline" not in reasons_of(d),
                     f"reasons {d.get('reasons')} claim kernel-cmdline, but the cmdline has no ids")
            if E1000E in groups:
                expect(c, n, d, "iommuGroup", groups[E1000E])
        d = devices(f"{s}.devices-after", E1000E)
        if d is not None:
            n = f"{group}/{s}.devices-after"
            expect(c, n, d, "keepOnVfio", True)
            expect(c, n, d, "driver", "vfio-pci")

    d = devices("runtime-move.devices", VIRTIO)
    if d is not None:
        n = f"{group}/runtime-move.devices"
        expect(c, n, d, "keepOnVfio", False)
        expect(c, n, d, "driver", "virtio-pci")
        expect(c, n, d, "driverOverride", None)
        expect(c, n, d, "vendorID", "0x1af4")
        expect(c, n, d, "deviceID", "0x1041")
        if VIRTIO in groups:
            expect(c, n, d, "iommuGroup", groups[VIRTIO])
        c.ok(f"{n}.functions", fn_bdfs(d) == [VIRTIO], f"functions {fn_bdfs(d)}, want [{VIRTIO}]")
    d = devices("runtime-move.devices-bound", VIRTIO)
    if d is not None:
        expect(c, f"{group}/runtime-move.devices-bound", d, "driver", "vfio-pci")
    d = devices("runtime-move.devices-after", VIRTIO)
    if d is not None:
        n = f"{group}/runtime-move.devices-after"
        expect(c, n, d, "driver", "virtio-pci")
        expect(c, n, d, "driverOverride", None)
        expect(c, n, d, "keepOnVfio", False)

    # a built-in host driver won the race for a device vfio-pci.ids names
    d = devices("builtin-race.devices", VIRTIO)
    if d is not None:
        n = f"{group}/builtin-race.devices"
        expect(c, n, d, "driver", "virtio-pci")
        expect(c, n, d, "keepOnVfio", True)
        c.ok(f"{n}.reason-kernel-cmdline", "kernel-cmdline" in reasons_of(d),
             f"reasons {d.get('reasons')}, want source kernel-cmdline")
    d = devices("builtin-race.devices-after", VIRTIO)
    if d is not None:
        n = f"{group}/builtin-race.devices-after"
        expect(c, n, d, "driver", "vfio-pci")
        expect(c, n, d, "keepOnVfio", True)

    d = devices("two-function.devices", E1000)
    if d is not None:
        n = f"{group}/two-function.devices"
        expect(c, n, d, "driver", "e1000")
        expect(c, n, d, "keepOnVfio", False)
        c.ok(f"{n}.functions", fn_bdfs(d) == [E1000, TESTDEV], f"functions {fn_bdfs(d)}, want [{E1000}, {TESTDEV}]")
        fns = {f.get("pciBusID"): f for f in d.get("functions") or [] if isinstance(f, dict)}
        if TESTDEV in fns:
            c.ok(f"{n}.testdev-driver", fns[TESTDEV].get("driver") is None,
                 f"function {TESTDEV} driver {fns[TESTDEV].get('driver')!r}, want null")
        if E1000 in groups:
            expect(c, n, d, "iommuGroup", groups[E1000])

    d = devices("no-host-driver.devices", EDU)
    if d is not None:
        n = f"{group}/no-host-driver.devices"
        expect(c, n, d, "driver", None)
        expect(c, n, d, "keepOnVfio", False)

    d = devices("foreign-override.devices", EDU)
    if d is not None:
        n = f"{group}/foreign-override.devices"
        expect(c, n, d, "keepOnVfio", True)
        expect(c, n, d, "driverOverride", "vfio-pci")
        c.ok(f"{n}.reason-driver-override", "driver-override" in reasons_of(d),
             f"reasons {d.get('reasons')}, want source driver-override")

    for src in ("kernel-cmdline", "modprobe"):
        check_doctor(c, group, blocks, src, groups)

    # the kernel stayed healthy
    dm = blocks.get("dmesg")
    if dm is not None:
        bad = [l for l in dm.out if re.search(r"BUG:|WARNING:|Oops|Call Trace|blocked for more than|general protection", l)]
        c.ok(f"{group}/kernel-log-clean", not bad, "; ".join(bad[:5]))

    # bind/release JSON results name the GPU they acted on
    for name, b in sorted(blocks.items()):
        m = re.match(r"^(prebound-[a-z-]+|runtime-move|builtin-race|two-function|no-host-driver|foreign-override)\.(bind|release)(-again)?$", name)
        if not m or b.rc != 0:
            continue
        want = {"runtime-move": VIRTIO, "builtin-race": VIRTIO, "two-function": E1000, "no-host-driver": EDU,
                "foreign-override": EDU}.get(m.group(1), E1000E)
        try:
            res = b.json()
        except ValueError:
            continue
        ok = isinstance(res, list) and any(isinstance(r, dict) and r.get("pciBusID") == want and "action" in r for r in res)
        c.ok(f"{group}/{name}.result-for-{want}", ok, f"no {{pciBusID: {want}, action}} in {b.text[:300]}")


DOCTOR_STATUSES = {"pass", "warn", "fail"}


def check_doctor(c, group, blocks, src, groups):
    """`doctor --output json` in a ready guest: the schema the README promises,
    and each check agreeing with the guest's sysfs (lspci_lite's groups)."""
    b = blocks.get(f"doctor-{src}.json")
    if b is None or b.rc != 0:
        return  # the guest already reported the rc (or skipped)
    n = f"{group}/doctor-{src}"
    try:
        checks = b.json()
    except ValueError:
        return  # valid-json already failed
    if not c.ok(f"{n}.json-array", isinstance(checks, list) and checks, f"not a non-empty array: {b.text[:200]}"):
        return
    bad = [x for x in checks if not (isinstance(x, dict) and {"check", "status", "detail", "fix"} <= x.keys()
                                     and x.get("status") in DOCTOR_STATUSES)]
    c.ok(f"{n}.schema", not bad, f"entries without check/status/detail/fix or with unknown status: {bad[:2]}")
    c.ok(f"{n}.fix-empty-on-pass", all(x.get("fix") == "" for x in checks if isinstance(x, dict) and x.get("status") == "pass"),
         "a passing check carries a fix")
    c.ok(f"{n}.fix-given-otherwise", all(x.get("fix") for x in checks if isinstance(x, dict) and x.get("status") != "pass"),
         "a warn/fail check has no fix")
    by = {}
    for x in checks:
        if isinstance(x, dict):
            by.setdefault((x.get("check"), x.get("pciBusID")), x)

    def status(cid, bdf=None, want=("pass",)):
        x = by.get((cid, bdf))
        what = cid + (f"[{bdf}]" if bdf else "")
        if not c.ok(f"{n}.{what}-present", x is not None, f"no {what} check in {sorted(k for k in by if k[0])}"):
            return None
        c.ok(f"{n}.{what}-{'-or-'.join(want)}", x.get("status") in want,
             f"status {x.get('status')!r} ({x.get('detail')!r}; fix {x.get('fix')!r})")
        return x

    x = status("iommu")
    if x is not None and groups:
        # the count doctor read is the count the guest has
        want = len(set(groups.values()))
        m = re.search(r"(\d+) groups", x.get("detail", ""))
        c.ok(f"{n}.iommu-group-count", m is not None and int(m.group(1)) >= want,
             f"detail {x.get('detail')!r}, the guest has at least {want} groups")
    status("interrupt-remapping")
    status("vfio-driver")
    # E1000E is named by ids= and vfio-pci (a module) won this boot, but no
    # softdep orders it before e1000e: a warning whose fix names e1000e,
    # the module modules.alias gives for 8086:10d3 (not a vendor guess).
    x = status("vfio-load-order", want=("warn",))
    if x is not None:
        fix = x.get("fix", "")
        c.ok(f"{n}.vfio-load-order-names-e1000e", "softdep e1000e pre: vfio-pci" in fix and "i915" not in fix,
             f"fix {fix!r}")
    for gpu in (E1000E, VIRTIO, E1000):
        status("gpu-isolation", gpu)
        x = status("intent", gpu, want=("pass", "warn"))
        if x is None:
            continue
        detail = x.get("detail", "")
        if gpu == E1000E:
            c.ok(f"{n}.intent[{gpu}]-names-{src}", "keepOnVfio" in detail and f"{src}:" in detail,
                 f"detail {detail!r} does not say it stays on vfio because of {src}")
        else:
            c.ok(f"{n}.intent[{gpu}]-movable", "movable" in detail and src not in detail,
                 f"detail {detail!r} names {src} for a GPU no admin setting names")


def counts(c):
    tail = f", {c.skipped} skipped" if c.skipped else ""
    return f"{c.passed} passed, {c.failed} failed{tail}"


def main(paths):
    c = Checker()
    metrics = []
    # boots are named <kernel>-<group> (run.sh); one subtotal per kernel
    per_kernel = {}
    for path in paths:
        try:
            group, results, blocks, mets, done = parse(path)
        except OSError as e:
            c.ok(f"log.{path}", False, str(e))
            continue
        before = (c.passed, c.failed, c.skipped)
        if group != "host":
            c.ok(f"{group}/vm-completed", done, f"no '=== VM DONE ===' in {path} (timeout, panic or init died)")
        for line in results:
            c.report(re.sub(r"^(PASS|FAIL|SKIP) ", lambda m: f"{m.group(1)} {group}/" if group != "host" else m.group(0), line))
        check_blocks(c, group, blocks, blocks.get("baseline.lspci"))
        metrics += [f"{group}: {m}" for m in mets]
        if group != "host":
            k = per_kernel.setdefault(group.split("-", 1)[0], Checker())
            k.passed += c.passed - before[0]
            k.failed += c.failed - before[1]
            k.skipped += c.skipped - before[2]
    if metrics:
        print("--- metrics")
        for m in metrics:
            print(m)
    for k, kc in per_kernel.items():
        print(f"VM {k}: {counts(kc)}")
    kernels = f" ({len(per_kernel)} kernels: {', '.join(per_kernel)})" if per_kernel else ""
    print(f"VM: {counts(c)}{kernels}")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
