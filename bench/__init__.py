"""The benchmark of issue 5: ``python -m bench.run [--quick] [--json PATH]`` (see BENCHMARKS.md)."""
