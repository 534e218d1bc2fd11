"""Model inputs from contexts and texts, through the shared Preprocessor (the serving one)."""

from __future__ import annotations

import numpy as np
import torch

from fuseloop.preprocessing import Preprocessor
from trainer.signals import Context


class ContextTensors:
    """Decodes each distinct image and tokenizes each distinct text once; gives batched tensors
    for lists of contexts."""

    def __init__(self, pre: Preprocessor) -> None:
        self.pre = pre.memoized(maxsize=None)
        self._pixels: dict[bytes, np.ndarray] = {}

    def pixels(self, contexts: list[Context]) -> torch.Tensor:
        out = []
        for c in contexts:
            if c.image not in self._pixels:
                self._pixels[c.image] = self.pre.image(c.image)
            out.append(self._pixels[c.image])
        return torch.from_numpy(np.stack(out))

    def inputs(self, contexts: list[Context]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = self.pre.prompts([c.prompt for c in contexts])
        return self.pixels(contexts), torch.from_numpy(ids), torch.from_numpy(mask)

    def responses(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.pre.responses(texts)
        return torch.from_numpy(ids), torch.from_numpy(mask)


def tokens_to_inputs(tokens: torch.Tensor, bos_id: int, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled tokens (B, T) (EOS then PAD) -> decoder inputs [BOS] + tokens and their mask,
    which covers every token up to and including the first EOS."""
    B = tokens.shape[0]
    ids = torch.cat([torch.full((B, 1), bos_id, dtype=tokens.dtype), tokens], dim=1)
    is_eos = (tokens == eos_id).int()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0  # strictly after the first EOS
    mask = torch.cat([torch.ones(B, 1, dtype=torch.long), (~after_eos).long()], dim=1)
    return ids * mask, mask
