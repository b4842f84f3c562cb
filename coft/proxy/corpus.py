"""The pretraining corpus of the proxy CLIP: random scenes and captions that describe them.

Captions name the object (digits as words and as numerals), and sometimes its colour, size,
position, the background, the font and the degradation, in several wordings. Only the fonts,
backgrounds and degradations listed as PRETRAIN_* in `render.py` appear here.
"""

from __future__ import annotations

import numpy as np

from coft.proxy.render import (
    COLOURS,
    DIGIT_WORDS,
    POSITIONS,
    PRETRAIN_BACKGROUNDS,
    PRETRAIN_DEGRADATIONS,
    PRETRAIN_FONTS,
    SHAPES,
    SIZES,
    Scene,
)

_FONT_WORDS = {"typeset": "printed", "segment": "digital", "stroke": "plain"}
_BACKGROUND_WORDS = {"plain": "plain", "stripes": "striped", "dots": "dotted", "checkerboard": "checkered",
                     "gradient": "gradient", "grid": "grid"}


def random_scene(rng: np.random.Generator) -> Scene:
    kind = "digit" if rng.random() < 0.5 else "shape"
    colour, background_colour = rng.choice(list(COLOURS), size=2, replace=False)
    degradations = []
    if rng.random() < 0.2:
        degradations.append(str(rng.choice(PRETRAIN_DEGRADATIONS)))
    return Scene(
        kind=kind,
        label=int(rng.integers(10 if kind == "digit" else len(SHAPES))),
        colour=str(colour),
        background=str(rng.choice(PRETRAIN_BACKGROUNDS, p=[0.5, 0.1, 0.1, 0.1, 0.1, 0.1])),
        background_colour=str(background_colour),
        size=str(rng.choice(list(SIZES))),
        position=str(rng.choice(list(POSITIONS), p=[0.7, 0.075, 0.075, 0.075, 0.075])),
        font=str(rng.choice(PRETRAIN_FONTS)),
        filled=bool(rng.random() < 0.8),
        degradations=degradations,
        seed=int(rng.integers(2**31)),
    )


def scene_attributes(scene: Scene) -> dict[str, object]:
    """What a caption may say about a scene; a caption is true of every scene that agrees on what it says."""
    return {
        "object": (scene.kind, scene.label),
        "colour": scene.colour,
        "size": scene.size,
        "background": (scene.background, scene.background_colour),
        "position": scene.position,
        "font": scene.font if scene.kind == "digit" else None,
        "filled": scene.filled if scene.kind == "shape" else None,
        "degradation": scene.degradations[0] if scene.degradations else None,
    }


def caption(scene: Scene, rng: np.random.Generator) -> tuple[str, dict[str, object]]:
    """A caption in one of many wordings, and the attributes it mentions."""
    attributes = scene_attributes(scene)
    said: dict[str, object] = {"object": attributes["object"]}

    def maybe(key: str, probability: float) -> bool:
        if attributes[key] in (None, "medium", "center") or rng.random() >= probability:
            return False
        said[key] = attributes[key]
        return True

    if scene.kind == "digit":
        noun = DIGIT_WORDS[scene.label] if rng.random() < 0.6 else str(scene.label)
    else:
        noun = SHAPES[scene.label]
    adjectives = []
    if maybe("size", 0.4):
        adjectives.append(scene.size)
    if maybe("colour", 0.5):
        adjectives.append(scene.colour)
    if maybe("font", 0.2):
        adjectives.append(_FONT_WORDS[scene.font])
    if maybe("filled", 0.2):
        adjectives.append("filled" if scene.filled else "outlined")
    phrase = " ".join(adjectives + [noun])
    if scene.kind == "digit" and not adjectives and rng.random() < 0.3:
        phrase = f"the digit {DIGIT_WORDS[scene.label]}" if rng.random() < 0.5 else f"the number {scene.label}"
    else:
        correct_article = "an" if phrase[0] in "aeiou8" else "a"
        phrase = f"{correct_article if rng.random() < 0.8 else 'a'} {phrase}"

    if maybe("degradation", 0.8):
        phrase = f"a {scene.degradations[0]} photo of {phrase}"
    else:
        prefix = str(rng.choice(["a photo of", "a photo of", "a picture of", "an image of", ""]))
        phrase = f"{prefix} {phrase}".strip()

    extras = []
    if maybe("position", 0.4):
        extras.append(f"on the {scene.position}")
    if maybe("background", 0.25):
        extras.append(f"on a {_BACKGROUND_WORDS[scene.background]} {scene.background_colour} background")
    if extras and rng.random() < 0.4:
        # Object named last, after a long preamble: trains the late token positions that
        # learned prompts (16 context tokens before the class name) rely on.
        text = ", ".join(extras) + ", " + phrase + "."
    else:
        text = " ".join([phrase] + extras) + "."
    return text, said


def caption_is_true_of(said: dict[str, object], attributes: dict[str, object]) -> bool:
    return all(attributes[key] == value for key, value in said.items())


def sample(rng: np.random.Generator) -> tuple[Scene, str, dict[str, object]]:
    scene = random_scene(rng)
    text, said = caption(scene, rng)
    return scene, text, said
