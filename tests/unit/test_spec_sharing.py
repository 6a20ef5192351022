"""GPU sharing in the spec: exclusive by default (nothing changes), time-sliced with each model's share of the
GPU, refusals that say what to do, and ``shares_fit``'s numbers."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from coder_stack.errors import SpecError
from coder_stack.spec import GpuSharing, StackSpec, load_spec, spec_yaml


def sliced(chat: float = 0.45, fim: float = 0.35, agent: float = 0.9, **sharing: object) -> StackSpec:
    shares = {"coder-chat": chat, "coder-fim": fim, "coder-agent": agent}
    base = StackSpec()
    models = [m.model_copy(update={"gpu_memory_utilization": shares[m.name]}) for m in base.models]
    return StackSpec(models=models, gpu_sharing=GpuSharing.model_validate({"mode": "time-sliced", **sharing}))


def test_exclusive_is_the_default_and_an_empty_file_is_still_the_reference_stack(tmp_path: Path) -> None:
    spec = StackSpec()
    assert spec.gpu_sharing == GpuSharing()
    assert spec.gpu_sharing.model_dump() == {
        "mode": "exclusive",
        "gpu_memory_gb": 24.0,
        "replicas": 2,
        "min_kv_cache_gb": 1.0,
    }
    assert {m.gpu_memory_utilization for m in spec.models} == {0.9}  # vLLM's own default
    f = tmp_path / "stack.yaml"
    f.write_text("gpus: 1\n")
    assert load_spec(f) == spec


def test_a_time_sliced_spec_round_trips_through_yaml(tmp_path: Path) -> None:
    spec = sliced(gpu_memory_gb=48, replicas=3, min_kv_cache_gb=2)
    f = tmp_path / "stack.yaml"
    f.write_text(spec_yaml(spec))
    loaded = load_spec(f)
    assert loaded == spec and loaded.model("coder-fim").gpu_memory_utilization == 0.35
    assert loaded.gpu_sharing.mode == "time-sliced" and loaded.gpu_sharing.replicas == 3


_ONE_MODEL = (
    "models:\n- {{name: a, role: chat, served_model_name: a, alias: a, weights_gb: 1,\n"
    "    gpu_memory_utilization: {share}}}\ndefault_model: a\nvirtual_keys: []\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu_sharing:\n  mode: mps\n", "gpu_sharing.mode: Input should be 'exclusive' or 'time-sliced'"),
        ("gpu_sharing:\n  gpu_memory_gb: 0\n", "gpu_sharing.gpu_memory_gb: Input should be greater than 0"),
        ("gpu_sharing:\n  min_kv_cache_gb: -1\n", "gpu_sharing.min_kv_cache_gb: Input should be greater than or"),
        (
            "gpu_sharing:\n  mode: time-sliced\n  replicas: 1\n",
            "time-slicing needs at least 2 replicas per GPU (one per model that shares it): set "
            "gpu_sharing.replicas to the number the cluster advertises",
        ),
        (
            _ONE_MODEL.format(share=0),
            "models.0.gpu_memory_utilization: Input should be greater than 0",
        ),
        (
            _ONE_MODEL.format(share=1.2),
            "models.0.gpu_memory_utilization: Input should be less than or equal to 1",
        ),
    ],
)
def test_bad_sharing_fields_are_refused_with_the_field_path(tmp_path: Path, text: str, expected: str) -> None:
    f = tmp_path / "stack.yaml"
    f.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(f)
    assert expected in str(info.value)


def test_exclusive_mode_accepts_one_replica() -> None:
    assert GpuSharing(mode="exclusive", replicas=1).replicas == 1


def test_chat_and_fim_fit_an_l4_with_the_numbers() -> None:
    v = sliced().shares_fit(["coder-chat", "coder-fim"])
    assert v.fits and v.shares_fit and v.count_fits and v.problems() == []
    assert (v.gpu_memory_gb, v.replicas, v.total_gb) == (24, 2, 19.2)
    chat, fim = v.models
    assert (chat.utilization, chat.share_gb, chat.weights_gb, chat.kv_cache_gb, chat.need_gb) == (
        0.45,
        10.8,
        5.5,
        1,
        6.5,
    )
    assert (fim.share_gb, fim.need_gb) == (8.4, 4.1)
    assert v.summary() == (
        "coder-chat 0.45 x 24 GB = 10.8 GB and coder-fim 0.35 x 24 GB = 8.4 GB: 19.2 GB of 24 GB; "
        "coder-chat needs 5.5 GB of weights + 1 GB of KV cache = 6.5 GB <= its 10.8 GB; "
        "coder-fim needs 3.1 GB of weights + 1 GB of KV cache = 4.1 GB <= its 8.4 GB"
    )


def test_shares_that_add_up_to_exactly_the_card_fit_and_one_hundredth_more_does_not() -> None:
    assert sliced(chat=0.55, fim=0.45).shares_fit(["coder-chat", "coder-fim"]).fits
    over = sliced(chat=0.56, fim=0.45).shares_fit(["coder-chat", "coder-fim"])
    assert not over.fits and not over.shares_fit and all(m.fits for m in over.models)
    assert over.problems() == [
        "the shares add up to 24.24 GB, more than the GPU's 24 GB: lower the models' gpu_memory_utilization so "
        "they add up to at most 1, or run fewer models together"
    ]


def test_a_share_under_weights_plus_kv_cache_names_the_least_share_that_holds_them() -> None:
    v = sliced(chat=0.27).shares_fit(["coder-chat", "coder-fim"])  # 6.48 GB < 6.5 GB
    assert not v.fits and v.shares_fit and [m.name for m in v.too_small] == ["coder-chat"]
    assert v.problems() == [
        "coder-chat's share of 6.48 GB cannot hold 5.5 GB of weights + 1 GB of KV cache: raise its "
        "gpu_memory_utilization to at least 0.28"
    ]
    assert sliced(chat=0.28).shares_fit(["coder-chat"]).fits


def test_a_model_too_big_for_the_whole_card_is_told_so() -> None:
    v = sliced(gpu_memory_gb=8).shares_fit(["coder-agent"])  # 9.5 + 1 GB on an 8 GB GPU
    assert v.problems() == [
        "coder-agent's share of 7.2 GB cannot hold 9.5 GB of weights + 1 GB of KV cache: it does not fit one 8 GB "
        "GPU even alone: use a smaller model or bigger GPU"
    ]


def test_more_models_than_replicas_do_not_fit_and_the_clusters_replicas_win() -> None:
    spec = sliced(chat=0.3, fim=0.2, agent=0.45)
    three = ["coder-chat", "coder-fim", "coder-agent"]
    v = spec.shares_fit(three)
    assert v.shares_fit and not v.count_fits and not v.fits
    assert v.problems()[0].startswith("3 models but a GPU is shared by at most 2 (its time-slicing replicas)")
    assert spec.shares_fit(three, replicas=3).fits
    assert not spec.shares_fit(three, replicas=3, gpu_memory_gb=22).fits  # 22.8 GB of shares on 22 GB


def test_exclusive_mode_gives_each_model_the_whole_gpu() -> None:
    spec = StackSpec()
    alone = spec.shares_fit(["coder-agent"])
    assert alone.fits and alone.replicas == 1 and alone.models[0].share_gb == 24 and alone.models[0].utilization == 1
    both = spec.shares_fit(["coder-chat", "coder-fim"])
    assert not both.fits
    assert both.problems() == [
        "gpu_sharing.mode is exclusive, so each of the 2 models takes a whole GPU: run one at a time, or set "
        "gpu_sharing.mode: time-sliced on a time-shared GPU node pool"
    ]


def test_shares_fit_takes_names_aliases_or_specs_counts_each_model_once_and_refuses_unknown_names() -> None:
    spec = sliced()
    by_spec = spec.shares_fit([spec.model("coder-chat"), "coder-fim", "coder-chat"])
    assert [m.name for m in by_spec.models] == ["coder-chat", "coder-fim"] and by_spec.total_gb == 19.2
    with pytest.raises(SpecError, match="unknown model 'coder-32b'"):
        spec.shares_fit(["coder-32b"])


def test_the_time_sliced_starter_serves_chat_and_fim_together_and_is_what_spec_prints() -> None:
    import yaml
    from typer.testing import CliRunner

    from coder_stack.app import cli
    from coder_stack.spec import parse_spec

    starter = StackSpec().time_sliced_starter()
    assert starter.time_sliced and [m.name for m in starter.bring_up_models] == ["coder-chat", "coder-fim"]
    assert starter.shares_fit(starter.bring_up_models).fits and starter.fit_together(["coder-chat", "coder-fim"])
    assert not starter.fit_together(["coder-chat", "coder-agent"])  # the agent needs the whole card
    assert starter.occupy(["coder-chat", "coder-fim"]) == 90 and starter.occupy(["coder-agent"]) == 90
    assert (
        starter.gpu_limit_slots == 100 and StackSpec().gpu_limit_slots == 1 and StackSpec().occupy(["coder-chat"]) == 1
    )
    res = CliRunner().invoke(cli.app, ["spec", "--time-sliced"])
    assert res.exit_code == 0, res.output
    assert parse_spec(yaml.safe_load(res.output), "spec --time-sliced") == starter
    assert parse_spec(yaml.safe_load(CliRunner().invoke(cli.app, ["spec"]).output), "spec") == StackSpec()


def test_time_sliced_is_planned_on_one_gpu_and_default_models_must_exist() -> None:
    with pytest.raises(ValidationError, match="time-slicing is planned on one GPU"):
        StackSpec(gpus=2, gpu_sharing=GpuSharing(mode="time-sliced"))
    with pytest.raises(ValidationError, match="default_models names unknown model 'coder-32b'"):
        StackSpec(default_models=["coder-32b"])
    spec = StackSpec(gpu_sharing=GpuSharing(mode="time-sliced"), default_models=["coder-agent", "coder-chat"])
    assert [m.name for m in spec.bring_up_models] == ["coder-chat", "coder-agent"]  # default_model starts first


def test_fit_beside_takes_candidates_in_order_while_they_fit_and_none_in_exclusive_mode() -> None:
    spec = sliced(chat=0.55, fim=0.35, agent=0.9)
    chat, fim, agent = (spec.model(n) for n in ("coder-chat", "coder-fim", "coder-agent"))
    assert spec.fit_beside([fim], [agent, chat]) == [chat]  # the agent does not fit beside fim; chat does
    assert spec.fit_beside([agent], [chat, fim]) == []
    assert spec.fit_beside([chat], [chat, fim, fim]) == [fim]  # the base and a repeat are not taken again
    assert StackSpec().fit_beside([StackSpec().model("coder-chat")], StackSpec().models) == []
