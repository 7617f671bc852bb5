"""Typed parameters: one frozen dataclass per section of params.yaml.

Every stage reads its own section(s) through `load_section`, which fails loudly
on unknown keys, values of the wrong type (`captioning.param_checks`) and
values out of range (`captioning.param_bounds`), so a typo in
`dvc exp run -S train.lerning_rate=...` stops the run instead of being ignored;
`check_params` checks the whole file at once (the pipeline's first stage,
`check`). Every message reads `section.key = value: allowed ...`.
The dataclasses hold every default, each with its reason beside it; a key left
out of params.yaml takes that default, which equals params.yaml's own value (a
test keeps the two equal). `captioning.model.captioner.ModelConfig` takes its defaults
from here and travels inside the saved model, so a checkpoint always knows the
settings that made it.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

# ConfigError and from_dict are part of this module's interface; they live with the checks.
from captioning.param_checks import ConfigError, from_dict, section_problems

# Pillow's own bound (Image.MAX_IMAGE_PIXELS); `validate.max_pixels` and the image
# reader default to it, and a test keeps them equal.
DEFAULT_MAX_PIXELS = 89_478_485
# Under this shorter side or over this side ratio an image says nothing at the
# extractor's 299x299 (a 1x1 dot, a 10000x10 strip): validate quarantines it and
# the server refuses it. 16 px keeps thumbnails; 10:1 keeps phone panoramas.
DEFAULT_MIN_SIDE = 16
DEFAULT_MAX_ASPECT = 10.0


# Each default below is the one home of that setting: params.yaml repeats the
# value (tests/test_config.py keeps the two equal), and code that needs a
# default reads it from these classes (`TrainParams.units`) instead of restating
# it. The measurements behind the chosen values are in docs/experiments.md.

DecoderMethod = Literal["greedy", "sample", "beam"]


@dataclasses.dataclass(frozen=True)
class DataParams:
    source: Literal["demo", "scenes", "local", "coco2014", "flickr8k", "flickr30k"] = "demo"
    path: str | None = None  # source=local: a folder in the COCO 2014 layout
    seed: int = 2014  # demo generation and the subset choice
    # Demo (and scenes) images written to train2014/ and val2014/ (val2014 is divided into val
    # and test). 2000 images seen once per epoch with one caption each learn the
    # scenes better than fewer images with all five captions in as many steps.
    demo_train_images: int = 2000
    demo_val_images: int = 240
    # Downloaded sources (captioning.data.fetch); None means the official host/URL.
    base_url: str | None = None  # coco2014: host of zips/, annotations/ and images (a mirror)
    subset: int | None = None  # coco2014: N images per split instead of the full 20 GB
    images_url: str | None = None  # flickr8k/30k image archive; None = the known Flickr8k URL
    karpathy_url: str | None = None  # Karpathy splits; coco2014 writes splits.json only when set
    download_workers: int = 8  # parallel image fetches in subset mode
    download_retries: int = 5  # retries per transfer without progress, backoff from 1 s


@dataclasses.dataclass(frozen=True)
class SplitParams:
    seed: int = 7
    val_fraction: float = 0.5  # share of val2014 images that become `val`; the rest are `test`
    # Optional caps, applied after the split (a quick run on a big source).
    max_train_images: int | None = None
    max_val_images: int | None = None
    max_test_images: int | None = None
    # coco: val2014 -> val/test by a seeded permutation; karpathy: <root>/splits.json.
    scheme: Literal["coco", "karpathy"] = "coco"


@dataclasses.dataclass(frozen=True)
class ValidateParams:
    # Decode bound against decompression bombs, checked from the image header.
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE  # shorter side in pixels; smaller images are quarantined
    max_aspect: float = DEFAULT_MAX_ASPECT  # longer/shorter side; stranger strips are quarantined
    max_quarantine_fraction: float = 0.05  # more undecodable images than this fails the stage
    min_caption_words: int = 1
    max_caption_words: int = 60


@dataclasses.dataclass(frozen=True)
class FeaturesParams:
    # imagenet | none (random init; features are standardised in the encoder, so
    # they train too) | path to a .weights.h5/.keras file.
    weights: str = "none"
    image_size: int = 299  # InceptionV3's input side: an 8x8 grid of 2048-channel features
    batch_size: int = 32  # images per InceptionV3 forward pass
    shard_size: int = 1024  # images per float16 shard file
    seed: int = 0  # initialisation seed when weights=none
    # Where extraction runs; both write the same store byte for byte, so neither
    # is a DVC param of the stage (docs/spark.md). local: this process, one machine.
    engine: Literal["local", "spark"] = "local"
    # engine=spark: the Spark master when not under spark-submit (local[*]: every core here).
    spark_master: str = "local[*]"


@dataclasses.dataclass(frozen=True)
class TokenizeParams:
    vocab_size: int = 5000  # top words kept (the tutorial's), plus <pad> <start> <end> <unk>
    max_len: int = 40  # tokens per caption including <start> and <end>; longer ones are cut


@dataclasses.dataclass(frozen=True)
class TrainParams:
    # The tutorial's sizes: embedding 256, GRU and attention 512, encoder Dense(256).
    embedding_dim: int = 256
    units: int = 512
    attention_units: int = 512
    encoder_dim: int = 256
    # A learned vector per feature-map location added to the encoded features,
    # so the attended context says where it looked. Off: it did not help on the demo.
    location_embedding: bool = False
    # gru: the tutorial's attention GRU (embedding_dim, units, attention_units).
    # transformer: captioning.model.transformer (the transformer_* sizes below). Both
    # read the same encoder; docs/transformer.md compares them.
    decoder: Literal["gru", "transformer"] = "gru"
    # Small for two CPU cores: 2 blocks of width 256 (4 heads of 64) hold fewer
    # weights than the GRU decoder (1.7 M against 2.4 M on the demo vocabulary)
    # and train about 2.5x the caption pairs/s. Not tuned beyond that.
    transformer_layers: int = 2
    transformer_heads: int = 4
    transformer_width: int = 256  # model dimension: embedding, attention and residual stream
    transformer_ff: int = 512  # feed-forward inner width
    transformer_dropout: float = 0.1  # residual and embedding dropout, the usual 0.1
    batch_size: int = 64  # caption pairs per step (the tutorial's); whole images when K > 1
    # K: a pass over the data is every image once with K of its captions, in
    # image-major batches that share one encoder pass (0: every caption, the
    # tutorial's epoch). Each image cycles through all its captions, K per pass,
    # in a fresh order each cycle, so the budget decides how many of the ~5
    # references training sees. More images beat more captions per image.
    captions_per_image: int = 1
    # The training budget in caption pairs (an image with one of its captions),
    # whatever the data set's size: the cosine schedule decays over it, and a
    # 500-image data set gets as many updates as an 8,000-image one. Chosen by
    # measurement on demo sets of three sizes (docs/experiments.md, "Training
    # budget"); docs/model.md says how to size it for COCO and Flickr.
    budget_pairs: int = 60000
    # An epoch here is this many pairs, not a pass over the data: the period of the
    # val figures, the checkpoint and the early-stopping check (about 2 s of val
    # captioning each on 2 cores), the same on every data set.
    epoch_pairs: int = 3000
    learning_rate: float = 1e-3  # the tutorial's Adam rate; 2e-3 and 3e-3 trailed it
    # Decay over the whole budget (cosine down to lr_min_fraction * learning_rate) or constant.
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_min_fraction: float = 0.02
    clip_norm: float = 5.0  # global gradient-norm clipping; 0 turns it off
    # Target smoothing (Szegedy et al. 2016); 0 turns it off. With five wordings
    # per scene, one-hot targets ask the model to be sure of a word the
    # references disagree on; 0.1 beat 0 on val object accuracy and CIDEr.
    label_smoothing: float = 0.1
    # Weight of the doubly stochastic attention penalty (Xu et al. 2015, lambda).
    # About 20 words over 64 locations cannot cover every location, so the term
    # stays near 0.5 and at weight 1 pulls attention towards the background;
    # 0.1 scored higher.
    attention_penalty: float = 0.1
    # Best checkpoint and early stopping: val CIDEr of greedy captions for a fixed
    # val sample, each epoch (what the model writes), or val loss (mostly how well
    # it guesses which of five wordings a reference used).
    select_by: Literal["val_CIDEr", "val_loss"] = "val_CIDEr"
    val_sample_images: int = 120  # val images captioned after every epoch for val_CIDEr
    # Early stopping reads the selection metric averaged over the last
    # `smoothing_epochs` epochs: on 120 val images val CIDEr moves by a few
    # tenths from one epoch to the next, and one low epoch must not stop a run
    # that is still learning (nor one lucky epoch make it look finished). It
    # stops when that average has not improved by more than `min_delta` for
    # `early_stopping_pairs` caption pairs, and never before the share
    # `early_stopping_from` of the budget: in the first half of the cosine
    # schedule the rate is above half its peak, val CIDEr is at its noisiest,
    # and the annealing that follows is where the model settles (a run of
    # twice the default budget was stopped at 40% of it, still learning,
    # without this; docs/experiments.md). The best checkpoint is the epoch with
    # the best single value. A run whose average is best at its last epoch
    # ends with a "still improving" warning: give it a larger budget.
    smoothing_epochs: int = 3
    min_delta: float = 0.01  # in the selection metric's units (CIDEr, or loss for val_loss)
    early_stopping_pairs: int = 15000  # 0: never stop early
    early_stopping_from: float = 0.5  # share of budget_pairs before which it never stops
    seed: int = 42
    jit_compile: bool = True  # XLA-compile the whole-sequence train step (about 4x faster on CPU)
    deterministic: bool = False  # TF op determinism: bit-identical reruns, about 3x slower steps
    # none: one device, Keras `fit`. mirrored: every local device (several GPUs),
    # multi_worker: the cluster in TF_CONFIG (TFJob, Slurm, Vertex AI); both run
    # captioning.training.distributed's loop, since Keras 3 `fit` fails under several
    # workers (docs/scaling.md). batch_size stays the global batch.
    distribute: Literal["none", "mirrored", "multi_worker"] = "none"
    # mixed_float16 (with loss scaling) or mixed_bfloat16 for accelerators with
    # fast half-precision matmuls; on CPU they run, with small and unsteady
    # gains (docs/scaling.md). Not float32: captioning.training.distributed's loop, one device too.
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    split: Literal["train", "val", "test"] = "test"
    # Greedy: the figure the gates and the registry compare; beam 3 scores a
    # little higher at less than half the speed.
    decoder: DecoderMethod = "greedy"
    beam_size: int = 3
    # Beam: rank finished captions by log-prob / words**length_penalty. 0 ranks by
    # the raw sum, which prefers short captions; 1 (per word) scores best on val.
    length_penalty: float = 1.0
    temperature: float = 1.0  # sample: softmax(logits / temperature)
    max_len: int = 40  # most tokens per caption: as long as tokenize.max_len, the longest trained
    batch_size: int = 64  # images decoded together


@dataclasses.dataclass(frozen=True)
class RegisterParams:
    # The alias `champion` moves only on a better test CIDEr on the same test set.
    model_name: str = "image-captioner"
    max_batch: int = 16  # most images per /invocations request
    # Per-image bound read from the header. The model sees 299x299, so this only
    # has to admit real photos (a 48 MP phone sensor); each decoded pixel costs
    # about 18 bytes on its way to 299x299 (uint8 RGB, then float32 in the resize).
    max_pixels: int = 50_000_000
    min_side: int = DEFAULT_MIN_SIDE  # shorter side in pixels; smaller images get a 400
    max_aspect: float = DEFAULT_MAX_ASPECT  # longer/shorter side; stranger strips get a 400
    # Request body bound, refused with 413 before it is read: 16 photos of 3 MB
    # (a 12 MP phone JPEG), base64-encoded (4/3), in one request.
    max_request_bytes: int = 67_108_864
    # /invocations requests parsed and predicted at once per server worker; the
    # rest wait unread (their bodies stay in the client's socket), so memory
    # stays bounded by this many bodies (and their parsed copies).
    max_concurrent_requests: int = 2
    # Pixels decoded at once across all requests of a worker (about 18 bytes each):
    # one image at max_pixels, or many small ones together.
    decode_budget_pixels: int = 50_000_000


@dataclasses.dataclass(frozen=True)
class ReportParams:
    num_images: int = 8  # a fixed sample of test images drawn with attention overlays
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class GatesParams:
    """`captioning gate`: absolute floors and allowed drops against the base branch.

    Both map a metric name of reports/metrics.json to a number in that metric's
    own units; every metric is higher-is-better. A tolerance is an absolute drop
    (0.02 BLEU-4 points), not a relative one, so it stays meaningful near zero.
    Empty by default (no gate): the floors are this repository's policy for its
    own metrics, so they live in params.yaml alone.
    """

    floors: dict[str, float] = dataclasses.field(default_factory=dict)
    tolerances: dict[str, float] = dataclasses.field(default_factory=dict)


SECTIONS: dict[str, type] = {
    "data": DataParams,
    "split": SplitParams,
    "validate": ValidateParams,
    "features": FeaturesParams,
    "tokenize": TokenizeParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "report": ReportParams,
    "register": RegisterParams,
    "gates": GatesParams,
}

T = TypeVar("T")


def check_params(params: dict[str, Any], require_all: bool = True) -> list[str]:
    """Every problem of a whole params mapping, one line each, in params.yaml's order.

    Unknown and (with `require_all`) missing sections count too. Empty: all is well.
    """
    problems = []
    for name, raw in params.items():
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), sorted(SECTIONS), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {sorted(SECTIONS)}"
            problems.append(f"{name}: unknown params section; {hint}")
        elif raw is not None and not isinstance(raw, dict):
            problems.append(f"{name} = {raw!r}: allowed: a mapping of keys")
        else:
            problems += section_problems(SECTIONS[name], name, dict(raw or {}))[1]
    if require_all:
        problems += [f"{name}: missing params section" for name in SECTIONS if name not in params]
    return problems


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The whole params file as a mapping (empty file -> empty mapping)."""
    with open(path, encoding="utf-8") as fh:
        loaded = yaml.safe_load(fh) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
    return loaded


def load_section(name: str, path: str | Path = "params.yaml", cls: type[T] | None = None) -> T:
    """Load params section `name` as its dataclass (see SECTIONS)."""
    cls = cls or SECTIONS[name]
    params = read_params(path)
    if name not in params:
        raise ConfigError(f"{path}: missing section '{name}'")
    return from_dict(cls, name, params[name])


def to_flat_dict(**sections: Any) -> dict[str, Any]:
    """`{'train.units': 512, ...}` for MLflow params from dataclass instances."""
    flat: dict[str, Any] = {}
    for name, section in sections.items():
        for key, value in dataclasses.asdict(section).items():
            flat[f"{name}.{key}"] = value
    return flat
