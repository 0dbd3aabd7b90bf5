"""Texts built from example columns (what an encoder or scorer reads), and conversations.

A *conversation* is what a causal LM is trained on and scored on: a list of turns
``{"role": "system" | "user" | "assistant", "content": str}`` (``conversation``).
A single-turn example is one user turn (instruction + input) and one assistant
turn (output); a multi-turn example (``messages`` from ingest) keeps every turn.
Its *response* is every assistant turn: ``prompt_segments`` cuts a conversation
into (prompt text, response text) segments, the one definition of "response"
that training (``mixray.models.sft``), IFD and SFTMix's training dynamics share.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("mixray.models")

# The example columns an encoder or scorer reads (``id`` to key the result).
TEXT_COLUMNS = ("id", "instruction", "input", "output")
# ... and with the turns of multi-turn examples (null for single-turn ones): what a model that
# computes a response loss reads (IFD, SFTMix's per-checkpoint perplexity).
CONVERSATION_COLUMNS = (*TEXT_COLUMNS, "messages")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def instruction_text(instruction: str, input_: str) -> str:
    """The instruction as QDIT embeds it: instruction, then the input on a new line if any."""
    return f"{instruction}\n{input_}" if input_ else instruction


def build_texts(
    kind: str, instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str]
) -> list[str]:
    """``instruction`` (instruction + input), ``full`` (that + response) or ``output``."""
    if kind == "instruction":
        return [instruction_text(i, x) for i, x in zip(instructions, inputs, strict=True)]
    if kind == "full":
        return [
            instruction_text(i, x) + "\n" + o
            for i, x, o in zip(instructions, inputs, outputs, strict=True)
        ]
    if kind == "output":
        return list(outputs)
    raise ValueError(f"unknown text kind {kind!r}; allowed: instruction, full, output")


def prompt_text(tokenizer, instruction: str, input_: str, system: str | None = None) -> str:
    """The prompt a causal LM sees before the response.

    The model's chat template (one user turn, after a system turn when ``system`` is
    given; generation prompt added) when it has one; the Alpaca template otherwise
    (``system``, then a blank line, before it).
    """
    if getattr(tokenizer, "chat_template", None):
        turns = [{"role": "system", "content": system}] if system else []
        return tokenizer.apply_chat_template(
            [*turns, {"role": "user", "content": instruction_text(instruction, input_)}],
            tokenize=False,
            add_generation_prompt=True,
        )
    if system:
        return f"{system}\n\n" + prompt_text(tokenizer, instruction, input_)
    if input_:
        return ALPACA_PROMPT.format(
            ctx=", paired with an input that provides further context",
            instruction=instruction,
            input_block=f"### Input:\n{input_}\n\n",
        )
    return ALPACA_PROMPT.format(ctx="", instruction=instruction, input_block="")


ALPACA_NEXT_TURN = "\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def conversation(instruction: str, input_: str, output: str, messages: Any = None) -> list[dict[str, str]]:
    """The turns an example is trained on: ``[{role, content}, ...]``, ending with an assistant turn.

    Without ``messages``: one user turn (``instruction_text``) and one assistant turn
    (``output``). With ``messages`` (a multi-turn example): every turn, normalised so
    that a chat template accepts it — empty turns dropped, a system turn kept only
    when it is the first message, turns before the first user turn and after the last assistant turn
    dropped, consecutive turns of one role joined by a blank line. If nothing is
    left (no user turn followed by an assistant turn), the single exchange.
    """
    single = [{"role": "user", "content": instruction_text(instruction, input_)},
              {"role": "assistant", "content": output}]
    if messages is None or len(messages) == 0:
        return single
    turns: list[dict[str, str]] = []
    for k, m in enumerate(messages):
        role, content = str(m["role"]), str(m["content"])
        if not content.strip() or (role == "system" and k > 0):
            continue
        if role == "assistant" and not any(t["role"] == "user" for t in turns):
            continue  # no instruction before it
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": turns[-1]["content"] + "\n\n" + content}
        else:
            turns.append({"role": role, "content": content})
    while turns and turns[-1]["role"] != "assistant":
        turns.pop()
    return turns if any(t["role"] == "assistant" for t in turns) else single


def _render(tokenizer, turns: list[dict[str, str]], prompt: bool) -> str:
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)


def prompt_segments(tokenizer, turns: list[dict[str, str]], first_prompt: str | None = None
                    ) -> list[tuple[str, str]]:
    """``[(prompt text, response text), ...]``: one segment per assistant turn, in order.

    Concatenating ``prompt + response + EOS`` over the segments gives the
    conversation as the model's chat template renders it, or with the Alpaca
    template when the tokenizer has none (later prompts: ``ALPACA_NEXT_TURN``).
    ``first_prompt`` replaces the first prompt (a single-turn example passes
    ``prompt_text(instruction, input)``, whose Alpaca form has an Input block). A
    later prompt is the template's text between the previous response's end-of-turn
    token and the next response; if the template does not reproduce the earlier
    turns verbatim (some templates rewrite past assistant turns), the conversation
    is cut after its first response.
    """
    answers = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
    chat = bool(getattr(tokenizer, "chat_template", None))
    out: list[tuple[str, str]] = []
    consumed = ""
    for k, i in enumerate(answers):
        reply = turns[i]["content"]
        rendered = _render(tokenizer, turns[:i], prompt=True) if chat else ""
        if k == 0:
            user = next(t["content"] for t in turns if t["role"] == "user")
            prompt = first_prompt if first_prompt is not None else (
                rendered if chat else prompt_text(tokenizer, user, ""))
        elif chat:
            if not rendered.startswith(consumed):
                log.warning("the chat template rewrites earlier turns; training on the first "
                            "response of such conversations only")
                return out
            prompt = rendered[len(consumed):]
        else:
            users = [t["content"] for t in turns[answers[k - 1] + 1 : i] if t["role"] == "user"]
            prompt = ALPACA_NEXT_TURN.format(instruction="\n\n".join(users))
        out.append((prompt, reply))
        consumed = rendered + reply + (tokenizer.eos_token or "")
    return out
