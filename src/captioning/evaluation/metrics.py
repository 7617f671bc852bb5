"""Caption metrics: the official COCO caption evaluation (coco-caption), and NLTK's corpus BLEU.

`COCOEvalCap.evaluate()` cannot run offline: its SPICE step downloads Stanford
CoreNLP. So this module does what it does, step by step: both sides go through
the same Java PTB tokenizer (the CoreNLP 3.4.1 jar shipped in pycocoevalcap,
same flags, same punctuation list, references and candidates tokenized in
separate calls), and the tokenized text goes to pycocoevalcap's BLEU(4),
ROUGE-L and CIDEr scorers, with CIDEr's document frequencies taken from the
references of the images being evaluated. METEOR talks to the same
meteor-1.5.jar with the same command line and stdio protocol as
pycocoevalcap's wrapper, but owns the Java process explicitly (no lock, no
`__del__`), so a failure cannot deadlock or leak the JVM. SPICE runs only when
its CoreNLP jars are installed and is otherwise reported in `skipped`, never as
zero. Beside them, `nltk_bleu` gives the NLTK corpus BLEU-1..4 that many
published captioning results report, under keys of their own (`BLEU-4_nltk`),
so a score can be compared with either kind of paper; its docstring says how it
differs from coco-caption's BLEU. Only the images that have a candidate are
scored, as coco-caption scores the images in its results file.
`load_results`/`load_references`/`score_files` read COCO JSON files,
`human_agreement` scores one human caption per image against the others, and
`format_table` renders a Markdown table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Submodules, not the namespace package: these hold the jar names and paths.
import pycocoevalcap.meteor.meteor as _meteor_module
import pycocoevalcap.spice.get_stanford_models as _spice_models
import pycocoevalcap.spice.spice as _spice_module
import pycocoevalcap.tokenizer.ptbtokenizer as _ptb_module
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from captioning.data.text import clean_caption

#: What `COCOEvalCap.evaluate()` computes.
COCO_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
#: NLTK's corpus BLEU-1..4 (`nltk_bleu`): a corpus score only, no per-image values.
NLTK_BLEU = "BLEU_nltk"
NLTK_KEYS = ("BLEU-1_nltk", "BLEU-2_nltk", "BLEU-3_nltk", "BLEU-4_nltk")
#: Every metric `score` knows; `score_files` asks for all of them.
ALL_METRICS = (*COCO_METRICS, NLTK_BLEU)
#: What `score` computes unless told otherwise: all but SPICE, which needs CoreNLP.
DEFAULT_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", NLTK_BLEU)
#: Result keys in display order.
CORPUS_KEYS = (
    *("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"),
    *NLTK_KEYS,
)
# Cumulative BLEU-n: the geometric mean of the 1..n-gram precisions, equally weighted.
_CUMULATIVE_WEIGHTS = [(1.0,), (1 / 2,) * 2, (1 / 3,) * 3, (1 / 4,) * 4]

# Characters the Java tokenizer treats as line breaks. coco-caption only
# replaces "\n", so a stray "\r" silently shifts every later caption onto the
# wrong image there; here they all become spaces (and the line count is checked).
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\u2028\u2029"})
# pycocoevalcap's METEOR command line (after the jar), word for word.
_METEOR_FLAGS = ("-", "-", "-stdio", "-l", "en", "-norm")


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """Corpus scores, per-image scores and the metrics that could not be computed."""

    corpus: dict[str, float]
    per_image: dict[int, dict[str, float]]
    skipped: dict[str, str]


def score(
    references: Mapping[int, Sequence[str]],
    candidates: Mapping[int, str],
    metrics: Iterable[str] = DEFAULT_METRICS,
) -> ScoreResult:
    """Score one candidate caption per image against that image's references.

    Only the candidates' images are scored; references of other images are
    ignored, including for CIDEr's document frequencies (as in coco-caption).
    """
    wanted = _check_metrics(metrics)
    ids = _check_inputs(references, candidates)
    with contextlib.ExitStack() as stack:
        # METEOR's JVM spends seconds loading its paraphrase table; start it
        # first so that it loads while the tokenizer and other scorers run.
        meteor = stack.enter_context(_MeteorProcess()) if "METEOR" in wanted else None
        # Two tokenizer runs, references then candidates, as coco-caption does.
        tokenized = iter(_ptb_tokenize([r for i in ids for r in references[i]]))
        gts = {i: [next(tokenized) for _ in references[i]] for i in ids}
        res = {
            i: [c] for i, c in zip(ids, _ptb_tokenize([candidates[i] for i in ids]), strict=True)
        }

        corpus: dict[str, float] = {}
        per_image: dict[int, dict[str, float]] = {i: {} for i in ids}
        skipped: dict[str, str] = {}

        def record(key: str, total: float, scores: Sequence[float]) -> None:
            corpus[key] = float(total)
            for i, s in zip(ids, scores, strict=True):
                per_image[i][key] = float(s)

        if "BLEU" in wanted:
            totals, per_n = Bleu(4).compute_score(gts, res, verbose=0)
            for n, (total, scores) in enumerate(zip(totals, per_n, strict=True), start=1):
                record(f"BLEU-{n}", total, scores)
        if "ROUGE_L" in wanted:
            record("ROUGE-L", *Rouge().compute_score(gts, res))
        if "CIDEr" in wanted:
            record("CIDEr", *Cider().compute_score(gts, res))
        if meteor is not None:
            record("METEOR", *meteor.compute_score(gts, res))
        if NLTK_BLEU in wanted:
            corpus.update(nltk_bleu(references, candidates))
    if "SPICE" in wanted:
        reason = spice_unavailable_reason() or _run_spice(gts, res, record)
        if reason is not None:
            skipped["SPICE"] = reason
    return ScoreResult(
        corpus={k: corpus[k] for k in CORPUS_KEYS if k in corpus},
        per_image={i: {k: s[k] for k in CORPUS_KEYS if k in s} for i, s in per_image.items()},
        skipped=skipped,
    )


def load_results(path: str | Path) -> dict[int, str]:
    """Read a COCO results file (`[{"image_id": int, "caption": str}, ...]`).

    Duplicate image ids are an error: pycocotools' `COCO.loadRes` keeps every
    entry and coco-caption then fails an assertion inside the scorers, so there
    is no official "first wins" or "last wins" to copy; we say which ids repeat.
    """
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: a results file is a JSON list of "
            f'{{"image_id", "caption"}} objects, got {type(data).__name__}'
        )
    results: dict[int, str] = {}
    duplicates: dict[int, None] = {}  # an ordered set
    for k, entry in enumerate(data):
        image_id, caption = _caption_entry(entry, f"{path}: entry {k}")
        if image_id in results:
            duplicates[image_id] = None
        results[image_id] = caption
    if duplicates:
        raise ValueError(
            f"{path}: {len(duplicates)} image ids have more than one caption "
            f"(coco-caption scores exactly one per image): {_some(list(duplicates))}"
        )
    if not results:
        raise ValueError(f"{path}: the results file is empty")
    return results


def load_references(annotations_path: str | Path) -> dict[int, list[str]]:
    """Read the reference captions of a COCO captions annotation file, by image id."""
    data = _read_json(annotations_path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(
            f'{annotations_path}: a COCO captions file is a JSON object with an "annotations" list'
        )
    references: dict[int, list[str]] = {}
    for k, entry in enumerate(data["annotations"]):
        image_id, caption = _caption_entry(entry, f"{annotations_path}: annotation {k}")
        references.setdefault(image_id, []).append(caption)
    if not references:
        raise ValueError(f"{annotations_path}: no caption annotations")
    return references


def score_files(
    results_path: str | Path,
    annotations_path: str | Path,
    metrics: Iterable[str] = ALL_METRICS,
) -> ScoreResult:
    """Score a COCO results file against a COCO captions file, like coco-caption's demo (+ NLTK BLEU)."""
    return score(load_references(annotations_path), load_results(results_path), metrics)


def human_agreement(
    references: Mapping[int, Sequence[str]],
    metrics: Iterable[str] = DEFAULT_METRICS,
) -> dict[str, float]:
    """Score each image's first reference against its other references (leave-one-out).

    Images with fewer than two references are left out. Caveat: the human is
    judged against one reference fewer (4 instead of 5 on COCO) than a model
    scored with `score`, and BLEU/CIDEr rise with more references, so this
    understates human agreement next to model scores; for a like-for-like
    comparison, score the model against the same `refs[1:]`.
    """
    held_in = {i: list(refs[1:]) for i, refs in references.items() if len(refs) >= 2}
    if not held_in:
        raise ValueError("human agreement needs images with at least two references")
    held_out = {i: references[i][0] for i in held_in}
    return score(held_in, held_out, metrics).corpus


def format_table(corpus: Mapping[str, float]) -> str:
    """Render corpus scores as a two-column Markdown table in the usual metric order."""
    known = [k for k in CORPUS_KEYS if k in corpus]
    keys = known + [k for k in corpus if k not in CORPUS_KEYS]
    rows = ["| metric | score |", "|---|---|"]
    rows += [f"| {k} | {corpus[k]:.4f} |" for k in keys]
    return "\n".join(rows) + "\n"


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here, or None when java and all its jars are present."""
    if shutil.which("java") is None:
        return "SPICE needs a `java` executable on PATH"
    spice_dir = Path(_spice_module.__file__).parent
    lib = spice_dir / _spice_models.SPICELIB
    needed = [
        spice_dir / _spice_module.SPICE_JAR,
        lib / f"{_spice_models.JAR}.jar",
        lib / f"{_spice_models.JAR}-models.jar",
    ]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        # Spice() would try to download these from nlp.stanford.edu; we never do.
        return (
            "SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on "
            f"first use and is not installed here; missing: {', '.join(missing)}"
        )
    return None


# --- NLTK BLEU ------------------------------------------------------------------


def nltk_bleu(
    references: Mapping[int, Sequence[str]], candidates: Mapping[int, str]
) -> dict[str, float]:
    """NLTK's corpus BLEU-1..4 (`nltk.translate.bleu_score.corpus_bleu`, no smoothing).

    Keys `BLEU-1_nltk` .. `BLEU-4_nltk`; only the candidates' images are scored.
    Tokens are `nltk_tokens`: the project's own caption cleaning
    (`captioning.data.text.clean_caption`: lower case, ASCII letters, digits and
    apostrophes) split on spaces, the lower-case, punctuation-free word lists
    that captioning code commonly hands to NLTK. coco-caption's PTB tokenizer
    differs: it splits clitics ("man's" -> "man 's", "don't" -> "do n't"),
    keeps hyphenated words whole ("t-shirt", which cleaning makes "t shirt")
    and non-ASCII letters, and keeps brackets as "-lrb-"/"-rrb-". Both BLEUs
    clip n-gram counts by the most in any one reference and take the reference
    length closest to each candidate (ties to the shorter), summed over the
    corpus, for the brevity penalty exp(1 - r/c) when c < r; coco-caption adds
    1e-15 and 1e-9 to every ratio (so an order with no match gives a tiny score
    instead of 0), and NLTK counts at least one n-gram per candidate in each
    order's denominator, so a candidate shorter than n words lowers NLTK's
    BLEU-n, where coco-caption counts none. Without smoothing an n-gram order
    with no match at all makes BLEU-n and every higher order (almost) 0.
    """
    ids = _check_inputs(references, candidates)
    return _nltk_corpus_bleu(
        [[nltk_tokens(r) for r in references[i]] for i in ids],
        [nltk_tokens(candidates[i]) for i in ids],
    )


def nltk_tokens(caption: str) -> list[str]:
    """The words `nltk_bleu` compares: `clean_caption`, split on spaces."""
    return clean_caption(caption).split()


def _nltk_corpus_bleu(
    references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]
) -> dict[str, float]:
    """NLTK corpus BLEU-1..4 of tokenized hypotheses, one list of tokenized references each."""
    # Imported here: NLTK's package import costs about a second, which only this needs.
    from nltk.translate.bleu_score import corpus_bleu

    with warnings.catch_warnings():
        # An order with no match warns; its score (almost 0) is what we report.
        warnings.filterwarnings("ignore", r"\s*The hypothesis contains 0 counts", UserWarning)
        scores = corpus_bleu(references, hypotheses, weights=_CUMULATIVE_WEIGHTS)
    return {key: float(value) for key, value in zip(NLTK_KEYS, scores, strict=True)}


# --- tokenizer ----------------------------------------------------------------


def _ptb_tokenize(captions: Sequence[str]) -> list[str]:
    """PTB-tokenize, lower-case and strip punctuation, exactly as coco-caption does.

    That includes its quirk of keeping brackets as "-lrb-"/"-rrb-" tokens: its
    punctuation list says "-LRB-", but the tokenizer has already lower-cased it.
    """
    if not captions:
        return []
    jar = Path(_ptb_module.__file__).parent / _ptb_module.STANFORD_CORENLP_3_4_1_JAR
    text = "\n".join(c.translate(_LINE_BREAKS) for c in captions)
    # A private temp dir rather than the package folder that coco-caption
    # writes into, which may be read-only or shared with a parallel run.
    with tempfile.TemporaryDirectory(prefix="ptb-") as tmp:
        source = Path(tmp) / "captions.txt"
        source.write_bytes(text.encode("utf-8"))
        tokenizer = ["edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
        done = _run_java(["-cp", str(jar), *tokenizer, str(source)], "PTB tokenizer")
    lines = done.stdout.decode("utf-8").split("\n")
    # Java ends the output with a newline only if the input ended with one.
    if len(lines) == len(captions) + 1 and lines[-1] == "":
        lines.pop()
    if len(lines) != len(captions):
        raise RuntimeError(
            f"PTB tokenizer returned {len(lines)} lines for {len(captions)} "
            "captions; the captions and images would be misaligned"
        )
    punctuation = set(_ptb_module.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in lines]


def _run_java(args: list[str], what: str) -> subprocess.CompletedProcess:
    if shutil.which("java") is None:
        raise RuntimeError(f"the {what} needs a `java` executable on PATH (Java 8 or newer)")
    done = subprocess.run(["java", *args], capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"the {what} failed (exit {done.returncode}): "
            f"{done.stderr.decode('utf-8', 'replace')[-2000:]}"
        )
    return done


# --- METEOR ---------------------------------------------------------------------


class _MeteorProcess:
    """One meteor-1.5.jar process speaking pycocoevalcap's stdio protocol.

    pycocoevalcap's `Meteor` takes a lock in `compute_score` without releasing
    it on errors and takes it again in `__del__`, so any failure can hang the
    interpreter at garbage collection; its stderr pipe is never read either.
    This class sends byte-for-byte the same lines, has no threads, sends
    stderr to a file, and always ends the JVM in `close()` (use `with`).
    """

    def __init__(self) -> None:
        if shutil.which("java") is None:
            raise RuntimeError("METEOR needs a `java` executable on PATH (Java 8 or newer)")
        # Owned by this object and closed in close(), so no `with` here.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                ["java", "-jar", "-Xmx2G", _meteor_module.METEOR_JAR, *_METEOR_FLAGS],
                cwd=Path(_meteor_module.__file__).parent,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
            )
        except OSError:
            self._stderr.close()
            raise

    def __enter__(self) -> _MeteorProcess:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # After an error nothing more will be asked, so don't wait for the JVM
        # to finish loading its paraphrase table just to read end-of-input.
        self.close(kill=exc_type is not None)

    def compute_score(
        self, gts: dict[int, list[str]], res: dict[int, list[str]]
    ) -> tuple[float, list[float]]:
        """Corpus METEOR and one score per image, in `gts` order."""
        stats = []
        for i, refs in gts.items():
            hypothesis = res[i][0].replace("|||", "").replace("  ", " ")
            stats.append(self._ask(" ||| ".join(("SCORE", " ||| ".join(refs), hypothesis))))
        # EVAL answers with one line per image, then the corpus score.
        self._send(" ||| ".join(("EVAL", *stats)))
        per_image = [float(self._read()) for _ in stats]
        return float(self._read()), per_image

    def close(self, kill: bool = False) -> None:
        """End the JVM: closing stdin lets it exit by itself; kill it if asked or if it hangs."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        with contextlib.suppress(BrokenPipeError):  # it may have gone already
            self._proc.stdin.close()
        if not kill:
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill = True
        if kill:
            self._proc.kill()  # a no-op if it has exited
        self._proc.wait()
        self._proc.stdout.close()
        self._stderr.close()

    def _ask(self, line: str) -> str:
        self._send(line)
        return self._read()

    def _send(self, line: str) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(line.encode("utf-8") + b"\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise self._died() from None

    def _read(self) -> str:
        assert self._proc.stdout is not None
        reply = self._proc.stdout.readline()
        if not reply:
            raise self._died()
        return reply.decode("utf-8").strip()

    def _died(self) -> RuntimeError:
        self._proc.wait(timeout=10)
        self._stderr.seek(0)
        err = self._stderr.read().decode("utf-8", "replace")[-2000:]
        return RuntimeError(f"METEOR exited early (exit {self._proc.returncode}): {err}")


# --- SPICE ----------------------------------------------------------------------


def _run_spice(
    gts: dict[int, list[str]],
    res: dict[int, list[str]],
    record: Callable[[str, float, Sequence[float]], None],
) -> str | None:
    """Run pycocoevalcap's SPICE; return a reason if it failed instead of a score."""
    try:
        total, scores = _spice_module.Spice().compute_score(gts, res)
    except (subprocess.CalledProcessError, OSError) as err:
        # SPICE 1.0 is known to fail on some JVMs; an optional metric should
        # not sink the whole evaluation, and a failure is not a zero.
        return f"SPICE failed: {err}"
    by_id = dict(zip(sorted(gts), scores, strict=True))  # Spice returns sorted ids
    record("SPICE", total, [by_id[i]["All"]["f"] for i in gts])
    return None


# --- validation -----------------------------------------------------------------


def _check_metrics(metrics: Iterable[str]) -> set[str]:
    wanted = set(metrics)
    unknown = wanted - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {list(ALL_METRICS)}")
    if not wanted:
        raise ValueError("no metrics requested")
    return wanted


def _check_inputs(
    references: Mapping[int, Sequence[str]], candidates: Mapping[int, str]
) -> list[int]:
    if not candidates:
        raise ValueError("no candidate captions to score")
    no_refs = [i for i in candidates if not references.get(i)]
    if no_refs:
        raise ValueError(
            f"{len(no_refs)} candidate image ids have no reference captions: {_some(no_refs)}"
        )
    ids = sorted(candidates)  # a fixed order, whatever order the dicts were built in
    for i in ids:
        if not isinstance(candidates[i], str):
            raise TypeError(f"candidate for image {i} is {type(candidates[i]).__name__}, not str")
        refs = references[i]
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references for image {i} must be a list of str")
    return ids


def _caption_entry(entry: Any, where: str) -> tuple[int, str]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is {type(entry).__name__}, not an object")
    image_id, caption = entry.get("image_id"), entry.get("caption")
    # bool is an int subclass; a float id (1.0) usually means a broken writer.
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        raise ValueError(f'{where}: "image_id" must be an integer, got {image_id!r}')
    if not isinstance(caption, str):
        raise ValueError(f'{where}: "caption" must be a string, got {caption!r}')
    return image_id, caption


def _read_json(path: str | Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _some(ids: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" ... ({len(ids) - limit} more)" if len(ids) > limit else "")
