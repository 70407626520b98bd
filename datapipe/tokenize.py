"""Tokenizers for ingest: a byte-level tokenizer that needs nothing downloaded, or a local Hugging Face
``tokenizer.json`` (the ``tokenizers`` package). Both encode a list of documents into ragged int32 ids with an
EOS id appended to every document, losslessly: the byte tokenizer stores a document's bytes as they are, and a
``tokenizer.json``'s own truncation and padding settings are switched off on load."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]", "<|im_end|>")


def _ragged(values, offsets):
    from datapipe.dataset import Ragged  # lazy: the dataset module loads torch, which ingest workers never need

    return Ragged(values, offsets)


class ByteTokenizer:
    """Bytes as ids 0..255, EOS = 256, vocabulary 257 (pad with 0 or 257 as you like).

    ``bytes`` documents are stored exactly as given (a file that is not valid UTF-8 keeps its bytes); ``str``
    documents are their UTF-8 encoding (lone surrogates, which have none, are written as by ``surrogatepass``).
    """

    name = "bytes"
    eos_id = 256
    vocab_size = 257

    def encode_batch(self, texts: Sequence[str | bytes]):
        """Encode documents into one Ragged int32 array (each document + EOS), without per-token Python.

        Args:
            texts: ``str`` (UTF-8 encoded) or ``bytes`` (taken as they are) documents.

        Returns:
            ``Ragged``: int32 ``values`` and int64 ``offsets`` ``[len(texts) + 1]``.
        """
        encoded = [t if isinstance(t, (bytes, bytearray, memoryview)) else t.encode("utf-8", errors="surrogatepass")
                   for t in texts]
        lengths = np.fromiter((len(b) + 1 for b in encoded), dtype=np.int64, count=len(encoded))
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.full(offsets[-1], self.eos_id, dtype=np.int32)
        body = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        # positions of the body bytes: every slot except each document's last (its EOS)
        is_body = np.ones(offsets[-1], dtype=bool)
        is_body[offsets[1:] - 1] = False
        values[is_body] = body
        return _ragged(values, offsets)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids) -> bytes:
        """The stored bytes of ``ids`` (EOS and other ids >= 256 left out)."""
        return bytes(int(i) for i in ids if int(i) < 256)


class HFTokenizer:
    """A local ``tokenizer.json`` through the ``tokenizers`` package (no hub access).

    The file's own truncation and padding are disabled on load (``no_truncation()``, ``no_padding()``), so a
    document is never cut or padded: its ids are ``encode(text, add_special_tokens=False).ids`` plus EOS.

    Args:
        path: the ``tokenizer.json`` file, or a ``tokenizers.Tokenizer`` object (copied, the caller's is untouched).
        eos_token: the EOS token's text (default: the first of ``<|endoftext|>``, ``</s>``, ``<eos>``, ... found).
        eos_id: the EOS id, instead of ``eos_token``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a tokenizer.json, or no EOS token is found.
    """

    def __init__(self, path, eos_token: str | None = None, eos_id: int | None = None):
        from tokenizers import Tokenizer

        if isinstance(path, Tokenizer):
            self.name = "tokenizers.Tokenizer"
            self.tok = Tokenizer.from_str(path.to_str())
        else:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"tokenizer file {path} does not exist (expected a tokenizer.json)")
            self.name = str(path)
            try:
                self.tok = Tokenizer.from_file(str(path))
            except Exception as e:  # the tokenizers package raises a bare Exception for a file it cannot parse
                raise ValueError(f"{path}: not a tokenizer.json the tokenizers package can read ({e}); pass "
                                 "--tokenizer bytes or a tokenizer.json file") from None
        # lossless: a shipped tokenizer.json often enables truncation (max_length) and padding; ingest keeps every
        # token of every document and stores no PAD ids
        self.tok.no_truncation()
        self.tok.no_padding()
        self.vocab_size = self.tok.get_vocab_size()
        if eos_id is None:
            cands = [eos_token] if eos_token else list(_EOS_CANDIDATES)
            for c in cands:
                tid = self.tok.token_to_id(c)
                if tid is not None:
                    eos_id = tid
                    break
        if eos_id is None:
            raise ValueError(f"{self.name}: no EOS token found among {cands}; pass eos_token= or eos_id=")
        self.eos_id = int(eos_id)

    def encode_batch(self, texts: Sequence[str]):
        """Encode texts into one Ragged int32 array: each text's ids (no special tokens, no truncation or padding)
        plus EOS.

        Returns:
            ``Ragged``: int32 ``values`` and int64 ``offsets`` ``[len(texts) + 1]``.
        """
        encs = self.tok.encode_batch(list(texts), add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) + 1 for e in encs), dtype=np.int64, count=len(encs))
        offsets = np.zeros(len(encs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.full(offsets[-1], self.eos_id, dtype=np.int32)
        for j, e in enumerate(encs):
            values[offsets[j] : offsets[j + 1] - 1] = e.ids
        return _ragged(values, offsets)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def load_tokenizer(spec="bytes", **kw):
    """``"bytes"`` or None (default) -> :class:`ByteTokenizer`; a path to a ``tokenizer.json`` or a
    ``tokenizers.Tokenizer`` -> :class:`HFTokenizer` (truncation and padding disabled); an object that already
    has ``encode_batch`` and ``eos_id`` is returned as is."""
    if spec is None or (isinstance(spec, str) and spec == "bytes"):
        return ByteTokenizer()
    if hasattr(spec, "encode_batch") and hasattr(spec, "eos_id"):
        return spec
    if not isinstance(spec, (str, os.PathLike)) and type(spec).__name__ != "Tokenizer":
        raise TypeError(f"tokenizer must be 'bytes', a tokenizer.json path, a tokenizers.Tokenizer or an object with "
                        f"encode_batch and eos_id (got {type(spec).__name__})")
    return HFTokenizer(spec, **kw)
