"""The Hugging Face families' session runs (tests/test_hf_families.py, and their published versions
for tests/test_hf_encoder_decoder_family.py and tests/test_hf_llava_family.py): each built, adapted
and published once per session, on first use."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from fuseloop.checkpoint import Checkpoint
from fuseloop.families import family_for, hf_encoder_decoder, hf_llava, hf_lora
from fuseloop.families.hf_onnx import session
from fuseloop.families.tiny import TinyConfig, build_encoder_decoder, build_llava
from fuseloop.preprocessing import PreprocessConfig, Preprocessor
from fuseloop.repository import MODELS, Manifest, ModelRepository
from fuseloop.scenes import make_split, render
from trainer.export import publish

MAX_NEW = 12


def decoder_weights(graph: Path) -> set[str]:
    """The names of the policy decoder's weights an exported graph holds (its initializers)."""
    import onnx

    return {i.name for i in onnx.load(str(graph), load_external_data=False).graph.initializer if ".decoder." in i.name}


def assert_cross_attention_is_projected_once(encoder_graph: Path, decoder_graph: Path) -> None:
    """An encoder-decoder's graphs: the encoder graph holds the decoder weights that project the
    image tokens into cross-attention keys and values (and no others: the dummy pass that runs
    them leaves nothing else behind), and the step graph holds none of them."""
    kv = decoder_weights(encoder_graph)
    assert kv, "the encoder graph computes no cross-attention cache"
    assert not kv & decoder_weights(decoder_graph), "the decoder graph still projects the image tokens"


def hf_generate_encoder_decoder(model, pixel_values, ids, max_new):
    return model.generate(pixel_values=pixel_values, decoder_input_ids=ids, max_new_tokens=max_new, do_sample=False)


def hf_generate_llava(model, pixel_values, ids, max_new):
    return model.generate(pixel_values=pixel_values, input_ids=ids, attention_mask=torch.ones_like(ids),
                          max_new_tokens=max_new, do_sample=False)


FAMILIES = {
    "encoder_decoder": (hf_encoder_decoder, build_encoder_decoder, hf_generate_encoder_decoder),
    "llava": (hf_llava, build_llava, hf_generate_llava),
}
FAMILY_NAMES = {"encoder_decoder": "hf-encoder-decoder", "llava": "hf-llava"}  # the registry's names


@dataclass
class FamilyRun:
    name: str
    module: object
    base_dir: Path
    base: torch.nn.Module  # the policy before LoRA
    lora: torch.nn.Module  # the peft-wrapped policy after a few adapter steps
    policy_dir: Path  # the merged policy, saved
    bundle: object  # loaded back from policy_dir
    reward: torch.nn.Module
    paths: dict[str, Path]
    sessions: dict
    generate: object
    # The family interface's checkpoint, published as version 1 of `repo`.
    ckpt: Checkpoint | None = None
    repo: ModelRepository | None = None
    manifest: Manifest | None = None

    def batch(self, examples, responses=None):
        images = [render(e.scene) for e in examples]
        pixels, ids, mask = self.bundle.inputs(images, [e.prompt for e in examples])
        r_ids, r_mask = self.bundle.responses(responses or [e.answer for e in examples])
        return pixels, ids, mask, r_ids, r_mask


def _train(model, module, bundle, examples, steps: int, lr: float, batch: int = 8) -> None:
    """Teacher-forced steps on the task's answers."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for step in range(steps):
        chunk = [examples[(step * batch + i) % len(examples)] for i in range(batch)]
        pixels, ids, mask = bundle.inputs([render(e.scene) for e in chunk], [e.prompt for e in chunk])
        r_ids, r_mask = bundle.responses([e.answer for e in chunk])
        logp = module.sequence_logprobs(model, pixels, ids, mask, r_ids, r_mask)
        loss = -logp.sum() / r_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_family_run(name: str, root: Path) -> FamilyRun:
    """build -> LoRA steps on the task -> merge -> save -> reload -> publish. The models are random,
    initialized wide (init_std) so that their greedy answers differ by image and prompt."""
    module, build, generate = FAMILIES[name]
    torch.manual_seed(0)
    base_dir = build(root / "base", TinyConfig(init_std=0.2))
    bundle = module.load(base_dir)
    base = copy.deepcopy(bundle.model)
    lora = hf_lora.add_lora(bundle.model, rank=4)
    _train(lora, module, bundle, make_split("train", 16), steps=2, lr=5e-3)
    bundle.model = hf_lora.merged(lora)
    bundle.save(root / "policy")
    loaded = module.load(root / "policy")
    loaded.model.eval()
    reward = module.reward_model(loaded.model).eval()
    run = FamilyRun(name, module, base_dir, base, lora, root / "policy", loaded, reward, {}, {}, generate)
    # Both exported once, as the trainer publishes them: the family interface's checkpoint, version 1.
    family = family_for(FAMILY_NAMES[name])
    config = family.preprocess_config(loaded.model, loaded.tokenizer, PreprocessConfig())
    run.ckpt = Checkpoint(family, loaded.model, reward, Preprocessor(loaded.tokenizer, config, loaded.image_processor))
    run.repo = ModelRepository(root / "repo")
    run.manifest = publish(run.ckpt, run.repo)
    run.paths = {m: run.repo.model_path(m, run.manifest.version) for m in MODELS}
    run.sessions = {k: session(p) for k, p in run.paths.items()}
    return run


class FamilyRuns:
    """Runs by family name, each built on first use (the session fixture `hf_family_runs`)."""

    def __init__(self, tmp_path_factory) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.runs: dict[str, FamilyRun] = {}

    def __getitem__(self, name: str) -> FamilyRun:
        if name not in self.runs:
            self.runs[name] = build_family_run(name, self.tmp_path_factory.mktemp(f"hf-{name}"))
        return self.runs[name]
