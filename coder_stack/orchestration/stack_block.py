"""The stack spec kept in Prefect: a ``CoderStackSpec`` block, for flow runs that have no file to read (a Job
pod of the Kubernetes work pool) and so that a deployment shows which stack it runs against.

The block holds the spec as structured fields (the UI renders a form of the spec's own fields, with their
descriptions and limits), not as YAML text. It is read back through the same validation as a stack file:
a block edited into something invalid fails with the same field-path lines (``models.0.weights_gb: ...``)
as :func:`coder_stack.spec.load_spec` gives for a file. It names where secrets live, never their values.
"""

from __future__ import annotations

from typing import Literal

import httpx
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from pydantic import Field

from coder_stack.errors import ConfigError, SpecError
from coder_stack.spec import StackSpec, parse_spec

BLOCK_TYPE_SLUG = "coder-stack-spec"
DEFAULT_STACK_BLOCK = "coder-stack"


class CoderStackSpec(Block):
    """The coder stack: namespaces, GPU models and their cold-start budgets, front-ends, virtual keys, how
    endpoints are reached. Flows name it in their `connection.stack_block` parameter. Edit it here, or rerun
    `coder-stack setup --stack FILE` to replace it with a file's contents."""

    _block_type_name = "Coder Stack Spec"
    _block_type_slug = BLOCK_TYPE_SLUG
    _description = (
        "The coder stack's spec (vLLM models, LiteLLM gateway, front-ends, virtual keys) that the coder-stack "
        "flows run against. Names where secrets live, never their values."
    )

    spec: StackSpec = Field(
        default_factory=StackSpec,
        description="The stack spec; every default is the runbook's reference deployment.",
    )


def _source(name: str) -> str:
    return f"stack block {name!r} ({BLOCK_TYPE_SLUG})"


async def _read_data(name: str) -> dict | None:
    """The block document's stored data, or None when there is none of that name."""
    try:
        async with get_client() as client:
            doc = await client.read_block_document_by_name(name, block_type_slug=BLOCK_TYPE_SLUG)
    except ObjectNotFound:
        return None
    except (httpx.HTTPError, OSError) as e:  # the API unreachable, or answering with an error
        raise ConfigError(
            f"the Prefect API could not be reached to read {_source(name)} ({type(e).__name__}); check PREFECT_API_URL"
        ) from e
    return dict(doc.data)


async def load_stack_block(name: str) -> StackSpec:
    """The spec held by the ``CoderStackSpec`` block ``name``, validated as a stack file is."""
    data = await _read_data(name)
    if data is None:
        raise SpecError(
            f"{_source(name)} does not exist; create it with `coder-stack setup --stack FILE --stack-block {name}` "
            "or in the Prefect UI (Blocks > Coder Stack Spec)"
        )
    return parse_spec(data.get("spec"), _source(name))


async def stack_block_exists(name: str) -> bool:
    return await _read_data(name) is not None


async def register_stack_block_type() -> None:
    """Register the block type and its schema, so the UI can create one (idempotent)."""
    await CoderStackSpec.aregister_type_and_schema()


async def save_stack_block(name: str, spec: StackSpec) -> Literal["created", "updated", "unchanged"]:
    """Create or replace the block ``name`` with ``spec``; safe to rerun (an equal block is left as it is)."""
    await register_stack_block_type()
    data = await _read_data(name)
    if data is not None:
        try:
            if parse_spec(data.get("spec"), _source(name)) == spec:
                return "unchanged"
        except SpecError:
            pass  # an invalid block is replaced by the file's valid spec
    await CoderStackSpec(spec=spec).asave(name, overwrite=True)
    return "created" if data is None else "updated"
