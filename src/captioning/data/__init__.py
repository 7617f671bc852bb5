"""Raw data sources for captioning, each ending as a folder in the COCO 2014 layout.

`demo` generates a small synthetic data set offline from `demo_scenes` (the
pictures) and `demo_captions` (the grammar that words them and grades captions
of them); `coco` and `flickr` download real data sets through `download`;
`coco_layout` reads any folder in that layout into the caption table that
every later stage uses.
"""
