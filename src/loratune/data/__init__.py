"""Datasets: local files read, converted to chat messages, cleaned, templated, tokenized, packed and collated."""

from .batches import collate, format_example, pack
from .clean import detect_format, to_messages
from .pipeline import prepare, prepare_eval, split_rows
from .readers import check_data_file, read_rows
from .schema import FORMATS, DataConfig, Example, PreparedData, Step
from .tokenize import tokenize_messages

__all__ = [
    "FORMATS", "DataConfig", "Example", "PreparedData", "Step", "check_data_file", "collate", "detect_format",
    "format_example", "pack", "prepare", "prepare_eval", "read_rows", "split_rows", "to_messages",
    "tokenize_messages",
]
