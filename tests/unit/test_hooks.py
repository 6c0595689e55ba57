"""Hook manager: scoped lifetimes, order, unwrapping, generate with a KV cache, early stop.

Tiny random-weight Llama and GPT-2 models built from configs; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import transformers
from tiny_models import tiny_llama_config

from kestrel.core.errors import InvalidInputError, NotFoundError
from kestrel.core.hooks import (
    ActivationRecorder,
    Controller,
    Detector,
    HookContext,
    HookManager,
    StopForward,
    add_vector,
    function_controller,
    hooks,
    mean_ablate,
    replace,
    run_until_stopped,
    scale,
    stop_after,
    zero_ablate,
)

D = 32
N_LAYERS = 3


def make_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        tiny_llama_config(vocab_size=100, hidden_size=D, num_hidden_layers=N_LAYERS)
    ).eval()
    model.generation_config.eos_token_id = None  # always generate max_new_tokens
    return model


def make_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=D, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture
def llama() -> transformers.LlamaForCausalLM:
    return make_llama()


@pytest.fixture
def gpt2() -> transformers.GPT2LMHeadModel:
    return make_gpt2()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 42, 8, 99, 23]])


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def hooked_modules(model: torch.nn.Module) -> list[tuple[str, str]]:
    """Every (module, hook dict) pair that still holds anything."""
    return [
        (name, attr) for name, module in model.named_modules() for attr in HOOK_DICTS if getattr(module, attr)
    ]


# --- 1. scoped lifetimes ------------------------------------------------------------------------


def test_no_hook_survives_an_exception_in_the_block(llama, ids):
    recorder = ActivationRecorder(["model.layers.0", "model.layers.1.self_attn"])
    assert hooked_modules(llama) == []
    with pytest.raises(KeyError), hooks(llama, *recorder.hooks(), zero_ablate("model.layers.2", when="pre")):
        assert {name for name, _ in hooked_modules(llama)} == {
            "model.layers.0",
            "model.layers.1.self_attn",
            "model.layers.2",
        }
        logits(llama, ids)
        raise KeyError("boom")
    assert recorder.records["model.layers.0"], "the hooks were live inside the block"
    assert hooked_modules(llama) == []


def test_no_hook_survives_an_exception_raised_by_a_hook(gpt2, ids):
    def explode(x: torch.Tensor, ctx: HookContext) -> None:
        raise RuntimeError(f"hook failed at {ctx.layer}")

    manager = HookManager(gpt2, [Detector("transformer.h.1", explode), scale("transformer.h.0.attn", 2.0)])
    with pytest.raises(RuntimeError, match=r"hook failed at transformer\.h\.1"), manager:
        logits(gpt2, ids)
    assert hooked_modules(gpt2) == []
    assert not manager.active
    manager.remove()  # idempotent
    assert hooked_modules(gpt2) == []


def test_one_torch_hook_per_layer_and_when(llama):
    layer = "model.layers.1"
    with hooks(llama, scale(layer, 2.0), scale(layer, 3.0), Detector(layer, print)):
        assert len(llama.model.layers[1]._forward_hooks) == 1
        assert len(llama.model.layers[1]._forward_pre_hooks) == 0


def test_add_while_active_registers_at_once_and_call_resets_on_enter(llama, ids):
    calls: list[int] = []
    manager = HookManager(llama)
    with manager:
        manager.add(Detector("model.layers.0", lambda x, ctx: calls.append(ctx.call)))
        logits(llama, ids)
        logits(llama, ids)
    assert calls == [0, 1]
    with manager:
        logits(llama, ids)
    assert calls == [0, 1, 0]
    logits(llama, ids)
    assert calls == [0, 1, 0]


# --- 2. order -----------------------------------------------------------------------------------


def test_controllers_compose_in_order_and_detectors_see_the_edit(llama, ids):
    layer = "model.layers.1"
    clean = ActivationRecorder([layer])
    with hooks(llama, *clean.hooks()):
        logits(llama, ids)
    x = clean.last(layer)

    seen: list[torch.Tensor] = []
    hs = [
        Detector(layer, lambda v, _: seen.append(v.clone())),  # added first, still runs last
        Controller(layer, lambda v, _: v + 1.0),
        Controller(layer, lambda v, _: v * 3.0),
    ]
    downstream = ActivationRecorder(["model.layers.2"], when="pre")
    with hooks(llama, *hs, *downstream.hooks()):
        logits(llama, ids)
    torch.testing.assert_close(seen[0], (x + 1.0) * 3.0)
    torch.testing.assert_close(downstream.last("model.layers.2"), (x + 1.0) * 3.0)


def test_controller_returning_none_leaves_value_unchanged(llama, ids):
    reference = logits(llama, ids)
    with hooks(llama, Controller("model.layers.0", lambda v, _: None)):
        torch.testing.assert_close(logits(llama, ids), reference)


# --- 3. recorder vs output_hidden_states --------------------------------------------------------


def test_recorder_matches_output_hidden_states(llama, ids):
    layers = [f"model.layers.{i}" for i in range(N_LAYERS)]
    post = ActivationRecorder(layers)
    pre = ActivationRecorder(layers, when="pre")
    with hooks(llama, *post.hooks(), *pre.hooks()):
        logits(llama, ids)
    with torch.no_grad():
        hidden = llama(ids, output_hidden_states=True).hidden_states
    assert len(hidden) == N_LAYERS + 1
    for i, layer in enumerate(layers):
        torch.testing.assert_close(pre.last(layer), hidden[i])
    for i, layer in enumerate(layers[:-1]):
        torch.testing.assert_close(post.last(layer), hidden[i + 1])
    # transformers ties the last hidden state to the output of the final norm
    with torch.no_grad():
        torch.testing.assert_close(llama.model.norm(post.last(layers[-1])), hidden[-1])


def test_recorder_options(llama, ids):
    recorder = ActivationRecorder(["model.layers.0", "model.layers.0"], dtype=torch.float16)
    with hooks(llama, *recorder.hooks()):
        logits(llama, ids)
        logits(llama, ids)
    assert recorder.layers == ["model.layers.0"]
    assert len(recorder.records["model.layers.0"]) == 2
    assert recorder.last("model.layers.0").dtype == torch.float16
    assert recorder.last("model.layers.0").device.type == "cpu"
    recorder.clear()
    assert recorder.records == {"model.layers.0": []}
    with pytest.raises(NotFoundError, match="nothing recorded"):
        recorder.last("model.layers.0")
    with pytest.raises(NotFoundError, match=r"did you mean 'model\.layers\.0'"):
        recorder.last("model.layers.O")
    with pytest.raises(InvalidInputError, match="sequence of names"):
        ActivationRecorder("model.layers.0")


def test_recorder_keeps_a_copy_not_a_view(llama, ids):
    recorder = ActivationRecorder(["model.layers.0"], to_cpu=False)
    with hooks(llama, *recorder.hooks(), Detector("model.layers.0", lambda v, _: v.mul_(0.0))):
        logits(llama, ids)
    # the recorder was added first, so it copied the value before the in-place zeroing
    assert recorder.last("model.layers.0").abs().sum() > 0


# --- 4. tuple and dataclass outputs, pre hooks on kwargs ----------------------------------------


@pytest.mark.parametrize(
    ("make", "attn"), [(make_gpt2, "transformer.h.0.attn"), (make_llama, "model.layers.0.self_attn")]
)
def test_zero_ablate_on_tuple_output_keeps_the_tuple(make, attn, ids):
    model = make()
    reference = logits(model, ids)
    module = model.get_submodule(attn)
    seen: list[object] = []
    # registered before our manager: ours is prepended, so this hook sees the edited output
    observer = module.register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        with hooks(model, zero_ablate(attn)):
            ablated = logits(model, ids)
        logits(model, ids)
    finally:
        observer.remove()
    assert not torch.allclose(ablated, reference)
    edited, after = seen
    assert isinstance(edited, tuple) and len(edited) == len(after)
    assert torch.count_nonzero(edited[0]) == 0
    assert torch.count_nonzero(after[0]) > 0


def test_model_output_is_rebuilt_with_its_other_fields(llama, ids):
    seen: list[object] = []
    probe = Detector("model", lambda v, _: seen.append(v.shape))
    with hooks(llama, zero_ablate("model"), probe), torch.no_grad():
        out = llama(ids, use_cache=True)
    assert seen == [torch.Size([1, ids.shape[1], D])]
    assert torch.count_nonzero(out.logits) == 0  # lm_head has no bias
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() == ids.shape[1]


def test_plain_dataclass_output_is_rebuilt():
    @dataclass
    class Out:
        value: torch.Tensor
        note: str

    class Module(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Out:
            return Out(x * 2.0, "kept")

    model = torch.nn.Sequential(Module())
    with hooks(model, scale("0", 10.0)):
        out = model(torch.ones(2, 3))
    assert isinstance(out, Out) and out.note == "kept"
    torch.testing.assert_close(out.value, torch.full((2, 3), 20.0))


def test_pre_hook_edits_keyword_input(llama, ids):
    # transformers 5 calls attention as self_attn(hidden_states=..., ...): no positional args
    attn = "model.layers.0.self_attn"
    norm_out = ActivationRecorder(["model.layers.0.input_layernorm"])
    attn_in = ActivationRecorder([attn], when="pre")
    with hooks(llama, *norm_out.hooks(), *attn_in.hooks()):
        reference = logits(llama, ids)
    torch.testing.assert_close(attn_in.last(attn), norm_out.last("model.layers.0.input_layernorm"))
    with hooks(llama, zero_ablate(attn, when="pre")):
        assert not torch.allclose(logits(llama, ids), reference)


def test_pre_hook_edits_positional_input(gpt2, ids):
    # GPT-2 blocks get hidden_states positionally
    block = "transformer.h.1"
    previous = ActivationRecorder(["transformer.h.0"])
    with hooks(gpt2, *previous.hooks(), scale(block, 0.0, when="pre")):
        ablated = logits(gpt2, ids)
    entering = ActivationRecorder([block], when="pre")
    with hooks(gpt2, *entering.hooks()):
        reference = logits(gpt2, ids)
    torch.testing.assert_close(entering.last(block), previous.last("transformer.h.0"))
    assert not torch.allclose(ablated, reference)


# --- 5. generate with a KV cache ----------------------------------------------------------------


def test_generate_call_counter_and_steering(llama, ids):
    def generate() -> torch.Tensor:
        return llama.generate(ids, max_new_tokens=5, do_sample=False)

    plain = generate()
    widths: list[tuple[int, int]] = []
    counter = Detector("model.layers.1", lambda v, ctx: widths.append((ctx.call, v.shape[1])))
    steer = add_vector("model.layers.1", torch.full((D,), 50.0))
    with hooks(llama, counter, steer):
        steered = generate()
    assert widths == [(0, ids.shape[1]), (1, 1), (2, 1), (3, 1), (4, 1)]
    assert steered.shape == plain.shape
    assert not torch.equal(steered[:, ids.shape[1] :], plain[:, ids.shape[1] :])
    assert torch.equal(generate(), plain)


# --- 6. validation ------------------------------------------------------------------------------


def test_unknown_layer_suggests_close_match(llama):
    with pytest.raises(NotFoundError, match=r"did you mean 'model\.layers\.1'"):
        HookManager(llama, [scale("model.layer.1", 2.0)])
    manager = HookManager(llama)
    with pytest.raises(NotFoundError, match=r"model\.layers\.2\.mlp"):
        manager.add(scale("model.layers.0", 1.0), Detector("model.layers.2.mlpp", print))
    with manager:
        assert hooked_modules(llama) == []  # the valid hook in the failed add was not kept


def test_shape_changing_controller_is_rejected(llama, ids):
    bad = function_controller("model.layers.0", lambda x: x[..., :-1])
    with pytest.raises(InvalidInputError) as info, hooks(llama, bad):
        logits(llama, ids)
    message = str(info.value)
    assert "model.layers.0" in message and "(1, 6, 32)" in message and "(1, 6, 31)" in message
    assert hooked_modules(llama) == []


def test_bad_hook_arguments_are_rejected(llama):
    with pytest.raises(InvalidInputError, match="when="):
        Detector("model.layers.0", print, when="post")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="1-D"):
        add_vector("model.layers.0", torch.ones(2, D))
    with pytest.raises(InvalidInputError, match="Detector or Controller"):
        HookManager(llama, ["model.layers.0"])  # type: ignore[list-item]
    not_a_tensor = Controller("model.layers.0", lambda v, _: "nope")
    with pytest.raises(InvalidInputError, match="returned str"), hooks(llama, not_a_tensor):
        logits(llama, torch.tensor([[1, 2]]))


def test_vector_width_mismatch_is_rejected(llama, ids):
    too_narrow = add_vector("model.layers.0", torch.ones(7))
    with pytest.raises(InvalidInputError, match="width 7"), hooks(llama, too_narrow):
        logits(llama, ids)


# --- 7. early stop ------------------------------------------------------------------------------


def test_stop_after_ends_the_forward(llama, ids):
    fired: list[str] = []
    recorder = ActivationRecorder(["model.layers.0"])
    # stop_after added before the recorder on the same layer: the recorder still runs
    with hooks(
        llama,
        stop_after("model.layers.0"),
        *recorder.hooks(),
        Detector("model.layers.2", lambda v, ctx: fired.append(ctx.layer)),
    ):
        result = run_until_stopped(lambda: llama(ids))
    assert result is None
    assert recorder.last("model.layers.0").shape == (1, ids.shape[1], D)
    assert fired == []
    assert hooked_modules(llama) == []


def test_run_until_stopped_passes_results_and_other_errors_through():
    assert run_until_stopped(lambda: 42) == 42
    with pytest.raises(ValueError):
        run_until_stopped(lambda: int("x"))
    assert issubclass(StopForward, Exception)


# --- 8. ready-made controllers ------------------------------------------------------------------

MLP, LAYER = "model.layers.0.mlp", "model.layers.0"
MEAN = torch.linspace(-1.0, 1.0, D)
PATCH = torch.arange(6 * D, dtype=torch.float32).reshape(1, 6, D) / 100.0


@pytest.mark.parametrize(
    ("controller", "expected_mlp"),
    [
        (scale(MLP, 3.0), lambda mlp: 3.0 * mlp),
        (mean_ablate(MLP, MEAN), lambda mlp: MEAN.expand_as(mlp)),
        (replace(MLP, PATCH), lambda mlp: PATCH),
        (replace(MLP, MEAN), lambda mlp: MEAN.expand_as(mlp)),
        (function_controller(MLP, torch.neg), lambda mlp: -mlp),
        (add_vector(MLP, MEAN, alpha=2.0), lambda mlp: mlp + 2.0 * MEAN),
        (zero_ablate(MLP), torch.zeros_like),
    ],
    ids=["scale", "mean_ablate", "replace", "replace_broadcast", "function", "add_vector", "zero"],
)
def test_ready_made_controllers_edit_the_residual_stream(llama, ids, controller, expected_mlp):
    # layers.0 output = residual + mlp output; the residual does not depend on the mlp
    clean = ActivationRecorder([MLP, LAYER])
    with hooks(llama, *clean.hooks()):
        logits(llama, ids)
    mlp, out = clean.last(MLP), clean.last(LAYER)
    residual = out - mlp

    edited = ActivationRecorder([LAYER])
    with hooks(llama, controller, *edited.hooks()):
        logits(llama, ids)
    torch.testing.assert_close(edited.last(LAYER), residual + expected_mlp(mlp))


def test_replace_rejects_unbroadcastable_value(llama, ids):
    too_many_rows = replace(LAYER, torch.ones(3, D))
    with pytest.raises(InvalidInputError, match="does not broadcast"), hooks(llama, too_many_rows):
        logits(llama, ids)
