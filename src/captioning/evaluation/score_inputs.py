"""What the scorers accept: one string candidate per image, each with a list of string references.

`check_inputs` is the one check of `score`'s and `nltk_bleu`'s arguments (every
candidate has references, all are strings) and fixes the order images are
scored in; `some_ids` shortens a list of offending ids for an error message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def check_inputs(
    references: Mapping[int, Sequence[str]], candidates: Mapping[int, str]
) -> list[int]:
    """The candidates' image ids in scoring order (sorted); raise on missing or non-str captions."""
    if not candidates:
        raise ValueError("no candidate captions to score")
    no_refs = [i for i in candidates if not references.get(i)]
    if no_refs:
        raise ValueError(
            f"{len(no_refs)} candidate image ids have no reference captions: {some_ids(no_refs)}"
        )
    ids = sorted(candidates)  # a fixed order, whatever order the dicts were built in
    for i in ids:
        if not isinstance(candidates[i], str):
            raise TypeError(f"candidate for image {i} is {type(candidates[i]).__name__}, not str")
        refs = references[i]
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references for image {i} must be a list of str")
    return ids


def some_ids(ids: Sequence[int], limit: int = 10) -> str:
    """The first `limit` ids, comma-separated, and how many more there are."""
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" ... ({len(ids) - limit} more)" if len(ids) > limit else "")
