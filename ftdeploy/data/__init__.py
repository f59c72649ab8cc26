"""The data stage: a dataset in any supported layout in, tokenized training rows with assistant-only labels out.

  sources.py  where rows come from: files, a directory of them, a Hugging Face dataset, the bundled demo data
  formats.py  layouts: rows -> Records (conversations or text), every bad row named; RecordStream
  labels.py   the definition of the labels (tokenize_conversation) and the errors of a row that trains on nothing
  fast.py     the same labels for many records at once (tokenize_records), checked against the definition
  writer.py   prepare_data: the eval rows, train.jsonl (packed or not), the train sample, stats.json
  inspect.py  inspect_data: layout, token lengths, one example as the model sees it, the plot

Submodules import each other, never this package, so importing any one of them runs no cycle.
"""

from .fast import tokenize_records
from .formats import Columns, Record, RecordStream, stream_records
from .inspect import inspect_data
from .labels import IGNORE_INDEX, Tokenized, tokenize_conversation, tokenize_text
from .sources import check_local_path, demo_path, resolve_data_path
from .writer import DataStats, load_eval, load_tokenized, load_train_sample, prepare_data

__all__ = [
    "IGNORE_INDEX",
    "Columns",
    "DataStats",
    "Record",
    "RecordStream",
    "Tokenized",
    "check_local_path",
    "demo_path",
    "inspect_data",
    "load_eval",
    "load_tokenized",
    "load_train_sample",
    "prepare_data",
    "resolve_data_path",
    "stream_records",
    "tokenize_conversation",
    "tokenize_records",
    "tokenize_text",
]
