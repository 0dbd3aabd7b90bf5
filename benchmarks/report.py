"""Every benchmark, one after the other, into one report: ``benchmarks/results.md`` + ``results.json``.

    make bench                                  # = .venv/bin/python benchmarks/report.py
    .venv/bin/python benchmarks/report.py --quick          # small sizes: a smoke run (~15 min)
    .venv/bin/python benchmarks/report.py --only select kmeans --hog 8

Each benchmark runs as its own subprocess (its own timeout; a failure is recorded and the
report goes on). The report holds, per benchmark: the command, its exit code and wall time,
every line of its output that states a ratio (a number followed by ``x`` or ``×``, or after
"ratio …:"; mixray
against the library a user would otherwise use, measured in the same run) and its full
output; the JSON file also carries each ratio as a number. At the top: the machine (CPU
model, cores, the CPUs this process may use, the SIMD/AMX flags, memory), the load average
before and after each benchmark, the date, the git commit, and the torch/ray versions.

``--hog N`` adds the selection benchmark once more, apricot lazy and mixray lazy at N = 10K
and 20K in 5 interleaved rounds of a quiet and a hogged run (N CPU-hog processes); each
method's slowdown is the median over rounds of hog time / quiet time of the same round
(issue 15's "busy machine" target: mixray's slowdown <= apricot's). Run on a quiet machine:
the full report took 65 minutes on 2 cores on 2026-11-30 (+ ~25 for ``--hog 8``; since
2026-12-01 + ~5 for stochastic selection at 200K and + ~18 for GRPO's three rounds), ``--quick``
about 15 minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATIO = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s?[x×](?![\w])")  # "1.06×", "0.82x"
NAMED = re.compile(r"ratio[^:=]*[:=]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)  # "ratio …: 0.87"

HOG_ROUNDS = 5  # --hog: rounds per size; each method's slowdown is the median over them

# name -> (full arguments, --quick arguments)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "select": (["--sizes", "20000", "--data", "clustered", "sphere", "minilm"],
               ["--sizes", "10000", "--skip-big"]),
    # issue 15's size, on overlapping and on well-separated clusters; the fastest of 3
    # interleaved fits per implementation (one 4 s fit swung 0.26-0.69 s/iter between reports)
    "kmeans": (["--sizes", "100000x384x1000", "--spread", "2", "10", "--repeat", "3"],
               ["--sizes", "50000x384x100"]),
    "embed": ([], ["--n", "2000"]),
    "train": ([], ["--rounds", "1", "--steps", "4", "--skip-memory"]),
    "dynamics": ([], ["--n", "64"]),
    "generate": ([], ["--clusters", "32", "--new-tokens", "32"]),
    # 3 interleaved rounds: the ratio is their median (one pair of runs varied 1.02-1.36x)
    "grpo": (["--no-zero2", "--rounds", "3"], ["--no-zero2", "--steps", "3", "--new-tokens", "32"]),
}


def machine() -> dict:
    """CPU model, cores, usable CPUs, ISA flags that matter here, memory, versions, commit."""
    sys.path.insert(0, str(HERE.parent))
    from mixray.algorithms.cores import available_cores, cgroup_cpu_limit

    info: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "host": platform.node(), "python": platform.python_version(),
                  "cpu_count": os.cpu_count(), "available_cores": available_cores(),
                  "cgroup_cpu_limit": cgroup_cpu_limit()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = re.search(r"model name\s*:\s*(.*)", cpuinfo).group(1).strip()
        flags = set(re.search(r"flags\s*:\s*(.*)", cpuinfo).group(1).split())
        info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")))
        mem = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
        info["memory_gib"] = round(int(mem.group(1)) / 2**20, 1)
    except (OSError, AttributeError):
        pass
    for dist in ("torch", "ray", "transformers", "deepspeed", "numba", "apricot-select", "faiss-cpu",
                 "scikit-learn"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    git = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    info["commit"] = git.stdout.strip() or None
    return info


def ratio_lines(text: str) -> list[dict]:
    """Every output line that states a ratio, with its numbers."""
    out = []
    for line in text.splitlines():
        found = [float(m) for m in RATIO.findall(line)] or [float(m) for m in NAMED.findall(line)]
        if found and not line.lstrip().startswith(("[", "(")):
            out.append({"line": line.strip(), "ratios": found})
    return out


def run_one(name: str, args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(HERE / f"bench_{name}.py"), *args]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    load0, t0 = os.getloadavg()[0], time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        code, stdout, stderr = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(
            e.stdout, bytes) else (e.stdout or ""), ""
    res = {"benchmark": name, "command": " ".join(["python", *cmd[1:]]), "exit": code,
           "seconds": round(time.time() - t0, 1), "load_before": load0, "load_after": os.getloadavg()[0],
           "ratios": ratio_lines(stdout), "stdout": stdout,
           "stderr_tail": stderr[-2000:] if code != 0 else ""}
    print(f"   exit {code}, {res['seconds']:.0f} s, {len(res['ratios'])} ratio lines", flush=True)
    return res


def markdown(info: dict, results: list[dict], mode: str) -> str:
    lines = [f"# Benchmark report ({mode})", "",
             "Generated by `benchmarks/report.py` (`make bench`); how to read it: benchmarks/README.md.", "",
             "| machine | |", "|---|---|"]
    for k in ("date", "commit", "cpu_model", "cpu_count", "available_cores", "cgroup_cpu_limit",
              "memory_gib", "cpu_flags", "python", "torch", "ray", "transformers", "deepspeed",
              "numba", "apricot-select", "faiss-cpu", "scikit-learn"):
        v = info.get(k)
        lines.append(f"| {k} | {' '.join(v) if isinstance(v, list) else v} |")
    lines += ["", "| benchmark | exit | wall (s) | load before → after | ratios |", "|---|---|---:|---|---:|"]
    for r in results:
        lines.append(f"| {r['benchmark']} | {r['exit']} | {r['seconds']:.0f} | "
                     f"{r['load_before']:.1f} → {r['load_after']:.1f} | {len(r['ratios'])} |")
    for r in results:
        lines += ["", f"## {r['benchmark']}", "", f"`{r['command']}` — exit {r['exit']}, {r['seconds']:.0f} s", ""]
        if r["ratios"]:
            lines += ["Ratio lines:", "", "```", *[x["line"] for x in r["ratios"]], "```", ""]
        lines += ["<details><summary>full output</summary>", "", "```", r["stdout"].rstrip(), "```", "",
                  "</details>"]
        if r["stderr_tail"]:
            lines += ["", "stderr (tail):", "", "```", r["stderr_tail"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every benchmark")
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    ap.add_argument("--hog", type=int, default=0, help="also run the selection benchmark under N CPU hogs")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    ap.add_argument("--out", type=Path, default=HERE / "results.md", help="Markdown report (+ .json beside)")
    args = ap.parse_args()

    info = machine()
    print(f"machine: {info.get('cpu_model')}, {info['available_cores']} usable CPUs, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for name in args.only or list(BENCHMARKS):
        full, quick = BENCHMARKS[name]
        results.append(run_one(name, quick if args.quick else full, args.timeout))
    if args.hog:
        # interleaved rounds (quiet, then hogged; method order alternating), median slowdown:
        # single runs under hogs vary ~1.5x back to back (benchmarks/README.md)
        sizes = ["--sizes", "10000", "--repeats", "2"] if args.quick else ["--repeats", str(HOG_ROUNDS)]
        r = run_one("select", [*sizes, "--skip-big", "--hog-only", "--methods", "apricot-lazy", "mixray-lazy",
                               "--hog", str(args.hog)], args.timeout)
        r["benchmark"] = f"select under {args.hog} CPU hogs"
        results.append(r)
    mode = "quick" if args.quick else "full"
    args.out.write_text(markdown(info, results, mode))
    args.out.with_suffix(".json").write_text(json.dumps({"mode": mode, "machine": info, "results": results},
                                                        indent=2))
    print(f"report: {args.out}\njson: {args.out.with_suffix('.json')}")
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
