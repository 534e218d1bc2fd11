"""The imperfect supervision behind the base policy: annotators with systematic biases.

Random label noise would wash out (the model learns the mode); systematic confusions on some
conditions make the supervised base confidently wrong there, which feedback can correct.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fuseloop.scenes.task import NUMBER_WORDS, POSITIONS, Example, Scene, SceneObject, describe

_MIRROR = {"top left": "top right", "top right": "top left", "bottom left": "bottom right", "bottom right": "bottom left"}
_COLOUR_SWAP = {"yellow": "green", "green": "yellow", "blue": "red", "red": "blue"}


@dataclass(frozen=True)
class BiasedAnnotator:
    """Labels examples; on biased conditions it gives a confusion with probability `bias_rate`.

    Biased conditions: the colour of triangles (swapped colours), the position of circles
    (mirrored left/right), counts of three (said "two"), and descriptions that mention a
    triangle (its colour swapped).
    """

    bias_rate: float = 0.7

    def biased(self, example: Example) -> bool:
        scene = example.scene
        if example.kind == "colour":
            return example.target == "triangle"
        if example.kind == "position":
            return example.target == "circle"
        if example.kind == "count":
            return len(scene.objects) == 3
        return any(o.shape == "triangle" for o in scene.objects)

    def confusion(self, example: Example) -> str:
        scene = example.scene
        if example.kind == "colour":
            return _COLOUR_SWAP[scene.find(example.target).colour]
        if example.kind == "position":
            return _MIRROR[scene.find(example.target).position]
        if example.kind == "count":
            return NUMBER_WORDS[len(scene.objects) - 1]
        swapped = tuple(
            SceneObject(o.shape, _COLOUR_SWAP[o.colour], o.size, o.position) if o.shape == "triangle" else o
            for o in scene.objects
        )
        return describe(Scene(swapped))

    def label(self, example: Example, rng: random.Random) -> str:
        if self.biased(example) and rng.random() < self.bias_rate:
            return self.confusion(example)
        return example.answer

    def share_wrong(self, examples: list[Example]) -> float:
        """Expected share of wrong labels over `examples`."""
        return self.bias_rate * sum(self.biased(e) for e in examples) / max(1, len(examples))


assert set(_MIRROR) == set(POSITIONS)
