"""``train --data`` sources (engine/data/sources.py): every format gives the same packed token
stream for the same documents, pre-tokenized ``input_ids``, a model directory's own tokenizer
with EOS between documents, the CLI end to end on a datasets directory, and each data error."""
from __future__ import annotations

import json
import os
import sys

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import run_python

from engine.cli import build_parser, main, train
from engine.data import BYTE_SEPARATOR, byte_tokens, open_documents, token_stream
from engine.errors import CLIError, DataError

DOCS = ["héllo world", "second doc\nwith lines", "", "third"]  # the empty one is skipped
SMALL = ["--batch", "2", "--seq-len", "8", "--quiet"]


def stream(path, field=None) -> list[int]:
    return token_stream(open_documents(str(path), field)).tolist()


def expected_bytes(docs=DOCS) -> list[int]:
    """Byte-level packing: the non-empty documents' UTF-8 bytes, a blank line between them."""
    return byte_tokens("\n\n".join(d for d in docs if d)).tolist()


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def save_dataset(path, columns: dict) -> str:
    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return str(path)


def test_every_format_gives_the_same_stream(tmp_path):
    want = expected_bytes()
    assert BYTE_SEPARATOR == (10, 10) and len(want) > 30
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join(d for d in DOCS if d), encoding="utf-8")  # one document, the same bytes
    assert stream(txt) == want
    assert stream(write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS])) == want
    assert stream(write_jsonl(tmp_path / "b.jsonl", [{"body": d, "id": i} for i, d in enumerate(DOCS)]), "body") == want
    assert stream(save_dataset(tmp_path / "ds", {"body": DOCS, "n": [1, 2, 3, 4]}), "body") == want
    # A DatasetDict: its "train" split, said in the description.
    ddict = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS}),
                                  "test": datasets.Dataset.from_dict({"text": ["held out"]})})
    ddict.save_to_disk(str(tmp_path / "dd"))
    assert stream(tmp_path / "dd") == want
    assert "split 'train'" in open_documents(str(tmp_path / "dd")).description
    pq.write_table(pa.table({"text": DOCS}), str(tmp_path / "a.parquet"), row_group_size=2)  # two row groups
    assert stream(tmp_path / "a.parquet") == want
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"text": DOCS[:2]}), str(shards / "part-0.parquet"))
    pq.write_table(pa.table({"text": DOCS[2:]}), str(shards / "part-1.parquet"))
    assert stream(shards) == want
    pq.write_table(pa.table({"input_ids": [[1]], "text": ["a"]}), str(shards / "part-2.parquet"))
    with pytest.raises(DataError, match=r"part-2\.parquet' would be read by its pre-tokenized column 'input_ids', "
                                        r".*part-0\.parquet' by its field 'text'"):
        open_documents(str(shards))  # the shards disagree: part-2 would be read pre-tokenized


def test_batches_span_many_record_batches(tmp_path, monkeypatch):
    """Documents are read a batch at a time (here 3 rows) and the stream is the same."""
    from engine.data import sources

    docs = [f"doc {i} " * (i % 4) for i in range(10)]
    monkeypatch.setattr(sources, "BATCH_ROWS", 3)
    ds = save_dataset(tmp_path / "ds", {"text": docs})
    pq.write_table(pa.table({"text": docs}), str(tmp_path / "a.parquet"), row_group_size=4)
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    assert stream(ds) == stream(tmp_path / "a.parquet") == stream(jsonl) == expected_bytes(docs)
    assert stream(ds) != stream(save_dataset(tmp_path / "shuffled", {"text": docs[::-1]}))
    for source in (ds, str(tmp_path / "a.parquet"), jsonl):  # 3 rows at a time, never all 10 at once
        assert [len(batch) for batch in open_documents(source).batches()] == [3, 3, 3, 1], source


def test_a_directory_of_many_parquet_shards_opens_one_file_at_a_time(tmp_path):
    """300 shards under an open-file limit of (open now + 20): footers are read one file at a
    time and each file is open only while read. A file that cannot be opened is the system's
    error naming it (not "not a parquet file")."""
    resource = pytest.importorskip("resource")
    docs = [f"shard {i}" for i in range(300)]
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, doc in enumerate(docs):
        pq.write_table(pa.table({"text": [doc]}), str(shards / f"part-{i:05d}.parquet"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 20, hard))
        got = stream(shards)
        assert open_documents(str(shards)).rows == 300
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert got == expected_bytes(docs)
    os.symlink(str(tmp_path / "gone"), str(shards / "part-99999.parquet"))  # a shard removed under its link
    with pytest.raises(OSError, match=r"part-99999\.parquet'?: cannot read it .*No such file") as info:
        open_documents(str(shards))
    assert not isinstance(info.value, DataError) and info.value.errno == 2  # the system's error, not "not parquet"


def test_split_named_parquet_files_read_the_train_split(tmp_path):
    """A Hub snapshot's data/: train-* shards next to test-* and validation-*: only train-* is read."""
    data = tmp_path / "data"
    data.mkdir()
    train_docs = ["first train doc", "second train doc", "third"]
    pq.write_table(pa.table({"text": train_docs[:2]}), str(data / "train-00000-of-00002.parquet"))
    pq.write_table(pa.table({"text": train_docs[2:]}), str(data / "train-00001-of-00002.parquet"))
    pq.write_table(pa.table({"text": ["a test doc"]}), str(data / "test-00000-of-00001.parquet"))
    pq.write_table(pa.table({"text": ["a validation doc"]}), str(data / "validation-00000-of-00001.parquet"))
    docs = open_documents(str(data))
    assert docs.rows == 3 and token_stream(docs).tolist() == expected_bytes(train_docs)
    assert docs.description == "2 parquet files, split 'train'; test, validation files not read, field 'text'"
    pq.write_table(pa.table({"text": ["x"]}), str(data / "part-0.parquet"))
    with pytest.raises(DataError, match=r"some \.parquet files are named by split .* and some not "
                                        r"\('part-0\.parquet'\)"):
        open_documents(str(data))
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    pq.write_table(pa.table({"text": ["x"]}), str(held_out / "test-00000-of-00001.parquet"))
    with pytest.raises(DataError, match=r"named by split \(test\) and none is a train-\* file"):
        open_documents(str(held_out))
    assert stream(held_out / "test-00000-of-00001.parquet") == expected_bytes(["x"])  # a file named: read


def test_pre_tokenized_input_ids_are_used_as_they_are(tmp_path):
    ids = [[5, 6, 7], [], [300, 2]]
    ds = save_dataset(tmp_path / "ds", {"text": ["abc", "", "de"], "input_ids": ids})
    docs = open_documents(ds)
    assert (docs.kind, docs.field) == ("tokens", "input_ids")
    tokens = token_stream(docs)
    assert tokens.dtype == torch.int32 and tokens.tolist() == [5, 6, 7, 300, 2]  # no separator added
    assert stream(ds, "text") == expected_bytes(["abc", "", "de"])  # naming a text field ignores input_ids
    pq.write_table(pa.table({"input_ids": pa.array(ids, pa.list_(pa.int64()))}), str(tmp_path / "t.parquet"))
    assert stream(tmp_path / "t.parquet") == [5, 6, 7, 300, 2]
    with pytest.raises(DataError, match=r"token id -1 in 'input_ids' \(rows 0\.\.0\)"):
        stream(save_dataset(tmp_path / "neg", {"input_ids": [[-1]]}))
    with pytest.raises(DataError, match=r"column 'input_ids' holds string, not lists of token ids"):
        open_documents(save_dataset(tmp_path / "str", {"input_ids": ["1 2"]}))


# -------------------------------------------------------------------- the model's own tokenizer
WORDS = ["[UNK]", "</s>", "hello", "world", "second", "doc", "with", "lines", "third"]


def save_tokenizer(directory, eos=True) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"eos_token": "</s>"} if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", **extra).save_pretrained(str(directory))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama checkpoint with a WordLevel tokenizer.json beside it (nothing from the hub)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tok") / "model"
    LlamaForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)
    save_tokenizer(path)
    return path


def test_the_model_directorys_tokenizer_with_eos_between_documents(model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    docs = ["hello world", "second doc with lines", "", "third hello"] * 3
    ds = save_dataset(tmp_path / "ds", {"text": docs})
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    want: list[int] = []
    for d in (d for d in docs if d):
        want += ([tok.eos_token_id] if want else []) + tok(d, add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id == 1 and want[:3] == [2, 3, 1]
    args = build_parser().parse_args(["train", "--model", str(model_dir), "--data", ds])
    tokens, byte_level = train._tokens(args)  # what run() trains on
    assert tokens.tolist() == want and not byte_level
    assert "EOS '</s>' (id 1) between documents" in capsys.readouterr().err

    # The whole run: its report counts those tokens, and the tokenizer's vocabulary fits the model's.
    assert main(["train", "--model", str(model_dir), "--data", ds, "--steps", "2", *SMALL,
                 "--output-dir", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "train.json") as f:
        assert json.load(f)["train"]["tokens"] == len(want)


def test_a_tokenizer_without_eos_joins_with_a_blank_lines_tokens(tmp_path, capsys):
    save_tokenizer(tmp_path, eos=False)
    encoder = train._encoder(str(tmp_path))
    assert encoder.separator == ()  # the Whitespace pre-tokenizer drops "\n\n": nothing between documents
    assert "has no EOS token" in capsys.readouterr().err


def test_train_on_a_datasets_directory_end_to_end(tmp_path):
    """``python -m engine train --data DIR --text-field body``: a fresh process, 2 steps, the report."""
    ds = save_dataset(tmp_path / "ds", {"body": ["some text to learn. " * 20, "more text here. " * 20]})
    out = tmp_path / "out"
    proc = run_python("-m", "engine", "train", "--data", ds, "--text-field", "body", "--steps", "2", *SMALL,
                      "--output-dir", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "field 'body'" in proc.stderr and "byte-level" in proc.stderr
    with open(out / "train.json") as f:
        report = json.load(f)["train"]
    assert len(report["losses"]) == 2 and report["data"] == ds
    assert report["tokens"] == len(("some text to learn. " * 20 + "\n\n" + "more text here. " * 20).encode())


# -------------------------------------------------------------------- errors
def test_missing_and_non_string_fields_name_the_file_row_and_columns(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"body": "x", "id": 1}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: .*\"text\" field; its fields: body, id \(choose one with "
                                        r"--text-field\)"):
        stream(jsonl)
    with pytest.raises(DataError, match=r"b\.jsonl:3: .*it is a int"):
        stream(write_jsonl(tmp_path / "b.jsonl", [{"text": "a"}, {"text": "b"}, {"text": 5}]))
    (tmp_path / "c.jsonl").write_text("{oops\n")
    with pytest.raises(DataError, match=r"c\.jsonl:1: not valid JSON"):
        stream(tmp_path / "c.jsonl")
    ds = save_dataset(tmp_path / "ds", {"body": ["a"], "n": [1]})
    with pytest.raises(DataError, match=r"no field 'text'; its columns: body, n \(choose one with --text-field\)"):
        open_documents(ds)
    with pytest.raises(DataError, match=r"field 'n' holds int64, not strings"):
        open_documents(ds, "n")
    pq.write_table(pa.table({"text": ["a", "b", None]}), str(tmp_path / "n.parquet"))
    with pytest.raises(DataError, match=r"n\.parquet'?: row 2 has no value in 'text' \(null\)"):
        stream(tmp_path / "n.parquet")
    pq.write_table(pa.table({"content": ["a"]}), str(tmp_path / "p.parquet"))
    with pytest.raises(DataError, match=r"p\.parquet'?: no field 'text'; its columns: content"):
        open_documents(str(tmp_path / "p.parquet"))


def test_empty_data_and_wrong_files(tmp_path):
    with pytest.raises(DataError, match="the dataset has no rows"):
        open_documents(save_dataset(tmp_path / "empty", {"text": []}))  # saved in 0 shards
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "empty1"), num_shards=1)
    with pytest.raises(DataError, match="the dataset has no rows"):
        open_documents(str(tmp_path / "empty1"))
    with pytest.raises(DataError, match="holds no text: every document is empty"):
        stream(save_dataset(tmp_path / "blank", {"text": ["", ""]}))
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), str(tmp_path / "e.parquet"))
    with pytest.raises(DataError, match="the parquet data has no rows"):
        open_documents(str(tmp_path / "e.parquet"))
    (tmp_path / "fake.parquet").write_text("not parquet at all, just text")
    with pytest.raises(DataError, match=r"fake\.parquet' is not a parquet file"):
        open_documents(str(tmp_path / "fake.parquet"))
    (tmp_path / "a.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"expected a \.txt or \.jsonl file, a \.parquet file, or a directory"):
        open_documents(str(tmp_path / "a.csv"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="a directory with neither a datasets save_to_disk"):
        open_documents(str(tmp_path / "nothing"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(
        str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"without a 'train' split \(splits: validation\); pass one split's "
                                        r"directory, e\.g\. .*dd/validation"):
        open_documents(str(tmp_path / "dd"))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"--text-field 'body': a \.txt file"):
        open_documents(str(tmp_path / "a.txt"), "body")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        open_documents(str(tmp_path / "missing.jsonl"))


def test_datasets_not_installed_is_a_clear_error(tmp_path, monkeypatch):
    ds = save_dataset(tmp_path / "ds", {"text": ["a"]})
    monkeypatch.setitem(sys.modules, "datasets", None)  # "import datasets" raises ImportError
    with pytest.raises(CLIError, match=r"needs the datasets package \(pip install 'memascend-engine\[data\]'\)"):
        open_documents(ds)


def test_cli_data_errors_are_one_line_with_status_2(tmp_path, capsys):
    ds = save_dataset(tmp_path / "ds", {"body": ["a"]})
    assert main(["train", "--data", ds, "--quiet", "--output-dir", str(tmp_path)]) == 2
    assert "no field 'text'; its columns: body" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing"), "--output-dir", str(tmp_path)]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    tokens = save_dataset(tmp_path / "ids", {"input_ids": [list(range(290, 310))]})
    assert main(["train", "--data", tokens, "--steps", "1", *SMALL, "--output-dir", str(tmp_path)]) == 2
    assert "the data has token id 309 but the model's vocabulary is 256: pre-tokenized for another model?" in (
        capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "train.json")


def test_token_stream_is_int32_and_batches_are_int64(tmp_path):
    from engine.data import TokenBatches

    tokens = stream(save_dataset(tmp_path / "ds", {"text": ["abcdefgh" * 20]}))
    batches = TokenBatches(torch.tensor(tokens, dtype=torch.int32), batch=2, seq_len=8, seed=3)
    x = batches.batch_at(4)
    assert x.dtype == torch.int64 and x.shape == (2, 8)
    assert torch.equal(x, TokenBatches(torch.tensor(tokens, dtype=torch.int64), 2, 8, seed=3).batch_at(4))
    assert np.array_equal(np.asarray(tokens[:8]), np.frombuffer(b"abcdefgh", np.uint8))


def test_a_progress_bar_when_tokenizing_takes_a_while(tmp_path, monkeypatch, capsys):
    """tqdm on stderr (delay 1 s: small datasets print nothing), off with progress=False (--quiet)."""
    import time

    from engine.data import BYTES, Encoder, sources

    def slow(texts):
        time.sleep(0.6)
        return BYTES.encode(texts)

    monkeypatch.setattr(sources, "BATCH_ROWS", 1)
    docs = open_documents(save_dataset(tmp_path / "ds", {"text": ["a", "b", "c"]}))
    slow_bytes = Encoder(slow, BYTES.separator, "slow bytes")
    capsys.readouterr()
    assert token_stream(docs, slow_bytes, progress=True).tolist() == expected_bytes(["a", "b", "c"])
    err = capsys.readouterr().err
    assert "tokenizing" in err and "3/3" in err
    token_stream(docs, BYTES, progress=True)
    token_stream(docs, slow_bytes, progress=False)
    assert "tokenizing" not in capsys.readouterr().err
