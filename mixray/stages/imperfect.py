"""imperfect (LM-Mixup 1): quality classes, and capacity-constrained clusters of the low-quality examples.

Inputs: ``embed/embeddings.parquet`` (a sentence-transformers encoder on ``embed.text: full``,
i.e. "instruction\\nresponse", as methods.md §4 clusters them), ``score/quality.parquet`` and
``ingest/examples.parquet``.

Outputs under ``<run_dir>/imperfect/``:

- ``classes.parquet`` — ``id, score, class (0-5), low`` for every scored example
  (``lmmixup.classes``: quantiles of the score, thresholds, or a 1-10 rating);
- ``clusters.parquet`` — ``cluster, member_ids, size, prompt``: the low-quality examples in
  clusters of ``min_size..max_size`` (``mixray.algorithms.lmmixup.CapacityKMeans``; the
  KMeans runs over Ray actors above ``clusters.distributed_above`` points), with the
  distiller's user turn (members cut to ``max_member_chars``);
- ``cluster_sizes.png`` — the histogram of the cluster sizes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mixray.contracts import (
    CLASSES_SCHEMA,
    CLUSTER_SIZES,
    EMBEDDINGS,
    EXAMPLES,
    LOW_CLUSTER_SCHEMA,
    LOW_CLUSTERS,
    QUALITY,
    QUALITY_CLASSES,
)
from mixray.errors import InputError
from mixray.io.rundir import write_table
from mixray.stages.runner import Outputs, Stage

log = logging.getLogger("mixray.lmmixup")


def check_lmmixup_embeddings(path: Path) -> dict[str, str]:
    """LM-Mixup embeds "instruction\\nresponse" with a sentence encoder (whose model the rewards
    reuse): the embeddings' metadata must say so. Returns the metadata."""
    meta = {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}
    if meta.get("mixray.encoder") != "sentence-transformers" or meta.get("mixray.text") != "full":
        raise InputError(
            f"LM-Mixup needs sentence-transformers embeddings of instruction + response, but {path} "
            f"has encoder={meta.get('mixray.encoder')!r}, text={meta.get('mixray.text')!r}; set "
            "embed.encoder: sentence-transformers and embed.text: full", where="embed.text")
    return meta


def cut(text: str, n: int) -> str:
    """``text`` cut to ``n`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def example_texts(examples: Path, ids: list[str]) -> dict[str, tuple[str, str]]:
    """``id -> (question, answer)``: question = instruction (+ "\\n" + input), answer = output."""
    from mixray.models.text import instruction_text

    want = set(ids)
    t = pq.read_table(examples, columns=["id", "instruction", "input", "output"])
    out = {}
    for i, ins, inp, o in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True):
        if i in want:
            out[i] = (instruction_text(ins, inp), o)
    return out


def plot_sizes(sizes: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    values, counts = np.unique(sizes, return_counts=True)
    ax.bar(values, counts, color="C0")
    ax.set_xlabel("cluster size (examples)")
    ax.set_ylabel("clusters")
    ax.set_xticks(values)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


class Imperfect(Stage):
    """``imperfect``: quality classes + capacity-constrained clusters of the low-quality examples."""

    name = "imperfect"
    requires = (EMBEDDINGS, QUALITY, EXAMPLES)
    outputs = (QUALITY_CLASSES, LOW_CLUSTERS, CLUSTER_SIZES)
    summary = "{clusters} clusters of {low} low-quality examples"
    seeded = True
    memory_knobs = ("clusters.concurrency",)

    config_path = "lmmixup"  # its settings: cfg.lmmixup

    def config(self) -> dict:
        s = self.section
        return {"classes": s.classes.model_dump(mode="json"), "clusters": s.clusters.model_dump(mode="json"),
                "seed": self.cfg.seed}

    def run(self, out: Outputs) -> None:
        from mixray.algorithms.lmmixup import quality_classes
        from mixray.stages.select import read_pool

        s = self.section
        check_lmmixup_embeddings(EMBEDDINGS.path(self.run_dir))
        ids, x, q = read_pool(self.run_dir)
        classes = quality_classes(q, s.classes.method, s.classes.cuts)
        low = classes < s.classes.low_below
        write_table(pa.table({"id": pa.array(ids.tolist(), pa.string()), "score": pa.array(q),
                              "class": pa.array(classes), "low": pa.array(low)}, schema=CLASSES_SCHEMA),
                    out.path(QUALITY_CLASSES))
        low_ids = ids[low].tolist()
        labels, k = self._cluster(x[low])
        table = self._clusters_table(low_ids, labels, k)
        write_table(table, out.path(LOW_CLUSTERS))
        sizes = table.column("size").to_numpy()
        plot_sizes(sizes, out.path(CLUSTER_SIZES),
                   f"{k} clusters of {len(low_ids)} low-quality examples")
        out.counts = {"pool": len(ids), "low": len(low_ids), "high": int((~low).sum()), "clusters": k}
        out.extra = {"class_counts": np.bincount(classes, minlength=6).tolist(),
                     "size_counts": {int(v): int(c) for v, c in zip(*np.unique(sizes, return_counts=True),
                                                                    strict=True)}}
        log.info("imperfect: %d examples -> classes %s; %d low-quality in %d clusters (sizes %s)",
                 len(ids), out.extra["class_counts"], len(low_ids), k, out.extra["size_counts"])

    def _cluster(self, X: np.ndarray) -> tuple[np.ndarray, int]:
        """Capacity-constrained labels of the low-quality points (KMeans distributed when large)."""
        from mixray.algorithms.lmmixup import CapacityKMeans

        c = self.section.clusters
        if len(X) < c.min_size:
            raise InputError(f"imperfect: {len(X)} low-quality example(s) cannot make a cluster of "
                             f"clusters.min_size={c.min_size}; raise classes.low_below or lower min_size",
                             where="lmmixup.classes.low_below")
        ck = CapacityKMeans(c.min_size, c.max_size, c.mean, c.std, self.cfg.seed, c.max_iter, c.top_centres)
        centres = None
        if len(X) > c.distributed_above:
            from mixray.algorithms.lmmixup_rewards import unit_rows
            from mixray.distributed.kmeans import DistributedKMeans
            from mixray.distributed.runtime import init_ray

            init_ray(self.cfg.ray)
            k = len(ck.plan(len(X)))
            centres = DistributedKMeans(k, concurrency=c.concurrency, max_iter=c.max_iter, random_state=self.cfg.seed,
                                        num_cpus=c.num_cpus, threads=c.threads).fit(
                unit_rows(X).astype(np.float32)).cluster_centers_
        ck.fit(X, centres=centres)
        return ck.labels_, len(ck.capacities_)

    def _clusters_table(self, ids: list[str], labels: np.ndarray, k: int) -> pa.Table:
        from mixray.algorithms.lmmixup import cluster_prompt

        n_chars = self.section.clusters.max_member_chars
        texts = example_texts(EXAMPLES.path(self.run_dir), ids)
        members = [[] for _ in range(k)]
        for i, label in zip(ids, labels.tolist(), strict=True):
            members[label].append(i)
        prompts = [cluster_prompt([(cut(texts[m][0], n_chars), cut(texts[m][1], n_chars)) for m in ms])
                   for ms in members]
        return pa.table({"cluster": pa.array(np.arange(k), pa.int64()),
                         "member_ids": pa.array(members, pa.list_(pa.string())),
                         "size": pa.array([len(m) for m in members], pa.int64()),
                         "prompt": pa.array(prompts, pa.string())}, schema=LOW_CLUSTER_SCHEMA)
