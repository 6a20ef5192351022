"""The wake request as an event on the Prefect server (what the LiteLLM callback sends, and `coder-stack wake`):
``coder-stack.model.wake-requested`` about the resource ``coder-stack.model.<deployment>``, which the
``wake-model`` deployment's trigger turns into a ``wake_model`` run. No key, no user, no prompt in it."""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.events import Event
from prefect.events.clients import get_events_client
from prefect.exceptions import ObjectNotFound

from coder_stack.errors import ConfigError

WAKE_EVENT = "coder-stack.model.wake-requested"
WAKE_DEPLOYMENT = "wake_model/wake-model"


def wake_event(deployment: str, alias: str, route: str, reason: str) -> Event:
    return Event(
        event=WAKE_EVENT,
        resource={
            "prefect.resource.id": f"coder-stack.model.{deployment}",
            "prefect.resource.name": deployment,
            "coder-stack.alias": alias,
        },
        payload={"alias": alias, "route": route, "reason": reason},
    )


async def request_wake(deployment: str, alias: str, route: str, reason: str) -> None:
    """Send the wake request, after checking that the ``wake-model`` deployment that answers it exists."""
    async with get_client() as client:
        try:
            await client.read_deployment_by_name(WAKE_DEPLOYMENT)
        except ObjectNotFound:
            raise ConfigError(
                f"no {WAKE_DEPLOYMENT} deployment on this Prefect server, so nothing would answer the wake: run "
                "`coder-stack setup` (it deploys prefect.yaml), then ask again; nothing was sent"
            ) from None
    async with get_events_client() as events:
        await events.emit(wake_event(deployment, alias, route, reason))
