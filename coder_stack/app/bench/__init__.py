"""The benchmark: ``python -m coder_stack.app.bench.run [--quick] [--json PATH]`` (see BENCHMARKS.md)."""
