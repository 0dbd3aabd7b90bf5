"""distill (LM-Mixup 5): a distillation for every low-quality cluster, re-scored, ranked and merged.

1. Generation through Ray Data batch inference (``map_with_actors`` + ``DistillGenerator``:
   an actor pool, a GPU per actor when the cluster has GPUs) on ``imperfect/clusters.parquet``,
   with the distiller ``lmmixup.generate.distiller`` (auto: ``distill_grpo/model`` when that
   stage completed, else ``distill_sft/model``; ``base``: ``generate.base_model``).
2. Parsing (``<think>…</think><answer>Q: … A: …</answer>``); malformed outputs go to
   ``rejects.parquet`` with the reason.
3. Re-scoring: the parsed pairs are embedded ("instruction\\nresponse", the embed stage's
   sentence encoder, over the same kind of actor pool) and rated by kNN-Bayes over the rated
   library (``expected_class``; kept when ≥ ``classes.low_below``).
4. Ranking of the kept by long-tail score (mean cosine distance to the 15 nearest kept,
   min-max normalised; rank 1 = rarest) and the merge: the top ``merge.top_n`` distilled +
   the high-quality originals (``merge.high_quality``) -> ``merged.parquet`` in the example
   schema (``train.data: distilled``, or an ingest source of another run for ``select``).

Counts: ``clusters = kept + not_kept + rejected``. Resume: every finished generation batch
is written to ``distill/generated/<run>/`` at once; a killed run generates only the clusters
not there yet (same config and inputs); the parts are removed when the stage completes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mixray.contracts import (
    DISTILL_REJECT_SCHEMA,
    DISTILL_REJECTS,
    DISTILLED,
    DISTILLED_SCHEMA,
    EMBEDDINGS,
    EXAMPLES,
    GRPO_MODEL,
    LOW_CLUSTERS,
    MERGED,
    QUALITY_CLASSES,
    SFT_MODEL,
)
from mixray.errors import InputError
from mixray.io.rundir import output_hash, read_manifest, write_table
from mixray.schema import EXAMPLE_SCHEMA
from mixray.stages.runner import Outputs, Stage

log = logging.getLogger("mixray.lmmixup")


def distilled_id(member_ids: list[str]) -> str:
    """A distillation's id: ``distill:<16 hex of sha256(member ids)>``, stable across runs."""
    return "distill:" + hashlib.sha256("\x1f".join(member_ids).encode()).hexdigest()[:16]


class Distill(Stage):
    """``distill``: low-quality clusters -> distilled pairs (Ray Data), re-scored, ranked, merged."""

    name = "distill"
    requires = (LOW_CLUSTERS, QUALITY_CLASSES, EMBEDDINGS, EXAMPLES)
    outputs = (DISTILLED, DISTILL_REJECTS, MERGED)
    summary = "{kept} kept, {rejected} rejected of {clusters} clusters; {merged} merged"
    seeded = True
    memory_knobs = ("generate.concurrency", "generate.batch_size", "generate.micro_batch", "generate.num_cpus")

    config_path = "lmmixup"  # its settings: cfg.lmmixup

    def config(self) -> dict:
        s = self.section
        return {"generate": s.generate.model_dump(mode="json"), "rewards": s.rewards.model_dump(mode="json"),
                "merge": s.merge.model_dump(mode="json"), "low_below": s.classes.low_below,
                "max_member_chars": s.clusters.max_member_chars, "seed": self.cfg.seed}

    def _distiller(self) -> tuple[str, str | None]:
        """(model path, the stage/artifact it comes from or None for base)."""
        from mixray.models.registry import check_model

        g = self.section.generate
        if g.distiller == "base":
            check_model(g.base_model, "lmmixup.generate.base_model")
            return g.base_model, None
        for artifact, kind in ((GRPO_MODEL, "grpo"), (SFT_MODEL, "sft")):
            m = read_manifest(self.run_dir / artifact.stage)
            done = m is not None and artifact.name in m.get("outputs", {})
            if g.distiller in ("auto", kind) and done:
                return str(artifact.path(self.run_dir).resolve()), artifact.stage
            if g.distiller == kind:
                raise InputError(f"generate.distiller={kind}: run the {artifact.stage} stage first",
                                 where="lmmixup.generate.distiller")
        raise InputError("distill: no distiller; run distill_sft (and distill_grpo) first, or set "
                         "lmmixup.generate.distiller: base", where="lmmixup.generate.distiller")

    def check(self) -> None:
        self.model, self.model_stage = self._distiller()

    def input_hashes(self) -> dict[str, str]:
        h = super().input_hashes()
        if self.model_stage is not None:
            h["distiller"] = output_hash(self.run_dir / self.model_stage, "model")
        else:
            h["distiller"] = self.model
        return h

    def run(self, out: Outputs) -> None:
        from mixray.distributed.runtime import init_ray

        init_ray(self.cfg.ray)
        clusters = pq.read_table(LOW_CLUSTERS.path(self.run_dir))
        if self.section.generate.clusters is not None:
            clusters = clusters.slice(0, self.section.generate.clusters)
        raw = self._generate(clusters)
        parsed, rejects = self._parse(clusters, raw)
        write_table(rejects, out.path(DISTILL_REJECTS))
        table = self._rescore(parsed)
        write_table(table, out.path(DISTILLED))
        merged = self._merge(table)
        write_table(merged, out.path(MERGED))
        kept = int(np.count_nonzero(table.column("kept").to_numpy(zero_copy_only=False)))
        out.counts = {"clusters": clusters.num_rows, "generated": len(raw), "parsed": table.num_rows,
                      "rejected": rejects.num_rows, "kept": kept, "not_kept": table.num_rows - kept,
                      "merged": merged.num_rows,
                      "merged_distilled": min(kept, self.section.merge.top_n)}
        reasons = rejects.column("reason").to_pylist()
        out.extra = {"distiller": self.model, "reject_reasons": {r: reasons.count(r) for r in set(reasons)}}
        log.info("distill: %d clusters -> %d parsed (%d rejected: %s), %d kept after re-scoring; "
                 "merged %d rows", clusters.num_rows, table.num_rows, rejects.num_rows,
                 out.extra["reject_reasons"], kept, merged.num_rows)

    @property
    def _parts(self) -> Path:
        """Where finished generation batches wait for the rest (the resume point of a killed run)."""
        return self.stage_dir / "generated" / f"run-{self.fingerprint[:12]}"

    def reset(self) -> None:
        shutil.rmtree(self.stage_dir / "generated", ignore_errors=True)

    finished = reset  # the parts only serve a resume

    def _generate(self, clusters: pa.Table) -> dict[int, str]:
        """Cluster -> generated text, over a Ray Data actor pool; every finished batch is kept
        in ``generated/`` at once, and a re-run after a kill generates only the rest."""
        import ray

        from mixray.distributed.pipeline import map_with_actors
        from mixray.models.distill import DistillGenerator
        from mixray.models.registry import check_model, worker_model_ref

        g, parts = self.section.generate, self._parts
        texts: dict[int, str] = {}
        for f in sorted(parts.glob("part-*.parquet")):
            t = pq.read_table(f)
            texts |= dict(zip(t.column("cluster").to_pylist(), t.column("output").to_pylist(), strict=True))
        t = clusters.select(["cluster", "prompt"])
        t = t.filter(pa.array([c not in texts for c in t.column("cluster").to_pylist()], pa.bool_()))
        if texts:
            log.info("distill: resuming: %d clusters generated before, %d to go", len(texts), t.num_rows)
        if not t.num_rows:
            return texts
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        refs = [ray.put(t.slice(s, g.batch_size)) for s in range(0, t.num_rows, g.batch_size)]
        check_model(self.model, "lmmixup.generate.base_model", need="model")
        kw = {"model_path": worker_model_ref(self.model),  # an alias resolves on the actor's node
              "max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
              "micro_batch": g.micro_batch, "max_prompt_length": g.max_prompt_length, "seed": self.cfg.seed,
              "precision": g.precision, "repetition_penalty": g.repetition_penalty}
        out = map_with_actors(ray.data.from_arrow_refs(refs), DistillGenerator, kw, g, "lmmixup.generate")
        parts.mkdir(parents=True, exist_ok=True)
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            got = dict(zip(batch["cluster"].tolist(), batch["output"].tolist(), strict=True))
            part = pa.table({"cluster": pa.array(list(got), pa.int64()), "output": pa.array(list(got.values()))})
            tmp = parts / f".part-{min(got)}.tmp"
            pq.write_table(part, tmp)
            os.replace(tmp, parts / f"part-{min(got)}.parquet")
            texts |= got
        return texts

    def _parse(self, clusters: pa.Table, raw: dict[int, str]) -> tuple[dict, pa.Table]:
        from mixray.algorithms.lmmixup import parse_output

        good = {"cluster": [], "instruction": [], "output": [], "member_ids": [], "raw": []}
        bad = {"cluster": [], "reason": [], "raw": []}
        for c, members in zip(clusters.column("cluster").to_pylist(), clusters.column("member_ids").to_pylist(),
                              strict=True):
            text = raw.get(c)
            p = parse_output(text) if text is not None else None
            if p is None or not p.ok:
                bad["cluster"].append(c)
                bad["reason"].append(p.reason if p is not None else "not_generated")
                bad["raw"].append(text or "")
                continue
            for k, v in (("cluster", c), ("instruction", p.question), ("output", p.answer),
                         ("member_ids", members), ("raw", text)):
                good[k].append(v)
        return good, pa.table(bad, schema=DISTILL_REJECT_SCHEMA)

    def _rescore(self, parsed: dict) -> pa.Table:
        """Embed the parsed pairs, kNN-Bayes expected class, kept flag, long-tail rank of the kept."""
        from mixray.algorithms.lmmixup_rewards import KnnBayesRater, long_tail_scores
        from mixray.stages.distill_grpo import rated_library

        s, n = self.section, len(parsed["cluster"])
        ids = [distilled_id(m) for m in parsed["member_ids"]]
        expected, tail, rank = np.zeros(n), np.full(n, np.nan), np.full(n, -1, dtype=np.int64)
        if n:
            lib, classes, T, encoder = rated_library(self.run_dir, s.rewards, self.cfg.seed)
            emb = self._embed(ids, parsed, encoder)
            expected = KnnBayesRater(lib, classes, k=s.rewards.knn_k, good_class=s.classes.low_below,
                                     T=T).expected_class(emb)
        kept = expected >= s.classes.low_below
        if kept.any():
            tail[kept] = long_tail_scores(emb[kept], s.merge.long_tail_k)
            order = np.flatnonzero(kept)[np.argsort(-tail[kept], kind="stable")]
            rank[order] = np.arange(1, len(order) + 1)
        return pa.table({"id": ids, "cluster": pa.array(parsed["cluster"], pa.int64()),
                         "instruction": parsed["instruction"], "output": parsed["output"],
                         "expected_class": expected, "kept": kept, "long_tail": tail,
                         "rank": pa.array(np.where(rank > 0, rank, None).tolist(), pa.int64()),
                         "member_ids": parsed["member_ids"], "raw": parsed["raw"]}, schema=DISTILLED_SCHEMA)

    def _embed(self, ids: list[str], parsed: dict, encoder: str) -> np.ndarray:
        """Embeddings of "instruction\\nresponse" of the parsed pairs, over a Ray Data actor pool."""
        import ray

        from mixray.distributed.pipeline import map_with_actors
        from mixray.models.callables import ENCODERS
        from mixray.models.registry import worker_model_ref

        g = self.section.generate
        t = pa.table({"id": ids, "instruction": parsed["instruction"], "input": [""] * len(ids),
                      "output": parsed["output"]})
        refs = [ray.put(t.slice(s, 256)) for s in range(0, t.num_rows, 256)]
        kw = {"model_path": worker_model_ref(encoder), "text": "full", "normalize": True,
              "max_length": 256, "encode_batch_size": 64}
        out = map_with_actors(ray.data.from_arrow_refs(refs), ENCODERS["sentence-transformers"], kw,
                              g.model_copy(update={"batch_size": 256}), "lmmixup.generate")
        got = {}
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            got |= dict(zip(batch["id"].tolist(), np.asarray(batch["embedding"]), strict=True))
        return np.stack([got[i] for i in ids]).astype(np.float64)

    def _merge(self, table: pa.Table) -> pa.Table:
        """Top N kept distillations (by rank) + the high-quality originals, in the example schema."""
        s = self.section
        t = table.filter(pc.is_valid(table.column("rank"))).sort_by("rank").slice(0, s.merge.top_n)
        n = t.num_rows
        distilled = pa.table({"id": t.column("id"), "source": pa.array(["lmmixup"] * n, pa.string()),
                              "task": pa.array(["distilled"] * n, pa.string()),
                              "instruction": t.column("instruction"), "input": pa.array([""] * n, pa.string()),
                              "output": t.column("output"),
                              "messages": pa.nulls(n, EXAMPLE_SCHEMA.field("messages").type),
                              "quality": t.column("expected_class")}, schema=EXAMPLE_SCHEMA)
        if not s.merge.high_quality:
            return distilled
        cls = pq.read_table(QUALITY_CLASSES.path(self.run_dir), columns=["id", "score", "class"])
        cls = cls.filter(pc.greater_equal(cls.column("class"), s.classes.low_below))
        cls = cls.sort_by([("score", "descending")])
        if s.merge.high_quality_limit is not None:
            cls = cls.slice(0, s.merge.high_quality_limit)
        ex = pq.read_table(EXAMPLES.path(self.run_dir)).cast(EXAMPLE_SCHEMA)
        pos = {v: i for i, v in enumerate(ex.column("id").to_pylist())}
        originals = ex.take(pa.array([pos[i] for i in cls.column("id").to_pylist()], pa.int64()))
        return pa.concat_tables([distilled, originals])
