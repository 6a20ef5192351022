"""The vLLM model servers: smoke.py checks a model pod directly."""
