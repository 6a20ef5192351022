"""The benchmark: ``python -m coder_stack_dev.bench.run [--quick] [--json PATH]`` (see BENCHMARKS.md)."""
