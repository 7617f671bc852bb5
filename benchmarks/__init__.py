"""Speed and memory benchmarks of the captioning pipeline, run as `python -m benchmarks.run`.

Not part of the installed package: run from the repository root (the Makefile's
`bench` target does), so `benchmarks` is found as the current folder's package.
"""
