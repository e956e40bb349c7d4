"""The word-level tokenizer of the bundled model, built with the `tokenizers` library.

Words and punctuation are tokens; digit runs are split in pairs so that "1732" is
"17" "32" (as GPT-2 tokenizes most years), which makes year endings single tokens.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tdb_agent.tasks.vocab import all_words

BOS = "<|endoftext|>"
UNK = "[UNK]"


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(all_words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Whitespace(),
        pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated"),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS,
                                   unk_token=UNK, pad_token=BOS, model_max_length=128)
