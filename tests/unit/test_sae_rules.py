"""The torch-free architecture rules (what the API checks a training request with) agree with the
SAE classes (what the worker builds): same defaults, same accepted and rejected configs."""

from __future__ import annotations

import pytest

from kestrel.core.sae import config as sae_config
from kestrel.core.sae.base import lookup_architecture


@pytest.mark.parametrize("name", sorted(sae_config.BUILTIN_ARCHITECTURES))
def test_builtin_classes_check_with_the_torch_free_rules(name: str) -> None:
    """One definition: the class a worker builds carries the rules the API checks with, and
    checks a config by them (a knob of another architecture, a non-positive one, are refused)."""
    rules, sae_class = sae_config.BUILTIN_ARCHITECTURES[name], lookup_architecture(name)
    assert sae_class.rules is rules and sae_class.config_defaults is rules.defaults
    for knob in sae_config.SPARSITY_KNOBS:
        config = sae_config.SAEConfig.model_construct(architecture=name, d_in=8, n_latents=64, **{knob: 0})
        reason = "must be (a )?positive" if knob in rules.defaults else "does not apply"
        with pytest.raises(ValueError, match=f"{knob} {reason}"):
            sae_class.check_config(config)


def test_unknown_architecture_reads_the_same_with_and_without_the_engine() -> None:
    """The API process (registry not loaded) and a worker name the same known architectures."""
    without = sae_config.unknown_architecture("topq", sorted(sae_config.BUILTIN_ARCHITECTURES))
    with pytest.raises(type(without)) as caught:
        lookup_architecture("topq")
    assert str(caught.value) == str(without) and caught.value.details == without.details
