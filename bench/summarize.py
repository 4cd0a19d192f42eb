#!/usr/bin/env python3
"""Helpers of bench/run.sh (standard library only).

  summarize.py parse-wrk FILE [EXTRA]    wrk's text output -> one JSON object (EXTRA: JSON merged in)
  summarize.py merge EXTRA < JSON        one JSON object from stdin, EXTRA merged in
  summarize.py meta OUT [KEY=VALUE...]   machine and tool facts -> OUT (JSON)
  summarize.py report JSONL META OUTDIR  all measurements -> results JSON + markdown table

The report takes, for every proxy and metric, the median over the repeats, and
shows the spread (min-max) when there is more than one repeat. Ratios are the
proxy's median divided by nginx's median ("x nginx"): above 1 means more
requests/s (better), or more CPU per request / memory / latency (worse).
"""

import json
import os
import re
import statistics
import subprocess
import sys

UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def to_us(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        return None
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    out = {"raw_file": os.path.basename(path)}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if m:
        out["requests"] = int(m.group(1))
        secs = float(m.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
        out["elapsed_s"] = secs
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non_2xx_3xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    lat = {}
    for pct, val in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", text, re.M):
        lat["p" + pct] = to_us(val)
    out["latency_us"] = lat
    return out


def med(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def spread(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return (min(values), max(values)) if values else None


def fmt(v, digits=0):
    if v is None:
        return "—"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def ratio(v, base):
    if v is None or base in (None, 0):
        return "—"
    return f"{v / base:.2f}×"


def report(jsonl, meta_path, outdir):
    rows = [json.loads(line) for line in open(jsonl, encoding="utf-8") if line.strip()]
    meta = json.load(open(meta_path, encoding="utf-8"))
    proxies = meta["proxies"]
    rates = meta["params"]["rates"]

    # metric name -> proxy -> list over repeats
    metrics = {}

    def add(proxy, name, value):
        metrics.setdefault(name, {}).setdefault(proxy, []).append(value)

    status = {p: meta.get("status", {}).get(p, "ok") for p in proxies}

    # Measurements taken while a build ran on the box are dropped from a
    # (proxy, test) group when the group has uncontended ones; otherwise they
    # are kept and the proxy is marked with "*".
    def group(r):
        return (r["proxy"], r["test"], r.get("target_rate"))

    clean_groups = {group(r) for r in rows if not r.get("contended")}
    used = [r for r in rows if not r.get("contended") or group(r) not in clean_groups]
    tainted = {r["proxy"] for r in used if r.get("contended")}
    dropped = len(rows) - len(used)
    for r in used:
        p = r["proxy"]
        if r["test"] == "saturation":
            add(p, "sat_rps", r.get("rps"))
            add(p, "sat_cpu_util", r.get("proxy_cpu_util"))
            add(p, "sat_cpu_us_per_req", r.get("proxy_cpu_us_per_req"))
            add(p, "sat_core1_busy", r.get("core1_busy"))
            add(p, "sat_p50", r.get("latency_us", {}).get("p50"))
            add(p, "sat_p99", r.get("latency_us", {}).get("p99"))
        elif r["test"] == "rate":
            k = r["target_rate"]
            add(p, f"cpu_{k}", r.get("cpu_us_per_req"))
            add(p, f"cpu_sched_{k}", r.get("cpu_sched_us_per_req"))
            add(p, f"p50_{k}", r.get("latency_us", {}).get("p50"))
            add(p, f"p99_{k}", r.get("latency_us", {}).get("p99"))
            add(p, f"achieved_{k}", r.get("achieved_rate"))
            add(p, f"sustained_{k}", 1 if r.get("sustained") else 0)
        elif r["test"] == "idle":
            b = r.get("bytes_per_conn")
            add(p, "mem_kib", b / 1024 if isinstance(b, (int, float)) else None)
            add(p, "idle_established", r.get("established"))

    def m(name, p):
        return med(metrics.get(name, {}).get(p, []))

    summary = {}
    for p in proxies:
        summary[p] = {
            name: {
                "median": med(per.get(p, [])),
                "min_max": spread(per.get(p, [])),
                "values": per.get(p, []),
            }
            for name, per in metrics.items()
            if p in per
        }
        summary[p]["status"] = status[p]

    lines = []
    head = ["proxy", "sat. req/s", "× nginx"]
    for k in rates:
        kk = f"{k // 1000}k" if k % 1000 == 0 else str(k)
        head += [f"CPU µs/req @{kk}", "× nginx", f"p50 / p99 µs @{kk}"]
    head += ["mem/idle conn KiB", "× nginx"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for p in proxies:
        if status[p] != "ok":
            lines.append("| " + " | ".join([f"{p} ({status[p]})"] + ["—"] * (len(head) - 1)) + " |")
            continue
        label = p + (" *" if p in tainted else "")
        cells = [label, fmt(m("sat_rps", p)), ratio(m("sat_rps", p), m("sat_rps", "nginx"))]
        for k in rates:
            cpu = m(f"cpu_{k}", p)
            flag = "" if (m(f"sustained_{k}", p) or 0) >= 1 else " (not sustained)"
            cells += [
                fmt(cpu, 1) + flag,
                ratio(cpu, m(f"cpu_{k}", "nginx")),
                f"{fmt(m(f'p50_{k}', p))} / {fmt(m(f'p99_{k}', p))}",
            ]
        mem = m("mem_kib", p)
        cells += [fmt(mem, 2 if mem is not None and mem < 10 else 1), ratio(mem, m("mem_kib", "nginx"))]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if status.get("portico") == "ok" and status.get("bare-pingora") == "ok":
        parts = [f"saturation {ratio(m('sat_rps', 'portico'), m('sat_rps', 'bare-pingora'))}"]
        for k in rates:
            parts.append(f"CPU/req @{k} {ratio(m(f'cpu_{k}', 'portico'), m(f'cpu_{k}', 'bare-pingora'))}")
        parts.append(f"memory/conn {ratio(m('mem_kib', 'portico'), m('mem_kib', 'bare-pingora'))}")
        notes.append("Portico ÷ bare-pingora (medians): " + ", ".join(parts) + ".")
    if tainted:
        notes.append("\\* some of this proxy's numbers were measured while a build ran on the machine (contended).")
    if dropped:
        notes.append(f"{dropped} contended measurement(s) dropped in favour of uncontended repeats.")
    if notes:
        lines.append("")
        lines.extend(notes)
    table = "\n".join(lines)

    # Spread table (min–max over repeats) and validity columns.
    sl = []
    shead = ["proxy", "runs used", "sat. req/s (min–max)", "proxy CPU at sat.", "core 1 busy at sat."]
    for k in rates:
        kk = f"{k // 1000}k" if k % 1000 == 0 else str(k)
        shead += [f"CPU µs/req @{kk} (min–max)", f"p99 @{kk} (min–max)"]
    shead += ["mem KiB/conn (min–max)"]
    sl.append("| " + " | ".join(shead) + " |")
    sl.append("|" + "|".join(["---"] * len(shead)) + "|")

    def mm(name, p, digits=0):
        s = spread(metrics.get(name, {}).get(p, []))
        return "—" if s is None else f"{fmt(s[0], digits)}–{fmt(s[1], digits)}"

    for p in proxies:
        if status[p] != "ok":
            continue
        n = len(metrics.get("sat_rps", {}).get(p, []))
        cu = m("sat_cpu_util", p)
        c1 = m("sat_core1_busy", p)
        cells = [
            p,
            str(n),
            mm("sat_rps", p),
            "—" if cu is None else f"{cu * 100:.0f}%",
            "—" if c1 is None else f"{c1 * 100:.0f}%",
        ]
        for k in rates:
            cells += [mm(f"cpu_{k}", p, 1), mm(f"p99_{k}", p)]
        cells += [mm("mem_kib", p, 1)]
        sl.append("| " + " | ".join(cells) + " |")
    spread_table = "\n".join(sl)

    stamp = meta["stamp"]
    result = {"meta": meta, "summary": summary, "measurements": rows,
              "contended_dropped": dropped, "contended_proxies": sorted(tainted),
              "table_markdown": table, "spread_markdown": spread_table}
    os.makedirs(outdir, exist_ok=True)
    jpath = os.path.join(outdir, f"results-{stamp}.json")
    with open(jpath, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    mpath = os.path.join(outdir, f"table-{stamp}.md")
    with open(mpath, "w", encoding="utf-8") as f:
        f.write(table + "\n\n" + spread_table + "\n")
    print(table)
    print()
    print(spread_table)
    print()
    print(f"raw results: {jpath}")
    print(f"table:       {mpath}")


def run(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return None


def meta(out, pairs):
    lscpu = run(["lscpu"]) or ""
    m = {
        "date": run(["date"]),
        "date_utc": run(["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "nproc": run(["nproc"]),
        "lscpu_head": lscpu.splitlines()[:10],
        "model_name": next((l.split(":", 1)[1].strip() for l in lscpu.splitlines()
                            if l.startswith("Model name")), None),
        "kernel": run(["uname", "-r"]),
        "loadavg": open("/proc/loadavg").read().strip(),
        "versions": {
            "nginx": run(["nginx", "-v"]),
            "haproxy": (run(["haproxy", "-v"]) or "").splitlines()[:1],
            "wrk": (run(["wrk", "-v"]) or "").splitlines()[:1],
            "rustc": run(["rustc", "--version"]),
        },
        "status": {},
        "params": {},
    }
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            value = json.loads(value)
        except ValueError:
            pass
        node = m
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    with open(out, "w", encoding="utf-8") as f:
        json.dump(m, f, indent=2)


def main():
    if len(sys.argv) in (3, 4) and sys.argv[1] == "parse-wrk":
        out = parse_wrk(sys.argv[2])
        if len(sys.argv) == 4:
            out.update(json.loads(sys.argv[3]))
        print(json.dumps(out))
    elif len(sys.argv) == 3 and sys.argv[1] == "merge":
        out = json.loads(sys.stdin.read())
        out.update(json.loads(sys.argv[2]))
        print(json.dumps(out))
    elif len(sys.argv) >= 3 and sys.argv[1] == "meta":
        meta(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) == 5 and sys.argv[1] == "report":
        report(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
