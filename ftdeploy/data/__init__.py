"""The data stage: a dataset in any supported layout in, tokenized training rows with assistant-only labels out.

  sources.py  where rows come from: files, a directory of them, a Hugging Face dataset, the bundled demo data
  hub.py      the commit a Hugging Face dataset is read at (fingerprinted, named in the provenance)
  mix.py      data.sources: several datasets in one seeded, weighted mix, reported source by source
  formats.py  layouts: rows -> Records (conversations or text), every bad row named; RecordStream
  preference.py  preference layouts (dpo pairs, kto labelled answers): rows -> Records with chosen/rejected answers
  labels.py   the definition of the labels (tokenize_conversation) and the errors of a row that trains on nothing
  fast.py     the same labels for many records at once (tokenize_records), checked against the definition
  preference_ids.py  preference Records -> prompt and completion ids, split where the definition's labels start
  grpo.py     GRPO prompts (prompt-only rows, or chats split before their last answer): rows -> prompt Records with
              the columns the reward functions get; their train.jsonl rows, read back by load_grpo_rows
  writer.py   prepare_data (sft, dpo, kto): the eval rows, train.jsonl (packed or not), the train sample, stats.json
  inspect.py  inspect_data: layout, token lengths, one example as the model sees it, the plot

Submodules import each other, never this package, so importing any one of them runs no cycle.
"""

from .fast import tokenize_records
from .formats import Columns, Record, RecordStream, stream_records
from .grpo import GrpoStream, load_grpo_rows, stream_grpo
from .inspect import inspect_data
from .labels import IGNORE_INDEX, Tokenized, tokenize_conversation, tokenize_text
from .preference import METHODS, PreferenceStream, stream_preference
from .preference_ids import PreferenceIds, tokenize_preference
from .sources import check_local_path, demo_path, resolve_data_path
from .writer import DataStats, load_eval, load_preference_rows, load_tokenized, load_train_sample, prepare_data

__all__ = [
    "IGNORE_INDEX",
    "METHODS",
    "Columns",
    "DataStats",
    "GrpoStream",
    "PreferenceIds",
    "PreferenceStream",
    "Record",
    "RecordStream",
    "Tokenized",
    "check_local_path",
    "demo_path",
    "inspect_data",
    "load_eval",
    "load_grpo_rows",
    "load_preference_rows",
    "load_tokenized",
    "load_train_sample",
    "prepare_data",
    "resolve_data_path",
    "stream_grpo",
    "stream_preference",
    "stream_records",
    "tokenize_conversation",
    "tokenize_preference",
    "tokenize_records",
    "tokenize_text",
]
