"""Generation backends: where the greedy completions of an evaluation come from.

The default is the model itself (Hugging Face ``generate`` through the TransformerBridge), so every hook an
intervention registers acts during generation. A serving engine cannot run our hooks; it fits the permanent form
of the intervention: orthogonalize the weights, export them (``refusal-circuits orthogonalize``), and serve the
export, e.g. a 70B model across GPUs with vLLM's tensor parallelism. Any callable with the :class:`Generator`
signature plugs into :func:`refusal_circuits.evaluation.evaluate_refusal`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from refusal_circuits.errors import InputError


@runtime_checkable
class Generator(Protocol):
    """Greedy completions (text, special tokens removed) of chat-formatted instructions, in input order.

    Runtime-checkable (by the presence of ``name`` and ``__call__``), so ``isinstance`` and the tests' type checks
    accept any object that has both.
    """

    name: str

    def __call__(self, instructions: Sequence[str], *, max_new_tokens: int) -> list[str]: ...


class VLLMGenerator:
    """Greedy generation with vLLM (``pip install "refusal-circuits[vllm]"``, a GPU machine).

    Args:
        model: a Hugging Face id or local directory (an `orthogonalize` export for the ablated model).
        engine_kwargs: passed to ``vllm.LLM``, e.g. ``tensor_parallel_size=8`` for a 70B model on 8 GPUs.

    Prompts are formatted by the tokenizer's own chat template with the generation prompt, as
    :func:`refusal_circuits.chat.tokenize_chat` does, and decoded with temperature 0.
    """

    name = "vllm"

    def __init__(self, model: str, **engine_kwargs: Any) -> None:
        try:
            vllm = importlib.import_module("vllm")
        except ImportError:
            raise InputError('the vllm backend needs vLLM: pip install "refusal-circuits[vllm]" (on a machine '
                             "with a GPU vLLM supports)") from None
        self._vllm = vllm
        self.model = model
        self.llm = vllm.LLM(model=model, **engine_kwargs)

    def __call__(self, instructions: Sequence[str], *, max_new_tokens: int) -> list[str]:
        tokenizer = self.llm.get_tokenizer()
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True) for text in instructions]
        params = self._vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True)
        outputs = self.llm.generate(prompts, params)
        return [o.outputs[0].text for o in outputs]


BACKENDS = {"vllm": VLLMGenerator}


def make_generator(name: str, model: str, **engine_kwargs: Any) -> Generator:
    """The named backend's generator for ``model``."""
    if name not in BACKENDS:
        raise InputError(f"unknown generation backend {name!r}; known: hf, {', '.join(BACKENDS)}")
    return BACKENDS[name](model, **engine_kwargs)
