"""The demo's caption grammar: scenes to captions (`describe`) and captions back to objects.

`describe` words one scene five different ways, in the styles people use (a
list of shapes, full clauses with the position before or after the shape, the
background first), each naming every object's kind, colour and position.
Because those captions come from this small grammar, a caption can be graded
exactly: `parse_caption` reads the (kind, colour, position) triples back out of
any caption the grammar writes, also after the model's lower-case,
punctuation-free tokenisation, and `caption_correct` compares them with the
truth the demo's instance files hold. `TRUTH_RULES` hands both to the scorer
(`captioning.data.scorers.TruthScorer`), with the box each mention names.
"""

from __future__ import annotations

import collections
import re

import numpy as np

from captioning.data.demo_scenes import IMAGE_SIZE, POSITION_CELLS, POSITIONS
from captioning.data.drawing import pick
from captioning.data.scorers import TruthRules, box_coverage

CAPTIONS_PER_IMAGE = 5

# Every word maps back to exactly one canonical name; the parser relies on that.
KIND_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
}
COLOUR_WORDS = {
    "red": ("red",),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_CORNER = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    **{f"{v} {h}": (f"in the {v} {h} corner", f"at the {v} {h}", f"in the {_CORNER[v][1]} {h}",
                    f"in the {_CORNER[v][1]} {h} corner")
       for v in ("top", "bottom") for h in ("left", "right")},
    **{v: (f"at the {v}", f"near the {v}", f"in the {v} middle") for v in ("top", "bottom")},
    **{h: (f"on the {h}", f"on the {h} side", f"at the {h}") for h in ("left", "right")},
    "center": ("in the center", "in the middle", "in the centre"),
}  # fmt: skip

# --- writing: five human-style wordings of one scene ---------------------------------------------


def _noun_phrase(obj: dict, rng: np.random.Generator) -> str:
    size = pick(rng, SIZE_WORDS[obj["size"]]) + " " if rng.random() < 0.5 else ""
    colour, kind = pick(rng, COLOUR_WORDS[obj["colour"]]), pick(rng, KIND_WORDS[obj["kind"]])
    return f"a {size}{colour} {kind}"


def _clause(obj: dict, fronted: bool, rng: np.random.Generator) -> str:
    noun, where = _noun_phrase(obj, rng), pick(rng, POSITION_PHRASES[obj["position"]])
    if fronted:
        return f"{where} {pick(rng, ('is', 'there is', 'sits', 'you can see', 'we see'))} {noun}"
    if rng.random() < 0.3:
        return f"there is {noun} {where}"
    verb = pick(rng, ("sits", "is", "is placed", "can be seen", "appears"))
    return f"{noun} {verb} {where}"


def _listing(items: list[str], rng: np.random.Generator) -> str:
    if len(items) == 1:
        return items[0]
    last = pick(rng, (" and ", ", and ")) if len(items) > 2 else " and "
    return ", ".join(items[:-1]) + last + items[-1]


def _placed_listing(objs: list[dict], rng: np.random.Generator) -> str:
    """Noun phrases with their positions: "a red circle at the top and a blue star on the left"."""
    return _listing(
        [f"{_noun_phrase(o, rng)} {pick(rng, POSITION_PHRASES[o['position']])}" for o in objs], rng
    )


def _as_listing(objs: list[dict], rng: np.random.Generator) -> str:
    """A list of noun phrases, each followed by its position, with an optional frame."""
    n = len(objs)
    body = _placed_listing(objs, rng)
    prefixes = [
        "",
        "a picture of ",
        "an image of ",
        "a photo showing ",
        "there is " if n == 1 else "there are ",
    ]
    if n > 1:
        prefixes.append(f"{('two', 'three')[n - 2]} {pick(rng, ('shapes', 'objects'))}: ")
    suffix = pick(rng, ("", "", "", " on a noisy background", " on a textured background"))
    return pick(rng, prefixes) + body + suffix


def _as_clauses(objs: list[dict], rng: np.random.Generator) -> str:
    """Full clauses, the position trailing or fronted."""
    # The parser tells the two orders apart per clause, and only "and"/"while"
    # survive tokenisation as clause breaks: objects not split by one share an order.
    fronted = bool(rng.random() < 0.5)
    clauses = [_clause(o, fronted, rng) for o in objs[:-1]]
    joiner = pick(rng, (" and ", ", while ", ". ")) if len(objs) > 1 else ""
    if joiner != ". ":
        fronted = bool(rng.random() < 0.5)
    clauses.append(_clause(objs[-1], fronted, rng))
    if joiner == ". ":
        return ". ".join(c[0].upper() + c[1:] for c in clauses)
    return ", ".join(clauses[:-1]) + joiner + clauses[-1]


def _background_first(objs: list[dict], rng: np.random.Generator) -> str:
    """The background, then the shapes on it."""
    grounds = (
        "a noisy background",
        "a textured background",
        "a grainy picture",
        "a mottled background",
    )
    ground = pick(rng, grounds)
    return f"{ground} with " + _placed_listing(objs, rng)


_STYLES = (_as_listing, _as_clauses, _background_first)


def _one_caption(objects: list[dict], rng: np.random.Generator) -> str:
    """One caption in a randomly chosen style, capitalised and full-stopped at random."""
    # Objects are named in reading order (top left to bottom right), as people
    # tend to describe a scene; the wording around them varies.
    objs = sorted(objects, key=lambda o: POSITIONS.index(o["position"]))
    text = _STYLES[int(rng.integers(len(_STYLES)))](objs, rng)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.5 and not text.endswith("."):
        text += "."
    return text


def describe(
    objects: list[dict], rng: np.random.Generator, count: int = CAPTIONS_PER_IMAGE
) -> list[str]:
    """`count` differently worded captions, each naming every object's kind, colour, position."""
    captions: dict[str, str] = {}
    for _ in range(100 * count):
        caption = _one_caption(objects, rng)
        captions.setdefault(" ".join(re.findall(r"[a-z]+", caption.lower())), caption)
        if len(captions) == count:
            return list(captions.values())
    raise RuntimeError(f"could not word {objects} {count} different ways")


# --- reading: caption -> (kind, colour, position) triples --------------------------------------

_TOKEN = re.compile(r"[a-z]+|[.,;:!?]")
_BOUNDARIES = {".", ",", ";", "!", "?", "and", "while", "whereas", "plus"}  # not ":" (labels)
_KIND_OF = {w: kind for kind, words in KIND_WORDS.items() for w in words}
_COLOUR_OF = {w: colour for colour, words in COLOUR_WORDS.items() for w in words}
_VERTICAL = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_HORIZONTAL = {"left": 0, "right": 2}
_MIDDLE = {"middle", "center", "centre", "central"}
_POSITION_AT = {cell: name for name, cell in POSITION_CELLS.items()}

Triple = tuple[str | None, str | None, str | None]


def _position_of(words: list[str]) -> str | None:
    """Canonical position of a run of position words; None when they contradict each other."""
    rows = {_VERTICAL[w] for w in words if w in _VERTICAL}
    cols = {_HORIZONTAL[w] for w in words if w in _HORIZONTAL}
    if len(rows) > 1 or len(cols) > 1:
        return None
    return _POSITION_AT[(rows.pop() if rows else 1, cols.pop() if cols else 1)]


def _clauses(caption: str) -> list[list[tuple[str, str | None]]]:
    """Split into clauses of ("K"|"C"|"P", value) items; adjacent position words form one P."""
    clauses: list[list[tuple[str, str | None]]] = [[]]
    run: list[str] = []
    for token in [*_TOKEN.findall(caption.lower()), "."]:
        is_position = token in _VERTICAL or token in _HORIZONTAL or token in _MIDDLE
        if run and not is_position:
            clauses[-1].append(("P", _position_of(run)))
            run = []
        if is_position:
            run.append(token)
        elif token in _BOUNDARIES:
            clauses.append([])
        elif token in _KIND_OF:
            clauses[-1].append(("K", _KIND_OF[token]))
        elif token in _COLOUR_OF:
            clauses[-1].append(("C", _COLOUR_OF[token]))
    return [c for c in clauses if c]


def _parse_clause(items: list[tuple[str, str | None]]) -> list[Triple]:
    """Attach colours and positions to the kinds of one clause; leftovers become incomplete."""
    kinds = [i for i, (tag, _) in enumerate(items) if tag == "K"]
    objects: dict[int, list[str | None]] = {}  # item index of the kind -> [kind, colour, position]
    leftovers: list[Triple] = []
    colours: list[str | None] = []
    for i, (tag, value) in enumerate(items):
        if tag == "C":
            colours.append(value)
        elif tag == "K":
            # The colour is an adjective right before its noun; two colours are ambiguous.
            objects[i] = [value, colours[0] if len(colours) == 1 else None, None]
            colours = []
    leftovers += [(None, c, None) for c in colours]
    # "in the middle is a red circle" fronts the position; "a red circle in the middle" trails it.
    # Within a clause the generator uses one order, so the first item decides which one it is.
    positions = [i for i, (tag, _) in enumerate(items) if tag == "P"]
    fronted = bool(positions) and (not kinds or positions[0] < kinds[0])
    for p in positions:
        # Only the nearest kind on either side may take it, and only if it has no position yet.
        before = [k for k in kinds if k < p][-1:]
        after = [k for k in kinds if k > p][:1]
        choices = [
            k for k in (after + before if fronted else before + after) if objects[k][2] is None
        ]
        if choices:
            objects[choices[0]][2] = items[p][1]
        else:
            leftovers.append((None, None, items[p][1]))
    return [tuple(objects[k]) for k in kinds] + leftovers  # type: ignore[misc]


def parse_caption(caption: str) -> list[Triple]:
    """(kind, colour, position) for every shape a caption mentions; None where unresolved."""
    return [triple for clause in _clauses(caption) for triple in _parse_clause(clause)]


def caption_correct(caption: str, objects: list[dict]) -> bool:
    """True iff the caption names exactly the objects' kinds, colours and positions."""
    truth = collections.Counter((o["kind"], o["colour"], o["position"]) for o in objects)
    return collections.Counter(parse_caption(caption)) == truth


def _mentions(caption: str) -> list[Triple]:
    """The triple of every shape noun, in order (a mention without a kind has no noun)."""
    return [triple for triple in parse_caption(caption) if triple[0] is not None]


def _regions(objects: list[dict]) -> dict[Triple, list[list[float]]]:
    return {(o["kind"], o["colour"], o["position"]): [o["bbox"]] for o in objects}


def _coverage(boxes: list[list[float]], grid: int):
    return box_coverage(boxes[0], grid, IMAGE_SIZE, IMAGE_SIZE)  # one object, one box


# How `captioning.data.scorers.TruthScorer` grades and grounds demo captions.
TRUTH_RULES = TruthRules(
    nouns=frozenset(_KIND_OF),
    caption_correct=caption_correct,
    mentions=_mentions,
    regions=_regions,
    coverage=_coverage,
)
