"""Tokenizers for ingest: a byte-level tokenizer that needs nothing downloaded, or a local Hugging Face
``tokenizer.json`` (the ``tokenizers`` package). Both encode a list of texts into ragged int32 ids with an EOS
id appended to every document."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from datapipe.dataset import Ragged

_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]", "<|im_end|>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOS = 256, vocabulary 257 (pad with 0 or 257 as you like)."""

    name = "bytes"
    eos_id = 256
    vocab_size = 257

    def encode_batch(self, texts: Sequence[str]) -> Ragged:
        """Encode texts into one Ragged int32 array (each document + EOS), without per-token Python."""
        encoded = [t.encode("utf-8", errors="replace") for t in texts]
        lengths = np.fromiter((len(b) + 1 for b in encoded), dtype=np.int64, count=len(encoded))
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.full(offsets[-1], self.eos_id, dtype=np.int32)
        body = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        # positions of the body bytes: every slot except each document's last (its EOS)
        is_body = np.ones(offsets[-1], dtype=bool)
        is_body[offsets[1:] - 1] = False
        values[is_body] = body
        return Ragged(values, offsets)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local ``tokenizer.json`` through the ``tokenizers`` package (no hub access)."""

    def __init__(self, path: str | os.PathLike, eos_token: str | None = None, eos_id: int | None = None):
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist (expected a tokenizer.json)")
        self.name = str(path)
        self.tok = Tokenizer.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size()
        if eos_id is None:
            cands = [eos_token] if eos_token else list(_EOS_CANDIDATES)
            for c in cands:
                tid = self.tok.token_to_id(c)
                if tid is not None:
                    eos_id = tid
                    break
        if eos_id is None:
            raise ValueError(f"{path}: no EOS token found among {list(_EOS_CANDIDATES)}; pass eos_token= or eos_id=")
        self.eos_id = int(eos_id)

    def encode_batch(self, texts: Sequence[str]) -> Ragged:
        encs = self.tok.encode_batch(list(texts), add_special_tokens=False)
        return Ragged.from_list([np.append(np.asarray(e.ids, dtype=np.int32), np.int32(self.eos_id)) for e in encs],
                                dtype=np.int32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str | os.PathLike | None = "bytes", **kw):
    """``"bytes"`` (default) -> :class:`ByteTokenizer`; a path to ``tokenizer.json`` -> :class:`HFTokenizer`."""
    if spec is None or spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec, **kw)
