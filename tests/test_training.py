"""fit_captioner: scheduled learning rate, clipping, selection by val CIDEr, resuming.

A real (tiny) feature store from a random-init InceptionV3 at its smallest
input; images of three flat colours, each with its own caption, so greedy
captions of a trained model have a known answer and val CIDEr moves.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from captioning.config import TrainParams
from captioning.data.text import Vocabulary
from captioning.features import FeatureStore, build_extractor, extract_features
from captioning.model.loss import masked_loss
from captioning.training.batches import (
    BatchPlan,
    CaptionSet,
    caption_arrays,
    caption_batches,
    steps_per_epoch,
)
from captioning.training.budget import StoppingRule, TrainingBudget, still_improving_warning
from captioning.training.callbacks import HeldOutLoss, LiveMetrics, val_sample
from captioning.training.checkpoints import EpochCheckpoint, read_history, write_history
from captioning.training.engine import make_optimizer
from captioning.training.fit import fit_captioner

SIZE = 75
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
CAPTION = "a {} picture"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    rows = []
    rng = np.random.default_rng(0)
    for image_id in range(1, 31):
        colour = list(COLOURS)[image_id % 3]
        pixels = np.clip(
            np.array(COLOURS[colour]) + rng.normal(0, 10, (SIZE, SIZE, 3)), 0, 255
        ).astype(np.uint8)
        path = root / f"{image_id}.jpg"
        Image.fromarray(pixels).save(path)
        split = "val" if image_id > 24 else "train"
        rows.append({"image_id": image_id, "path": str(path), "split": split, "colour": colour})
    images = pd.DataFrame(rows)
    extract_features(
        images, root / "features", build_extractor("none", SIZE, 0), 8, 16, SIZE, False
    )
    captions = {
        i: [CAPTION.format(c)] * 2 for i, c in zip(images.image_id, images.colour, strict=True)
    }
    vocab = Vocabulary.build([c for cs in captions.values() for c in cs], 50)
    sets = {}
    for split in ("train", "val"):
        ids = [i for i in images.image_id[images.split == split] for _ in range(2)]
        tokens = vocab.encode_batch([captions[i][0] for i in ids], 8)
        sets[split] = CaptionSet(tokens, np.asarray(ids, dtype=np.int64))
    extractor = {"image_size": SIZE, "extractor_weights": "none", "extractor_seed": 0}
    return FeatureStore(root / "features"), vocab, sets, captions, extractor


PARAMS = TrainParams(
    embedding_dim=16,
    units=32,
    attention_units=16,
    encoder_dim=16,
    batch_size=8,
    captions_per_image=0,  # every caption each pass: 6 steps of 8
    budget_pairs=288,  # six epochs of 48 pairs
    epoch_pairs=48,
    learning_rate=1e-2,
    early_stopping_pairs=0,  # never stop early
    jit_compile=False,
    val_sample_images=4,
    label_smoothing=0.0,  # the plain objective: these tests' training budgets assume it
    attention_penalty=1.0,
)


def _fit(data, tmp_path, params=PARAMS, **kwargs):
    store, vocab, sets, captions, extractor = data
    return fit_captioner(
        store,
        vocab,
        sets["train"],
        sets["val"],
        params,
        extractor,
        tmp_path / "ckpt",
        tmp_path / "history.csv",
        val_references=captions,
        **kwargs,
    )


def test_selects_the_epoch_with_the_best_val_cider(data, tmp_path):
    model, summary = _fit(data, tmp_path)
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.epoch) == list(range(1, 7))
    assert {"val_CIDEr", "val_loss", "learning_rate"} <= set(history.columns)
    best = int(history.val_CIDEr.idxmax())
    assert summary["best_epoch"] == best + 1
    assert summary["best_val_CIDEr"] == pytest.approx(history.val_CIDEr.max())
    assert history.val_CIDEr.max() > 1.0  # it learnt the three captions
    # Cosine decay: the rate falls every epoch, towards lr_min_fraction * learning_rate.
    rates = history.learning_rate.to_numpy()
    assert np.all(np.diff(rates) < 0) and rates[0] < PARAMS.learning_rate
    assert rates[-1] == pytest.approx(PARAMS.learning_rate * PARAMS.lr_min_fraction, rel=1e-3)
    # The model returned is the best epoch's, not the last one's.
    best_weights = keras.models.clone_model(model)
    best_weights.load_weights(tmp_path / "ckpt" / "best.weights.h5")
    for a, b in zip(model.get_weights(), best_weights.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["monitor"] == "val_CIDEr" and state["best_epoch"] == best + 1

    # Running again with the same settings resumes at the end: nothing retrained.
    _, again = _fit(data, tmp_path)
    assert again["resumed_from_epoch"] == 6 and again["best_epoch"] == summary["best_epoch"]


def test_val_cider_selection_needs_references(data, tmp_path):
    store, vocab, sets, _, extractor = data
    with pytest.raises(ValueError, match="val references"):
        fit_captioner(
            store, vocab, sets["train"], sets["val"], PARAMS, extractor,
            tmp_path / "c", tmp_path / "h.csv",
        )  # fmt: skip


def test_constant_rate_and_val_loss_selection(data, tmp_path):
    params = dataclasses.replace(
        PARAMS, lr_schedule="constant", select_by="val_loss", budget_pairs=144
    )
    _, summary = _fit(data, tmp_path, params)
    history = pd.read_csv(tmp_path / "history.csv")
    assert np.allclose(history.learning_rate, params.learning_rate)
    assert summary["best_val_loss"] == pytest.approx(history.val_loss.min())
    assert summary["best_epoch"] == int(history.val_loss.idxmin()) + 1


def test_make_optimizer_clips_the_global_norm():
    optimizer = make_optimizer(dataclasses.replace(PARAMS, clip_norm=1.0), total_steps=5)
    variable = keras.Variable(np.zeros(3, np.float32))
    optimizer.build([variable])
    optimizer.apply_gradients([(np.array([300.0, 400.0, 0.0], np.float32), variable)])
    # Adam's first step moves each weight by about the rate whatever the scale, so look at
    # the first moment instead: it holds (1 - beta_1) * the clipped gradient.
    np.testing.assert_allclose(
        optimizer._momentums[0].numpy(), 0.1 * np.array([0.6, 0.8, 0.0]), rtol=1e-5
    )
    unclipped = make_optimizer(dataclasses.replace(PARAMS, clip_norm=0.0), 5)
    assert unclipped.global_clipnorm is None


class _WeightlessModel:
    """What EpochCheckpoint needs of a model: weights to save, an optimiser, a stop flag."""

    stop_training = False

    def __init__(self):
        self.optimizer = keras.optimizers.Adam()
        self.optimizer.build([keras.Variable(np.zeros(1, np.float32))])

    def save_weights(self, path):
        open(path, "w").close()


def _checkpoint_over(tmp_path, values, **rule) -> EpochCheckpoint:
    rule = {"smoothing_epochs": 1, "min_delta": 0.0, "patience_pairs": 0, "start_pairs": 0} | rule
    """An EpochCheckpoint fed `values` of val_CIDEr, one epoch of 100 pairs each, until it stops."""
    budget = TrainingBudget(
        pairs_per_step=10, steps_per_epoch=10, epochs=len(values), steps_per_pass=5
    )
    checkpoint = EpochCheckpoint(tmp_path, "x", StoppingRule("val_CIDEr", **rule), budget)
    checkpoint.set_model(_WeightlessModel())
    for epoch, value in enumerate(values):
        checkpoint.on_epoch_end(epoch, {"val_CIDEr": value, "loss": 1.0})
        if checkpoint.model.stop_training:
            break
    return checkpoint


def test_early_stopping_counts_pairs_without_improvement_of_the_smoothed_metric(tmp_path):
    # Raw values: one lucky epoch (0.9) then a noisy level; the 2-epoch mean peaks at epoch 4.
    values = [0.5, 0.9, 0.6, 0.85, 0.7, 0.8, 0.7, 0.75, 0.7]
    checkpoint = _checkpoint_over(
        tmp_path, values, smoothing_epochs=2, min_delta=0.0, patience_pairs=300
    )
    state = checkpoint.state
    assert state["best_epoch"] == 2 and state["best"] == 0.9  # best single value is kept
    # Means: .5 .7 .75 .725 .775 .75 .75 .725: best at epoch 5, three epochs (300 pairs) later stop.
    assert state["stopped"] and state["epoch"] == 8
    history = pd.DataFrame(state["history"])
    assert list(history.pairs_seen) == [100 * e for e in range(1, 9)]
    assert history.val_CIDEr_smoothed.iloc[4] == pytest.approx(0.775)
    summary = checkpoint.summary(0)
    assert summary["stopped_early"] and not summary["still_improving"]
    assert summary["pairs_seen"] == 800
    # Without smoothing the same values stop after the lucky epoch's patience runs out ...
    raw = _checkpoint_over(tmp_path / "raw", values, patience_pairs=300)
    assert raw.state["stopped"] and raw.state["epoch"] == 5
    # ... unless it may not stop before 700 pairs.
    late = _checkpoint_over(tmp_path / "late", values, patience_pairs=300, start_pairs=700)
    assert late.state["stopped"] and late.state["epoch"] == 7


@pytest.mark.parametrize(
    ("values", "improving"),
    [
        ([0.5, 0.9, 1.2, 1.4, 1.5], True),  # rising to the end
        ([0.5, 0.9, 1.2, 1.2, 1.205], False),  # last gain below min_delta: levelled off
        ([0.5, 1.3, 1.2, 1.25, 1.22], False),  # best long before the end, noise since
        ([0.5, 1.3, 1.2, 1.1, 1.5], True),  # a late rise past the best: still learning
        ([0.5], False),  # one epoch says nothing
    ],
)
def test_still_improving_warning_appears_only_when_the_last_epoch_improved(
    tmp_path, values, improving
):
    checkpoint = _checkpoint_over(tmp_path, values, smoothing_epochs=1, min_delta=0.01)
    assert checkpoint.summary(0)["still_improving"] is improving
    write_history(tmp_path / "h.csv", checkpoint.state["history"])  # the CSV the stage reads back
    warning = still_improving_warning(checkpoint.rule, read_history(tmp_path / "h.csv"))
    assert (warning is not None) is improving
    if improving:
        assert f"at the last epoch ({len(values)}, {100 * len(values)} caption pairs" in warning
        assert "raise train.budget_pairs" in warning


def test_val_sample_is_fixed_and_seeded():
    val = CaptionSet(np.zeros((40, 4), np.int32), np.repeat(np.arange(20), 2))
    a, b = val_sample(val, 5, seed=1), val_sample(val, 5, seed=1)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 5 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, val_sample(val, 5, seed=2))
    np.testing.assert_array_equal(val_sample(val, 100, seed=1), np.arange(20))


def _tiny_model(data, tiny_captioner):
    """An untrained captioner sized for the fixture's feature store."""
    store, vocab, _, _, extractor = data
    return tiny_captioner(
        vocab, store.feature_shape, embedding_dim=8, units=16, attention_units=8, encoder_dim=8,
        **extractor,
    )  # fmt: skip


def test_image_major_batches_cover_every_image_with_its_own_captions(data):
    store, _, sets, _, _ = data
    train = sets["train"]
    ids = np.unique(train.image_ids)
    stored = store.get(ids)
    batches = caption_batches(store, train, 6, seed=3, captions_per_image=3)
    seen = []
    for features, tokens in batches.as_numpy_iterator():
        assert tokens.shape[1] == 3 and features.shape[0] == tokens.shape[0] == 2  # 6 / 3 images
        for image_features, image_tokens in zip(features, tokens, strict=True):
            (match,) = np.flatnonzero((stored == image_features).all(axis=(1, 2)))
            owner = ids[match]
            own = train.tokens[train.image_ids == owner][:, : image_tokens.shape[1]]
            for row in image_tokens:  # all K captions are the owner's
                assert (own == row).all(axis=1).any()
            seen.append(owner)
    assert sorted(seen) == sorted(set(train.image_ids.tolist()))  # every image once
    assert steps_per_epoch(train, 6, 3) == len(seen) // 2


def test_image_major_loss_equals_the_per_caption_loss(data, tiny_captioner):
    store, _, sets, _, _ = data
    model = _tiny_model(data, tiny_captioner)
    features, tokens = next(
        caption_batches(store, sets["train"], 6, 0, captions_per_image=3).as_numpy_iterator()
    )
    grouped = model.figures((features, tokens), training=False)
    flat = model.figures(
        (np.repeat(features, 3, axis=0), tokens.reshape(-1, tokens.shape[-1])), training=False
    )
    for a, b in zip(grouped, flat, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5)


def test_training_epochs_drop_a_short_last_batch_but_validation_keeps_every_row(data):
    store, _, sets, _, _ = data
    train = sets["train"]  # 48 captions of 24 images
    batches = caption_batches(store, train, 10, seed=1)
    first = [tokens for _, tokens in batches.as_numpy_iterator()]
    second = [tokens for _, tokens in batches.as_numpy_iterator()]
    assert [len(t) for t in first] == [10] * 4 == [len(t) for t in second]  # 48 // 10 full
    assert steps_per_epoch(train, 10, None) == 4
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    val = [t for _, t in caption_batches(store, sets["val"], 5, seed=None).as_numpy_iterator()]
    assert sum(len(t) for t in val) == len(sets["val"])  # 12 captions: 5 + 5 + 2


def test_held_out_loss_is_the_mean_over_val_batches_of_the_masked_loss(data, tiny_captioner):
    store, _, sets, _, _ = data
    model = _tiny_model(data, tiny_captioner)
    batches = list(caption_arrays(store, sets["val"], 5, None))
    assert [len(t) for _, t in batches] == [5, 5, 2]  # every val caption, in store order
    expected = []
    for features, tokens in batches:
        logits, weights = model((features, tokens[:, :-1]))
        expected.append([float(v) for v in masked_loss(tokens[:, 1:], logits, weights, 1.0)])
    callback = HeldOutLoss(lambda: iter(batches), jit_compile=False)
    callback.set_model(model)
    logs = {"loss": 1.0}
    callback.on_epoch_end(0, logs)
    assert set(logs) == {
        "loss",
        "val_loss",
        "val_ce",
        "val_attention_penalty",
        "val_token_accuracy",
    }
    loss, ce, penalty = np.mean(expected, axis=0)
    assert logs["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert logs["val_ce"] == pytest.approx(ce, rel=1e-5)
    assert logs["val_attention_penalty"] == pytest.approx(penalty, rel=1e-5)
    assert 0.0 <= logs["val_token_accuracy"] <= 1.0


def test_endless_batches_reshuffle_every_epoch_and_keep_widths_tight(data):
    store, _, sets, _, _ = data
    train = sets["train"]  # 24 images, 2 captions each
    stream = caption_arrays(store, train, 4, seed=5, captions_per_image=1, epochs=None)
    per_epoch = steps_per_epoch(train, 4, 1)
    epochs = [[next(stream) for _ in range(per_epoch)] for _ in range(3)]
    for batches in epochs:
        seen = {f.tobytes() for features, _ in batches for f in features}
        assert len(seen) == 24  # every image once per epoch
        for _, tokens in batches:  # cut to the longest chosen caption, rounded up to 8
            longest = int((tokens != 0).sum(axis=-1).max())
            assert tokens.shape[-1] == min(-(-longest // 8) * 8, train.tokens.shape[1])
    orders = [[f.tobytes() for features, _ in batches for f in features] for batches in epochs]
    assert orders[0] != orders[1] != orders[2]


def _captions(images: int, per_image: int = 5) -> CaptionSet:
    """A caption set of `images` images with `per_image` captions each (tokens of 6, no features)."""
    rows = images * per_image
    tokens = np.zeros((rows, 6), np.int32)
    tokens[:, :4] = 5 + np.arange(rows)[:, None] % 7  # non-pad words of every length 4
    return CaptionSet(tokens, np.repeat(np.arange(images, dtype=np.int64), per_image))


@pytest.mark.parametrize("captions_per_image", [1, 0, 5])
def test_the_budget_sets_the_same_steps_whatever_the_data_size(captions_per_image):
    params = TrainParams(batch_size=64, captions_per_image=captions_per_image)
    budgets = {n: TrainingBudget.of(params, _captions(n)) for n in (500, 2000, 8000)}
    for images, budget in budgets.items():
        pairs = budget.pairs_seen(budget.epochs)
        epoch = budget.pairs_seen(1)
        # The whole budget, rounded up to whole epochs of about epoch_pairs.
        assert params.budget_pairs <= pairs < params.budget_pairs + epoch, images
        assert abs(epoch - params.epoch_pairs) <= budget.pairs_per_step
    assert len({b.total_steps for b in budgets.values()}) == 1
    # What changes with the size is how often each pair comes round.
    assert budgets[500].passes(1) > 10 * budgets[8000].passes(1)


def test_the_schedule_spans_the_budget_on_a_small_and_a_large_data_set(data, tmp_path):
    store, vocab, sets, captions, extractor = data
    train = sets["train"]  # 48 captions of 24 images
    small = CaptionSet(train.tokens[:16], train.image_ids[:16])  # a third of it
    params = dataclasses.replace(PARAMS, budget_pairs=96, epoch_pairs=16)
    for name, captions_set in (("small", small), ("large", train)):
        _, summary = fit_captioner(
            store, vocab, captions_set, sets["val"], params, extractor,
            tmp_path / name / "ckpt", tmp_path / name / "h.csv", val_references=captions,
        )  # fmt: skip
        history = pd.read_csv(tmp_path / name / "h.csv")
        assert summary["pairs_seen"] == 96 and list(history.pairs_seen) == [
            16 * e for e in range(1, 7)
        ]
        rates = history.learning_rate.to_numpy()
        assert np.all(np.diff(rates) < 0)  # decaying over the whole budget ...
        # ... to its floor at the budget's last step, on either size.
        assert rates[-1] == pytest.approx(params.learning_rate * params.lr_min_fraction, rel=1e-3)
        passes = 96 / len(captions_set)
        assert history.passes.iloc[-1] == pytest.approx(passes)


def test_each_image_cycles_through_all_its_captions(data):
    """With one caption per image per pass, five passes give each image its five captions."""
    train = _captions(40, per_image=5)
    train = CaptionSet(np.arange(200, dtype=np.int32)[:, None].repeat(2, 1) + 4, train.image_ids)
    plan = BatchPlan(train, 8, 1)
    seen: dict[int, list[int]] = {}
    for number in range(10):
        for units, rows in plan.epoch(seed=3, epoch=number):
            for unit, row in zip(units, rows[:, 0], strict=True):
                assert train.image_ids[row] == plan.images[unit]
                seen.setdefault(int(unit), []).append(int(row))
    for rows in seen.values():
        assert len(rows) == 10
        # Passes 0-4 and 5-9 each use every caption of the image once, in new orders.
        assert sorted(rows[:5]) == sorted(rows[5:]) == sorted(set(rows))
    assert any(rows[:5] != rows[5:] for rows in seen.values())


class _Interrupt(Exception):
    pass


class _InterruptAfter(keras.callbacks.Callback):
    """Stops the process's training after `epochs` epochs, once the checkpoint is written."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise _Interrupt


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested JSON object as one level of `a/b` keys (to compare with pytest.approx)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_early_stopping_and_resume_give_the_uninterrupted_result(data, tmp_path):
    # Only the first epoch counts as an improvement (min_delta is out of reach), so the
    # smoothed metric waits from epoch 1: patience (144 pairs) runs out after epoch 4,
    # but the run may not stop before half its budget (240 pairs): it stops after epoch 5.
    params = dataclasses.replace(
        PARAMS, budget_pairs=480, deterministic=True, min_delta=100.0, early_stopping_pairs=144,
        early_stopping_from=0.5,
    )  # fmt: skip
    live = {name: tmp_path / name / "dvclive" for name in ("whole", "cut")}
    model, whole = _fit(data, tmp_path / "whole", params, callbacks=[LiveMetrics(live["whole"])])
    assert whole["stopped_early"] and whole["epochs_run"] == 5 and not whole["still_improving"]
    assert whole["pairs_seen"] == 240 < params.budget_pairs

    with pytest.raises(_Interrupt):
        _fit(
            data, tmp_path / "cut", params, callbacks=[LiveMetrics(live["cut"]), _InterruptAfter(2)]
        )
    # What DVCLive shows of the killed run: its two epochs, stepped by caption pairs.
    steps = pd.read_csv(live["cut"] / "plots" / "metrics" / "train" / "loss.tsv", sep="\t").step
    assert steps.tolist() == [48, 96]
    resumed_model, resumed = _fit(
        data, tmp_path / "cut", params, callbacks=[LiveMetrics(live["cut"])]
    )
    assert resumed["resumed_from_epoch"] == 2
    for key in ("epochs_run", "best_epoch", "best_val_CIDEr", "stopped_early", "pairs_seen"):
        assert resumed[key] == whole[key], key
    for a, b in zip(model.get_weights(), resumed_model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    columns = ["epoch", "loss", "val_CIDEr", "val_CIDEr_smoothed", "pairs_seen"]
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "whole" / "history.csv")[columns],
        pd.read_csv(tmp_path / "cut" / "history.csv")[columns],
    )
    # DVCLive's files too: a fresh folder rebuilt from the checkpoint, then the rest.
    files = {
        name: sorted(p.relative_to(d) for d in [live[name]] for p in d.rglob("*") if p.is_file())
        for name in live
    }
    assert files["whole"] == files["cut"] and Path("metrics.json") in files["whole"]
    # Same steps and figures; a figure may differ in its last float32 bit (Keras' running
    # mean of the epoch loss is summed in thread order), as the history frames above allow.
    for path in files["whole"]:
        if path.suffix == ".tsv":
            pd.testing.assert_frame_equal(
                pd.read_csv(live["whole"] / path, sep="\t"),
                pd.read_csv(live["cut"] / path, sep="\t"),
                rtol=1e-6,
            )
        else:
            assert _flat(json.loads((live["whole"] / path).read_text())) == pytest.approx(
                _flat(json.loads((live["cut"] / path).read_text())), rel=1e-6
            ), path
    summary = json.loads((live["whole"] / "metrics.json").read_text())
    assert summary["step"] == 240 and summary["eval"]["CIDEr"] == pytest.approx(
        pd.read_csv(tmp_path / "whole" / "history.csv").val_CIDEr.iloc[-1]
    )
