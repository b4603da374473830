"""The tokenizer: str -> token ids [L], list[str] -> [B, L], cleaned as OpenCLIP cleans texts.

    tokenize = build_tokenizer(cfg.model.text)   # str -> [L], list[str] -> [B, L]

Vocabularies come from the package (builtin:tiny, builtin:clip-bpe) or local folders; nothing here
can reach a model hub.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import ftfy
import torch
from transformers import AutoTokenizer, BertTokenizerFast

from clip_train.config import ConfigError, TextTowerConfig
from clip_train.models.pretrained import resolve_text_folder

TINY_VOCAB = Path(__file__).resolve().parent.parent / "assets" / "tiny_vocab.txt"


def clean_text(text: str) -> str:
    """OpenCLIP's text cleaning (open_clip.tokenizer basic_clean + whitespace_clean): ftfy.fix_text,
    HTML entities unescaped twice, runs of whitespace collapsed. OpenCLIP's tokenizers all apply it,
    so clip_train's applies it too: an exported or imported model then tokenizes as in OpenCLIP.
    Printable ASCII text without '&', with single spaces and none at either end, comes back unchanged."""
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


class TextTokenizer:
    """str -> LongTensor [L]; list[str] -> LongTensor [B, L]; L = context_length, right-padded.

    A plain class (not a lambda) so that DataLoader workers can pickle it. Too long texts are cut to
    L tokens and keep their closing special token ([SEP]), so eos pooling still sees it. Texts are
    cleaned first as OpenCLIP cleans them (clean_text), for every tokenizer, in training and evaluation.
    """

    def __init__(self, tokenizer, context_length: int):
        if tokenizer.pad_token_id is None:
            raise ConfigError(f"tokenizer {tokenizer.name_or_path} has no pad token: pick another tokenizer")
        specials = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.bos_token_id}
        specials.add(tokenizer.eos_token_id)
        if tokenizer.pad_token_id in specials:
            # the towers find padding by its id; a pad id shared with a real token would be masked out
            raise ConfigError(f"tokenizer {tokenizer.name_or_path} pads with a token that also ends texts")
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "right"
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.vocab_size = len(tokenizer)

    def save_pretrained(self, folder) -> None:
        self.tokenizer.save_pretrained(str(folder))

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        single = isinstance(texts, str)
        ids = self.tokenizer(
            [clean_text(t) for t in ([texts] if single else texts)],
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )["input_ids"]
        return ids[0] if single else ids


def tiny_tokenizer() -> BertTokenizerFast:
    """The WordPiece tokenizer of the shipped tiny vocab: lower-case letters, digits and their ## forms,
    punctuation and a few hundred common words, so any English text tokenizes without [UNK]."""
    path = str(TINY_VOCAB)
    # transformers 5 takes the vocab as `vocab`, 4.x as `vocab_file`; pass both and check it was read
    tokenizer = BertTokenizerFast(vocab=path, vocab_file=path, do_lower_case=True)
    with open(path, encoding="utf-8") as f:
        n_lines = sum(1 for _ in f)
    if len(tokenizer) != n_lines:
        raise RuntimeError(f"the tiny vocab {path} was not loaded ({len(tokenizer)} of {n_lines} tokens)")
    return tokenizer


def build_tokenizer(cfg: TextTowerConfig) -> TextTokenizer:
    """From cfg.tokenizer ("builtin:tiny", "builtin:clip-bpe" or a local folder), else the pretrained
    folder."""
    # The Rust tokenizer's thread pool does not survive DataLoader's fork and would warn in each
    # worker; workers give the parallelism anyway. A user's own setting wins.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = cfg.tokenizer or cfg.pretrained
    if not spec:
        raise ConfigError(
            "model.text.tokenizer and model.text.pretrained are both empty: set model.text.tokenizer to "
            "builtin:tiny or a local tokenizer folder"
        )
    if spec == "builtin:tiny":
        tokenizer = tiny_tokenizer()
    elif spec == "builtin:clip-bpe":
        from clip_train.models.arch import clip_bpe_tokenizer  # OpenCLIP's vocabulary, only when asked

        tokenizer = clip_bpe_tokenizer()
    elif spec.startswith("builtin:"):
        raise ConfigError(
            f"model.text.tokenizer={spec} is unknown: the built-in tokenizers are builtin:tiny and "
            "builtin:clip-bpe"
        )
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve_text_folder(spec), local_files_only=True)
    return TextTokenizer(tokenizer, cfg.context_length)
