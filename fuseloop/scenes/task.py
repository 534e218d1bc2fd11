"""Scenes and questions: rendering, prompts and ground-truth answers, deterministic by seed."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Quadrants in reading order; every object sits in its own quadrant.
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
QUESTION_KINDS = ("colour", "count", "position", "describe")

PROMPTS = {
    "colour": ("what colour is the {shape} ?", "which colour is the {shape} ?", "what color is the {shape} ?"),
    "count": ("how many shapes are there ?", "how many shapes can you see ?", "count the shapes ."),
    "position": ("where is the {shape} ?", "where is the {shape} in the picture ?"),
    "describe": ("describe the scene .", "what is in the picture ?"),
}

SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}


@dataclass(frozen=True)
class SceneTaskConfig:
    image_size: int = 32
    max_objects: int = 3
    background: tuple[int, int, int] = (245, 245, 245)
    # Share of each question kind; "describe" answers are long, so it is asked less often.
    kind_weights: tuple[float, float, float, float] = (0.3, 0.25, 0.3, 0.15)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at {self.position}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    jitter: tuple[tuple[int, int], ...] = field(default=())  # pixel offsets, rendering only

    def find(self, shape: str) -> SceneObject:
        return next(o for o in self.objects if o.shape == shape)


@dataclass(frozen=True)
class Example:
    """One (scene, question) with its ground truth. `target` is the shape asked about, if any."""

    scene: Scene
    kind: str
    prompt: str
    answer: str
    target: str | None = None


def describe(scene: Scene) -> str:
    ordered = sorted(scene.objects, key=lambda o: POSITIONS.index(o.position))
    return " and ".join(o.phrase() for o in ordered)


def true_answer(scene: Scene, kind: str, target: str | None) -> str:
    if kind == "colour":
        return scene.find(target).colour
    if kind == "position":
        return scene.find(target).position
    if kind == "count":
        return NUMBER_WORDS[len(scene.objects)]
    if kind == "describe":
        return describe(scene)
    raise ValueError(f"unknown question kind {kind!r}")


def random_scene(rng: random.Random, config: SceneTaskConfig) -> Scene:
    n = rng.randint(1, config.max_objects)
    shapes = rng.sample(SHAPES, n)
    positions = rng.sample(POSITIONS, n)
    objects = tuple(
        SceneObject(shape=s, colour=rng.choice(list(COLOURS)), size=rng.choice(SIZES), position=p)
        for s, p in zip(shapes, positions)
    )
    cell = config.image_size // 2
    jitter = tuple((rng.randint(-cell // 10, cell // 10), rng.randint(-cell // 10, cell // 10)) for _ in objects)
    return Scene(objects=objects, jitter=jitter)


def render(scene: Scene, config: SceneTaskConfig = SceneTaskConfig()) -> Image.Image:
    size = config.image_size
    cell = size // 2
    img = Image.new("RGB", (size, size), config.background)
    draw = ImageDraw.Draw(img)
    for i, obj in enumerate(scene.objects):
        row, col = divmod(POSITIONS.index(obj.position), 2)
        dx, dy = scene.jitter[i] if i < len(scene.jitter) else (0, 0)
        cx, cy = col * cell + cell // 2 + dx, row * cell + cell // 2 + dy
        r = cell * (0.42 if obj.size == "large" else 0.24)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_examples(n: int, seed: int, config: SceneTaskConfig = SceneTaskConfig()) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng, config)
        kind = rng.choices(QUESTION_KINDS, weights=config.kind_weights)[0]
        target = rng.choice(scene.objects).shape if kind in ("colour", "position") else None
        prompt = rng.choice(PROMPTS[kind]).format(shape=target)
        out.append(Example(scene, kind, prompt, true_answer(scene, kind, target), target))
    return out


def make_split(split: str, n: int, config: SceneTaskConfig = SceneTaskConfig()) -> list[Example]:
    """Deterministic split: the same (split, n) always gives the same examples."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLIT_SEEDS)}")
    return make_examples(n, seed=SPLIT_SEEDS[split] * 1_000_003, config=config)


def alternative_answer(example: Example, rng: random.Random) -> str:
    """A different, well-formed answer of the same kind (not necessarily wrong for other scenes).

    Used to build contrast pairs from labelled data; it knows the answer format, not the truth.
    """
    scene = example.scene
    if example.kind == "colour":
        return rng.choice([c for c in COLOURS if c != example.answer])
    if example.kind == "position":
        return rng.choice([p for p in POSITIONS if p != example.answer])
    if example.kind == "count":
        return rng.choice([w for w in NUMBER_WORDS.values() if w != example.answer])
    i = rng.randrange(len(scene.objects))
    o = scene.objects[i]
    field_ = rng.choice(("colour", "size", "shape"))
    if field_ == "colour":
        o = SceneObject(o.shape, rng.choice([c for c in COLOURS if c != o.colour]), o.size, o.position)
    elif field_ == "size":
        o = SceneObject(o.shape, o.colour, "small" if o.size == "large" else "large", o.position)
    else:
        o = SceneObject(rng.choice([s for s in SHAPES if s != o.shape]), o.colour, o.size, o.position)
    return describe(Scene(scene.objects[:i] + (o,) + scene.objects[i + 1:]))


def task_texts(config: SceneTaskConfig = SceneTaskConfig()) -> list[str]:
    """Every word the task can say, in prompts and answers: the tokenizer's training text."""
    texts = [t.format(shape=s) for kind in PROMPTS.values() for t in kind for s in SHAPES]
    texts += [f"a {size} {colour} {shape} at {pos} and" for size in SIZES for colour in COLOURS
              for shape in SHAPES for pos in POSITIONS]
    texts += list(NUMBER_WORDS.values())
    return texts
