"""Tokenizers: byte-level (built in), Hugging Face `tokenizers`, SentencePiece.

Spec strings (`c.data.tokenizer`): `byte` | `hf:HUB_ID_OR_DIR` | `spm:MODEL_FILE`.
Every tokenizer has `encode(str) -> list[int]`, `encode_batch(list[str]) -> list of
int arrays`, `decode`, `eos_id`, `pad_id` (always 0: padding is marked by segment id 0,
so id 0 may also be a real token, e.g. SmolLM2's <|endoftext|> which is its EOS),
`vocab_size` and `fingerprint` (a content hash of the files that define it).
Documents are encoded without special tokens and end with EOS (added by the store).
"""

import hashlib
import json
import os

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes shifted by 2: id 0 = pad, 1 = EOS, 2..257 = bytes. No training."""

    pad_id = 0
    eos_id = 1
    vocab_size = 258
    fingerprint = "byte-v1"
    spec = "byte"

    def encode(self, text: str) -> list[int]:
        return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + 2).tolist()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) + 2 for t in texts]

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[ids >= 2] - 2
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _hash_files(paths: list[str]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer from a hub id or a local directory."""

    pad_id = 0

    def __init__(self, name: str):
        from tokenizers import Tokenizer

        self.spec = f"hf:{name}"
        if os.path.isdir(name):
            tok_file = os.path.join(name, "tokenizer.json")
            if not os.path.exists(tok_file):
                raise ValueError(f"data.tokenizer={self.spec!r}: no tokenizer.json in {name}")
            cfg_file = os.path.join(name, "tokenizer_config.json")
        else:
            from huggingface_hub import hf_hub_download

            try:
                tok_file = hf_hub_download(name, "tokenizer.json")
                cfg_file = hf_hub_download(name, "tokenizer_config.json")
            except Exception as e:  # offline, unknown id, no network
                raise ValueError(
                    f"data.tokenizer={self.spec!r}: not a local directory and not "
                    f"downloadable from the hub ({type(e).__name__}: {e})"
                ) from e
        self._tok = Tokenizer.from_file(tok_file)
        files = [tok_file]
        eos = None
        if os.path.exists(cfg_file):
            files.append(cfg_file)
            with open(cfg_file) as f:
                eos = json.load(f).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
        eos_id = self._tok.token_to_id(eos) if eos else None
        if eos_id is None:
            for cand in ("<|endoftext|>", "</s>", "<eos>"):
                eos_id = self._tok.token_to_id(cand)
                if eos_id is not None:
                    break
        if eos_id is None:
            raise ValueError(f"data.tokenizer={self.spec!r}: cannot find an EOS token")
        self.eos_id = int(eos_id)
        self.vocab_size = int(self._tok.get_vocab_size())
        self.fingerprint = "hf-" + _hash_files(files)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SPMTokenizer:
    """A SentencePiece model file. EOS is the model's eos id (or 2 where it has none)."""

    pad_id = 0

    def __init__(self, path: str):
        import sentencepiece as spm

        self.spec = f"spm:{path}"
        if not os.path.isfile(path):
            raise ValueError(f"data.tokenizer={self.spec!r}: model file {path!r} not found")
        self._sp = spm.SentencePieceProcessor(model_file=path)
        eos = self._sp.eos_id()
        self.eos_id = int(eos if eos >= 0 else 2)
        self.vocab_size = int(self._sp.get_piece_size())
        self.fingerprint = "spm-" + _hash_files([path])

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(texts)]

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


def make_tokenizer(spec: str):
    """`byte` | `hf:HUB_ID_OR_DIR` | `spm:MODEL_FILE`."""
    if spec == "byte":
        return ByteTokenizer()
    scheme, _, arg = str(spec).partition(":")
    if scheme == "hf" and arg:
        return HFTokenizer(arg)
    if scheme == "spm" and arg:
        return SPMTokenizer(arg)
    raise ValueError(
        f"data.tokenizer={spec!r} unknown; allowed: 'byte', 'hf:HUB_ID_OR_DIR', 'spm:MODEL_FILE'"
    )
