"""SAELens's transcoder formats (6.x ``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``,
``jumprelu_skip_transcoder``), both ways, exactly; the SAE formats are `kestrel.core.sae.saelens`.

SAELens's `Transcoder` encodes ReLU(x·W_enc + b_enc) without subtracting b_dec (its
``apply_b_dec_to_input`` must be false), decodes to ``d_out`` through W_dec [d_sae, d_out] and
b_dec [d_out], and a skip-transcoder adds x·W_skipᵀ with W_skip [d_out, d_in]; the JumpReLU kinds
keep a latent only above its ``threshold``. The input hook is ``metadata.hook_name`` and the
target ``metadata.hook_name_out``. That is Kestrel's transcoder (`kestrel.core.sae.base`) term
for term, so:

- export: a batchtopk transcoder becomes a ``jumprelu_(skip_)transcoder`` with its one inference
  threshold repeated per latent (as its SAE export does), a jumprelu one the same, a relu_l1 one a
  ``(skip_)transcoder``. A topk transcoder has no SAELens equivalent (SAELens has no TopK
  transcoder) and is refused, naming batchtopk as the exportable choice. The Kestrel config rides
  along under "kestrel", so export then import gives back the same config and weights.
- import: any of the four; a normalisation or a decoder-norm rescale (not folded into the
  weights) is refused by name, as is any tensor a transcoder does not use.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kestrel.core.clientdata import TensorInfo
from kestrel.core.errors import InvalidInputError
from kestrel.core.limits import Caps, check_sae_size
from kestrel.core.sae.base import SAE
from kestrel.core.sae.config import SAEConfig

#: SAELens's transcoder architectures: (Kestrel architecture, skip).
FROM_SAELENS: dict[str, tuple[str, bool]] = {
    "transcoder": ("relu_l1", False),
    "skip_transcoder": ("relu_l1", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
_TO_SAELENS = {"relu_l1": "transcoder", "jumprelu": "jumprelu_transcoder", "batchtopk": "jumprelu_transcoder"}
_FLOATS = ("F16", "BF16", "F32", "F64")


def is_transcoder_cfg(cfg: dict[str, Any]) -> bool:
    return cfg.get("architecture") in FROM_SAELENS


# -- export --------------------------------------------------------------------------------------


def transcoder_architecture(config: SAEConfig) -> str:
    """SAELens's name for a transcoder of ``config``'s kind; refuses a topk one."""
    if config.architecture not in _TO_SAELENS:
        raise InvalidInputError(
            f"a {config.architecture} transcoder has no SAELens equivalent (SAELens has ReLU and "
            "JumpReLU transcoders): train it as batchtopk, whose inference is a JumpReLU, to export it",
            details={"architecture": config.architecture, "exportable": sorted(_TO_SAELENS)},
        )
    name = _TO_SAELENS[config.architecture]
    return name.replace("transcoder", "skip_transcoder") if config.skip else name


def adapt_config(cfg: dict[str, Any], config: SAEConfig) -> dict[str, Any]:
    """Turn an SAE's 6.x ``cfg.json`` (``saelens.saelens_config``) into its transcoder's."""
    cfg["architecture"] = transcoder_architecture(config)
    cfg["d_out"] = config.output_width
    cfg["apply_b_dec_to_input"] = False  # SAELens refuses a transcoder that sets it
    cfg.pop("k", None)
    cfg.pop("rescale_acts_by_decoder_norm", None)
    meta = cfg["metadata"]
    meta["hook_name_out"] = config.target_layer
    meta["hf_hook_name_out"] = config.target_layer
    meta["hook_head_index_out"] = None
    return cfg


def skip_weights(sae: SAE) -> dict[str, Tensor]:
    """W_skip [d_out, d_in] (SAELens's layout is Kestrel's), for a skip-transcoder."""
    return {"W_skip": sae.W_skip.detach()} if sae.config.skip else {}


# -- import --------------------------------------------------------------------------------------


def check_header(
    cfg: dict[str, Any], header: dict[str, TensorInfo], caps: Caps | None
) -> tuple[str, bool, int, int, int]:
    """(architecture, skip, d_in, d_sae, d_out) from a transcoder's cfg.json and weights header,
    every shape checked before anything is read."""
    architecture, skip = FROM_SAELENS[cfg["architecture"]]
    kestrel = cfg.get("kestrel")
    if (
        isinstance(kestrel, dict)
        and kestrel.get("architecture") == "batchtopk"
        and architecture == "jumprelu"
    ):
        architecture = "batchtopk"  # Kestrel's own export: one threshold, repeated per latent
    for key, allowed in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if (cfg.get(key) or "none") != allowed:
            raise InvalidInputError(
                f"a SAELens transcoder with {key}={cfg.get(key)!r} is not supported: "
                "fold it into the weights",
                details={key: cfg.get(key)},
            )
    if cfg.get("apply_b_dec_to_input") or cfg.get("rescale_acts_by_decoder_norm"):
        raise InvalidInputError(
            "a SAELens transcoder applies neither b_dec to its input nor a decoder-norm rescale"
        )
    wanted = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"W_skip"} if skip else set())
    thresholds = {"threshold", "log_threshold"} & set(header)
    if architecture != "relu_l1" and not thresholds:
        raise InvalidInputError("SAELens weights lack ['threshold']", details={"missing": ["threshold"]})
    missing, unknown = (
        sorted(wanted - set(header)),
        sorted(set(header) - wanted - (thresholds if architecture != "relu_l1" else set())),
    )
    if missing or unknown:
        raise InvalidInputError(
            f"SAELens {cfg['architecture']} weights: missing {missing}, unexpected {unknown}",
            details={"missing": missing, "unexpected": unknown},
        )
    w_enc, w_dec = header["W_enc"].shape, header["W_dec"].shape
    if len(w_enc) != 2 or len(w_dec) != 2 or 0 in w_enc or 0 in w_dec:
        raise InvalidInputError(f"W_enc {list(w_enc)} and W_dec {list(w_dec)} must be 2-D and non-empty")
    (d_in, d_sae), d_out = w_enc, w_dec[1]
    expected = {"W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,), "W_skip": (d_out, d_in)}
    expected.update({name: (d_sae,) for name in thresholds})
    for name, shape in expected.items():
        if name in header and (header[name].shape != shape or header[name].dtype not in _FLOATS):
            raise InvalidInputError(
                f"SAELens tensor {name} is {header[name].dtype} {list(header[name].shape)}; with W_enc "
                f"{list(w_enc)} and W_dec {list(w_dec)} it must be floating point {list(shape)}",
                details={"tensor": name, "expected": list(shape)},
            )
    for key, actual in (("d_in", d_in), ("d_sae", d_sae), ("d_out", d_out)):
        if cfg.get(key) is not None and cfg.get(key) != actual:
            raise InvalidInputError(
                f"cfg.json says {key}={cfg.get(key)} but the weights have {actual}", details={"field": key}
            )
    check_sae_size(max(d_in, d_out), d_sae, caps or Caps())
    return architecture, skip, d_in, d_sae, d_out


def kestrel_weights(tensors: dict[str, Tensor], architecture: str) -> dict[str, Tensor]:
    """Kestrel's tensors for the function SAELens's transcoder computes (float32)."""
    ours = {
        "W_enc": tensors["W_enc"].float().t().contiguous(),
        "b_enc": tensors["b_enc"].float(),
        "W_dec": tensors["W_dec"].float(),
        "b_dec": tensors["b_dec"].float(),
    }
    if "W_skip" in tensors:
        ours["W_skip"] = tensors["W_skip"].float()
    if architecture != "relu_l1":
        threshold = tensors.get("threshold")
        threshold = threshold.float() if threshold is not None else tensors["log_threshold"].float().exp()
        ours["threshold"] = threshold.reshape(-1)[0] if architecture == "batchtopk" else threshold
    return ours


def transcoder_config(
    cfg: dict[str, Any], architecture: str, skip: bool, d_in: int, d_sae: int, d_out: int
) -> SAEConfig:
    """What the files say: Kestrel's own config when it rides along, else SAELens's fields."""
    kestrel = cfg.get("kestrel")
    if isinstance(kestrel, dict):
        return SAEConfig.from_dict(kestrel)
    if architecture == "batchtopk":
        raise InvalidInputError(
            "a batchtopk transcoder can only be imported with the Kestrel config it was exported with"
        )
    metadata = cfg.get("metadata") or {}
    dtype = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    return SAEConfig(
        architecture=architecture,
        d_in=d_in,
        n_latents=d_sae,
        d_out=d_out,
        skip=skip,
        dtype=dtype if dtype in ("float32", "float16", "bfloat16") else "float32",
        model=metadata.get("model_name"),
        layer=metadata.get("hf_hook_name") or metadata.get("hook_name"),
        target_layer=metadata.get("hf_hook_name_out") or metadata.get("hook_name_out"),
        normalize_input=None,
        data={"imported_from": "saelens", "saelens_architecture": cfg["architecture"]},
    )
