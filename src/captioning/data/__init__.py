"""Data: sources in the COCO 2014 layout, the one image reader, text, and validation.

`sources` is the download stage's entry: `demo` generates a small synthetic
data set offline from `demo_scenes` (the pictures) and `demo_captions` (the
grammar that words them and grades captions of them), `scenes` a second one
(`scenes_drawing`, `scenes_captions`), both through one generator
(`synthetic`) and one set of drawing helpers (`drawing`); `coco` and `flickr`
download real data sets through `download` (one attempt in `transfer`, the
errors and retry policy in `download_failures`); `coco_layout` reads any folder in
that layout into the caption table that every later stage uses. `images` is
the one image reader (serving, validation, features, reports), `text` the one
caption cleaner and vocabulary, `validation` (with `captions_suite`) the
validate stage's checks. A source may provide scores only its data supports
(`scorers.SourceScorer`, found by `sources.source_scorer`); the generated ones
score object accuracy and grounding against their ground truth
(`scorers.TruthScorer`, with each grammar's `TRUTH_RULES`).
"""
