"""Byte-level BPE tokenizer from the checkpoint's own files (`tokenizer.json`, or `vocab.json` + `merges.txt`).

Runs on HF `tokenizers` (Rust). Also builds Qwen2-format tokenizer files from a tiktoken
rank file, which is how the embedded default gets the real Qwen2 vocabulary.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                 r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen2.5-Omni's special tokens from id 151643 on (the Omni renamings of Qwen2's 151646-151656).
OMNI_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
    "<|IMAGE|>", "<|VIDEO|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]

# Qwen3-Omni's added tokens from id 151643 on (Qwen3's 151643-151668, then the Omni audio/TTS ones up to
# <|audio_pad|> 151675), as in Qwen3-Omni-30B-A3B-*'s tokenizer_config.json.
QWEN3_OMNI_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
]
# Added tokens Qwen3 marks `"special": false`: matched whole when encoding but kept when decoding, so a
# reply's reasoning block and tool calls survive skip_special_tokens.
QWEN3_NON_SPECIAL = frozenset([
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
])


class TokenizerError(ValueError):
    pass


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def qwen2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], specials: dict[str, int],
                    non_special: frozenset[str] | set[str] = frozenset()) -> Tokenizer:
    """Qwen2 byte-level BPE with `specials` added at their ids; those in `non_special` are added tokens
    that decoding keeps (`"special": false`)."""
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for text, _ in sorted(specials.items(), key=lambda kv: kv[1]):
        if text in non_special:
            tok.add_tokens([AddedToken(text, special=False, normalized=False)])
        else:
            tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
    for text, i in specials.items():
        if tok.token_to_id(text) != i:
            raise TokenizerError(f"special token {text} landed at {tok.token_to_id(text)}, expected {i}")
    return tok


def from_tiktoken(path: str | Path, specials: list[str] = OMNI_SPECIALS,
                  non_special: frozenset[str] | set[str] | None = None, max_rank: int | None = None) -> Tokenizer:
    """Qwen2 tokenizer from a tiktoken rank file (`qwen.tiktoken`: base64 bytes, rank per line).

    max_rank: keep only the tokens ranked below it (a consistent smaller BPE: every kept token's merge parts
    rank lower), for small random checkpoints; the specials follow the kept ranks.

    non_special: which of `specials` decoding keeps; None: QWEN3_NON_SPECIAL for QWEN3_OMNI_SPECIALS,
    none for any other list (Qwen2.5-Omni's files mark every added token special).
    """
    if non_special is None:
        non_special = QWEN3_NON_SPECIAL if list(specials) == QWEN3_OMNI_SPECIALS else frozenset()
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_text().splitlines():
        if line:
            b64, rank = line.split()
            if max_rank is None or int(rank) < max_rank:
                ranks[base64.b64decode(b64)] = int(rank)
    byte_map = _bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab = {enc(b): r for b, r in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], enc(left), enc(right)))
    merges.sort()
    n = len(ranks)
    return qwen2_tokenizer(vocab, [(m[3], m[4]) for m in merges], {t: n + i for i, t in enumerate(specials)},
                           non_special)


def save_qwen2_files(tok: Tokenizer, out_dir: Path, model_max_length: int = 32768) -> None:
    """tokenizer.json, vocab.json, merges.txt and tokenizer_config.json as a Qwen2 checkpoint has them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    tok.model.save(str(out_dir))
    added = {}
    for i, t in sorted(tok.get_added_tokens_decoder().items()):
        added[str(i)] = {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": bool(t.special)}
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": model_max_length, "errors": "replace",
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "bos_token": None,
        "split_special_tokens": False, "clean_up_tokenization_spaces": False, "added_tokens_decoder": added,
    }, indent=2))


class TextTokenizer:
    """What the processor needs: encode text (special tokens recognised), decode ids, look up specials."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    @classmethod
    def from_dir(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if (path / "tokenizer.json").exists():
            return cls(Tokenizer.from_file(str(path / "tokenizer.json")))
        if (path / "vocab.json").exists() and (path / "merges.txt").exists():
            vocab = json.loads((path / "vocab.json").read_text())
            merges = [tuple(l.split(" ")) for l in (path / "merges.txt").read_text().splitlines()
                      if l and not l.startswith("#version")]
            specials, non_special = {}, set()
            cfg = path / "tokenizer_config.json"
            if cfg.exists():
                for i, t in json.loads(cfg.read_text()).get("added_tokens_decoder", {}).items():
                    specials[t["content"]] = int(i)
                    if t.get("special", True) is False:
                        non_special.add(t["content"])
            return cls(qwen2_tokenizer(vocab, merges, specials, non_special))
        raise TokenizerError(f"{path}: no tokenizer.json or vocab.json + merges.txt")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def token_id(self, text: str) -> int:
        i = self.tok.token_to_id(text)
        if i is None:
            raise TokenizerError(f"the tokenizer has no token {text!r}")
        return i
