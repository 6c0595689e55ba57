"""Importing a safetensors file of activations as a run: the run reads back as the file's tensors,
bad files fail naming the tensor and publish nothing, and an SAE trains on the result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kestrel.core.errors import InvalidInputError
from kestrel.core.imports import import_activations
from kestrel.core.run_reader import iter_row_batches
from kestrel.core.runs import get_manifest, list_runs
from kestrel.core.sae import artifacts

N_ROWS, D = 600, 16


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(path))
    return path


def all_rows(store, run_id: str, layer: str):
    return next(iter_row_batches(store, run_id, layer, batch_size=10**6, dtype=torch.float32))


@pytest.fixture
def acts() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "resid.3": torch.randn(N_ROWS, D, generator=generator),
        "mlp.3": torch.randn(N_ROWS, D * 2, generator=generator),
    }


def test_run_equals_the_file_with_metadata(store, tmp_path, acts) -> None:
    doc_index = torch.arange(N_ROWS) // 30
    meta = {
        "token_id": torch.arange(N_ROWS) % 97,
        "doc_index": doc_index,
        "position": torch.arange(N_ROWS) % 30,
    }
    path = write(tmp_path / "acts.safetensors", {**acts, **meta})
    manifest = import_activations(store, path, dtype="fp32", shard_mb=0.01, model="some-model")

    assert [m.id for m in list_runs(store)] == [manifest.id]
    assert get_manifest(store, manifest.id) == manifest
    assert set(manifest.layers) == {"resid.3", "mlp.3"} and manifest.n_tokens == N_ROWS
    assert manifest.layers["mlp.3"].d == 2 * D and manifest.d_model == 2 * D
    assert len(manifest.shards) > 1, "small shard_mb splits the rows into several shards"
    assert manifest.n_docs == 20 and manifest.import_.synthetic_row_fields == []
    assert manifest.model.model_dump(exclude_unset=True) == {
        "name": "some-model",
        "source": "external",
        "loadable": False,
        "d_model": 32,
    }
    for layer, tensor in acts.items():
        rows = all_rows(store, manifest.id, layer)
        torch.testing.assert_close(rows.acts_ND, tensor, rtol=0, atol=0)
        assert torch.equal(rows.token_id_N.long(), meta["token_id"])
        assert torch.equal(rows.doc_index_N.long(), doc_index)
        assert torch.equal(rows.position_N.long(), meta["position"])


def test_defaults_keep_the_files_dtype_and_make_up_metadata(store, tmp_path, acts) -> None:
    path = write(tmp_path / "acts.safetensors", {"resid.3": acts["resid.3"].half()})
    manifest = import_activations(store, path, tensors={"resid.3": "model.layers.3"})
    assert manifest.dtype == "fp16" and list(manifest.layers) == ["model.layers.3"]
    assert manifest.import_.synthetic_row_fields == ["token_id", "doc_index", "position"]
    rows = all_rows(store, manifest.id, "model.layers.3")
    assert torch.equal(rows.acts_ND, acts["resid.3"].half().float())
    assert torch.equal(rows.doc_index_N, torch.arange(N_ROWS, dtype=torch.int32)), "a document per row"
    assert bool((rows.position_N == 1).all()) and bool((rows.token_id_N == -1).all())


def test_positions_follow_documents_and_documents_follow_positions(store, tmp_path, acts) -> None:
    doc_index = torch.tensor([0, 0, 0, 1, 1, 2] * 100)
    path = write(tmp_path / "docs.safetensors", {"x": acts["resid.3"], "doc_index": doc_index})
    run = import_activations(store, path).id
    assert all_rows(store, run, "x").position_N[:6].tolist() == [0, 1, 2, 0, 1, 0]

    position = torch.tensor([0, 1, 2, 0, 1, 5] * 100)
    path = write(tmp_path / "positions.safetensors", {"x": acts["resid.3"], "position": position})
    run = import_activations(store, path).id
    assert all_rows(store, run, "x").doc_index_N[:7].tolist() == [0, 0, 0, 1, 1, 1, 2]


@pytest.mark.parametrize(
    ("tensors", "kwargs", "message"),
    [
        ({"a": torch.zeros(4, 3, 2)}, {}, "no 2-D floating-point tensor"),
        ({"a": torch.zeros(4, 3, 2)}, {"tensors": {"a": "a"}}, r"tensor 'a' has shape \[4, 3, 2\]"),
        ({"a": torch.zeros(4, 3, dtype=torch.int64)}, {"tensors": {"a": "a"}}, "tensor 'a' is I64"),
        ({"a": torch.zeros(4, 3), "b": torch.zeros(5, 3)}, {}, "tensor 'b' has 5 rows but tensor 'a' has 4"),
        ({"a": torch.zeros(4, 3)}, {"tensors": {"resid": "a"}}, "tensor 'resid' is not in the file"),
        ({"a": torch.zeros(4, 3)}, {"tensors": {"a": "../up"}}, "layer name '../up'"),
        ({"a": torch.zeros(4, 3)}, {"tensors": {"a": "manifest.json"}}, "layer name 'manifest.json'"),
        ({"docs.jsonl": torch.zeros(4, 3)}, {}, "layer name 'docs.jsonl'"),
        (
            {"a": torch.zeros(4, 3), "position": torch.zeros(4)},
            {},
            "'position' .* is F32: it must be an integer",
        ),
        ({"a": torch.zeros(4, 3), "doc_index": torch.zeros(3, dtype=torch.int64)}, {}, r"shape \[3\].*\[4\]"),
        (
            {"a": torch.zeros(4, 3), "position": -torch.ones(4, dtype=torch.int64)},
            {},
            r"values in \[-1, -1\]",
        ),
        ({"a": torch.tensor([[0.0, 1.0], [float("nan"), 0.0]])}, {}, "'a' has non-finite .* row 1"),
        ({"a": torch.tensor([[0.0], [1e6]])}, {"dtype": "fp16"}, "beyond the range of fp16 .* row 1"),
        ({"a": torch.zeros(0, 3)}, {}, "tensor 'a' has no rows"),
    ],
)
def test_bad_files_name_the_tensor_and_publish_nothing(store, tmp_path, tensors, kwargs, message) -> None:
    path = write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(InvalidInputError, match=message):
        import_activations(store, path, **kwargs)
    assert list_runs(store) == []
    assert not list((store.root / "activations").glob("*")), "no staging directory left behind"


def test_not_a_safetensors_file(store, tmp_path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(InvalidInputError, match="not a readable safetensors file"):
        import_activations(store, path)


def test_an_sae_trains_on_an_imported_run(store, tmp_path) -> None:
    """Rows built from a few directions: the imported run trains like a captured one."""
    generator = torch.Generator().manual_seed(1)
    directions = torch.randn(8, D, generator=generator)
    codes = torch.rand(2000, 8, generator=generator) * (torch.rand(2000, 8, generator=generator) < 0.3)
    path = write(tmp_path / "acts.safetensors", {"blocks.2": codes @ directions})
    run = import_activations(store, path).id
    summary = artifacts.train_from_run(
        store,
        run,
        "blocks.2",
        {"architecture": "topk", "n_latents": 32, "k": 4},
        {"batch_size": 256, "epochs": 2, "seed": 0},
    )
    assert summary.status == "complete" and summary.config["d_in"] == D
    assert summary.model == "unknown" and summary.run_id == run
    assert 0 <= summary.metrics["fvu"] < 1


def test_cli_runs_import(store, tmp_path, acts) -> None:
    from typer.testing import CliRunner

    from kestrel.cli import app

    path = write(tmp_path / "acts.safetensors", acts)
    runner = CliRunner()
    args = ["runs", "import", str(path), "--store", str(store.root), "-t", "resid.3=model.layers.3", "--json"]
    result = runner.invoke(app, [*args, "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    run = list_runs(store)[0]
    assert list(run.layers) == ["model.layers.3"] and run.dtype == "bf16"
    bad = runner.invoke(app, ["runs", "import", str(path), "--store", str(store.root), "-t", "resid.3"])
    assert bad.exit_code == 2 and "--tensor takes KEY=VALUE" in bad.output


def test_import_through_the_s3_store(tmp_path, s3_endpoint, acts) -> None:
    """Only Store protocol verbs are used: the same import publishes to S3, and reads back equal."""
    from s3_server import new_bucket

    from kestrel.core.store import open_store

    store = open_store(new_bucket(s3_endpoint), endpoint_url=s3_endpoint, local_root=tmp_path / "local")
    path = write(tmp_path / "acts.safetensors", acts)
    manifest = import_activations(store, path, dtype="fp32", shard_mb=0.01)
    assert [m.id for m in list_runs(store)] == [manifest.id] and len(manifest.shards) > 1
    for layer, tensor in acts.items():
        assert torch.equal(all_rows(store, manifest.id, layer).acts_ND, tensor)


# ---------------------------------------------------------------------------------------------
# Client files parsed without a 500: safetensors headers, JSON, SAELens imports


def raw_safetensors(header: object, data: bytes = b"", *, header_bytes: bytes | None = None) -> bytes:
    """A safetensors file with exactly this header (however wrong) followed by ``data``."""
    import json
    import struct

    body = header_bytes if header_bytes is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


EIGHT = b"\0" * 8


def entry(**fields: object) -> dict:
    """A header with one tensor ``a`` of two F32 values (eight bytes), with ``fields`` changed."""
    return {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], **fields}}


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (entry(data_offsets=["0", "8"]), EIGHT, "invalid data_offsets"),
        (entry(data_offsets=[False, True]), EIGHT, "invalid data_offsets"),
        (entry(data_offsets=[0]), EIGHT, "invalid data_offsets"),
        (entry(data_offsets=[0, 80]), EIGHT, "lies outside the file"),
        (entry(data_offsets=[-8, 0]), EIGHT, "lies outside the file"),
        (entry(dtype="F99"), EIGHT, "unknown dtype 'F99'"),
        (entry(shape=[300000, 576]), EIGHT, "not what shape"),
        (entry(shape=[-2]), EIGHT, "invalid shape"),
        (entry(shape="2"), EIGHT, "invalid shape"),
        ({"a": ["F32", [2], [0, 8]]}, EIGHT, "is not described by an object"),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
        ([1, 2], b"", "not a JSON object"),
    ],
)
def test_malformed_safetensors_headers_are_invalid_input(header, data, message) -> None:
    from kestrel.core.clientdata import safetensors_header

    with pytest.raises(InvalidInputError, match=message):
        safetensors_header(raw_safetensors(header, data))


@pytest.mark.parametrize(
    ("header_bytes", "message"),
    [
        (b"[" * 20_000 + b"]" * 20_000, "nested too deeply"),
        (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}', "out of range"),
        (b'{"\xc3\x28": 1}', "not UTF-8"),
        (b"{not json}", "not valid JSON"),
    ],
)
def test_unparseable_safetensors_headers_are_invalid_input(header_bytes: bytes, message: str) -> None:
    from kestrel.core.clientdata import safetensors_header

    with pytest.raises(InvalidInputError, match=message):
        safetensors_header(raw_safetensors(None, header_bytes=header_bytes))


def test_a_well_formed_header_reads_back_its_tensors() -> None:
    from safetensors.torch import save

    from kestrel.core.clientdata import TensorInfo, safetensors_header

    data = save({"w": torch.zeros(3, 4), "i": torch.zeros(5, dtype=torch.int64)}, metadata={"k": "v"})
    expected = {"w": TensorInfo("w", "F32", (3, 4)), "i": TensorInfo("i", "I64", (5,))}
    assert safetensors_header(data) == expected


def test_layer_and_id_patterns_refuse_a_trailing_newline(store, tmp_path, acts) -> None:
    from kestrel.core.store import validate_id

    with pytest.raises(InvalidInputError, match="invalid run id"):
        validate_id("abc\n", "run id")
    path = write(tmp_path / "a.safetensors", {"a": acts["resid.3"]})
    with pytest.raises(InvalidInputError, match="invalid run id"):
        import_activations(store, path, run_id="abc\n")
    with pytest.raises(InvalidInputError, match=r"layer name 'model\.layers\.3\\n'"):
        import_activations(store, path, tensors={"a": "model.layers.3\n"})
    assert list_runs(store) == [] and not any((store.local_root / "activations").glob("*"))


def saelens_files(d_in: int = 8, n_latents: int = 32, **cfg_updates) -> tuple[bytes, bytes]:
    """cfg.json and sae_weights.safetensors of a small TopK SAE, as SAELens writes them."""
    import json

    from safetensors.torch import save

    from kestrel.core.sae import SAEConfig, create
    from kestrel.core.sae.io import _saelens_config

    sae = create(SAEConfig(architecture="topk", d_in=d_in, n_latents=n_latents, k=4))
    weights = {
        "W_enc": sae.W_enc.detach().t().contiguous(),
        "b_enc": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach(),
        "b_dec": sae.b_dec.detach(),
    }
    cfg = _saelens_config(sae.config)
    cfg.pop("kestrel")
    cfg.update(cfg_updates)
    return json.dumps(cfg).encode(), save(weights)


def test_saelens_import_reads_shapes_from_the_header_not_the_config() -> None:
    from kestrel.core.sae.io import saelens_from_bytes

    cfg, weights = saelens_files(d_sae=300_000)
    with pytest.raises(InvalidInputError, match=r"cfg.json says d_sae=300000 but the weights have 32"):
        saelens_from_bytes(cfg, weights)
    cfg, weights = saelens_files(d_sae=True)
    with pytest.raises(InvalidInputError, match=r"cfg\.json says d_sae=True"):
        saelens_from_bytes(cfg, weights)
    sae = saelens_from_bytes(*saelens_files())
    assert (sae.d_in, sae.n_latents) == (8, 32) and all(p.device.type == "cpu" for p in sae.parameters())


def test_saelens_import_is_capped_before_reading_weights() -> None:
    from kestrel.core.limits import Caps, LimitExceededError
    from kestrel.core.sae.io import saelens_from_bytes

    cfg, weights = saelens_files(d_in=8, n_latents=64)
    with pytest.raises(LimitExceededError, match="max_n_latents") as caught:
        saelens_from_bytes(cfg, weights, caps=Caps(max_n_latents=32))
    assert caught.value.details == {"limit": "max_n_latents", "max": 32, "got": 64}
    with pytest.raises(LimitExceededError, match="max_sae_params"):
        saelens_from_bytes(cfg, weights, caps=Caps(max_sae_params=8 * 63))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_saelens_import_rejects_non_finite_weights(bad: float) -> None:
    from safetensors.torch import load, save

    from kestrel.core.sae.io import saelens_from_bytes

    cfg, weights = saelens_files()
    tensors = load(weights)
    tensors["W_dec"][3, 1] = bad
    with pytest.raises(InvalidInputError, match="W_dec has non-finite values"):
        saelens_from_bytes(cfg, save(tensors))


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (b"[" * 20_000 + b"]" * 20_000, "nested too deeply"),
        (b'{"d_in": ' + b"1" * 5000 + b"}", "out of range"),
        (b"[1, 2]", "must hold a JSON object"),
        (b'{"d_sae": 32}', "cfg.json has no d_in"),
    ],
)
def test_saelens_import_rejects_unparseable_configs(cfg: bytes, message: str) -> None:
    from kestrel.core.sae.io import saelens_from_bytes

    with pytest.raises(InvalidInputError, match=message):
        saelens_from_bytes(cfg, saelens_files()[1])
