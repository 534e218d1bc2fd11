"""Model families by name. Adding one is a module that implements `ModelFamily` and `Stepper`
(fuseloop/families/base.py) and a line in FAMILIES (a Hugging Face family: also the architecture
its config.json names, in HF_ARCHITECTURES); a family is imported only when asked for.

A version's manifest and a checkpoint record their family's name; those written before families
existed have none, and mean "builtin".
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from fuseloop.errors import UserError
from fuseloop.families.base import DecodeState, Graph, GraphRunner, ModelFamily, Stepper

DEFAULT = "builtin"
FAMILIES: Mapping[str, str] = {  # name -> "module:class"
    "builtin": "fuseloop.families.builtin:BuiltinFamily",
    "hf-encoder-decoder": "fuseloop.families.hf_encoder_decoder:HFEncoderDecoderFamily",
    "hf-llava": "fuseloop.families.hf_llava:HFLlavaFamily",
}

# config.json "architectures" -> family: how `fuseloop import hf:DIR` knows what it was given.
HF_ARCHITECTURES: Mapping[str, str] = {
    "VisionEncoderDecoderModel": "hf-encoder-decoder",
    "LlavaForConditionalGeneration": "hf-llava",
}

__all__ = ["HF_ARCHITECTURES", "DEFAULT", "FAMILIES", "DecodeState", "Graph", "GraphRunner", "ModelFamily", "Stepper", "family_for"]


def family_for(source: object = None) -> ModelFamily:
    """The family of a manifest (its `family`), a config dict (its "family" key), a name, or None
    (the default). Raises UserError naming the known families for an unknown one."""
    if source is None:
        name = DEFAULT
    elif isinstance(source, str):
        name = source
    elif isinstance(source, Mapping):
        name = source.get("family", DEFAULT)
    else:
        name = getattr(source, "family", None) or DEFAULT
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)()
