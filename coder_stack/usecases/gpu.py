"""Free the GPU: every GPU model but the ones to keep scaled to 0, then until their pods are gone; and, when
models share a time-sliced GPU, wait until a model's share of it is free before it starts.

One call for the check, the scale-downs and the wait: it runs between the GPU grant and the next model's
scale-up, where each extra step is time the freed GPU idles. Safe to repeat (a second finds nothing).

Why a share is waited for rather than raced: vLLM measures the GPU's free memory when its worker initialises the
device (``request_memory`` in ``vllm/v1/worker/utils.py``, called from ``Worker.init_device``) and refuses to start
(``ValueError: Free memory on device ... is less than desired GPU memory utilization``) when less than
``ceil(total x gpu_memory_utilization)`` is free. A server still loading, or a pod still terminating, holds (or is
about to take) its share; so a model starts only once the shares of every pod already on the GPU plus its own fit
the card, and models that share a GPU start one after another.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from kubernetes_asyncio.client import ApiClient
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import WaitTimeout
from coder_stack.kubernetes.preflight import ModelOnGpu, models_on_gpu
from coder_stack.kubernetes.wait import GoneReport, wait_gone
from coder_stack.kubernetes.workloads import scale
from coder_stack.spec import ModelSpec, ShareVerdict, StackSpec

# How often the share is looked at again while a model that still has replicas holds it (a terminating pod is
# watched until it is gone instead).
SHARE_POLL_S = 1.0


class FreedGpu(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    scaled_down: list[ModelOnGpu] = Field(description="The other GPU models found with replicas or pods, scaled to 0.")
    gone: list[GoneReport] = Field(description="For each of them, the wait until its last pod was gone.")


def kept_names(keep: ModelSpec | Sequence[ModelSpec] | None) -> list[str]:
    if keep is None:
        return []
    if isinstance(keep, ModelSpec):
        return [keep.name]
    return [m.name for m in keep]


async def free_gpu(api: ApiClient, spec: StackSpec, keep: ModelSpec | Sequence[ModelSpec] | None) -> FreedGpu:
    """Every GPU model except ``keep`` (one model, several, or none) to 0 at once, then wait until each one's pods
    are gone."""
    ns = spec.serving_namespace
    others = await models_on_gpu(api, spec, kept_names(keep))
    if not others:
        return FreedGpu(scaled_down=[], gone=[])
    await asyncio.gather(*(scale(api, ns, h.name, 0, found=h.replicas) for h in others))  # as just listed
    gone = await asyncio.gather(
        *(wait_gone(api, ns, spec.model(h.name).selector, spec.timeouts.deletion_s) for h in others)
    )
    return FreedGpu(scaled_down=others, gone=list(gone))


class ShareCheck(BaseModel):
    """Whether ``model``'s share of the time-sliced GPU is free now, with what holds the GPU."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="The model about to start.")
    on_gpu: list[ModelOnGpu] = Field(description="The other models that hold the GPU (replicas > 0 or pods).")
    verdict: ShareVerdict = Field(description="Their shares plus the model's against the card and its replicas.")
    own_pods: list[str] = Field(description="The model's own pods still there while it is scaled to 0.")
    already_up: bool = Field(False, description="The model already has replicas: it holds its share already.")

    @property
    def free(self) -> bool:
        return self.already_up or (self.verdict.fits and not self.own_pods)

    @property
    def terminating(self) -> list[str]:
        """The models scaled to 0 whose pods are still there (they go by themselves)."""
        out = [h.name for h in self.on_gpu if h.replicas == 0 and h.pods]
        return [self.model, *out] if self.own_pods else out

    def describe(self) -> str:
        holders = (
            ", ".join(f"{h.name} ({h.replicas} replica(s), {len(h.pods)} pod(s))" for h in self.on_gpu)
            or "nothing else"
        )
        own = f"; its own old pod(s) {', '.join(self.own_pods)} still there" if self.own_pods else ""
        why = " ".join(self.verdict.problems()) if not self.verdict.fits else ""
        return f"on the GPU: {holders}{own}; {self.verdict.summary()}{'; ' + why if why else ''}"


async def check_share(api: ApiClient, spec: StackSpec, model: ModelSpec) -> ShareCheck:
    """One look: the models holding the GPU (replicas or pods) and whether ``model``'s share fits beside them."""
    everyone = await models_on_gpu(api, spec)
    others = [h for h in everyone if h.name != model.name]
    mine = next((h for h in everyone if h.name == model.name), None)
    # its own pods count only while it is scaled to 0: a pod terminating beside its new one holds its memory
    own = mine.pods if mine is not None and mine.replicas == 0 else []
    verdict = spec.shares_fit([*(h.name for h in others), model.name])
    up = mine is not None and mine.replicas > 0
    return ShareCheck(model=model.name, on_gpu=others, verdict=verdict, own_pods=own, already_up=up)


async def wait_for_share(
    api: ApiClient, spec: StackSpec, model: ModelSpec, timeout_s: float, poll_s: float = SHARE_POLL_S
) -> ShareCheck:
    """Until ``model``'s share of the time-sliced GPU is free: the shares of the models with replicas or pods on it
    (``model`` excluded) plus its own fit the card and its replicas, and none of its own old pods is left.
    A terminating pod is watched until it is gone; a model that still has replicas is looked at every ``poll_s``.
    Past ``timeout_s``: WaitTimeout naming what holds the GPU and the numbers. Time-sliced mode only: in exclusive
    mode the flow's GPU session is the whole card and the flow frees it first."""
    begin = time.monotonic()
    ns = spec.serving_namespace
    while True:
        check = await check_share(api, spec, model)
        left = begin + timeout_s - time.monotonic()
        if check.free:
            return check
        if left <= 0:
            raise WaitTimeout(
                f"{model.name}'s share of the GPU was not free after {timeout_s:.0f} s ({check.describe()}). vLLM "
                "refuses to start when its share of the GPU's memory is not free, so it was not started; scale the "
                "models you do not need to 0 (`coder-stack swap` or `coder-stack down`) and run again",
                phase="gpu-share",
                elapsed_s=time.monotonic() - begin,
            )
        going = check.terminating
        if going:
            try:
                await wait_gone(api, ns, spec.model(going[0]).selector, left)
            except WaitTimeout:
                continue  # out of time: the next look says what still holds the GPU
        else:
            await asyncio.sleep(min(poll_s, left))


__all__ = ["SHARE_POLL_S", "FreedGpu", "ShareCheck", "check_share", "free_gpu", "kept_names", "wait_for_share"]
