"""Data pipeline: read documents, train a BPE tokenizer, tokenize once into shards, load batches.

Typical flow: :func:`stdlib_corpus` (or :func:`iter_documents`) -> :func:`train_bpe` ->
:func:`shard_documents` -> :class:`PretrainLoader`; for chat fine-tuning :func:`read_gsm8k` ->
:class:`SFTLoader`. Every input problem raises :class:`DataError` naming the file.
"""

from mobilemoe.data.chat import (
    IGNORE_INDEX,
    EncodedChat,
    SFTLoader,
    encode_chat,
    encode_prompt,
    gsm8k_final_answer,
    parse_chat,
    read_gsm8k,
    render_chat,
)
from mobilemoe.data.corpus import CorpusSplit, split_by_file, stdlib_corpus, stdlib_root
from mobilemoe.data.loader import EpochBatcher, PretrainLoader
from mobilemoe.data.readers import (
    DataError,
    iter_documents,
    read_hf_dataset,
    read_jsonl,
    read_jsonl_chats,
    read_parquet,
    read_source_dir,
    read_text_file,
)
from mobilemoe.data.shards import ShardIndex, ShardInfo, load_index, shard_documents
from mobilemoe.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_bpe

__all__ = [
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "CorpusSplit",
    "DataError",
    "EncodedChat",
    "EpochBatcher",
    "PretrainLoader",
    "SFTLoader",
    "ShardIndex",
    "ShardInfo",
    "Tokenizer",
    "encode_chat",
    "encode_prompt",
    "gsm8k_final_answer",
    "iter_documents",
    "load_index",
    "parse_chat",
    "read_gsm8k",
    "read_hf_dataset",
    "read_jsonl",
    "read_jsonl_chats",
    "read_parquet",
    "read_source_dir",
    "read_text_file",
    "render_chat",
    "shard_documents",
    "split_by_file",
    "stdlib_corpus",
    "stdlib_root",
    "train_bpe",
]
