"""A tiny distiller for the LM-Mixup tests: the tiny random Llama taught (a few plain torch steps, no
Ray) to answer the distiller's prompt in the required format, so its generations parse and its
GRPO rewards vary."""

from __future__ import annotations

from pathlib import Path

CLUSTERS = [[("What is 2+2?", "4"), ("2 plus 2?", "four")],
            [("Capital of France?", "Paris"), ("France capital city", "paris")]]
TARGETS = [("What is 2 + 2?", "4"), ("What is the capital of France?", "Paris")]


def taught_distiller(tiny_lm_dir: Path, out: Path, steps: int = 40, prompts: list[str] | None = None) -> Path:
    """The tiny Llama after ``steps`` Adam passes over (cluster prompt -> target) sequences.

    Default: the two ``CLUSTERS`` -> their ``TARGETS`` (loss on the whole sequence). With
    ``prompts`` (user turns, e.g. a run's real clusters): each -> the first target, the loss
    on the target only, so the model answers any such prompt in the format.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from mixray.algorithms.lmmixup import cluster_prompt, target_text
    from mixray.models.distill import chat_prompt
    from mixray.models.sft import load_tokenizer

    tok = load_tokenizer(str(tiny_lm_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    pairs = [(cluster_prompt(m), target_text(q, a, "same question"))
             for m, (q, a) in zip(CLUSTERS, TARGETS, strict=True)] if prompts is None else \
        [(p, target_text(*TARGETS[0], "same question")) for p in prompts]
    batches = []
    for prompt, target in pairs:
        head = tok(chat_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        tail = tok(target + tok.eos_token, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([head + tail])
        labels = ids.clone()
        if prompts is not None:
            labels[0, : len(head)] = -100
        batches.append((ids, labels))
    for _ in range(steps):
        for ids, labels in batches:
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
