"""Benchmarks of the captioning pipeline: `python -m benchmarks [NAME ...] [--quick] [--out FILE]`.

`__main__` is the one runner, `registry` lists every benchmark (add one there),
`harness` and `workspace` hold what they share, and each other module holds the
benchmarks of one subject. Not part of the installed package: run from the
repository root (the Makefile's bench targets do).
"""
