"""The Java half of coco-caption, run offline: the PTB tokenizer, METEOR and SPICE.

`COCOEvalCap.evaluate()` cannot run offline: its SPICE step downloads Stanford
CoreNLP. So `ptb_tokenize` runs the same Java PTB tokenizer (the CoreNLP 3.4.1
jar shipped in pycocoevalcap, same flags, same punctuation list) the way
coco-caption does; `MeteorProcess` talks to the same meteor-1.5.jar with the
same command line and stdio protocol as pycocoevalcap's wrapper, but owns the
Java process explicitly (no lock, no `__del__`), so a failure cannot deadlock or
leak the JVM; and `run_spice` runs SPICE only where `spice_unavailable_reason`
finds its CoreNLP jars installed, reporting a failure as a reason, never a zero.
`captioning.evaluation.metrics.score` drives all three.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

# Submodules, not the namespace package: these hold the jar names and paths.
import pycocoevalcap.meteor.meteor as _meteor_module
import pycocoevalcap.spice.get_stanford_models as _spice_models
import pycocoevalcap.spice.spice as _spice_module
import pycocoevalcap.tokenizer.ptbtokenizer as _ptb_module

# Characters the Java tokenizer treats as line breaks. coco-caption only
# replaces "\n", so a stray "\r" silently shifts every later caption onto the
# wrong image there; here they all become spaces (and the line count is checked).
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\u2028\u2029"})
# pycocoevalcap's METEOR command line (after the jar), word for word.
_METEOR_FLAGS = ("-", "-", "-stdio", "-l", "en", "-norm")


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


# --- tokenizer ----------------------------------------------------------------


def ptb_tokenize(captions: Sequence[str]) -> list[str]:
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


class MeteorProcess:
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

    def __enter__(self) -> MeteorProcess:
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


def run_spice(
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
