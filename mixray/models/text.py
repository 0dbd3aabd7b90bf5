"""Texts built from example columns (what an encoder or scorer reads)."""

from __future__ import annotations

from collections.abc import Sequence

# The example columns an encoder or scorer reads (``id`` to key the result).
TEXT_COLUMNS = ("id", "instruction", "input", "output")

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
