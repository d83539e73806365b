"""Reading training documents from each ``train --data`` format, a batch at a time.

Formats: a ``.txt`` file (one document), a ``.jsonl`` file (one object per line, the text
in ``text_field``), a ``.parquet`` file or a directory of them, and a directory written by
``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict``: its ``"train"`` split).
Arrow-backed formats (parquet, datasets) are read in record batches, never whole: the text
is read a batch at a time, but the token stream built from it is held in memory (4 bytes per
token, :func:`engine.data.token_stream`). They may also be pre-tokenized (an ``input_ids``
column of integer lists). ``datasets`` and ``pyarrow`` are the optional extra
``memascend-engine[data]``, imported only when such a file is read.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Optional, Union

import numpy as np

from ..errors import CLIError, DataError

BATCH_ROWS = 1024  # documents read (and tokenized) together
TOKENS_COLUMN = "input_ids"
DEFAULT_TEXT_FIELD = "text"
FORMATS = ("expected a .txt or .jsonl file, a .parquet file, or a directory (datasets save_to_disk, "
           "or .parquet files)")

DocBatch = Union[list[str], list[np.ndarray]]


@dataclass(frozen=True)
class Documents:
    """The documents of one ``--data`` source: ``batches()`` yields lists of texts
    (``kind == "text"``) or of int64 token arrays (``kind == "tokens"``, pre-tokenized)."""
    path: str
    kind: Literal["text", "tokens"]
    field: str
    description: str  # e.g. "datasets directory, split 'train', field 'text'"
    rows: Optional[int]  # None where unknown without reading it all (jsonl)
    _batches: Callable[[], Iterator[DocBatch]]

    def batches(self) -> Iterator[DocBatch]:
        return self._batches()


def open_documents(path: str, text_field: Optional[str] = None) -> Documents:
    """The documents at ``path``. ``text_field`` None: ``"text"``, or for arrow formats their
    ``input_ids`` column when they have one. Raises DataError / FileNotFoundError naming the
    file and the fix; the format, fields and emptiness are checked here, the rows as read."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(
                os.path.join(path, "state.json")):
            return _saved_dataset(path, text_field)
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
        if not files:
            raise DataError(f"--data {path!r}: a directory with neither a datasets save_to_disk "
                            "(state.json / dataset_dict.json) nor .parquet files in it; " + FORMATS)
        return _parquet_dir(path, files, text_field)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, f"--data {path!r}: no such file or directory", path)
    if path.endswith(".parquet"):
        return _parquet(path, [path], text_field)
    if path.endswith(".jsonl"):
        return _jsonl(path, text_field or DEFAULT_TEXT_FIELD)
    if path.endswith(".txt"):
        if text_field is not None:
            raise DataError(f"--text-field {text_field!r}: a .txt file ({path!r}) has no fields")
        return Documents(path, "text", "", ".txt file, one document", 1, lambda: _txt(path))
    raise DataError(f"dataset file {path!r}: {FORMATS}")


# ---------------------------------------------------------------------- text formats
def _txt(path: str) -> Iterator[DocBatch]:
    with open(path, encoding="utf-8", errors="replace") as f:
        yield [f.read()]  # one document: a tokenizer sees it whole, as before


def _jsonl(path: str, field: str) -> Documents:
    def batches() -> Iterator[DocBatch]:
        batch: list[str] = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                batch.append(_jsonl_text(path, number, line, field))
                if len(batch) == BATCH_ROWS:
                    yield batch
                    batch = []
        if batch:
            yield batch
    return Documents(path, "text", field, f".jsonl file, field {field!r}", None, batches)


def _jsonl_text(path: str, number: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{number}: expected an object with a string {json.dumps(field)} field, "
                        f"got a {type(record).__name__}")
    if field not in record:
        raise DataError(f"{path}:{number}: expected an object with a string {json.dumps(field)} field; "
                        f"its fields: {', '.join(record) or 'none'} (choose one with --text-field)")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{path}:{number}: expected an object with a string {json.dumps(field)} field; "
                        f"it is a {type(value).__name__}")
    return value


# ---------------------------------------------------------------------- arrow formats
def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 - the submodule the readers use
    except ImportError:
        raise CLIError("reading parquet or a datasets directory needs pyarrow and datasets: "
                       "pip install 'memascend-engine[data]'") from None
    return pyarrow


def _saved_dataset(path: str, text_field: Optional[str]) -> Documents:
    _pyarrow()
    try:
        import datasets
    except ImportError:
        raise CLIError(f"--data {path!r} is a datasets directory: reading it needs the datasets package "
                       "(pip install 'memascend-engine[data]')") from None
    for state in (os.path.join(path, "state.json"), os.path.join(path, "train", "state.json")):
        if _no_data_files(state):  # datasets itself cannot load a save of 0 rows in 0 shards
            raise DataError(f"--data {path!r}: the dataset has no rows")
    loaded = datasets.load_from_disk(path)
    where = "datasets directory"
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"--data {path!r}: a DatasetDict without a 'train' split (splits: "
                            f"{', '.join(loaded) or 'none'}); pass one split's directory, e.g. "
                            f"{os.path.join(path, next(iter(loaded), 'SPLIT'))}")
        loaded, where = loaded["train"], "datasets directory (DatasetDict), split 'train'"
    if len(loaded) == 0:  # before the columns: an empty column's type may be null
        raise DataError(f"--data {path!r}: the dataset has no rows")
    kind, field = _choose_column(path, loaded.features.arrow_schema, text_field)
    table = loaded.select_columns([field]).with_format("arrow")

    def batches() -> Iterator[DocBatch]:
        row = 0
        for chunk in table.iter(batch_size=BATCH_ROWS):
            yield _arrow_documents(path, chunk.column(0), kind, field, row)
            row += chunk.num_rows
    return Documents(path, kind, field, f"{where}, {_column_words(kind, field)}", len(loaded), batches)


def _no_data_files(state_json: str) -> bool:
    if not os.path.isfile(state_json):
        return False
    with open(state_json, encoding="utf-8") as f:
        return json.load(f).get("_data_files") == []


def _parquet(path: str, files: list[str], text_field: Optional[str], what: str = "") -> Documents:
    """Parquet files read in order. Only their footers are read here (one file open at a time:
    a directory of thousands of shards stays under the open-file limit); each file is opened
    again while its rows are read."""
    pa = _pyarrow()
    metadata = [_parquet_metadata(pa, name) for name in files]
    rows = sum(m.num_rows for m in metadata)
    if rows == 0:  # before the columns: an empty column's type may be null
        raise DataError(f"--data {path!r}: the parquet data has no rows")
    schemas = [m.schema.to_arrow_schema() for m in metadata]
    kind, field = _choose_column(files[0], schemas[0], text_field)
    for name, schema in zip(files[1:], schemas[1:]):  # every file has the same column
        got = _choose_column(name, schema, text_field)
        if got != (kind, field):
            raise DataError(f"--data {name!r} would be read by its {_column_words(*got)}, {files[0]!r} by its "
                            f"{_column_words(kind, field)}: the files must agree (name the column with --text-field)")

    def batches() -> Iterator[DocBatch]:
        for name in files:
            row = 0
            with pa.parquet.ParquetFile(name) as pf:  # open while it is read, closed after
                for chunk in pf.iter_batches(batch_size=BATCH_ROWS, columns=[field]):  # a row group at a time
                    yield _arrow_documents(name, chunk.column(0), kind, field, row)
                    row += chunk.num_rows
    what = what or ("parquet file" if len(files) == 1 and files[0] == path else f"{len(files)} parquet files")
    return Documents(path, kind, field, f"{what}, {_column_words(kind, field)}", rows, batches)


def _parquet_metadata(pa: Any, name: str) -> Any:
    """The file's footer (row count, schema); the file is closed again when this returns."""
    try:
        return pa.parquet.read_metadata(name)
    except pa.ArrowInvalid as exc:
        raise DataError(f"--data {name!r} is not a parquet file ({exc}); {FORMATS}") from None
    except OSError as exc:  # e.g. permissions, too many open files: the system's error, the file named
        raise OSError(exc.errno, f"--data {name!r}: cannot read it ({exc})", name) from exc


# A Hub dataset's data files named by split (datasets' convention): "train-00000-of-00002.parquet",
# "test.parquet", "validation_0.parquet".
_SPLIT_NAME = re.compile(r"^(train|training|test|testing|eval|evaluation|validation|valid|val|dev)(?=[-_.])",
                         re.IGNORECASE)
_TRAIN = ("train", "training")


def _parquet_dir(path: str, files: list[str], text_field: Optional[str]) -> Documents:
    """A directory of parquet files: all of them, or when they are named by split (a Hub
    snapshot's ``data/``), the ``train`` split's only; a mix of split-named and other files is
    refused (which are training data is unclear)."""
    splits = {name: _split_of(name) for name in files}
    named = [name for name, split in splits.items() if split is not None]
    if not named:
        return _parquet(path, files, text_field)
    if len(named) != len(files):
        other = next(name for name in files if splits[name] is None)
        raise DataError(f"--data {path!r}: some .parquet files are named by split ({os.path.basename(named[0])!r}) "
                        f"and some not ({os.path.basename(other)!r}); which are training data is unclear - pass "
                        "a directory holding only the training files")
    train = [name for name in files if splits[name] in _TRAIN]
    others = sorted({str(splits[name]) for name in files if splits[name] not in _TRAIN})
    if not train:
        raise DataError(f"--data {path!r}: its .parquet files are named by split ({', '.join(others)}) and none is "
                        "a train-* file; pass a directory or file of training data")
    skipped = f"; {', '.join(others)} files not read" if others else ""
    return _parquet(path, train, text_field, f"{len(train)} parquet files, split 'train'{skipped}")


def _split_of(name: str) -> Optional[str]:
    match = _SPLIT_NAME.match(os.path.basename(name))
    return match.group(1).lower() if match else None


def _column_words(kind: str, field: str) -> str:
    return f"field {field!r}" if kind == "text" else f"pre-tokenized column {field!r}"


def _choose_column(path: str, schema: Any, text_field: Optional[str]) -> tuple[Literal["text", "tokens"], str]:
    """("tokens", "input_ids") for a pre-tokenized source when no field is asked for, else
    ("text", field); its arrow type checked."""
    pa = _pyarrow()
    names = list(schema.names)
    if text_field is None and TOKENS_COLUMN in names:
        value_type = schema.field(TOKENS_COLUMN).type
        if not (pa.types.is_list(value_type) or pa.types.is_large_list(value_type)) or not pa.types.is_integer(
                value_type.value_type):
            raise DataError(f"--data {path!r}: column {TOKENS_COLUMN!r} holds {value_type}, not lists of token "
                            "ids; name a text column with --text-field")
        return "tokens", TOKENS_COLUMN
    field = text_field or DEFAULT_TEXT_FIELD
    if field not in names:
        raise DataError(f"--data {path!r}: no field {field!r}; its columns: {', '.join(names) or 'none'} "
                        "(choose one with --text-field)")
    value_type = schema.field(field).type
    if not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type)):
        raise DataError(f"--data {path!r}: field {field!r} holds {value_type}, not strings (row 0 is one); "
                        "choose a text column with --text-field")
    return "text", field


def _arrow_documents(path: str, column: Any, kind: str, field: str, first_row: int) -> DocBatch:
    """One record batch's documents; a null names its row (counted from 0 in the file)."""
    pa = _pyarrow()
    if isinstance(column, pa.ChunkedArray):  # datasets hands tables, parquet record batches
        column = column.combine_chunks()
    if column.null_count:
        row = first_row + column.is_null().to_pylist().index(True)
        raise DataError(f"--data {path!r}: row {row} has no value in {field!r} (null); remove such rows")
    if kind == "text":
        return column.to_pylist()
    rows = f"rows {first_row}..{first_row + len(column) - 1}"
    flat = column.flatten()  # the ids of all rows, slicing respected
    if flat.null_count:
        raise DataError(f"--data {path!r}: a null token id in {field!r} ({rows}); remove such rows")
    values = flat.to_numpy().astype(np.int64, copy=False)
    if len(values) and (values.min() < 0 or values.max() >= 2**31):
        bad = int(values.min()) if values.min() < 0 else int(values.max())
        raise DataError(f"--data {path!r}: token id {bad} in {field!r} ({rows}); ids must be in [0, 2**31)")
    return np.split(values, np.cumsum(np.asarray(column.value_lengths()))[:-1])
