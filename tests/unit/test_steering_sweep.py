"""Steering with a sense of scale (issue #14): continuation scoring, keyword effect, the sweep and
its verdicts, and the measured logit effect against the direct path."""

from __future__ import annotations

import math

import pytest
import torch
from test_steering import LAYER, loader, make_sae, publish_max_activations

from kestrel.core import logit_check, steering, steering_sweep
from kestrel.core.concepts import contexts
from kestrel.core.sae import io as sae_io
from kestrel.core.steering import SteeringConfig

PROMPTS = ["the cat sat on", "numbers go up and"]


def _plan_at(tiny_lm, sae, op: str = "add"):
    def plan(strength: float):
        config = SteeringConfig(
            sae_id="s", edits=[{"latent": 3, "op": op, "value": strength}], positions="all"
        )
        return steering.compile_plan(config, tiny_lm, load_sae=loader(sae))

    return plan


def test_perplexity_is_what_the_model_gives_its_own_greedy_tokens(tiny_lm) -> None:
    """Teacher-forced scoring (one forward) against generate's own per-step logits (KV cache)."""
    encoded = tiny_lm.tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        out = tiny_lm.model.generate(
            **encoded, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    ids = out.sequences[0, encoded["input_ids"].shape[1] :].tolist()
    chosen = [float(step[0].float().log_softmax(-1)[t]) for step, t in zip(out.scores, ids, strict=True)]
    want = math.exp(-sum(chosen) / len(chosen))
    scores = steering_sweep.score_continuations(tiny_lm, PROMPTS[:1], [ids])
    assert scores[0]["n_tokens"] == 8
    assert steering_sweep.perplexity(scores) == pytest.approx(want, rel=1e-4)
    # rows of different lengths, padded together, score as they do alone
    both = steering_sweep.score_continuations(tiny_lm, PROMPTS, [ids, ids[:3]])
    alone = steering_sweep.score_continuations(tiny_lm, PROMPTS[1:], [ids[:3]])
    assert both[1]["nll"] == pytest.approx(alone[0]["nll"], rel=1e-4)
    assert steering_sweep.score_continuations(tiny_lm, PROMPTS[:1], [[]])[0]["n_tokens"] == 0


def test_keywords_hits_and_token_ids(tiny_lm) -> None:
    assert steering_sweep.keyword_hits("Cats and a cat; catalog. CAT", ["cat"]) == 2
    assert steering_sweep.keyword_hits("anything", []) == 0
    ids = steering_sweep.keyword_token_ids(tiny_lm.tokenizer, ["cat"])
    assert tiny_lm.tokenizer.encode(" cat", add_special_tokens=False)[0] in ids
    assert steering_sweep.trim_continuation([5, 6, 0, 0], 0) == [5, 6]


def test_sweep_at_strength_zero_is_the_unsteered_output_and_strong_edits_break_fluency(tiny_lm) -> None:
    sae = make_sae(32)
    result = steering_sweep.sweep(
        tiny_lm, PROMPTS, _plan_at(tiny_lm, sae), [0.0, 200.0], keywords=["cat"], max_new_tokens=6
    )
    zero, strong = result["points"]
    baseline_ids = [item["token_ids"] for item in result["baseline"]["items"]]
    assert [item["token_ids"] for item in zero["items"]] == baseline_ids
    assert zero["perplexity_ratio"] == 1.0 and zero["changed_fraction"] == 0.0
    assert zero["keyword_logprob_delta"] == 0.0 and not zero["effect"] and zero["fluent"]
    assert zero["default_perplexity"] == result["baseline"]["perplexity"]
    assert strong["absolute_value"] == 200.0
    assert strong["changed_fraction"] > 0
    assert strong["keyword_logprob_delta"] != 0.0
    assert result["fluent_up_to"] in (0.0, 200.0)
    assert isinstance(result["verdict"], str) and result["verdict"]


def _point(strength: float, fluent: bool, effect: bool) -> dict:
    return {"strength": strength, "fluent": fluent, "effect": effect}


@pytest.mark.parametrize(
    ("points", "fluent_up_to", "effect_from", "steers", "says"),
    [
        ([_point(0, True, False), _point(1, True, True), _point(4, False, True)], 1, 1, True, "steers: "),
        ([_point(0, True, False), _point(1, True, False), _point(4, False, True)], 1, 4, False, "only from"),
        (
            [_point(0, True, False), _point(2, True, False), _point(8, True, False)],
            8,
            None,
            False,
            "not steer at all",
        ),
        ([_point(0, True, False), _point(1, False, False), _point(2, True, True)], 0, 2, False, "only from"),
    ],
)
def test_summary_names_the_window_and_says_when_a_latent_does_not_steer(
    points, fluent_up_to, effect_from, steers, says
) -> None:
    summary = steering_sweep.summarize(points, 2.0, with_keywords=True)
    assert (summary["fluent_up_to"], summary["effect_from"], summary["steers"]) == (
        fluent_up_to,
        effect_from,
        steers,
    )
    assert says in summary["verdict"]


def test_side_by_side_effects_report_both_perplexities(tiny_lm) -> None:
    sae = make_sae(32)
    plan = _plan_at(tiny_lm, sae, op="clamp")(80.0)
    result = steering.generate_side_by_side(tiny_lm, PROMPTS, plan, max_new_tokens=5)
    reported = steering_sweep.side_by_side_effects(tiny_lm, result, plan, ["cat"])
    item = reported["items"][0]
    eos = tiny_lm.tokenizer.eos_token_id
    default_ids = steering_sweep.trim_continuation(item["default"]["token_ids"], eos)
    own = steering_sweep.score_continuations(tiny_lm, PROMPTS[:1], [default_ids])
    assert item["effect"]["default_perplexity"] == pytest.approx(steering_sweep.perplexity(own), rel=1e-5)
    assert reported["effect"]["perplexity_ratio"] == pytest.approx(
        reported["effect"]["steered_perplexity"] / reported["effect"]["default_perplexity"]
    )


@pytest.fixture
def saved_sae(store):
    sae = make_sae(32)
    with store.writer("saes", "sweep-sae") as writer:
        sae_io.save_sae(sae, writer.directory, metrics={})
        writer.commit({"id": "sweep-sae", "layer": LAYER, "config": sae.config.model_dump(mode="json")})
    return "sweep-sae"


def test_sweep_resolves_relative_strengths_from_discovery(store, saved_sae, tiny_lm) -> None:
    publish_max_activations(store, saved_sae, {3: 2.5})

    def plan(strength: float):
        config = SteeringConfig(
            sae_id=saved_sae,
            edits=[{"latent": 3, "op": "add", "value": strength, "unit": "max_activation"}],
        )
        return steering.plan_from_store(store, tiny_lm, config)

    result = steering_sweep.sweep(tiny_lm, PROMPTS[:1], plan, [0.0, 2.0], max_new_tokens=3)
    assert [p["absolute_value"] for p in result["points"]] == [0.0, 5.0]


# ---------------------------------------------------------------------------------------------
# Logit effects: direct path and measurement


def test_agreement_and_spearman() -> None:
    values = torch.tensor([0.1, 3.0, -2.0, 0.5, -0.7, 1.5])
    same = logit_check.agreement(values, values * 2, k=2)
    assert same == {"promoted_overlap": 1.0, "suppressed_overlap": 1.0, "spearman": pytest.approx(1.0)}
    assert logit_check.spearman(values, -values) == pytest.approx(-1.0)
    # tied values share their average rank: [1, 1, 2] ranks (1.5, 1.5, 3) against (1, 2, 3)
    assert logit_check.spearman(
        torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])
    ) == pytest.approx(0.8660254, abs=1e-6)
    assert logit_check.spearman(torch.ones(4), torch.arange(4.0)) == 0.0  # no ordering on one side


def test_measured_effect_of_a_token_unembedding_row_moves_that_token_up(smollm) -> None:
    """At the last block, a token's own unembedding row is what the direct path and the model agree on."""
    unembed_VD, gain_D = contexts.unembedding(smollm)
    token = smollm.tokenizer.encode(" ocean", add_special_tokens=False)[0]
    row_D = unembed_VD[token] / unembed_VD[token].norm()
    texts = ["The weather today is", "She opened the door and"]
    measured_V = logit_check.measured_logit_effect(smollm, "model.layers.29", 8.0 * row_D, texts)
    assert int(measured_V.argmax()) == token
    assert float(measured_V[token]) > 0.5  # nats, on average over every position
    zero_V = logit_check.measured_logit_effect(smollm, "model.layers.29", 0.0 * row_D, texts)
    assert torch.equal(zero_V, torch.zeros_like(zero_V))
    direct_V = logit_check.direct_logit_effect(smollm, row_D)
    assert int(direct_V.argmax()) == token
    page = contexts.logit_effects(row_D[None], unembed_VD, gain_D, k=5)  # the feature page's view
    assert torch.equal(page["logit_pos_ids"][0], direct_V.topk(5).indices.cpu())
    report = logit_check.check_latent(smollm, "model.layers.29", row_D, 8.0, texts, k=10)
    assert report["measured"]["positive"][0]["token_id"] == token
    effects = logit_check.measured_effects(smollm, "model.layers.29", 8.0 * row_D, texts)
    assert torch.equal(effects["logprob"], measured_V)
    assert float(effects["prob"][token]) > 0
    assert abs(float(effects["prob"].sum())) < 1e-4  # both distributions sum to 1
    assert report["agreement"]["spearman"] > 0.5


def test_keyword_logprob_change_is_not_claimed_for_generated_only_edits(tiny_lm) -> None:
    sae = make_sae(32)
    edits = [{"latent": 3, "op": "clamp", "value": 80.0}]
    config = SteeringConfig(sae_id="s", edits=edits, positions="generated")
    plan = steering.compile_plan(config, tiny_lm, load_sae=loader(sae))
    result = steering.generate_side_by_side(tiny_lm, PROMPTS[:1], plan, max_new_tokens=4)
    reported = steering_sweep.side_by_side_effects(tiny_lm, result, plan, ["cat"])
    assert reported["effect"]["keyword_logprob_delta"] is None
    assert reported["effect"]["default_keyword_hits"] is not None
