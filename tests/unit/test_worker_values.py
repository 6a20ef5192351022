"""The Kubernetes work pool's base job template, and the Helm values for the official prefect-worker chart.

What users rely on: the template is prefect-kubernetes 0.8.0's own default with only coder-stack's values
changed (namespace and ServiceAccount from deployments/rbac.yaml, the image, a pod watch timeout above a node
scale-up); a rerun of setup never silently drops a value someone changed in the pool; and the chart's values
carry the same pool, type and template (the chart writes its template into the pool at every worker start,
so a difference would undo setup's).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from prefect_kubernetes.worker import KubernetesWorker

from coder_stack.app.setup import (
    DEFAULT_IMAGE,
    K8S_POOL,
    POD_WATCH_TIMEOUT_S,
    k8s_base_job_template,
    reconcile_k8s_template,
    render_worker_values,
)

ROOT = Path(__file__).resolve().parents[2]
VALUES = ROOT / "deployments" / "prefect-worker-values.yaml"


def defaults(template: dict) -> dict:
    return {k: v.get("default") for k, v in template["variables"]["properties"].items()}


def rbac_service_account() -> tuple[str, str]:
    docs = list(yaml.safe_load_all((ROOT / "deployments" / "rbac.yaml").read_text()))
    sa = next(d for d in docs if d and d["kind"] == "ServiceAccount")
    return sa["metadata"]["namespace"], sa["metadata"]["name"]


def test_the_template_is_prefect_kubernetes_default_with_only_our_values_changed() -> None:
    stock = KubernetesWorker.get_default_base_job_template()
    ours = k8s_base_job_template("ghcr.io/acme/coder-stack:0.1.0")
    assert ours["job_configuration"] == stock["job_configuration"]
    changed = {k: v for k, v in defaults(ours).items() if v != defaults(stock)[k]}
    namespace, sa = rbac_service_account()
    assert changed == {
        "namespace": namespace,
        "service_account_name": sa,
        "image": "ghcr.io/acme/coder-stack:0.1.0",
        "pod_watch_timeout_seconds": POD_WATCH_TIMEOUT_S,
    }
    assert (namespace, sa) == ("prefect", "coder-stack-flows")
    # Above a node scale-up (minutes), far above prefect-kubernetes' 60 s; no bound on the job itself.
    assert defaults(stock)["pod_watch_timeout_seconds"] == 60 and POD_WATCH_TIMEOUT_S >= 600
    assert defaults(ours)["job_watch_timeout_seconds"] is None


def test_a_rerun_sets_only_values_that_are_still_stock_or_ours() -> None:
    stock = KubernetesWorker.get_default_base_job_template()
    # A fresh stock pool: every value is set, and said so.
    done, notes = reconcile_k8s_template(stock, DEFAULT_IMAGE, image_given=False)
    assert done == k8s_base_job_template(DEFAULT_IMAGE)
    assert len(notes) == 4 and all(n.startswith("set ") for n in notes), notes
    # Ours already: nothing to do.
    assert reconcile_k8s_template(done, DEFAULT_IMAGE, image_given=False) == (done, [])
    # Someone moved the Jobs to another namespace and pinned another image: both kept, with a note each.
    edited = json.loads(json.dumps(done))
    edited["variables"]["properties"]["namespace"]["default"] = "flows"
    edited["variables"]["properties"]["image"]["default"] = "their/image:1"
    kept, notes = reconcile_k8s_template(edited, DEFAULT_IMAGE, image_given=False)
    assert kept == edited
    assert notes == [
        "kept namespace='flows', changed since prefect-kubernetes' default (coder-stack would set 'prefect'; "
        "edit the pool's base job template to change it)",
        "kept image 'their/image:1' (give --image or CODER_STACK_IMAGE to change it)",
    ]
    # An image given on purpose (--image / CODER_STACK_IMAGE) replaces theirs; their namespace still stays.
    kept, notes = reconcile_k8s_template(edited, "ghcr.io/acme/coder-stack:0.2.0", image_given=True)
    assert defaults(kept)["image"] == "ghcr.io/acme/coder-stack:0.2.0"
    assert defaults(kept)["namespace"] == "flows"
    assert "set image to 'ghcr.io/acme/coder-stack:0.2.0' (was 'their/image:1')" in notes


def test_the_helm_values_agree_with_the_pool_setup_creates() -> None:
    values = yaml.safe_load(VALUES.read_text())
    config = values["worker"]["config"]
    template = json.loads(config["baseJobTemplate"]["configuration"])
    image = defaults(template)["image"]
    assert (config["workPool"], config["type"]) == (K8S_POOL, "kubernetes")
    assert template == k8s_base_job_template(image)
    namespace, _ = rbac_service_account()
    assert f".{namespace}.svc." in values["worker"]["selfHostedServerApiConfig"]["apiUrl"]
    assert values["worker"]["image"]["prefectTag"].startswith("3.9.1-python3.11")  # the Prefect the flows pin
    # The file is exactly what `coder-stack worker-values` prints for its image (regenerate it with that).
    assert VALUES.read_text() == render_worker_values(image)


def test_the_chart_reads_the_keys_the_values_set() -> None:
    """The keys are the chart's (prefect-helm charts/prefect-worker/values.yaml): worker.config.workPool, .type,
    .baseJobTemplate.configuration as a JSON string; a misspelt key would be ignored by helm without a word."""
    values = yaml.safe_load(VALUES.read_text())
    assert set(values) == {"worker", "serviceAccount"}
    assert set(values["worker"]) == {"apiConfig", "selfHostedServerApiConfig", "image", "config"}
    assert set(values["worker"]["config"]) == {"workPool", "type", "baseJobTemplate"}
    assert set(values["worker"]["config"]["baseJobTemplate"]) == {"configuration"}
    assert isinstance(values["worker"]["config"]["baseJobTemplate"]["configuration"], str)
    assert values["worker"]["apiConfig"] == "selfHostedServer"
