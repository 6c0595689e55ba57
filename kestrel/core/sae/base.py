"""The SAE base class, its typed outputs, and the registry of architectures.

An architecture is one file: a subclass of `SAE` decorated with `@register("name")` that says how
it chooses active latents (`_encode_2d`) and, if it is not a k-sparse autoencoder trained on FVU
plus AuxK, how it is trained (`training_loss`). Everything else (decoding, shapes, saving,
training, evaluation) is shared.

Weights follow the nn.Linear layout: `W_enc` [n_latents, d_in] (row i reads latent i), `W_dec`
[n_latents, d_in] (row i is latent i's direction), `b_enc` [n_latents], `b_dec` [d_in]. The
encoder reads `x - b_dec`, so `b_dec` is the origin of the dictionary (apply_b_dec_to_input in
SAELens terms).

A transcoder (``config.is_transcoder``) is an SAE whose decoder writes another layer: `W_dec`
[n_latents, d_out], `b_dec` [d_out], and its encoder reads x itself (b_dec lives in the output
space, as in SAELens's `Transcoder`); a skip-transcoder adds `W_skip` [d_out, d_in], so
x̂_out = Σ_i f_i(x) W_dec[i] + b_dec + W_skip x. Every architecture gets this from `_centre` and
`forward`; `decode` gives the latents' part only (it has no x for the skip term).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.functional import linear

from kestrel.core.errors import InvalidInputError
from kestrel.core.sae.config import (
    BUILTIN_ARCHITECTURES,
    ArchitectureRules,
    SAEConfig,
    check_knobs,
    unknown_architecture,
)
from kestrel.core.sae.kernels import dense_decode, gather_linear, sparse_decode


class EncoderOutput(NamedTuple):
    """The active latents of each row, as (value, index) pairs."""

    acts: Tensor
    """[..., K] non-negative activations; entries a row does not use are 0 (K can exceed its L0)."""

    indices: Tensor
    """[..., K] int64 latent ids of `acts`."""

    pre_acts: Tensor
    """[..., n_latents] encoder output before the sparsity nonlinearity. Detached for k-sparse
    architectures: their gradients flow through `acts` only."""


class ForwardOutput(NamedTuple):
    """Everything one pass through the SAE produces."""

    reconstruction: Tensor
    """[..., d_in] decode(encode(x))."""

    latent_acts: Tensor
    """[..., K] values of the active latents (see `EncoderOutput.acts`)."""

    latent_indices: Tensor
    """[..., K] ids of the active latents."""

    pre_acts: Tensor
    """[..., n_latents] pre-activations (see `EncoderOutput.pre_acts`)."""


@dataclass(frozen=True)
class LossSettings:
    """What the trainer tells the loss at one step."""

    dead_N: Tensor | None
    """Boolean mask of latents counted dead (AuxK trains these); None before tracking starts."""

    aux_k: int
    """How many dead latents per row AuxK may use."""

    aux_k_coefficient: float
    """Weight of the AuxK term; 0 turns it off."""

    l1_scale: float = 1.0
    """Warm-up factor in [0, 1] on the L1 coefficient (relu_l1)."""


@dataclass
class LossOutput:
    """The loss to backpropagate and the detached figures the trainer reports."""

    loss: Tensor
    """Scalar objective."""

    fvu: Tensor
    """Batch FVU: Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the batch's rows."""

    l0: Tensor
    """Mean number of non-zero latents per row."""

    fire_counts_N: Tensor
    """[n_latents] number of rows on which each latent was non-zero."""

    aux_loss: Tensor
    """AuxK term before its coefficient (0 when no latent is dead)."""

    sparsity_loss: Tensor
    """Penalty term before its coefficient (relu_l1's weighted L1; 0 for k-sparse ones)."""


_REGISTRY: dict[str, type[SAE]] = {}


def register(name: str):
    """Class decorator adding an architecture under `name` (the `architecture` config value)."""

    def add(cls: type[SAE]) -> type[SAE]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"architecture {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.architecture = name
        # Only rules of its own: a subclass of a built-in is checked by its own config_defaults.
        cls.rules = cls.__dict__.get("rules")
        _REGISTRY[name] = cls
        return cls

    return add


def register_builtin(name: str):
    """`register` for a built-in architecture: its config defaults and check are its rules in
    `config.BUILTIN_ARCHITECTURES`, the one definition the API (no torch) checks requests with."""

    def add(cls: type[SAE]) -> type[SAE]:
        cls.rules = BUILTIN_ARCHITECTURES[name]
        cls.config_defaults = cls.rules.defaults
        return register(name)(cls)

    return add


def load_builtin_architectures() -> None:
    """Import the built-in architecture modules (kestrel.core.sae.<name>), which register
    themselves (once; cheap after)."""
    for name in BUILTIN_ARCHITECTURES:
        import_module(f"kestrel.core.sae.{name}")


def architectures() -> list[str]:
    """Names accepted as `SAEConfig.architecture`."""
    load_builtin_architectures()
    return sorted(_REGISTRY)


def lookup_architecture(name: str) -> type[SAE]:
    """The class registered as `name`, or an error that lists what exists."""
    load_builtin_architectures()
    if name not in _REGISTRY:
        raise unknown_architecture(name, architectures())
    return _REGISTRY[name]


def create(config: SAEConfig, *, generator: torch.Generator | None = None) -> SAE:
    """A freshly initialised SAE of the configured architecture (on CPU, float32)."""
    return lookup_architecture(config.architecture)(config, generator=generator)


class SAE(nn.Module):
    """Sparse autoencoder: x ≈ Σ_i f_i(x) W_dec[i] + b_dec with few non-zero f_i."""

    architecture: ClassVar[str] = ""
    config_defaults: ClassVar[dict[str, Any]] = {}
    """Values for the architecture's own config fields (`k`, `l1_coefficient`) when left unset;
    a field not named here must stay unset."""

    rules: ClassVar[ArchitectureRules | None] = None
    """A built-in architecture's config rules (set by `register_builtin`)."""

    unit_norm_decoder: ClassVar[bool] = True
    """Whether training keeps decoder rows at unit norm (otherwise activations and decoder norms
    trade off freely and the penalty must account for it)."""

    decoder_init_norm: ClassVar[float] = 1.0
    """Norm of the initial decoder (and tied encoder) rows."""

    def __init__(self, config: SAEConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        n_latents, d_in, d_out = config.n_latents, config.d_in, config.output_width
        directions_ND = torch.randn(n_latents, d_in, generator=generator)
        directions_ND /= directions_ND.norm(dim=1, keepdim=True)
        # Tied initialisation (encoder = decoderᵀ) starts every latent reading its own direction;
        # a transcoder's decoder writes another space, so its rows are drawn on their own.
        self.W_enc = nn.Parameter(directions_ND.clone() * self.decoder_init_norm)
        if config.is_transcoder:
            directions_ND = torch.randn(n_latents, d_out, generator=generator)
            directions_ND /= directions_ND.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(directions_ND * self.decoder_init_norm)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if config.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in))  # SAELens's start: no skip at first

    @classmethod
    def check_config(cls, config: SAEConfig) -> None:
        """Raise ValueError (pydantic reports it) when the config does not fit this architecture."""
        if cls.rules is not None:
            cls.rules.check(config)
        else:
            check_knobs(cls.architecture, cls.config_defaults, config)

    # -- shapes ---------------------------------------------------------------------------------

    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def n_latents(self) -> int:
        return self.config.n_latents

    @property
    def d_out(self) -> int:
        """Width of the reconstruction: d_in for an SAE, the target layer's for a transcoder."""
        return self.config.output_width

    def _centre(self, x_BD: Tensor) -> Tensor:
        """What the encoder reads: x − b_dec for an SAE, x itself for a transcoder."""
        return x_BD if self.config.is_transcoder else x_BD - self.b_dec

    def skip_term(self, x_BD: Tensor) -> Tensor | None:
        """A skip-transcoder's W_skip·x (None otherwise)."""
        return linear(x_BD.to(self.W_skip.dtype), self.W_skip) if self.config.skip else None

    def _check_width(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise InvalidInputError(
                f"input has width {x.shape[-1]} but this SAE reads width {self.d_in}",
                details={"sae_d_in": self.d_in, "input_d_in": int(x.shape[-1])},
            )

    # -- inference ------------------------------------------------------------------------------

    def pre_acts(self, x: Tensor) -> Tensor:
        """Dense encoder output [..., n_latents], differentiable."""
        self._check_width(x)
        return linear(self._centre(x.to(self.W_enc.dtype)), self.W_enc, self.b_enc)

    def encode(self, x: Tensor) -> EncoderOutput:
        """Active latents of each row of x [..., d_in]."""
        self._check_width(x)
        lead = x.shape[:-1]
        enc, _ = self._encode_2d(x.reshape(-1, self.d_in).to(self.W_enc.dtype))
        return EncoderOutput(*(t.reshape(*lead, t.shape[-1]) for t in enc))

    def decode(self, acts: Tensor, indices: Tensor) -> Tensor:
        """Reconstruction from (value, index) pairs: gathers the named decoder rows only."""
        lead = acts.shape[:-1]
        acts_BK, indices_BK = acts.reshape(-1, acts.shape[-1]), indices.reshape(-1, indices.shape[-1])
        out_BD = sparse_decode(acts_BK, indices_BK, self.W_dec) + self.b_dec
        return out_BD.reshape(*lead, self.d_out)

    def decode_dense(self, acts: Tensor, indices: Tensor) -> Tensor:
        """Plain twin of `decode` through a dense latent matrix (tests hold them equal)."""
        lead = acts.shape[:-1]
        acts_BK, indices_BK = acts.reshape(-1, acts.shape[-1]), indices.reshape(-1, indices.shape[-1])
        out_BD = dense_decode(acts_BK, indices_BK, self.W_dec) + self.b_dec
        return out_BD.reshape(*lead, self.d_out)

    def dense(self, acts: Tensor, indices: Tensor) -> Tensor:
        """[..., n_latents] latent values from (value, index) pairs, zero elsewhere, in ``acts``'s
        dtype and device. Summed, not overwritten: a row using fewer than K latents pads with
        zero-valued pairs whose index may repeat a real one (TopK's never repeat)."""
        dense = acts.new_zeros(*acts.shape[:-1], self.n_latents)
        return dense.scatter_add_(-1, indices, acts)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Reconstruction from a dense latent vector [..., n_latents] (after an edit, say)."""
        return latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> ForwardOutput:
        """Encode and decode x [..., d_in]; in train mode BatchTopK chooses across the batch."""
        self._check_width(x)
        lead = x.shape[:-1]
        x_BD = x.reshape(-1, self.d_in).to(self.W_enc.dtype)
        enc, _ = self._encode_2d(x_BD)
        recon_BD = self._reconstruct(enc)
        skip_BD = self.skip_term(x_BD)
        if skip_BD is not None:
            recon_BD = recon_BD + skip_BD
        return ForwardOutput(
            recon_BD.reshape(*lead, self.d_out),
            enc.acts.reshape(*lead, enc.acts.shape[-1]),
            enc.indices.reshape(*lead, enc.indices.shape[-1]),
            enc.pre_acts.reshape(*lead, self.n_latents),
        )

    # -- architecture hooks -----------------------------------------------------------------------

    def _encode_2d(self, x_BD: Tensor) -> tuple[EncoderOutput, Tensor]:
        """Choose the active latents of [B, d_in] rows; also return the centred input x - b_dec.

        k-sparse architectures compute the dense pre-activations without grad, pick their indices,
        then differentiate only the chosen entries through `_chosen_values`.
        """
        raise NotImplementedError

    def _reconstruct(self, enc: EncoderOutput) -> Tensor:
        return sparse_decode(enc.acts, enc.indices, self.W_dec) + self.b_dec

    def _dense_pre_acts(self, x_centred_BD: Tensor) -> Tensor:
        with torch.no_grad():
            return linear(x_centred_BD, self.W_enc, self.b_enc)

    def _chosen_values(self, x_centred_BD: Tensor, indices_BK: Tensor, pre_BN: Tensor) -> Tensor:
        """Pre-activations at the chosen indices, with a k-sparse backward when grads are on."""
        needs_grad = self.W_enc.requires_grad or self.b_enc.requires_grad or x_centred_BD.requires_grad
        if torch.is_grad_enabled() and needs_grad:
            return gather_linear(x_centred_BD, self.W_enc, self.b_enc, indices_BK, pre_BN)
        return pre_BN.gather(1, indices_BK)

    # -- training -------------------------------------------------------------------------------

    def training_loss(
        self, x_BD: Tensor, settings: LossSettings, target_BD: Tensor | None = None
    ) -> LossOutput:
        """FVU of the reconstruction plus AuxK on dead latents (k-sparse architectures).

        Normalising the squared error by the batch's variance makes the loss, and so the learning
        rate, independent of the activations' scale (sparsify does the same). A transcoder's
        FVU is against ``target_BD`` (its target layer's rows); AuxK's dead latents then predict
        the target's residual the same way.
        """
        enc, x_centred_BD = self._encode_2d(x_BD)
        self.on_training_step(enc)
        recon_BD = self._reconstruct(enc)
        skip_BD = self.skip_term(x_BD)
        if skip_BD is not None:
            recon_BD = recon_BD + skip_BD
        target_BD = x_BD if target_BD is None else target_BD
        total_variance = batch_total_variance(target_BD)
        error_BD = recon_BD - target_BD
        fvu = error_BD.pow(2).sum() / total_variance
        if x_BD.device.type == "cpu":
            aux = self._aux_k_loss(x_centred_BD, error_BD.detach(), settings, total_variance)
        else:
            aux = self._aux_k_loss_on_device(x_centred_BD, error_BD.detach(), settings, total_variance, enc)
        loss = fvu + settings.aux_k_coefficient * aux if settings.aux_k_coefficient > 0 else fvu
        return LossOutput(
            loss=loss,
            fvu=fvu.detach(),
            l0=(enc.acts > 0).sum(dim=1).float().mean(),
            fire_counts_N=_fire_counts(enc, self.n_latents),
            aux_loss=aux.detach(),
            sparsity_loss=torch.zeros((), device=x_BD.device),
        )

    def _aux_k_loss(
        self,
        x_centred_BD: Tensor,
        error_BD: Tensor,
        settings: LossSettings,
        total_variance: Tensor,
    ) -> Tensor:
        """AuxK (Gao et al. 2024): the top dead latents of each row try to predict the residual.

        Dead latents get no gradient from the main loss; this gives their encoder and decoder rows
        one that points at what the live latents miss. The term is scaled down when fewer latents
        are dead than `aux_k`, as in sparsify.
        """
        zero = torch.zeros((), device=x_centred_BD.device)
        if settings.dead_N is None or settings.aux_k_coefficient <= 0:
            return zero
        dead_ids = settings.dead_N.nonzero().squeeze(1)
        n_dead = int(dead_ids.numel())
        if n_dead == 0:
            return zero
        # A dense product over just the dead rows of the weights: on CPU it beats gathering aux_k
        # rows per input row at any dead count (1.6x at half the latents dead, far more at few).
        dead_pre_BM = linear(x_centred_BD, self.W_enc[dead_ids], self.b_enc[dead_ids])
        dead_acts_BM = dead_pre_BM.relu()
        if n_dead > settings.aux_k:
            chosen_BK = dead_pre_BM.detach().topk(settings.aux_k, dim=1, sorted=False).indices
            dead_acts_BM = dead_acts_BM * torch.zeros_like(dead_acts_BM).scatter_(1, chosen_BK, 1.0)
        predicted_BD = dead_acts_BM.to(self.W_dec.dtype) @ self.W_dec[dead_ids]
        scale = min(n_dead / settings.aux_k, 1.0)
        return scale * (predicted_BD + error_BD).pow(2).sum() / total_variance

    def _aux_k_loss_on_device(
        self,
        x_centred_BD: Tensor,
        error_BD: Tensor,
        settings: LossSettings,
        total_variance: Tensor,
        enc: EncoderOutput,
    ) -> Tensor:
        """`_aux_k_loss` without a host sync (for CUDA): the same function, reading no count back.

        `_aux_k_loss` selects the dead rows with `nonzero`, whose output size the host must wait
        for. Here the top `aux_k` latents come from the step's dense pre-activations with the live
        ones masked to -inf; a pick that is not dead (fewer than `aux_k` are) gets weight 0, and
        the scale min(n_dead / aux_k, 1) stays a device tensor, 0 when none is dead. The chosen
        values take the k-sparse backward and decode through the sparse decoder.
        """
        zero = torch.zeros((), device=x_centred_BD.device)
        if settings.dead_N is None or settings.aux_k_coefficient <= 0:
            return zero
        dead_N = settings.dead_N
        pre_BN = enc.pre_acts.detach()
        if pre_BN.shape[-1] != self.n_latents:  # an architecture that keeps no dense scores
            with torch.no_grad():
                pre_BN = linear(x_centred_BD, self.W_enc, self.b_enc)
        masked_BN = pre_BN.masked_fill(~dead_N, float("-inf"))
        chosen_BK = masked_BN.topk(settings.aux_k, dim=1, sorted=False).indices
        values_BK = self._chosen_values(x_centred_BD, chosen_BK, pre_BN)
        acts_BK = values_BK.relu() * dead_N[chosen_BK].to(values_BK.dtype)
        predicted_BD = sparse_decode(acts_BK, chosen_BK, self.W_dec)
        scale = (dead_N.sum() / settings.aux_k).clamp(max=1.0).to(total_variance.dtype)
        return scale * (predicted_BD + error_BD).pow(2).sum() / total_variance

    def on_training_step(self, enc: EncoderOutput) -> None:
        """Hook for state an architecture keeps across steps (BatchTopK's inference threshold)."""

    # -- weight transforms ------------------------------------------------------------------------

    @torch.no_grad()
    def fold_input_scale(self, scale: float, output_scale: float | None = None) -> None:
        """Make an SAE trained on `scale * x` read x directly (exactly the same function).

        encode: (s·x − b_dec)·W_encᵀ = (x − b_dec/s)·(s·W_enc)ᵀ; decode: (z·W_dec + b_dec)/s.
        Decoder rows then have norm 1/s instead of 1. A transcoder trained to predict t·y from
        s·x (``output_scale`` t) reads x with s·W_enc and writes y with W_dec/t, b_dec/t and
        W_skip·s/t.
        """
        out = scale if output_scale is None else output_scale
        self.W_enc.mul_(scale)
        self.W_dec.div_(out)
        self.b_dec.div_(out)
        if self.config.skip:
            self.W_skip.mul_(scale / out)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Put decoder rows back on the unit sphere after an optimiser step."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each decoder row, which renormalising would undo."""
        if self.W_dec.grad is None:
            return
        parallel_N1 = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel_N1 * self.W_dec)


def batch_total_variance(x_BD: Tensor) -> Tensor:
    """Σ‖x − mean(x)‖² over the batch, the FVU denominator (floored for constant batches)."""
    with torch.no_grad():
        x64_BD = x_BD.double()
        variance = (x64_BD - x64_BD.mean(dim=0)).pow(2).sum()
        return variance.clamp_min(torch.finfo(x_BD.dtype).tiny).to(x_BD.dtype)


def _fire_counts(enc: EncoderOutput, n_latents: int) -> Tensor:
    with torch.no_grad():
        # index_add rather than bincount, whose CUDA kernel reads the largest index back to the host
        fired_BK = (enc.acts > 0).to(torch.float32)
        counts_N = torch.zeros(n_latents, dtype=torch.float32, device=fired_BK.device)
        return counts_N.index_add_(0, enc.indices.reshape(-1), fired_BK.reshape(-1))
