"""Wake on demand: the LiteLLM callback module that `coder-stack wake-setup` ships into the gateway (a placeholder
on this branch; the module itself is written beside it and replaces this file)."""
