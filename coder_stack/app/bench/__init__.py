"""The benchmark of issue 5: ``python -m coder_stack.app.bench.run [--quick] [--json PATH]`` (see BENCHMARKS.md)."""
