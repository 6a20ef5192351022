"""Contract tier: the project's gateway, key, smoke and doctor functions against a real gateway (by
environment) and, always, against the stand-ins started locally. See docs/CONTRACT.md."""
