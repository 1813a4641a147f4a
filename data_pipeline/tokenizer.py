"""The sentencepiece tokenizer stage: train a BPE or unigram model on a bounded, seeded sample of the ingested
corpus (or adopt an existing `.model`), load it, and hash it.

Special ids, fixed for every model this stage trains (and checked on an adopted model):
  pad = 0  padding in `single` packing and in the last partial `pack` context (loss_mask 0 there)
  unk = 1  never emitted with byte_fallback (unknown characters become byte pieces <0x..>)
  bos = 2  opens every article
  eos = 3  closes every article
"""
from __future__ import annotations

import io
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from nulls_dist.formats import atomic
from nulls_dist.formats.digests import file_sha256

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
MODEL_TYPES = ("bpe", "unigram")
MODEL_FILE = "tokenizer.model"


@dataclass
class TokenizerConfig:
    """`model_path` set: adopt that model, train nothing. Otherwise train on a sample of `sample_articles`
    articles (reservoir sample, seeded), each cut to `max_chars_per_article` characters, so the trainer's
    memory is bounded whatever the corpus size."""

    model_path: str | None = None
    model_type: str = "bpe"
    vocab_size: int = 49152
    sample_articles: int = 20000
    max_chars_per_article: int = 20000
    max_sentence_length: int = 8192
    character_coverage: float = 0.9995
    num_threads: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"tokenizer.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.vocab_size < 260:  # 256 byte pieces + 4 specials
            raise ValueError(f"tokenizer.vocab_size must be >= 260 (byte fallback), got {self.vocab_size}")
        if self.sample_articles <= 0:
            raise ValueError(f"tokenizer.sample_articles must be positive, got {self.sample_articles}")


def reservoir_sample(texts: Iterable[str], k: int, seed: int, max_chars: int,
                     num_texts: int | None = None) -> list[str]:
    """A uniform sample of k texts from a stream (Algorithm R), each cut to max_chars. With `num_texts` (the
    stream's length, e.g. from the ingest report) the same sample is drawn from the slot indices alone
    (`reservoir_slots`), so no text is ever kept and later replaced: memory is the sample plus the caller's
    batch, and the allocator is not left fragmented by replaced texts (the streamed form's peak RSS crept up
    with the corpus length)."""
    if num_texts is not None:
        slots = reservoir_slots(num_texts, k, seed)
        slot_of = {index: slot for slot, index in enumerate(slots)}
        sample: list[str | None] = [None] * len(slots)
        count = 0
        for i, text in enumerate(texts):
            count += 1
            slot = slot_of.get(i)
            if slot is not None:
                sample[slot] = text[:max_chars]
        if count != num_texts:
            raise ValueError(f"tokenizer sample: expected {num_texts} texts (ingest report), the corpus has {count}")
        return sample
    rng = random.Random(seed)
    sample = []
    for i, text in enumerate(texts):
        if i < k:
            sample.append(text[:max_chars])
        else:
            j = rng.randint(0, i)
            if j < k:
                sample[j] = text[:max_chars]
    return sample


def reservoir_slots(num_texts: int, k: int, seed: int) -> list[int]:
    """The stream indices that Algorithm R (as in `reservoir_sample`) leaves in its k slots, in slot order."""
    rng = random.Random(seed)
    slots = list(range(min(num_texts, k)))
    for i in range(k, num_texts):
        j = rng.randint(0, i)
        if j < k:
            slots[j] = i
    return slots


def _sentences(texts: list[str], max_len: int) -> Iterator[str]:
    # Paragraph lines are sentencepiece's "sentences"; over-long lines are cut, not dropped.
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            while line:
                yield line[:max_len]
                line = line[max_len:]


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_dir: str | os.PathLike,
                    num_texts: int | None = None) -> Path:
    """Train on a sample of `texts` (`num_texts`: their number, if known: see `reservoir_sample`); write
    `<out_dir>/tokenizer.model` atomically and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = reservoir_sample(texts, cfg.sample_articles, cfg.seed, cfg.max_chars_per_article, num_texts)
    if not sample:
        raise ValueError("tokenizer: the corpus is empty, nothing to train on")
    log.info("training %s tokenizer, vocab %d, on %d sampled articles", cfg.model_type, cfg.vocab_size, len(sample))
    spm.set_random_generator_seed(cfg.seed)
    model = io.BytesIO()  # in memory: no file path ends up in the model's trainer spec, so bytes are reproducible
    try:
        _train(sample, cfg, model)
    except RuntimeError as exc:  # sentencepiece's status errors: settings this sample cannot satisfy
        raise ValueError(f"tokenizer: sentencepiece cannot train with these settings on {len(sample)} sampled "
                         f"articles (tokenizer.vocab_size={cfg.vocab_size}): {exc}") from None
    return atomic.write_bytes(out_dir / MODEL_FILE, model.getvalue())


def _train(sample: list[str], cfg: TokenizerConfig, model: io.BytesIO) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(sample, cfg.max_sentence_length),
        model_writer=model,
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        byte_fallback=True,
        character_coverage=cfg.character_coverage,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        max_sentence_length=cfg.max_sentence_length * 4,  # bytes, the cut above is in characters
        num_threads=cfg.num_threads,
        shuffle_input_sentence=False,  # the sample is already a seeded random sample
        minloglevel=2,
    )


def load_tokenizer(path: str | os.PathLike, num_threads: int = 1) -> spm.SentencePieceProcessor:
    """Load a model and check that its special ids are the ones the pipeline writes into shards. Batch encoding
    uses `num_threads` threads (1: the shard stage parallelises over processes, one per core)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer.model_path: no such file {path}")
    sp = spm.SentencePieceProcessor(model_file=str(path), num_threads=num_threads)
    found = {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
    if found != SPECIAL_IDS:
        raise ValueError(f"tokenizer {path}: special ids {found}, the pipeline needs {SPECIAL_IDS}")
    return sp


def describe_tokenizer(path: str | os.PathLike) -> dict:
    """What the dataset manifest records about the tokenizer."""
    sp = load_tokenizer(path)
    return {
        "path": str(Path(path).resolve()),
        "sha256": file_sha256(path),
        "vocab_size": sp.get_piece_size(),
        "special_ids": dict(SPECIAL_IDS),
    }
