"""Text sources and token batching, on files written here and a tokenizer built here (no network)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from kestrel.core.datasets import (
    DatasetSpec,
    FileSource,
    HFSource,
    TextsSource,
    TokenBatch,
    check_nonempty,
    iter_texts,
    prepare_tokenizer,
    token_batches,
)
from kestrel.core.errors import InvalidInputError, NotFoundError

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "bird",
    "sat",
    "ran",
    "flew",
    "on",
    "under",
    "over",
    "mat",
    "log",
    "tree",
    "big",
    "small",
    "red",
    "quick",
    "slow",
    "and",
]

DOCS = [
    "the cat sat on the mat",
    "a dog ran",
    "the big red bird flew over the tree and the small dog sat under the log",
    "cat",
    "the quick dog and the slow cat ran on the log",
    "a bird",
    "the small red cat sat",
    "dog and cat and bird",
]


def build_tokenizer(*, pad: bool = True, eos: bool = True, unk: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that prepends <bos>, so special-token handling is exercised too."""
    specials = ["<unk>", "<pad>", "<eos>", "<bos>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    kwargs = {"bos_token": "<bos>"}
    if unk:
        kwargs["unk_token"] = "<unk>"
    if pad:
        kwargs["pad_token"] = "<pad>"
    if eos:
        kwargs["eos_token"] = "<eos>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(record) for record in records])


def decode_rows(batch: TokenBatch, tokenizer: PreTrainedTokenizerFast) -> dict[int, str]:
    """doc index → decoded real tokens of its row (specials dropped)."""
    decoded = {}
    rows = zip(batch.input_ids_BT, batch.attention_mask_BT, batch.doc_index_B, strict=True)
    for ids_T, mask_T, doc in rows:
        real = ids_T[mask_T.bool()].tolist()
        decoded[int(doc)] = tokenizer.decode(real, skip_special_tokens=True)
    return decoded


# ---- sources: formats ------------------------------------------------------------------------


def test_texts_source_skips_blank_and_applies_limit() -> None:
    spec = TextsSource(texts=["one", "  ", "", "two", "three"], limit=2)
    assert list(iter_texts(spec)) == ["one", "two"]


def test_txt_line_mode_one_document_per_nonempty_line(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\n   \nsecond line\r\nthird line", encoding="utf-8")
    assert list(iter_texts(FileSource(path=str(path)))) == ["first line", "second line", "third line"]


def test_txt_file_mode_whole_file_is_one_document(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "story.txt", ["once upon", "a time"])
    assert list(iter_texts(FileSource(path=str(path), txt_mode="file"))) == ["once upon\na time\n"]


def test_txt_directory_reads_sorted_txt_files(tmp_path: Path) -> None:
    write_lines(tmp_path / "b.txt", ["bee"])
    write_lines(tmp_path / "a.txt", ["ay one", "ay two"])
    (tmp_path / "c.txt").write_text("   \n", encoding="utf-8")  # blank file: skipped
    write_lines(tmp_path / "notes.md", ["not a txt file"])
    as_files = FileSource(path=str(tmp_path), txt_mode="file")
    assert list(iter_texts(as_files)) == ["ay one\nay two\n", "bee\n"]
    as_lines = FileSource(path=str(tmp_path))
    assert list(iter_texts(as_lines)) == ["ay one", "ay two", "bee"]


def test_directory_without_matching_files_is_rejected(tmp_path: Path) -> None:
    write_lines(tmp_path / "notes.md", ["x"])
    with pytest.raises(InvalidInputError, match=r"no txt files"):
        iter_texts(FileSource(path=str(tmp_path)))


def test_jsonl_reads_field_and_skips_blank_lines_and_null_texts(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(
        '{"body": "alpha", "id": 1}\n\n{"body": null, "id": 2}\n{"body": "beta", "id": 3}\n', encoding="utf-8"
    )
    assert list(iter_texts(FileSource(path=str(path), text_field="body"))) == ["alpha", "beta"]


def test_ndjson_suffix_and_explicit_format_override(tmp_path: Path) -> None:
    records = [{"text": "x"}, {"text": "y"}]
    assert list(iter_texts(FileSource(path=str(write_jsonl(tmp_path / "d.ndjson", records))))) == ["x", "y"]
    odd_name = write_jsonl(tmp_path / "d.data", records)
    assert list(iter_texts(FileSource(path=str(odd_name), format="jsonl"))) == ["x", "y"]


def test_csv_reads_column_with_quoted_newlines_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    path.write_text('\ufeffid,text\n1,"hello, world"\n2,"two\nlines"\n3,\n', encoding="utf-8")
    assert list(iter_texts(FileSource(path=str(path)))) == ["hello, world", "two\nlines"]


def test_parquet_streams_the_column_in_order(tmp_path: Path) -> None:
    texts = [f"document {i}" for i in range(2500)] + [None, ""]
    table = pa.table({"id": list(range(len(texts))), "content": texts})
    path = tmp_path / "docs.parquet"
    pq.write_table(table, path, row_group_size=700)
    assert list(iter_texts(FileSource(path=str(path), text_field="content"))) == texts[:2500]


def test_limit_stops_reading_early(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\nnot json at all\n', encoding="utf-8")
    assert list(iter_texts(FileSource(path=str(path), limit=3))) == ["a", "b", "c"]


# ---- sources: errors -------------------------------------------------------------------------


def test_missing_file_names_the_path_and_suggests_siblings(tmp_path: Path) -> None:
    write_lines(tmp_path / "corpus.txt", ["x"])
    missing = tmp_path / "corpsu.txt"
    with pytest.raises(NotFoundError) as caught:
        iter_texts(FileSource(path=str(missing)))
    assert str(missing) in caught.value.message
    assert "corpus.txt" in caught.value.message


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_missing_text_field_lists_available_fields_before_any_document(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"docs.{suffix}"
    rows = [{"txet": "hello", "label": 1}]
    if suffix == "jsonl":
        write_jsonl(path, rows)
    elif suffix == "csv":
        path.write_text("txet,label\nhello,1\n", encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(NotFoundError) as caught:
        iter_texts(FileSource(path=str(path)))
    message = caught.value.message
    assert "'text'" in message and "'txet'" in message and "'label'" in message
    assert "did you mean 'txet'" in message
    assert caught.value.details["available"] == ["txet", "label"]


def test_malformed_jsonl_names_the_line_number(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "also ok"}\n{"text": broken}\n', encoding="utf-8")
    docs = iter_texts(FileSource(path=str(path)))
    assert next(docs) == "ok"
    with pytest.raises(InvalidInputError, match=r"line 4 is not valid JSON"):
        list(docs)


def test_jsonl_record_that_is_not_an_object_is_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.jsonl", ['["a", "list"]'])
    with pytest.raises(InvalidInputError, match=r"line 1 is a JSON list, expected an object"):
        iter_texts(FileSource(path=str(path)))


def test_non_text_value_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": 42}])
    with pytest.raises(InvalidInputError, match=r"holds a int"):
        iter_texts(FileSource(path=str(path)))


def test_unknown_suffix_lists_supported_ones(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.xml", ["<doc/>"])
    with pytest.raises(InvalidInputError) as caught:
        iter_texts(FileSource(path=str(path)))
    for suffix in (".txt", ".jsonl", ".ndjson", ".csv", ".parquet"):
        assert suffix in caught.value.message


def test_corrupt_parquet_is_invalid_input(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    path.write_bytes(b"definitely not parquet")
    with pytest.raises(InvalidInputError, match=r"not a readable parquet file"):
        iter_texts(FileSource(path=str(path)))


@pytest.mark.parametrize(
    "content",
    ["", "\n  \n\t\n"],
    ids=["empty-file", "blank-lines"],
)
def test_empty_dataset_raises_at_call_time(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidInputError, match=r"dataset is empty"):
        iter_texts(FileSource(path=str(path)))


def test_empty_csv_with_header_only_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    path.write_text("text\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match=r"dataset is empty"):
        iter_texts(FileSource(path=str(path)))


def test_check_nonempty_on_a_plain_iterable() -> None:
    assert list(check_nonempty(iter(["", "x", " ", "y"]))) == ["x", "y"]
    with pytest.raises(InvalidInputError, match=r"dataset is empty: my texts"):
        check_nonempty(["", "  "], source="my texts")


# ---- sources: schema -------------------------------------------------------------------------


def test_dataset_spec_is_a_discriminated_union_that_round_trips() -> None:
    adapter = pydantic.TypeAdapter(DatasetSpec)
    for spec in (
        TextsSource(texts=["a"], limit=1),
        FileSource(path="/data/x.csv", format="csv", text_field="body"),
        HFSource(name="org/corpus", config="en", split="validation", streaming=False, limit=10),
    ):
        assert adapter.validate_python(spec.model_dump()) == spec
    assert isinstance(adapter.validate_python({"kind": "file", "path": "x.txt"}), FileSource)


@pytest.mark.parametrize(
    "payload",
    [
        {"kind": "hf"},  # name is required
        {"kind": "hf", "name": "org/corpus", "limit": 0},
        {"kind": "hf", "name": "org/corpus", "text_feild": "body"},  # typo is not silently ignored
        {"kind": "file", "path": "x.txt", "format": "xml"},
        {"kind": "texts", "texts": []},
        {"kind": "spreadsheet", "path": "x"},
    ],
)
def test_invalid_specs_are_rejected_by_validation(payload: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        pydantic.TypeAdapter(DatasetSpec).validate_python(payload)


def test_hf_source_validates_without_importing_or_fetching(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_dataset must not be called by validation")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    spec = pydantic.TypeAdapter(DatasetSpec).validate_python({"kind": "hf", "name": "org/corpus"})
    assert spec == HFSource(name="org/corpus", split="train", streaming=True)


def test_hf_loading_passes_name_config_split_streaming(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(path: str, name: str | None = None, **kwargs: object) -> list[dict]:
        calls.append((path, name, kwargs))
        return [{"text": "one", "id": 0}, {"text": " ", "id": 1}, {"text": "two", "id": 2}, {"text": "x"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = HFSource(name="org/corpus", config="en", split="validation", streaming=False, limit=2)
    assert list(iter_texts(spec)) == ["one", "two"]
    assert calls == [
        ("org/corpus", "en", {"split": "validation", "streaming": False, "data_files": None}),
    ]


def test_hf_local_json_builder_streams_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    path = write_jsonl(tmp_path / "local.jsonl", [{"body": "alpha"}, {"body": "beta"}, {"body": "gamma"}])
    spec = HFSource(name="json", data_files=[str(path)], text_field="body", limit=2)
    assert list(iter_texts(spec)) == ["alpha", "beta"]
    with pytest.raises(NotFoundError, match=r"text field 'text' not found.*'body'"):
        list(iter_texts(HFSource(name="json", data_files=[str(path)])))
    with pytest.raises(NotFoundError, match=r"could not be found"):
        iter_texts(HFSource(name="json", data_files=[str(tmp_path / "missing.jsonl")]))


# ---- tokenizer -------------------------------------------------------------------------------


def test_prepare_tokenizer_falls_back_to_eos_then_unk() -> None:
    with_eos = prepare_tokenizer(build_tokenizer(pad=False))
    assert with_eos.pad_token == "<eos>"
    only_unk = prepare_tokenizer(build_tokenizer(pad=False, eos=False))
    assert only_unk.pad_token == "<unk>"
    has_pad = build_tokenizer()
    assert prepare_tokenizer(has_pad).pad_token == "<pad>"
    with pytest.raises(InvalidInputError, match=r"no pad, eos or unk"):
        prepare_tokenizer(build_tokenizer(pad=False, eos=False, unk=False))


def test_prepare_tokenizer_leaves_padding_side_alone() -> None:
    tok = build_tokenizer(pad=False)
    tok.padding_side = "left"
    prepare_tokenizer(tok)
    assert tok.padding_side == "left"


# ---- token batches ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_length": 0}, "max_length"),
        ({"max_length": -3}, "max_length"),
        ({"token_budget": 0}, "token_budget"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"sort_window": 0}, "sort_window"),
        ({"max_length": 2.5}, "max_length"),
    ],
)
def test_bad_arguments_rejected_before_reading(kwargs: dict, name: str, tokenizer) -> None:
    def never_read() -> Iterator[str]:
        raise AssertionError("texts must not be read")
        yield ""

    with pytest.raises(InvalidInputError, match=rf"{name} must be a positive integer, got {kwargs[name]!r}"):
        token_batches(never_read(), tokenizer, **kwargs)


def test_rows_map_back_to_their_documents_after_sorting(tokenizer) -> None:
    batches = list(token_batches(DOCS, tokenizer, token_budget=40, sort_window=5))
    decoded: dict[int, str] = {}
    for batch in batches:
        rows = decode_rows(batch, tokenizer)
        assert not set(rows) & set(decoded), "a document appeared twice"
        decoded.update(rows)
    assert decoded == dict(enumerate(DOCS))
    # sorting happened: within a window the first batch starts with its longest document
    assert int(batches[0].doc_index_B[0]) == 2


def test_input_ids_match_direct_tokenisation(tokenizer) -> None:
    for batch in token_batches(DOCS, tokenizer, token_budget=64):
        for ids_T, mask_T, doc in zip(
            batch.input_ids_BT, batch.attention_mask_BT, batch.doc_index_B, strict=True
        ):
            assert ids_T[mask_T.bool()].tolist() == tokenizer(DOCS[int(doc)])["input_ids"]


@pytest.mark.parametrize(("budget", "max_rows"), [(16, None), (30, 2), (64, None), (1000, 3)])
def test_token_budget_and_batch_size_respected(tokenizer, budget: int, max_rows: int | None) -> None:
    texts = [" ".join(WORDS[: 1 + (i * 7) % 15]) for i in range(40)]
    batches = list(
        token_batches(texts, tokenizer, token_budget=budget, max_batch_size=max_rows, sort_window=9)
    )
    for batch in batches:
        rows, width = batch.input_ids_BT.shape
        assert rows * width <= budget
        assert max_rows is None or rows <= max_rows
        assert int(batch.attention_mask_BT.sum(dim=1).max()) == width  # no all-padding columns
    assert sorted(int(d) for b in batches for d in b.doc_index_B) == list(range(len(texts)))
    expected_tokens = sum(len(tokenizer(t)["input_ids"]) for t in texts)
    assert sum(b.n_tokens for b in batches) == expected_tokens


def test_document_longer_than_budget_forms_a_batch_of_one(tokenizer) -> None:
    long_doc = " ".join(WORDS)  # 20 words + <bos>
    batches = list(token_batches([long_doc, "cat", "dog"], tokenizer, max_length=64, token_budget=8))
    assert batches[0].input_ids_BT.shape == (1, 21)
    assert [b.input_ids_BT.shape[0] for b in batches[1:]] == [2]


def test_truncation_keeps_the_first_max_length_tokens(tokenizer) -> None:
    (batch,) = token_batches(["the big red bird flew over the tree", "cat"], tokenizer, max_length=4)
    assert batch.input_ids_BT.shape == (2, 4)
    assert decode_rows(batch, tokenizer) == {0: "the big red", 1: "cat"}


def test_truncation_keeps_the_start_even_if_tokenizer_truncates_left(tokenizer) -> None:
    tokenizer.truncation_side = "left"
    (batch,) = token_batches(["the big red bird flew"], tokenizer, max_length=3)
    assert decode_rows(batch, tokenizer) == {0: "the big"}


def test_right_padding_even_when_tokenizer_pads_left(tokenizer) -> None:
    tokenizer.padding_side = "left"
    (batch,) = token_batches(["a dog ran", "cat", "the cat sat on the mat"], tokenizer)
    assert tokenizer.padding_side == "left"
    pad_id = tokenizer.pad_token_id
    expected_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    assert torch.equal(batch.attention_mask_BT, expected_mask)
    assert batch.doc_index_B.tolist() == [2, 0, 1]
    assert batch.input_ids_BT[1, 4:].tolist() == [pad_id] * 3
    assert batch.input_ids_BT[:, 0].tolist() == [tokenizer.bos_token_id] * 3  # real tokens start at 0
    assert batch.n_tokens == 13
    assert batch.input_ids_BT.dtype == batch.attention_mask_BT.dtype == batch.doc_index_B.dtype == torch.long


def test_pads_without_a_pad_token_and_does_not_mutate_tokenizer() -> None:
    tok = build_tokenizer(pad=False)
    (batch,) = token_batches(["cat", "a dog ran"], tok)
    assert tok.pad_token is None
    assert batch.input_ids_BT[1, 2:].tolist() == [tok.eos_token_id] * 2


def test_zero_token_documents_are_skipped_but_keep_their_index(tokenizer) -> None:
    batches = list(token_batches(["cat", "dog", "bird"], tokenizer, add_special_tokens=False, sort_window=2))
    assert [b.doc_index_B.tolist() for b in batches] == [[0, 1], [2]]
    (batch,) = token_batches(["cat", "", "dog"], tokenizer, add_special_tokens=False)
    assert batch.doc_index_B.tolist() == [0, 2]
    assert batch.input_ids_BT.shape == (2, 1)


def test_batching_is_deterministic(tokenizer) -> None:
    def run() -> list[tuple[list, list]]:
        return [
            (b.input_ids_BT.tolist(), b.doc_index_B.tolist())
            for b in token_batches(DOCS * 3, tokenizer, token_budget=30, sort_window=7)
        ]

    assert run() == run()


def test_streams_one_window_at_a_time(tokenizer) -> None:
    consumed = 0

    def endless() -> Iterator[str]:
        nonlocal consumed
        while True:
            consumed += 1
            yield DOCS[consumed % len(DOCS)]

    batches = token_batches(endless(), tokenizer, token_budget=10_000, sort_window=6)
    first = next(batches)
    assert first.input_ids_BT.shape[0] == 6
    assert consumed == 6
    next(batches)
    assert consumed == 12


def test_sources_feed_batches_end_to_end(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": doc} for doc in DOCS])
    texts = list(iter_texts(FileSource(path=str(path), limit=5)))
    batches = list(token_batches(texts, tokenizer, token_budget=24, sort_window=3))
    decoded = {doc: text for batch in batches for doc, text in decode_rows(batch, tokenizer).items()}
    assert decoded == dict(enumerate(DOCS[:5]))


def test_non_string_parquet_column_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(InvalidInputError, match=r"column 'text' .* has type int64, expected a string column"):
        iter_texts(FileSource(path=str(path)))


def test_csv_row_missing_the_text_column_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    path.write_text("id,text\n1,hello\n2\n", encoding="utf-8")
    docs = iter_texts(FileSource(path=str(path)))
    assert next(docs) == "hello"
    with pytest.raises(InvalidInputError, match=r"line 3 has 1 columns"):
        list(docs)
