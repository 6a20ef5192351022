import os

# As the CLI and the deployments do, before Prefect is imported: flow runs send a heartbeat every 30 s, which a
# GPU session requires (coder_stack.orchestration.liveness). Flow and worker processes started by tests inherit it.
os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
