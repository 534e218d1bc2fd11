""""scenes": the built-in multimodal task. Procedural images of shapes, questions about them,
ground-truth answers, and a gold oracle that scores any answer."""

from fuseloop.scenes.task import (
    COLOURS,
    POSITIONS,
    QUESTION_KINDS,
    SHAPES,
    SIZES,
    Example,
    Scene,
    SceneObject,
    SceneTaskConfig,
    make_examples,
    make_split,
    render,
    alternative_answer,
    png_bytes,
    task_texts,
)
from fuseloop.scenes.oracle import GoldOracle
from fuseloop.scenes.annotator import BiasedAnnotator

__all__ = [
    "COLOURS", "POSITIONS", "QUESTION_KINDS", "SHAPES", "SIZES",
    "Example", "Scene", "SceneObject", "SceneTaskConfig", "make_examples", "make_split", "render",
    "alternative_answer", "png_bytes", "task_texts",
    "GoldOracle", "BiasedAnnotator",
]
