"""mixture (LM-Mixup 2): the distiller's training pairs, cluster -> one distilled pair.

Two sources (``lmmixup.mixture``), both optional, at least one on:

- ``files``: MIXTURE-format records (jsonl / json / parquet / csv, read by the ingest
  readers): ``instruction`` (the merge instruction), ``input`` (the cluster: members
  ``"Q: …\\n A: …"`` joined by blank lines) and ``output`` (the distilled pair, with or
  without ``<think>``/``<answer>`` tags). The user turn is ``instruction + "\\n\\n" + input``.
  A record whose output has no ``Q: … A: …`` is counted in ``file_rejected`` (with the
  reason in the log), never trained on.
- ``degrade``: pairs made offline from high-quality examples (``imperfect/classes.parquet``,
  class ≥ ``low_below``): a seeded sample of ``targets`` examples, each turned into a
  synthetic cluster of ``min_members..max_members`` degraded copies (truncation, dropped
  sentences, typos, near-duplicate rewrites), whose target is the original.

Output ``<run_dir>/mixture/pairs.parquet``: ``id, origin, target_id, prompt, target,
reference, members`` (``contracts.MIXTURE_PAIRS``).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mixray.contracts import EXAMPLES, MIXTURE_PAIRS, PAIR_SCHEMA, QUALITY_CLASSES
from mixray.errors import InputError
from mixray.io.rundir import file_sha256, write_table
from mixray.stages.imperfect import cut, example_texts
from mixray.stages.runner import Outputs, Stage

log = logging.getLogger("mixray.lmmixup")


def _pair_id(*parts: str) -> str:
    return "pair:" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def mixture_file_pairs(path: str) -> tuple[list[dict], dict[str, int]]:
    """The pairs of one MIXTURE-format file, and the count of unusable records per reason."""
    from mixray.algorithms.lmmixup import (
        THINK_DEGRADED,
        Parsed,
        answer_pair,
        parse_output,
        target_text,
    )
    from mixray.io.readers import read_source, resolve_path

    pairs, bad = [], {}
    for rec in read_source(resolve_path(path), "auto"):
        v = rec.value if isinstance(rec.value, dict) else {}
        ins, inp, out = (str(v.get(k) or "") for k in ("instruction", "input", "output"))
        parsed = parse_output(out) if "<answer>" in out else _bare(out, Parsed)
        reason = rec.error or parsed.reason or (None if inp.strip() else "empty_input")
        if reason:
            bad[reason] = bad.get(reason, 0) + 1
            continue
        n = inp.count("Q:")
        target = out.strip() if "<answer>" in out else target_text(parsed.question, parsed.answer,
                                                                    THINK_DEGRADED.format(n=n))
        pairs.append({"id": _pair_id(path, str(rec.row)), "origin": "mixture", "target_id": None,
                      "prompt": f"{ins.strip()}\n\n{inp.strip()}" if ins.strip() else inp.strip(),
                      "target": target, "reference": answer_pair(parsed.question, parsed.answer),
                      "members": n})
    return pairs, bad


def _bare(out: str, parsed_cls):
    """``Q: … A: …`` without tags -> Parsed."""
    from mixray.algorithms.lmmixup import QA_SPLIT

    m = QA_SPLIT.search(out)
    if m is None or not m.group(1).strip() or not m.group(2).strip():
        return parsed_cls(reason="no_question_answer")
    return parsed_cls(m.group(1).strip(), m.group(2).strip())


class Mixture(Stage):
    """``mixture``: MIXTURE files and/or degraded high-quality examples -> the distiller's pairs."""

    name = "mixture"
    requires = (EXAMPLES, QUALITY_CLASSES)
    outputs = (MIXTURE_PAIRS,)
    summary = "{pairs} pairs"
    seeded = True

    @property
    def section(self):
        return self.cfg.lmmixup

    def config(self) -> dict:
        s = self.section
        return {"mixture": s.mixture.model_dump(mode="json"), "low_below": s.classes.low_below,
                "max_member_chars": s.clusters.max_member_chars, "seed": self.cfg.seed}

    def input_hashes(self) -> dict[str, str]:
        from mixray.io.readers import resolve_path

        h = super().input_hashes()
        for i, f in enumerate(self.section.mixture.files):
            p = resolve_path(f)
            if not p.is_file():
                raise InputError(f"MIXTURE file {f} not found", where=f"lmmixup.mixture.files.{i}")
            h[f"mixture_file_{i}"] = file_sha256(p)
        return h

    def run(self, out: Outputs) -> None:
        m = self.section.mixture
        pairs, bad = [], {}
        for f in m.files:
            got, rejected = mixture_file_pairs(f)
            pairs += got
            for k, v in rejected.items():
                bad[k] = bad.get(k, 0) + v
            log.info("mixture: %s -> %d pairs (%d unusable: %s)", f, len(got), sum(rejected.values()), rejected)
        n_files = len(pairs)
        if m.degrade:
            pairs += self._degraded()
        if not pairs:
            raise InputError("mixture: no training pairs (no usable MIXTURE record, no high-quality "
                             "example short enough to degrade)", where="lmmixup.mixture")
        write_table(pa.Table.from_pylist(pairs, schema=PAIR_SCHEMA), out.path(MIXTURE_PAIRS))
        out.counts = {"pairs": len(pairs), "from_files": n_files, "degraded": len(pairs) - n_files,
                      "file_rejected": sum(bad.values())}
        out.extra = {"file_rejects": bad}

    def _degraded(self) -> list[dict]:
        from mixray.algorithms.lmmixup import (
            THINK_DEGRADED,
            answer_pair,
            cluster_prompt,
            degraded_members,
            target_text,
        )

        s, m = self.section, self.section.mixture
        t = pq.read_table(QUALITY_CLASSES.path(self.run_dir), columns=["id", "class"])
        high = [i for i, c in zip(t.column("id").to_pylist(), t.column("class").to_pylist(), strict=True)
                if c >= s.classes.low_below]
        texts = example_texts(EXAMPLES.path(self.run_dir), high)
        usable = [i for i in high if len(texts[i][0]) + len(texts[i][1]) <= m.max_target_chars]
        rng = np.random.default_rng([self.cfg.seed, 0x3157])
        if m.targets is not None and len(usable) > m.targets:
            usable = [usable[j] for j in np.sort(rng.choice(len(usable), m.targets, replace=False))]
        n_chars, out = s.clusters.max_member_chars, []
        for i in usable:
            q, a = texts[i]
            n = int(rng.integers(m.min_members, m.max_members + 1))
            members = degraded_members(q, a, n, rng, m.kinds)
            out.append({"id": _pair_id("degraded", i), "origin": "degraded", "target_id": i,
                        "prompt": cluster_prompt([(cut(x, n_chars), cut(y, n_chars)) for x, y in members]),
                        "target": target_text(q, a, THINK_DEGRADED.format(n=n)),
                        "reference": answer_pair(q, a), "members": n})
        log.info("mixture: %d high-quality examples, %d short enough (<= %d chars), %d degraded into "
                 "synthetic clusters", len(high), len([i for i in high if len(texts[i][0]) + len(texts[i][1])
                                                       <= m.max_target_chars]), m.max_target_chars, len(out))
        return out
