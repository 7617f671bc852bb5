"""The scenes data set's caption grammar: scenes to five captions, and captions back to groups.

Unlike the demo's grammar (`demo_captions`: every caption names every object
with a grid position), these captions count ("two striped orange crosses",
"a pair of pink rings"), put textures before or after the noun ("a cyan
hexagon with spots"), relate groups to each other instead of to the frame
("... to the left of ...", "... above them"), name the floor, and take the
sentence shapes of Flickr8k's people: inventories, relations, "there are"
fronted by the place, "a photo of ...", and now and then a gist that names
only the biggest group ("... and some other shapes"). Captions come lower- or
upper-case, with or without a full stop, sometimes as " ." the way Flickr8k's
tokenised text ends. `parse_caption` reads the (kind, colour, count, texture)
groups back out of any caption `describe` writes (also after lower-casing and
punctuation removal), and `caption_correct` grades a caption against a
scene's groups. `TRUTH_RULES` hands both to the scorer
(`captioning.data.scorers.TruthScorer`): a gist caption that names only the
biggest group is wrong, as it should be for a model, and a noun is grounded
in the union of its group's boxes.
"""

from __future__ import annotations

import collections
import re
from typing import NamedTuple

import numpy as np

from captioning.data.drawing import pick
from captioning.data.scenes_drawing import HEIGHT, WIDTH
from captioning.data.scorers import TruthRules, boxes_coverage

CAPTIONS_PER_IMAGE = 5

# Every word maps back to one canonical name; the parser relies on that.
KIND_WORDS = {
    "cross": (("cross", "crosses"),),
    "diamond": (("diamond", "diamonds"), ("lozenge", "lozenges")),
    "hexagon": (("hexagon", "hexagons"),),
    "arrow": (("arrow", "arrows"),),
    "ring": (("ring", "rings"), ("hoop", "hoops")),
}
TEXTURE_ADJECTIVES = {
    "plain": ("plain",),
    "striped": ("striped",),
    "spotted": ("spotted", "dotted"),
    "checkered": ("checkered", "checked"),
}
TEXTURE_NOUNS = {"striped": ("stripes",), "spotted": ("spots", "dots"), "checkered": ("checks",)}
COUNT_WORDS = {1: ("a", "one"), 2: ("two", "a pair of"), 3: ("three",)}
GROUNDS = {
    "wooden": ("on a wooden floor", "on the wooden floor", "on wooden boards", "on a parquet"),
    "tiled": ("on a tiled floor", "on the tiles", "on floor tiles"),
    "carpet": ("on a carpet", "on the carpet", "on a rug"),
}
_WALLS = ("in front of a wall", "against a bare wall", "by the wall")
_RELATIONS = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "near": ("next to", "beside", "near"),
}


class Group(NamedTuple):
    """One mention read from a caption: None where the caption leaves it unresolved."""

    kind: str
    colour: str | None
    count: int | None
    texture: str | None


# --- writing ----------------------------------------------------------------------------------


def _noun_phrase(group: dict, rng: np.random.Generator) -> str:
    """ "two striped orange crosses", "a pink ring with spots", "a pair of plain black hoops"."""
    n = group["count"]
    singular, plural = pick(rng, KIND_WORDS[group["kind"]])
    adjective, trailer = "", ""
    if group["texture"] == "plain":
        adjective = "plain " if rng.random() < 0.3 else ""
    elif rng.random() < 0.6:
        adjective = pick(rng, TEXTURE_ADJECTIVES[group["texture"]]) + " "
    else:
        trailer = " with " + pick(rng, TEXTURE_NOUNS[group["texture"]])
    words = f"{adjective}{group['colour']} {singular if n == 1 else plural}{trailer}"
    count = pick(rng, COUNT_WORDS[n])
    if count == "a" and words[0] in "aeiou":
        count = "an"
    return f"{count} {words}"


def _verb(group: dict, rng: np.random.Generator) -> str:
    return pick(rng, ("is", "lies", "sits", "rests") if group["count"] == 1
                else ("are", "lie", "sit", "rest"))  # fmt: skip


def _listing(phrases: list[str], rng: np.random.Generator) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + pick(rng, (" and ", " and ", ", and ")) + phrases[-1]


def relation(a: dict, b: dict) -> str:
    """Where group a is with respect to group b, from the centres of their tokens."""
    dx, dy = np.asarray(a["centre"]) - np.asarray(b["centre"])
    if abs(dx) > 1.5 * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) > 1.5 * abs(dx):
        return "above" if dy < 0 else "below"
    return "near"


def _inventory(groups, ground, rng):
    return _listing([_noun_phrase(g, rng) for g in groups], rng) + " " + pick(rng, GROUNDS[ground])


def _relations(groups, ground, rng):
    first = groups[0]
    if len(groups) == 1:
        return f"{_noun_phrase(first, rng)} {_verb(first, rng)} {pick(rng, GROUNDS[ground])}"
    anchor = groups[1]
    text = f"{_noun_phrase(first, rng)} {_verb(first, rng)} "
    text += f"{pick(rng, _RELATIONS[relation(first, anchor)])} {_noun_phrase(anchor, rng)}"
    if len(groups) == 3:
        last = groups[2]
        pronoun = "it" if anchor["count"] == 1 else "them"
        text += pick(rng, (", and ", " while ", " and "))
        text += f"{_noun_phrase(last, rng)} {_verb(last, rng)} "
        text += f"{pick(rng, _RELATIONS[relation(last, anchor)])} {pronoun}"
    return text


def _place_first(groups, ground, rng):
    verb = pick(rng, ("there is", "lies", "sits") if groups[0]["count"] == 1
                else ("there are", "lie", "sit"))  # fmt: skip
    listing = _listing([_noun_phrase(g, rng) for g in groups], rng)
    return f"{pick(rng, GROUNDS[ground])} {verb} {listing}"


def _framed(groups, ground, rng):
    frame = pick(rng, ("a photo of", "a picture showing", "a room with", "a view of"))
    text = f"{frame} {_listing([_noun_phrase(g, rng) for g in groups], rng)}"
    return text + " " + pick(rng, (*GROUNDS[ground], *_WALLS))


def _gist(groups, ground, rng):
    """Only the biggest group, as people often do: the caption is not graded correct."""
    biggest = max(groups, key=lambda g: (g["count"], g["size"]))
    rest = pick(rng, ("and some other shapes", "among other shapes", "with other things"))
    return f"{_noun_phrase(biggest, rng)} {rest} {pick(rng, GROUNDS[ground])}"


_STYLES = (_inventory, _relations, _place_first, _framed)


def _finish(text: str, rng: np.random.Generator) -> str:
    if rng.random() < 0.4:
        text = text[0].upper() + text[1:]
    return text + pick(rng, (" .", " .", ".", "", ""))


def describe(scene: dict, rng: np.random.Generator, count: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """`count` differently worded captions; at most one is a gist, the rest name every group.

    `scene` as `sample_scene` returns it; groups are mentioned from left to right.
    """
    groups = _with_centres(scene)
    order = sorted(groups, key=lambda g: g["centre"][0])
    captions: dict[str, str] = {}
    gist_used = len(groups) == 1  # one group: a gist would be a full caption
    for _ in range(100 * count):
        if not gist_used and rng.random() < 0.15:
            gist_used, style = True, _gist
        else:
            style = _STYLES[int(rng.integers(len(_STYLES)))]
        caption = _finish(style(order, scene["floor"], rng), rng)
        captions.setdefault(" ".join(re.findall(r"[a-z]+", caption.lower())), caption)
        if len(captions) == count:
            return list(captions.values())
    raise RuntimeError(f"could not word {groups} {count} different ways")


def _with_centres(scene: dict) -> list[dict]:
    """The scene's groups, each with the mean centre and mean size of its tokens."""
    groups = [dict(g) for g in scene["groups"]]
    for i, group in enumerate(groups):
        boxes = np.array([o["bbox"] for o in scene["objects"] if o["group"] == i])
        group["centre"] = (boxes[:, :2] + boxes[:, 2:] / 2).mean(0).tolist()
        group["size"] = float(boxes[:, 2:].mean())
    return groups


# --- reading ----------------------------------------------------------------------------------

_KIND_OF = {
    word: (kind, number == 1)
    for kind, pairs in KIND_WORDS.items()
    for pair in pairs
    for number, word in enumerate(pair)
}  # word -> (kind, is plural)
_TEXTURE_ADJ = {w: t for t, words in TEXTURE_ADJECTIVES.items() for w in words}
_TEXTURE_NOUN = {w: t for t, words in TEXTURE_NOUNS.items() for w in words}
_COUNT = {"a": 1, "an": 1, "one": 1, "two": 2, "pair": 2, "three": 3}
_COLOURS = {"orange", "pink", "cyan", "brown", "white", "black"}


def parse_caption(caption: str) -> list[Group]:
    """Every group a caption mentions, in order.

    A colour counts only right before its noun; a count word or texture
    adjective applies to the next noun; "with stripes" after a noun gives that
    group its texture. A count that disagrees with the noun's number ("two
    cross", "a crosses", a plural with no count) is unresolved (None).
    """
    groups: list[Group] = []
    count: int | None = None
    texture: str | None = None
    previous = ""
    for word in re.findall(r"[a-z]+", caption.lower()):
        if word in _KIND_OF:
            kind, plural = _KIND_OF[word]
            agrees = count is not None and (count > 1) == plural
            colour = previous if previous in _COLOURS else None
            groups.append(Group(kind, colour, count if agrees else None, texture))
            count, texture = None, None
        elif word in _COUNT:
            count = _COUNT[word]
        elif word in _TEXTURE_ADJ:
            texture = _TEXTURE_ADJ[word]
        elif word in _TEXTURE_NOUN and groups and groups[-1].texture is None and previous == "with":
            groups[-1] = groups[-1]._replace(texture=_TEXTURE_NOUN[word])
        previous = word
    return groups


def caption_correct(caption: str, groups: list[dict]) -> bool:
    """True iff the caption names every group with its kind, colour and count, and nothing else.

    A texture is optional, but one that is stated must be the group's.
    """
    said = parse_caption(caption)
    truth = {(g["kind"], g["colour"]): g for g in groups}
    if collections.Counter((g.kind, g.colour, g.count) for g in said) != collections.Counter(
        (g["kind"], g["colour"], g["count"]) for g in groups
    ):
        return False
    return all(g.texture in (None, truth[g.kind, g.colour]["texture"]) for g in said)


def _mentions(caption: str) -> list[tuple[str, str | None]]:
    return [(g.kind, g.colour) for g in parse_caption(caption)]


def _regions(groups: list[dict]) -> dict[tuple[str, str | None], list[list[float]]]:
    return {(g["kind"], g["colour"]): g["boxes"] for g in groups}


def _coverage(boxes: list[list[float]], grid: int):
    # The picture is 4:3 and the feature map square: boxes are measured in
    # fractions of the width and height, as the features stage stretches the picture.
    return boxes_coverage(boxes, grid, WIDTH, HEIGHT)


# How `captioning.data.scorers.TruthScorer` grades and grounds scenes captions:
# a group's mention looks at the union of its tokens' boxes.
TRUTH_RULES = TruthRules(
    nouns=frozenset(_KIND_OF),
    caption_correct=caption_correct,
    mentions=_mentions,
    regions=_regions,
    coverage=_coverage,
)
