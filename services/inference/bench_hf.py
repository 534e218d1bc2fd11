"""The Hugging Face families' parts of `fuseloop bench inference --model hf-...`: the model the
bench serves (a tiny family model at a size that means something on CPU, published into a
repository as the trainer publishes), and the contender a user would pick instead of the service:
the same model's `generate()` in PyTorch, batched, loaded from its `save_pretrained` directory.

Generic over the Hugging Face families: each has a builder in `fuseloop.families.tiny` and a module
whose `load(directory)` gives a bundle with `.model`, `.tokenizer` and `.inputs(images, prompts)`
(the model's own processor, prompts chat-templated and left-padded, as `generate()` wants them).
"""

from __future__ import annotations

import contextlib
import importlib
import io
from dataclasses import dataclass
from pathlib import Path

from fuseloop.errors import UserError

# model name -> (family module, tiny builder)
HF_MODELS = {
    "hf-encoder-decoder": ("fuseloop.families.hf_encoder_decoder", "build_encoder_decoder"),
    "hf-llava": ("fuseloop.families.hf_llava", "build_llava"),
}


@dataclass(frozen=True)
class HFBenchModel:
    """The bench's model: random weights (speed does not depend on them), initialized wide so that
    greedy answers vary by image and prompt, as the test fixtures do."""

    family: str
    d_model: int = 256
    layers: int = 4  # vision and text stacks each
    heads: int = 4
    init_std: float = 0.2

    def describe(self) -> str:
        return (f"{self.family}, random weights, d_model {self.d_model}, {self.layers}+{self.layers} layers, "
                f"{self.heads} heads")


def family_module(family: str):
    if family not in HF_MODELS:
        raise UserError(f"--model {family}: not a Hugging Face family the bench knows; known: {', '.join(HF_MODELS)}")
    return importlib.import_module(HF_MODELS[family][0])


def build_model(spec: HFBenchModel, directory: Path) -> Path:
    """A `save_pretrained` directory of the family's tiny model at the spec's size."""
    from fuseloop.families import family_for, tiny

    family_for(spec.family)  # an unregistered family fails here, with the known ones named
    build = getattr(tiny, HF_MODELS[spec.family][1])
    cfg = tiny.TinyConfig(d_model=spec.d_model, n_heads=spec.heads, n_kv_heads=max(1, spec.heads // 2),
                          n_vision_layers=spec.layers, n_text_layers=spec.layers, init_std=spec.init_std)
    return build(directory, cfg)


def publish_model(family: str, model_dir: Path, repo_dir: Path) -> Path:
    """The model in `model_dir` (with a fresh reward head) as version 1 of a new repository at `repo_dir`."""
    from fuseloop.checkpoint import Checkpoint
    from fuseloop.families import family_for
    from fuseloop.preprocessing import PreprocessConfig, Preprocessor
    from fuseloop.repository import ModelRepository
    from trainer.export import publish

    fam = family_for(family)
    bundle = family_module(family).load(model_dir)
    policy = bundle.model.eval()
    ckpt = Checkpoint(fam, policy, fam.reward_model_from_policy(policy).eval(),
                      Preprocessor(bundle.tokenizer, PreprocessConfig()))
    publish(ckpt, ModelRepository(repo_dir))
    return repo_dir


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` while inside (the process's own setting is restored)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class HFGenerate:
    """What a user would run instead of the service: the model directory loaded as `transformers`
    loads it, then `model.generate()` greedy on a batch of images and prompts, texts decoded."""

    def __init__(self, family: str, model_dir: Path, threads: int) -> None:
        bundle = family_module(family).load(model_dir)
        bundle.model.eval()
        self.bundle, self.threads = bundle, threads
        self.eos = bundle.tokenizer.eos_token_id
        self.parameters = sum(p.numel() for p in bundle.model.parameters())

    def generate(self, w, idx: list[int], max_new: int, temperature: float = 0.0) -> int:
        """One batch of the workload's rows `idx` (greedy; `temperature` is there for the raw
        contender's signature); returns the tokens generated, EOS included, as the service counts."""
        import torch
        from PIL import Image

        model, tok = self.bundle.model, self.bundle.tokenizer
        with torch_threads(self.threads), torch.inference_mode():
            images = [Image.open(io.BytesIO(w.images[i])).convert("RGB") for i in idx]
            pixel_values, ids, mask = self.bundle.inputs(images, [w.prompts[i] for i in idx])
            prompt = ({"decoder_input_ids": ids, "decoder_attention_mask": mask} if model.config.is_encoder_decoder
                      else {"input_ids": ids, "attention_mask": mask})
            out = model.generate(pixel_values=pixel_values, **prompt, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            new = out[:, ids.shape[1]:]
            tok.batch_decode(new, skip_special_tokens=True)  # as the service answers text
        # Rows end at their first EOS; after it generate() pads. (A random model also emits the pad id
        # as a real token, so padding can't be told from tokens by value.)
        is_eos = (new == self.eos).int()
        ended = is_eos.any(dim=1)
        lengths = torch.where(ended, is_eos.argmax(dim=1) + 1, torch.full_like(ended, new.shape[1], dtype=torch.long))
        return int(lengths.sum())
