# The coder-stack flows for the Kubernetes work pool `coder-stack-k8s`: the worker runs each flow run as a
# Job whose pod runs this image. Contract: the in-cluster deployments have no pull step (`pull: []` in
# prefect.yaml), so a flow run starts in the container's working directory, this image's WORKDIR, and loads
# its entrypoint (flows/<name>.py) from there.
#
#   docker build -t REGISTRY/coder-stack:0.1.0 .     # from the checkout; README "In the cluster"
#   docker push REGISTRY/coder-stack:0.1.0
#
# The Python of the base image and every package are pinned: pyproject.toml pins the direct dependencies
# (prefect 3.9.1, prefect-kubernetes 0.8.0, ...), constraints.txt the whole resolved set. No dev extras.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

WORKDIR /opt/coder-stack

# The project's metadata and pins first, then the product's folders: the library (coder_stack/, whose app, flows
# and tasks are links to the folders beside it) and the layers above it. The development tools (devtools/: the
# simulator, the demo, the benchmark) are not copied: the image holds the product only.
COPY pyproject.toml constraints.txt README.md ./
COPY coder_stack/ coder_stack/
COPY app/ app/
COPY flows/ flows/
COPY tasks/ tasks/

RUN python -m pip install --no-cache-dir "pip==26.3" \
    && python -m pip install --no-cache-dir -c constraints.txt . \
    && rm -rf build ./*.egg-info \
    && useradd --system --uid 10001 --create-home --home-dir /home/coder-stack --shell /usr/sbin/nologin coder-stack

COPY prefect.yaml ./

# Numeric, so a pod's `runAsNonRoot: true` can verify it.
USER 10001
