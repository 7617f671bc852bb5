"""Speed and memory benchmarks of the captioning pipeline, run as `python -m benchmarks.run`.

`run` is the command line; `workspace` holds the sizes, project defaults and
temporary data the benchmarks share, and `results` how they report;
`features`, `train`, `memory` and `decode` are the benchmarks themselves;
`serve_load` load-tests the served model through `scoring_server`. Not part of
the installed package: run from the repository root (the Makefile's `bench`
target does), so `benchmarks` is found as the current folder's package.
"""
