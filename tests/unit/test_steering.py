"""Steering: configs and their errors, the error-preserving SAE edit (fast form = the formula),
positions under generate, direction edits, side-by-side generation, saved configs and preview,
and the identity acceptance test on SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

from kestrel.core import steering
from kestrel.core.concepts import Concept, update_concepts
from kestrel.core.errors import InvalidInputError, NotFoundError
from kestrel.core.hooks import Controller, HookContext, add_vector
from kestrel.core.models import forward
from kestrel.core.sae import SAEConfig, create
from kestrel.core.sae import io as sae_io
from kestrel.core.sae.base import SAE
from kestrel.core.sae.records import SAEManifest
from kestrel.core.steering import LatentEdit, SteeringConfig

LAYER = "model.layers.1"


def make_sae(d_in: int, n_latents: int = 64, k: int = 4, layer: str = LAYER, seed: int = 0):
    sae = create(
        SAEConfig(d_in=d_in, n_latents=n_latents, k=k, layer=layer),
        generator=torch.Generator().manual_seed(seed),
    )
    with torch.no_grad():
        sae.b_enc.fill_(0.1)  # some latents fire on random inputs
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae.eval()


def loader(sae):
    def load(sae_id: str) -> tuple[SAE, SAEManifest]:
        summary = SAEManifest(id=sae_id, layer=sae.config.layer, config=sae.config.model_dump(mode="json"))
        return sae, summary

    return load


@pytest.fixture
def saved_sae(store):
    """An SAE published in the store (d_in 32 for the tiny Llama), as the pipeline would."""
    sae = make_sae(32)
    with store.writer("saes", "steer-sae") as writer:
        sae_io.save_sae(sae, writer.directory, metrics={})
        writer.commit({"id": "steer-sae", "layer": LAYER, "config": sae.config.model_dump(mode="json")})
    return "steer-sae"


# ---------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"sae_id": "s", "edits": [{"latent": 1, "op": "boost", "value": 1}]}, r"edits\.0\.op"),
        (
            {
                "sae_id": "s",
                "edits": [
                    {"latent": 1, "op": "add", "value": 1},
                    {"latent": 2, "op": "add", "value": float("nan")},
                ],
            },
            r"edits\.1\.value: must be a finite number",
        ),
        ({"sae_id": "s", "edits": [{"latent": -3, "op": "add", "value": 1}]}, r"edits\.0\.latent"),
        (
            {
                "sae_id": "s",
                "edits": [{"latent": 4, "op": "add", "value": 1}, {"latent": 4, "op": "scale", "value": 0}],
            },
            r"edits\[1\]: latent 4 is already edited by edits\[0\]",
        ),
        ({"edits": [{"latent": 4, "op": "add", "value": 1}]}, r"give sae_id"),
        (
            {"directions": [{"layer": LAYER, "alpha": 1, "vector": [1.0], "latent": 3}]},
            r"directions\.0: .*exactly one of vector or latent",
        ),
        ({"directions": [{"layer": LAYER, "alpha": float("inf"), "vector": [1.0]}]}, r"directions\.0\.alpha"),
        (
            {"directions": [{"layer": LAYER, "alpha": 1, "latent": 3}]},
            r"directions\[0\]: a latent direction needs sae_id",
        ),
        ({"positions": "middle"}, r"positions"),
        ({"sae_id": "s", "edits": [], "extra": 1}, r"extra"),
    ],
)
def test_config_errors_name_the_edit(config, message) -> None:
    with pytest.raises(InvalidInputError, match=message):
        SteeringConfig(**config)


def test_check_config_against_the_sae(store, saved_sae) -> None:
    ok = steering.check_config(
        store, SteeringConfig(sae_id=saved_sae, edits=[{"latent": 63, "op": "add", "value": 2}])
    )
    assert ok.layer == LAYER
    with pytest.raises(
        InvalidInputError,
        match=r"edits\[1\]: latent 64 is out of range; sae 'steer-sae' has 64 latents \(0..63\)",
    ):
        steering.check_config(
            store,
            SteeringConfig(
                sae_id=saved_sae,
                edits=[{"latent": 1, "op": "add", "value": 1}, {"latent": 64, "op": "add", "value": 1}],
            ),
        )
    with pytest.raises(InvalidInputError, match=r"reads 'model\.layers\.1', not 'model\.layers\.2'"):
        steering.check_config(store, SteeringConfig(sae_id=saved_sae, layer="model.layers.2"))
    with pytest.raises(InvalidInputError, match=r"directions\[0\]: latent 99"):
        steering.check_config(
            store, SteeringConfig(sae_id=saved_sae, directions=[{"layer": LAYER, "alpha": 1, "latent": 99}])
        )
    with pytest.raises(NotFoundError):
        steering.check_config(store, SteeringConfig(sae_id="missing-sae"))


def test_an_sae_steers_only_the_model_it_reads() -> None:
    """The one check the API (before queueing) and the generate job (before loading) both make."""
    from kestrel.core.steering_config import check_steered_model

    check_steered_model("sae-a", "model-a", "model-a")
    check_steered_model("sae-a", None, "model-b")  # an SAE that records no model: nothing to compare
    check_steered_model("sae-a", "model-a", None)  # no model named: the SAE's is used
    with pytest.raises(
        InvalidInputError, match="sae 'sae-a' reads 'model-a'; it cannot steer 'model-b'"
    ) as e:
        check_steered_model("sae-a", "model-a", "model-b")
    assert e.value.details == {"model": "model-b", "sae_model": "model-a"}


# ---------------------------------------------------------------------------------------------
# The SAE edit


@pytest.mark.parametrize("keep_error", [True, False])
def test_fast_edit_equals_the_formula(keep_error) -> None:
    sae = make_sae(16, n_latents=40, k=6)
    h = torch.randn(3, 5, 16) * 2
    active = sae.encode(h).indices[0, 0, :3].tolist()  # latents active somewhere, and others
    others = [i for i in range(40) if i not in active][:2]
    edits = [
        LatentEdit(latent=active[0], op="scale", value=3.0),
        LatentEdit(latent=active[1], op="clamp", value=-1.5),
        LatentEdit(latent=active[2], op="add", value=1.0),
        LatentEdit(latent=others[0], op="add", value=4.0),
        LatentEdit(latent=others[1], op="clamp", value=2.0),
    ]
    controller = steering.sae_edit_controller("x", sae, edits, keep_error=keep_error)
    fast = controller.fn(h, HookContext("x", "forward", 0))
    torch.testing.assert_close(
        fast, steering.reference_edit(sae, h, edits, keep_error=keep_error), atol=1e-4, rtol=1e-4
    )
    assert not torch.allclose(fast, h)


def test_empty_edit_is_exactly_the_identity_and_the_error_term_matters(tiny_lm) -> None:
    sae = make_sae(32)
    texts = ["The chef simmered the sauce.", "Stars and galaxies"]
    base = forward(tiny_lm, texts)
    mask = base.attention_mask_BT.bool()
    plan = steering.compile_plan(SteeringConfig(sae_id="s"), tiny_lm, load_sae=loader(sae))
    assert plan.layer == LAYER and len(plan.hooks) == 1
    same = steering.steered_forward(tiny_lm, texts, plan)
    assert torch.equal(same.logits_BTV[mask], base.logits_BTV[mask])
    no_error = steering.compile_plan(
        SteeringConfig(sae_id="s", keep_error=False), tiny_lm, load_sae=loader(sae)
    )
    changed = steering.steered_forward(tiny_lm, texts, no_error)
    assert (changed.logits_BTV - base.logits_BTV)[mask].abs().max() > 1e-2


@pytest.mark.slow
def test_identity_on_smollm2_within_1e4_and_the_error_term_report(smollm, topic_sae, record_property) -> None:
    """Acceptance: a trained SAE attached with an empty edit moves SmolLM2's logits by <= 1e-4
    (max abs, fp32); without the error term the change is reported, and is large."""
    from kestrel.core.sae.artifacts import load_sae

    store, _ = topic_sae
    sae, summary = load_sae(store, "topics")
    texts = ["The capital of France is Paris, and", "Interest rates rose again in March."]
    base = forward(smollm, texts)
    mask = base.attention_mask_BT.bool()
    plan = steering.compile_plan(SteeringConfig(sae_id="topics"), smollm, load_sae=lambda _: (sae, summary))
    fast = (steering.steered_forward(smollm, texts, plan).logits_BTV - base.logits_BTV)[mask].abs().max()
    formula = Controller(plan.layer, lambda h, _: steering.reference_edit(sae, h, []))
    literal = (forward(smollm, texts, hooks=[formula]).logits_BTV - base.logits_BTV)[mask].abs().max()
    no_error_plan = steering.compile_plan(
        SteeringConfig(sae_id="topics", keep_error=False), smollm, load_sae=lambda _: (sae, summary)
    )
    no_error = (steering.steered_forward(smollm, texts, no_error_plan).logits_BTV - base.logits_BTV)[mask]
    report = {
        "layer": plan.layer,
        "max_abs_logit_change_empty_edit": float(fast),
        "max_abs_logit_change_formula_written_out": float(literal),
        "max_abs_logit_change_without_error_term": float(no_error.abs().max()),
        "mean_abs_logit_change_without_error_term": float(no_error.abs().mean()),
    }
    print(json.dumps(report))
    record_property("identity", report)
    assert fast <= 1e-4 and literal <= 1e-4
    assert report["max_abs_logit_change_without_error_term"] > 1.0


# ---------------------------------------------------------------------------------------------
# Positions, directions, generation


@pytest.mark.parametrize(
    ("positions", "expected"), [("all", None), ("prompt", [0]), ("generated", [1, 2, 3])]
)
def test_positions_under_generate(tiny_lm, positions, expected) -> None:
    from kestrel.core.models import generate

    calls: list[int] = []
    sae = make_sae(32)
    plan = steering.compile_plan(
        SteeringConfig(sae_id="s", positions=positions, edits=[{"latent": 2, "op": "add", "value": 5.0}]),
        tiny_lm,
        load_sae=loader(sae),
    )
    inner = plan.hooks[0].fn

    def spy(x, ctx):
        out = inner(x, ctx)
        if out is not None:
            calls.append(ctx.call)
        return out

    generate(tiny_lm, ["hello there"], max_new_tokens=4, hooks=[Controller(LAYER, spy)])
    assert calls == (expected if expected is not None else [0, 1, 2, 3])


def test_direction_edits_match_add_vector_and_the_sae_add_op(tiny_lm) -> None:
    sae = make_sae(32)
    texts = ["Some words here", "and more"]
    vector = torch.randn(32)
    plan = steering.compile_plan(
        SteeringConfig(directions=[{"layer": "model.layers.0", "alpha": 2.5, "vector": vector.tolist()}]),
        tiny_lm,
        load_sae=loader(sae),
    )
    expected = forward(tiny_lm, texts, hooks=[add_vector("model.layers.0", vector, alpha=2.5)]).logits_BTV
    torch.testing.assert_close(steering.steered_forward(tiny_lm, texts, plan).logits_BTV, expected)
    by_direction = steering.compile_plan(
        SteeringConfig(sae_id="s", directions=[{"layer": LAYER, "alpha": 3.0, "latent": 5}]),
        tiny_lm,
        load_sae=loader(sae),
    )
    by_edit = steering.compile_plan(
        SteeringConfig(sae_id="s", edits=[{"latent": 5, "op": "add", "value": 3.0}]),
        tiny_lm,
        load_sae=loader(sae),
    )
    torch.testing.assert_close(
        steering.steered_forward(tiny_lm, texts, by_direction).logits_BTV,
        steering.steered_forward(tiny_lm, texts, by_edit).logits_BTV,
        atol=1e-4,
        rtol=1e-4,
    )
    with pytest.raises(InvalidInputError, match=r"directions\[0\]: the direction has width 3"):
        steering.compile_plan(
            SteeringConfig(directions=[{"layer": LAYER, "alpha": 1, "vector": [1.0, 2.0, 3.0]}]),
            tiny_lm,
            load_sae=loader(sae),
        )
    with pytest.raises(NotFoundError, match="did you mean"):
        steering.compile_plan(
            SteeringConfig(directions=[{"layer": "model.layer.1", "alpha": 1, "vector": [1.0] * 32}]),
            tiny_lm,
            load_sae=loader(sae),
        )


def test_generate_side_by_side_greedy_sampled_and_top_latents(tiny_lm) -> None:
    sae = make_sae(32)
    empty = steering.compile_plan(SteeringConfig(sae_id="s"), tiny_lm, load_sae=loader(sae))
    same = steering.generate_side_by_side(tiny_lm, ["hello", "the cat"], empty, max_new_tokens=6)
    assert all(item["default"]["token_ids"] == item["steered"]["token_ids"] for item in same["items"])
    strong = steering.compile_plan(
        SteeringConfig(sae_id="s", edits=[{"latent": 3, "op": "clamp", "value": 50.0}]),
        tiny_lm,
        load_sae=loader(sae),
    )
    greedy = steering.generate_side_by_side(
        tiny_lm, ["hello", "the cat"], strong, max_new_tokens=6, top_latents=3, names={3: "three"}
    )
    item = greedy["items"][0]
    assert item["default"]["token_ids"] != item["steered"]["token_ids"]
    assert len(item["steered"]["tokens"]) == len(item["steered"]["token_ids"]) == 6
    assert item["steered"]["tokens"][0]["latents"][0] == {
        "latent": 3,
        "value": pytest.approx(item["steered"]["tokens"][0]["latents"][0]["value"]),
        "name": "three",
    }
    assert set(greedy["seconds"]) == {"default", "steered"}
    alone = steering.generate_side_by_side(
        tiny_lm, ["hello", "the cat"], strong, max_new_tokens=6, compare=False
    )
    assert alone["items"][0]["default"] is None and set(alone["seconds"]) == {"steered"}
    assert alone["items"][0]["steered"]["token_ids"] == item["steered"]["token_ids"]
    sampled = [
        steering.generate_side_by_side(tiny_lm, ["hello"], strong, max_new_tokens=6, do_sample=True, seed=7)[
            "items"
        ][0]
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1], "the same seed gives the same sampled continuations"
    with pytest.raises(InvalidInputError, match="top_latents needs an SAE"):
        no_sae = steering.compile_plan(SteeringConfig(), tiny_lm, load_sae=loader(sae))
        steering.generate_side_by_side(tiny_lm, ["hello"], no_sae, top_latents=2)


# ---------------------------------------------------------------------------------------------
# Saved configs and preview


def test_save_list_get_preview_delete(store, saved_sae, tiny_lm) -> None:
    update_concepts(store, saved_sae, [Concept(latent=7, name="Cooking", source="manual")])
    config = SteeringConfig(
        name="more cooking",
        sae_id=saved_sae,
        edits=[{"latent": 7, "op": "clamp", "value": 8}, {"latent": 9, "op": "scale", "value": 0}],
        directions=[{"layer": "model.layers.0", "alpha": 2, "latent": 7}],
        positions="generated",
    )
    record = steering.save_config(store, config)
    assert record["id"].startswith("steer-") and record["config"]["layer"] == LAYER
    assert [r["id"] for r in steering.list_configs(store)] == [record["id"]]
    loaded = steering.load_config(store, record["id"])
    assert loaded.edits == config.edits and loaded.positions == "generated"
    preview = steering.preview(store, loaded)
    assert preview["valid"] and [t["name"] for t in preview["touches"]] == ["Cooking", None]
    assert preview["directions"][0] == {
        "direction": 0,
        "layer": "model.layers.0",
        "alpha": 2.0,
        "kind": "latent",
        "latent": 7,
        "sae_id": saved_sae,
        "name": "Cooking",
        "normalize": False,
    }
    plan = steering.plan_from_store(store, tiny_lm, loaded)
    assert len(plan.hooks) == 2
    with pytest.raises(InvalidInputError, match=r"edits\[0\]: latent 500 is out of range"):
        steering.save_config(
            store, SteeringConfig(sae_id=saved_sae, edits=[{"latent": 500, "op": "add", "value": 1}])
        )
    assert len(steering.list_configs(store)) == 1, "an invalid config is never saved"
    steering.delete_config(store, record["id"])
    assert steering.list_configs(store) == []
    with pytest.raises(NotFoundError, match="no steering config"):
        steering.get_config_record(store, record["id"])
    with pytest.raises(InvalidInputError, match="invalid steering id"):
        steering.get_config_record(store, "../etc")


# ---------------------------------------------------------------------------------------------
# Strength relative to a latent's max activation, and warnings


def publish_max_activations(store, sae_id: str, peaks: dict[int, float], n_latents: int = 64) -> None:
    """A discovery result holding only what steering reads: density and max activation."""
    from kestrel.core.concepts.store import publish, staging_dir

    max_activation = torch.zeros(n_latents)
    for latent, peak in peaks.items():
        max_activation[latent] = peak
    tensors = {"density": (max_activation > 0).float() * 0.01, "max_activation": max_activation}
    publish(store, sae_id, staging_dir(store, sae_id), tensors, {}, {"n_latents": n_latents})


def test_relative_edits_resolve_to_multiples_of_the_observed_max(store, saved_sae, tiny_lm) -> None:
    publish_max_activations(store, saved_sae, {7: 3.25, 9: 0.5})
    relative = SteeringConfig(
        sae_id=saved_sae,
        edits=[
            {"latent": 7, "op": "clamp", "value": 2, "unit": "max_activation"},
            {"latent": 9, "op": "add", "value": -1.5, "unit": "max_activation"},
            {"latent": 11, "op": "scale", "value": 0},
        ],
    )
    resolved = steering.resolve_edits(store, relative)
    assert [(e.op, e.value, e.unit) for e in resolved.edits] == [
        ("clamp", 6.5, "absolute"),
        ("add", -0.75, "absolute"),
        ("scale", 0.0, "absolute"),
    ]
    record = steering.save_config(store, relative)
    assert record["config"]["edits"][0] == {
        "latent": 7,
        "op": "clamp",
        "value": 2.0,
        "unit": "max_activation",
    }
    # The compiled plan steers exactly as the absolute config does.
    texts = ["the cat sat on the mat", "a second text"]
    got = steering.steered_forward(tiny_lm, texts, steering.plan_from_store(store, tiny_lm, relative))
    want = steering.steered_forward(tiny_lm, texts, steering.plan_from_store(store, tiny_lm, resolved))
    assert torch.equal(got.logits_BTV, want.logits_BTV)
    preview = steering.preview(store, relative)
    assert [(t["unit"], t["absolute_value"], t["max_activation"]) for t in preview["touches"][:2]] == [
        ("max_activation", 6.5, 3.25),
        ("max_activation", -0.75, 0.5),
    ]
    assert preview["warnings"] == []
    with pytest.raises(InvalidInputError, match="must be resolved"):
        steering.compile_plan(relative, tiny_lm, load_sae=loader(make_sae(32)))


def test_relative_edits_need_discovery_and_a_latent_that_fired(store, saved_sae) -> None:
    edit = {"latent": 7, "op": "clamp", "value": 2, "unit": "max_activation"}
    with pytest.raises(InvalidInputError, match=r"edits\[0\]: .*no discovery result: run discovery first"):
        steering.save_config(store, SteeringConfig(sae_id=saved_sae, edits=[edit]))
    publish_max_activations(store, saved_sae, {9: 1.0})
    with pytest.raises(InvalidInputError, match=r"edits\[0\]: latent 7 never fired .*give unit absolute"):
        steering.save_config(store, SteeringConfig(sae_id=saved_sae, edits=[edit]))
    with pytest.raises(InvalidInputError, match=r"unit applies only to clamp and add"):
        SteeringConfig(sae_id=saved_sae, edits=[{**edit, "op": "scale"}])
    assert steering.list_configs(store) == []
    # A config saved before units existed reads as absolute.
    old = SteeringConfig.from_dict({"sae_id": saved_sae, "edits": [{"latent": 9, "op": "clamp", "value": 4}]})
    assert old.edits[0].unit == "absolute" and steering.resolve_edits(store, old) == old


def test_preview_warns_about_edits_far_beyond_the_observed_max(store, saved_sae) -> None:
    absolute = SteeringConfig(
        sae_id=saved_sae,
        edits=[
            {"latent": 7, "op": "clamp", "value": 40},  # the README's old example: 12x a max of 3.3
            {"latent": 9, "op": "clamp", "value": 8},  # 8x: strong but within range
            {"latent": 11, "op": "scale", "value": 20},
            {"latent": 12, "op": "add", "value": 30, "unit": "max_activation"},
        ],
    )
    blind = steering.edit_warnings(store, absolute)
    assert len(blind) == 1 and "no discovery result" in blind[0]
    publish_max_activations(store, saved_sae, {7: 3.3, 9: 1.0, 11: 0.5, 12: 2.0})
    warnings = steering.preview(store, absolute)["warnings"]
    assert len(warnings) == 3, warnings
    assert warnings[0].startswith("edits[0]: clamp 40 on latent 7 drives it to 12× its largest observed")
    assert warnings[1].startswith("edits[2]: scale 20") and warnings[2].startswith("edits[3]: add 30 ×")


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu_l1", "jumprelu"])
def test_dense_latents_decode_as_the_sparse_pairs_do(architecture: str) -> None:
    config = SAEConfig(d_in=16, n_latents=64, architecture=architecture, layer=LAYER)
    sae = create(config, generator=torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
        x_BTD = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
        enc = sae.encode(x_BTD)
        dense_BTN = sae.dense(enc.acts, enc.indices)
        assert dense_BTN.shape == (3, 5, 64) and int((dense_BTN > 0).sum()) == int((enc.acts > 0).sum())
        torch.testing.assert_close(sae.decode_latents(dense_BTN), sae.decode(enc.acts, enc.indices))


def test_dense_sums_a_repeated_index_rather_than_overwriting_it() -> None:
    sae = make_sae(d_in=8, n_latents=16)
    dense = sae.dense(torch.tensor([[2.0, 0.0]]), torch.tensor([[3, 3]]))  # a zero pad naming 3 again
    assert dense[0, 3] == 2.0 and float(dense.sum()) == 2.0
