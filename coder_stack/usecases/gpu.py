"""Free the GPU: every GPU model but the one to keep scaled to 0, then until their pods are gone.

One call for the check, the scale-downs and the wait: it runs between the GPU grant and the next model's
scale-up, where each extra step is time the freed GPU idles. Safe to repeat (a second finds nothing).
"""

from __future__ import annotations

import asyncio

from kubernetes_asyncio.client import ApiClient
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.kubernetes.preflight import ModelOnGpu, models_on_gpu
from coder_stack.kubernetes.wait import GoneReport, wait_gone
from coder_stack.kubernetes.workloads import scale
from coder_stack.spec import ModelSpec, StackSpec


class FreedGpu(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    scaled_down: list[ModelOnGpu] = Field(description="The other GPU models found with replicas or pods, scaled to 0.")
    gone: list[GoneReport] = Field(description="For each of them, the wait until its last pod was gone.")


async def free_gpu(api: ApiClient, spec: StackSpec, keep: ModelSpec | None) -> FreedGpu:
    """Every GPU model except ``keep`` to 0 at once, then wait until each one's pods are gone."""
    ns = spec.serving_namespace
    others = await models_on_gpu(api, spec, keep.name if keep else None)
    if not others:
        return FreedGpu(scaled_down=[], gone=[])
    await asyncio.gather(*(scale(api, ns, h.name, 0) for h in others))
    gone = await asyncio.gather(
        *(wait_gone(api, ns, spec.model(h.name).selector, spec.timeouts.deletion_s) for h in others)
    )
    return FreedGpu(scaled_down=others, gone=list(gone))


__all__ = ["FreedGpu", "free_gpu"]
