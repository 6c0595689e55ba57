"""The torch-free architecture rules (what the API checks a training request with) agree with the
SAE classes (what the worker builds): same defaults, same accepted and rejected configs."""

from __future__ import annotations

import itertools

import pytest

from kestrel.core.sae import config as sae_config
from kestrel.core.sae.base import lookup_architecture


@pytest.mark.parametrize("name", sorted(sae_config.BUILTIN_ARCHITECTURES))
def test_builtin_rules_match_the_classes(name: str) -> None:
    rules, sae_class = sae_config.BUILTIN_ARCHITECTURES[name], lookup_architecture(name)
    assert rules.defaults == sae_class.config_defaults
    knobs = itertools.product((None, -1, 0, 4, 64, 65), (None, -1.0, 0.0, 0.5), (None, 0.0, 2.0))
    for k, l1, l0 in knobs:
        config = sae_config.SAEConfig.model_construct(
            architecture=name, d_in=8, n_latents=64, k=k, l1_coefficient=l1, l0_coefficient=l0
        )
        outcomes = []
        for check in (rules.check, sae_class.check_config):
            try:
                check(config)
                outcomes.append(None)
            except ValueError as error:
                outcomes.append(str(error))
        assert outcomes[0] == outcomes[1], (name, k, l1, l0)


def test_unknown_architecture_reads_the_same_with_and_without_the_engine() -> None:
    """The API process (registry not loaded) and a worker name the same known architectures."""
    without = sae_config.unknown_architecture("topq", sorted(sae_config.BUILTIN_ARCHITECTURES))
    with pytest.raises(type(without)) as caught:
        lookup_architecture("topq")
    assert str(caught.value) == str(without) and caught.value.details == without.details
