"""Free the GPU: every GPU model but the one to keep scaled to 0, then until their pods are gone.

One call for the check, the scale-downs and the wait: it runs between the GPU grant and the next model's
scale-up, where each extra step is time the freed GPU idles. Safe to repeat (a second finds nothing).
"""

from __future__ import annotations

import asyncio

from kubernetes_asyncio.client import ApiClient
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.kubernetes.preflight import ModelOnGpu, gpu_holders
from coder_stack.kubernetes.wait import GoneReport, wait_gone
from coder_stack.kubernetes.workloads import scale
from coder_stack.spec import ModelSpec, StackSpec


class FreedGpu(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    holders: list[ModelOnGpu] = Field(description="The other GPU models found with replicas or pods.")
    gone: list[GoneReport] = Field(description="For each of them, the wait until its last pod was gone.")


async def free_gpu(api: ApiClient, spec: StackSpec, keep: ModelSpec | None) -> FreedGpu:
    """Every GPU model except ``keep`` to 0 at once, then wait until each one's pods are gone."""
    ns = spec.serving_namespace
    holders = await gpu_holders(api, spec, keep.name if keep else None)
    if not holders:
        return FreedGpu(holders=[], gone=[])
    await asyncio.gather(*(scale(api, ns, h.name, 0) for h in holders))
    gone = await asyncio.gather(
        *(wait_gone(api, ns, spec.model(h.name).selector, spec.timeouts.deletion_s) for h in holders)
    )
    return FreedGpu(holders=holders, gone=list(gone))


__all__ = ["FreedGpu", "free_gpu"]
