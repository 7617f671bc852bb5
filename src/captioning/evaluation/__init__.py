"""Scoring captions: coco-caption metrics, split evaluation, reports, gates and the CI comment.

`metrics` runs coco-caption's scorers (and NLTK's BLEU) offline, with
`coco_java` (PTB tokenizer, METEOR, SPICE), `nltk_bleu`, `coco_files` (COCO
JSON) and `score_inputs` (argument checks) beside it; `evaluate`
captions and scores a split, `report` writes the attention-overlay pages
(drawn by `attention_overlay`, laid out by `report_page`),
`gate` compares metrics with thresholds and a base run, `ci_comment` writes a
pull request's comment. Data-set-specific scores (the demo's object accuracy
and grounding) come from the data source as a plug-in, not from here.
"""
