"""coder-stack's development tools: the demo, the benchmark and their commands (not part of the product)."""
