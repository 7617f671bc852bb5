"""Raw data sources for captioning, each ending as a folder in the COCO 2014 layout.

`demo` generates a small synthetic data set offline (and the grammar that scores
captions of it); the other modules read any folder in that layout into the
caption table that every later stage uses.
"""
