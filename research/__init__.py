"""One-off tooling of particular measurement sessions (README.md here says what each measured and
where its result is). Run from the repository root as ``python -m research.NAME``, or the
``gpu_*.sh`` scripts as ``bash research/gpu_*.sh``; they share ``benchmarks.harness``."""
