"""The S3 store and the mirrored ``both`` store, against a real S3-compatible server.

moto's standalone server runs as a subprocess on loopback (never a mock object in this process),
so every request goes through boto3, HTTP and a server that enforces S3's semantics, conditional
writes included. The protocol tests run over all three backends; the S3-specific ones cover
what only S3 can get wrong: a writer killed mid-upload, stale cache entries, orphaned keys.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
from s3_server import new_bucket

from kestrel.core.errors import ConflictError, InvalidInputError, NotFoundError
from kestrel.core.store import LocalStore, Store, open_store, parse_s3_url
from kestrel.core.store.mirror import MirrorStore
from kestrel.core.store.s3 import CLAIM, S3Store
from kestrel.settings import Settings

pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the dev extra)")


@pytest.fixture
def s3_url(s3_endpoint) -> str:
    """A fresh bucket per test, with a prefix, so tests never see each other's keys."""
    return new_bucket(s3_endpoint)


def _settings(backend: str, tmp_path: Path, s3_url: str | None, endpoint: str | None) -> Settings:
    return Settings(
        store_root=tmp_path / "store", store_backend=backend, s3_url=s3_url, s3_endpoint_url=endpoint
    )


@pytest.fixture(params=["local", "s3", "both"])
def any_store(request, tmp_path, s3_endpoint, s3_url) -> Store:
    return _settings(request.param, tmp_path, s3_url, s3_endpoint).open_store()


@pytest.fixture
def s3_store(tmp_path, s3_endpoint, s3_url) -> S3Store:
    store = open_store(s3_url, endpoint_url=s3_endpoint, local_root=tmp_path / "local")
    assert isinstance(store, S3Store)
    return store


def _publish(store: Store, kind: str, artifact_id: str, files: dict[str, bytes]) -> dict:
    manifest = {"id": artifact_id, "kind": kind, "files": sorted(files)}
    with store.writer(kind, artifact_id) as writer:
        for rel, data in files.items():
            (writer.directory / rel).parent.mkdir(parents=True, exist_ok=True)
            (writer.directory / rel).write_bytes(data)
        writer.commit(manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Choosing a store


def test_open_store_chooses_the_backend(tmp_path, s3_endpoint, s3_url) -> None:
    assert isinstance(open_store(tmp_path / "plain"), LocalStore)
    assert isinstance(_settings("local", tmp_path, None, None).open_store(), LocalStore)
    assert isinstance(_settings("s3", tmp_path, s3_url, s3_endpoint).open_store(), S3Store)
    both = _settings("both", tmp_path, s3_url, s3_endpoint).open_store()
    assert isinstance(both, MirrorStore) and both.local_root == (tmp_path / "store").resolve()
    assert all(isinstance(s, Store) for s in (both, both.local, both.remote)), "the whole protocol"
    cached = Settings(
        store_root=tmp_path / "store",
        store_backend="s3",
        s3_url=s3_url,
        s3_endpoint_url=s3_endpoint,
        s3_cache_dir=tmp_path / "cache",
    ).open_store()
    _publish(cached, "uploads", "up-c", {"data.txt": b"cached"})
    assert cached.local_path("uploads", "up-c", "data.txt").is_relative_to(tmp_path / "cache")
    with pytest.raises(InvalidInputError, match="KESTREL_S3_URL"):
        _settings("s3", tmp_path, None, None).open_store()
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    for bad in ("http://bucket/x", "s3:///prefix"):
        with pytest.raises(InvalidInputError):
            parse_s3_url(bad)
    with pytest.raises(InvalidInputError):
        open_store("s3://bucket/../escape", endpoint_url=s3_endpoint, local_root=tmp_path)


def test_settings_read_the_backend_from_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("KESTREL_STORE_BACKEND", "s3")
    monkeypatch.setenv("KESTREL_S3_URL", "s3://bucket/prefix")
    monkeypatch.setenv("KESTREL_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    settings = Settings()
    assert (settings.store_backend, settings.s3_url, settings.s3_endpoint_url) == (
        "s3",
        "s3://bucket/prefix",
        "http://127.0.0.1:9000",
    )


# ---------------------------------------------------------------------------------------------
# The protocol, over local, s3 and both


def test_write_commit_list_read_delete(any_store: Store) -> None:
    store = any_store
    files = {"data.bin": b"\x00\x01" * 1000, "layer.1/00000.safetensors": b"shard", "docs.jsonl": b"{}\n"}
    with store.writer("activations", "run-a") as writer:
        for rel, data in files.items():
            (writer.directory / rel).parent.mkdir(parents=True, exist_ok=True)
            (writer.directory / rel).write_bytes(data)
        assert store.list("activations") == [] and not store.exists("activations", "run-a")
        writer.commit({"id": "run-a", "n": 3})
    assert store.list("activations") == ["run-a"] and store.exists("activations", "run-a")
    assert store.read_json("activations", "run-a") == {"id": "run-a", "n": 3}
    for rel, data in files.items():
        assert store.local_path("activations", "run-a", rel).read_bytes() == data
    listed = store.list_files("activations", "run-a")
    assert [f.rel for f in listed] == sorted([*files, "manifest.json"])
    assert store.stat("activations", "run-a", "data.bin").size == 2000
    assert [f.rel for f in store.list_files("activations", "run-a", "layer.1/")] == [
        "layer.1/00000.safetensors"
    ]
    local = store.local_dir("activations", "run-a", ["data.bin", "docs.jsonl"])
    assert (local / "data.bin").read_bytes() == files["data.bin"]

    with pytest.raises(ConflictError):
        store.writer("activations", "run-a")
    with pytest.raises(NotFoundError, match="no file"):
        store.local_path("activations", "run-a", "missing.bin")
    with pytest.raises(NotFoundError):
        store.read_json("activations", "run-b")
    with pytest.raises(InvalidInputError):
        store.local_path("activations", "run-a", "../escape")

    store.delete("activations", "run-a")
    assert store.list("activations") == [] and not store.exists("activations", "run-a")
    with pytest.raises(NotFoundError):
        store.local_path("activations", "run-a", "data.bin")
    with pytest.raises(NotFoundError):
        store.delete("activations", "run-a")


def test_a_failed_writer_publishes_nothing(any_store: Store) -> None:
    with pytest.raises(RuntimeError), any_store.writer("saes", "sae-x") as writer:
        (writer.directory / "weights.safetensors").write_bytes(b"half")
        raise RuntimeError("killed by the test")
    assert not writer.directory.exists()
    assert any_store.list("saes") == [] and not any_store.exists("saes", "sae-x")
    _publish(any_store, "saes", "sae-x", {"weights.safetensors": b"whole"})  # the id is free
    assert any_store.local_path("saes", "sae-x", "weights.safetensors").read_bytes() == b"whole"


def test_files_inside_a_published_artifact(any_store: Store) -> None:
    store = any_store
    _publish(store, "saes", "sae-a", {"config.json": b"{}", "weights.safetensors": b"w1"})
    store.put_json("saes", "sae-a", "metrics.json", {"fvu": 0.1})
    assert store.read_json("saes", "sae-a", "metrics.json") == {"fvu": 0.1}
    before = store.stat("saes", "sae-a", "metrics.json").version
    store.put_json("saes", "sae-a", "metrics.json", {"fvu": 0.2, "more": True})
    assert store.read_json("saes", "sae-a", "metrics.json") == {"fvu": 0.2, "more": True}
    assert json.loads(store.local_path("saes", "sae-a", "metrics.json").read_text())["fvu"] == 0.2
    assert store.stat("saes", "sae-a", "metrics.json").version != before

    staging = store.scratch_dir("saes", "sae-a", "features") / ".staging-test"
    staging.mkdir()
    (staging / "features.safetensors").write_bytes(b"tensors")
    (staging / "vocab.json").write_text("{}")
    store.put_tree("saes", "sae-a", "features/v-1", staging)
    assert not staging.exists()
    assert [f.rel for f in store.list_files("saes", "sae-a", "features/")] == [
        "features/v-1/features.safetensors",
        "features/v-1/vocab.json",
    ]
    assert store.local_path("saes", "sae-a", "features/v-1/features.safetensors").read_bytes() == b"tensors"
    again = store.scratch_dir("saes", "sae-a", "features") / ".staging-again"
    again.mkdir()
    with pytest.raises(ConflictError):
        store.put_tree("saes", "sae-a", "features/v-1", again)
    store.delete_tree("saes", "sae-a", "features/v-1")
    assert store.list_files("saes", "sae-a", "features/") == []
    with pytest.raises(NotFoundError):
        store.put_json("saes", "sae-missing", "metrics.json", {})


# ---------------------------------------------------------------------------------------------
# S3 specifics


def test_keys_follow_the_local_layout(s3_store: S3Store) -> None:
    _publish(s3_store, "activations", "run-a", {"tokens/00000.safetensors": b"t"})
    bucket, prefix = parse_s3_url(s3_store.url)
    keys = sorted(o["Key"] for o in s3_store.client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == [
        f"{prefix}/activations/run-a/manifest.json",
        f"{prefix}/activations/run-a/tokens/00000.safetensors",
    ]


def test_a_republished_id_never_serves_stale_bytes(s3_store: S3Store, tmp_path, s3_endpoint) -> None:
    _publish(s3_store, "uploads", "up-a", {"data.txt": b"first version"})
    assert s3_store.local_path("uploads", "up-a", "data.txt").read_bytes() == b"first version"
    other = S3Store(s3_store.bucket, s3_store.prefix, endpoint_url=s3_endpoint, local_root=tmp_path / "other")
    other.delete("uploads", "up-a")
    with pytest.raises(NotFoundError):
        s3_store.local_path("uploads", "up-a", "data.txt")  # the cached copy is not served
    _publish(other, "uploads", "up-a", {"data.txt": b"second, longer version"})
    assert s3_store.local_path("uploads", "up-a", "data.txt").read_bytes() == b"second, longer version"


def test_claims_keep_two_writers_apart_and_gc_frees_a_dead_ones(s3_store: S3Store) -> None:
    first = s3_store.writer("saes", "sae-r")
    second = s3_store.writer("saes", "sae-r")  # neither has published yet: both may start
    (first.directory / "w").write_bytes(b"first")
    (second.directory / "w").write_bytes(b"second")
    first.commit({"id": "sae-r", "by": "first"})
    with pytest.raises(ConflictError, match="already exists"):
        second.commit({"id": "sae-r", "by": "second"})
    assert s3_store.local_path("saes", "sae-r", "w").read_bytes() == b"first"

    claim = s3_store._key("saes", "sae-dead", CLAIM)
    s3_store.client.put_object(Bucket=s3_store.bucket, Key=claim, Body=b"{}")  # a writer that died
    with pytest.raises(ConflictError, match="being written"), s3_store.writer("saes", "sae-dead") as w:
        w.commit({"id": "sae-dead"})
    assert s3_store.gc(older_than_s=3600) == []  # too recent to be a dead writer's
    assert s3_store.gc(older_than_s=0) == [claim]
    _publish(s3_store, "saes", "sae-dead", {"w": b"after gc"})
    assert s3_store.list("saes") == ["sae-dead", "sae-r"]
    assert s3_store.gc(older_than_s=0) == []  # published artifacts are never collected


def test_a_manifest_rewrite_racing_a_delete_does_not_resurrect_it(s3_store: S3Store, monkeypatch) -> None:
    """The window between put_json's checks and its PUT, pinned open: the delete lands there (the
    checks saw the manifest a moment before), and the conditional PUT must refuse rather than list
    a half-deleted artifact again."""
    _publish(s3_store, "saes", "racing", {"weights.bin": b"w"})
    seen = s3_store._head(s3_store._key("saes", "racing", "manifest.json"))
    s3_store.delete("saes", "racing")
    monkeypatch.setattr(s3_store, "require", lambda *_: None)
    monkeypatch.setattr(s3_store, "_head", lambda key: seen)
    with pytest.raises(ConflictError, match="changed or deleted"):
        s3_store.put_json("saes", "racing", "manifest.json", {"id": "racing"})
    monkeypatch.undo()
    assert s3_store.list("saes") == [] and not s3_store.exists("saes", "racing")


def test_a_cached_copy_is_exactly_the_version_asked_for(s3_store: S3Store) -> None:
    """A download pinned to an ETag that is no longer current fails instead of caching other bytes
    under that tag."""
    _publish(s3_store, "saes", "pinned", {"w.bin": b"one"})
    stale = s3_store.stat("saes", "pinned", "w.bin").version
    s3_store.put_json("saes", "pinned", "w.bin", {"two": 2})  # a new version of the object
    with pytest.raises(ConflictError, match="changed or was deleted"):
        s3_store._cached("saes", "pinned", "w.bin", stale)
    assert s3_store.local_path("saes", "pinned", "w.bin").read_bytes().startswith(b"{")


def test_foreign_keys_in_the_bucket_are_not_listed(s3_store: S3Store) -> None:
    for key in ("activations/Not_An_Id/manifest.json", "activations/half/data.bin", "readme.txt"):
        s3_store.client.put_object(Bucket=s3_store.bucket, Key=f"{s3_store.prefix}/{key}", Body=b"x")
    assert s3_store.list("activations") == []


def test_mirror_reads_local_first_then_s3(tmp_path, s3_endpoint, s3_url) -> None:
    mirror = _settings("both", tmp_path, s3_url, s3_endpoint).open_store()
    assert isinstance(mirror, MirrorStore)
    _publish(mirror, "analyses", "an-both", {"report.md": b"# both"})
    assert mirror.local.exists("analyses", "an-both") and mirror.remote.exists("analyses", "an-both")
    _publish(mirror.remote, "analyses", "an-remote", {"report.md": b"# remote only"})
    _publish(mirror.local, "analyses", "an-local", {"report.md": b"# local only"})
    assert mirror.list("analyses") == ["an-both", "an-local", "an-remote"]
    remote_copy = mirror.local_path("analyses", "an-remote", "report.md")
    assert remote_copy.read_bytes() == b"# remote only" and "s3-cache" in remote_copy.parts
    assert mirror.local_path("analyses", "an-both", "report.md").is_relative_to(mirror.local.root)
    mirror.put_json("analyses", "an-both", "results.json", {"ok": True})
    assert mirror.remote.read_json("analyses", "an-both", "results.json") == {"ok": True}
    mirror.delete("analyses", "an-both")
    assert not mirror.local.exists("analyses", "an-both") and not mirror.remote.exists("analyses", "an-both")


def test_a_failed_upload_publishes_nowhere(tmp_path, s3_endpoint) -> None:
    missing_bucket = f"s3://kestrel-absent-{secrets.token_hex(3)}/p"
    mirror = _settings("both", tmp_path, missing_bucket, s3_endpoint).open_store()
    with pytest.raises(Exception, match=r"NoSuchBucket|does not exist"):
        _publish(mirror, "steering", "cfg-a", {"config.json": b"{}"})
    assert mirror.local.list("steering") == [] and not any((mirror.local.root / "steering").iterdir())


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from kestrel.core.store.s3 import S3Store

    endpoint, bucket, prefix, local_root = sys.argv[1:5]
    store = S3Store(bucket, prefix, endpoint_url=endpoint, local_root=local_root)
    with store.writer("activations", "killed") as writer:
        for i in range(3000):
            (writer.directory / "model.layers.1").mkdir(exist_ok=True)
            (writer.directory / "model.layers.1" / f"{i:05d}.safetensors").write_bytes(bytes(4096))
        print("uploading", flush=True)
        writer.commit({"id": "killed", "kind": "activations"})
    print("committed", flush=True)
    """
)


def test_a_writer_killed_mid_upload_leaves_nothing_listed(s3_store: S3Store, tmp_path, s3_endpoint) -> None:
    prefix = s3_store._key("activations", "killed") + "/"
    args = [s3_endpoint, s3_store.bucket, s3_store.prefix, str(tmp_path / "w")]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300  # the writer's start (imports) on a busy machine
        uploaded = 0
        while uploaded < 20 and time.monotonic() < deadline and proc.poll() is None:
            uploaded = s3_store.client.list_objects_v2(Bucket=s3_store.bucket, Prefix=prefix)["KeyCount"]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the writer finished before the test could kill it"
    assert uploaded >= 20, "some keys were uploaded before the kill"
    fresh = S3Store(s3_store.bucket, s3_store.prefix, endpoint_url=s3_endpoint, local_root=tmp_path / "r")
    for reader in (s3_store, fresh):
        assert reader.list("activations") == [] and not reader.exists("activations", "killed")
        with pytest.raises(NotFoundError):
            reader.local_path("activations", "killed", "model.layers.1/00000.safetensors")
    left = s3_store.client.list_objects_v2(Bucket=s3_store.bucket, Prefix=prefix)["KeyCount"]
    assert left >= 20 and s3_store._head(prefix + "manifest.json") is None
    with pytest.raises(ConflictError, match="being written"), fresh.writer("activations", "killed") as w:
        w.commit({"id": "killed"})  # the dead writer's claim holds the id until gc
    removed = fresh.gc(older_than_s=0)
    assert len(removed) == left
    assert s3_store.client.list_objects_v2(Bucket=s3_store.bucket, Prefix=prefix)["KeyCount"] == 0


# ---------------------------------------------------------------------------------------------
# The acceptance workflow: capture, train, load, evaluate, discover, name, export on S3


TOPICS = ["cooking pasta with garlic and basil", "a football match with two goals", "stars far away"]


@pytest.mark.parametrize("backend", ["s3", "both"])
def test_capture_train_evaluate_discover_on_s3(backend, tiny_lm, tmp_path, s3_endpoint, s3_url) -> None:
    from kestrel.core import concepts
    from kestrel.core.activations import capture
    from kestrel.core.concepts.dictionary import Concept, export_dictionary, update_concepts
    from kestrel.core.concepts.store import FeatureReader
    from kestrel.core.run_reader import iter_batches
    from kestrel.core.runs import CaptureOptions
    from kestrel.core.sae import artifacts

    store = _settings(backend, tmp_path, s3_url, s3_endpoint).open_store()
    texts = [f"{TOPICS[i % 3]} number {i}, told again and again." * 3 for i in range(90)]
    run = capture(tiny_lm, texts, ["model.layers.1"], store, options=CaptureOptions(dtype="fp32"))
    assert store.list("activations") == [run.id]
    assert next(iter(iter_batches(store, run.id, "model.layers.1"))).shape[1] == 32

    sae = {"architecture": "topk", "n_latents": 64, "k": 4}
    summary = artifacts.train_from_run(
        store, run.id, "model.layers.1", sae, {"batch_size": 256, "epochs": 1, "seed": 3}, sae_id="sae-s3"
    )
    assert summary.status == "complete" and [s.id for s in artifacts.list_saes(store)] == ["sae-s3"]
    loaded, _ = artifacts.load_sae(store, "sae-s3")
    assert loaded.n_latents == 64
    metrics = artifacts.evaluate_sae(store, "sae-s3", tiny_lm, texts[:6])
    assert "model_in_the_loop" in artifacts.get_sae(store, "sae-s3").metrics and metrics
    assert store.read_json("saes", "sae-s3", "metrics.json")["model_in_the_loop"] == metrics

    manifest = concepts.discover(store, "sae-s3", tiny_lm, config={"top_n": 4, "window": 2})
    reader = FeatureReader(store, "sae-s3")
    assert reader.manifest["version"] == manifest["version"]
    assert reader.full("top_values")["top_values"].shape == (64, 4)
    update_concepts(store, "sae-s3", [Concept(latent=3, name="pasta")])
    assert '"pasta"' in export_dictionary(store, "sae-s3", "json")
    archive = zipfile.ZipFile(io.BytesIO(artifacts.export_sae_zip(store, "sae-s3", "kestrel")))
    assert {"config.json", "weights.safetensors", "manifest.json"} <= set(archive.namelist())

    if isinstance(store, MirrorStore):
        remote = store.remote
        assert remote.list("saes") == ["sae-s3"] and remote.list("activations") == [run.id]
        assert remote.read_json("saes", "sae-s3", "features/manifest.json")["version"] == manifest["version"]
    artifacts.delete_sae(store, "sae-s3")
    assert artifacts.list_saes(store) == []


def test_a_list_skips_an_artifact_deleted_while_it_is_read(tmp_path) -> None:
    """One concurrent delete must not turn a whole list into a 404."""
    from kestrel.core.store import LocalStore, read_manifests

    class DeletedMidList(LocalStore):
        def list(self, kind: str) -> list[str]:
            return [*super().list(kind), "gone-since-listed"]

    store = DeletedMidList(tmp_path / "s")
    with store.writer("analyses", "here") as writer:
        writer.commit({"id": "here"})
    assert read_manifests(store, "analyses") == [{"id": "here"}]
