"""The data stage: corpus sources, cleaning, sentencepiece, and the encoded corpus.

`preprocess(recipe, run_dir)` turns the recipe's `data` and `tokenizer` sections into
artifacts under `run_dir/data/` (see `nmt.data.preprocess` for the file list); training
then reads only those artifacts, through `load_tokenizers` and `EncodedCorpus`.

    sources.py     read parallel text: local files, URLs (cached downloads), the HF hub
    clean.py       normalisation and the per-rule filters on training pairs
    tokenizer.py   sentencepiece training and the `Tokenizer` wrapper (fixed special ids)
    corpus.py      the memory-mapped encoded corpus and its streamed writer
    preprocess.py  the stage itself: caching, atomic output, manifest, summary
"""


class DataError(Exception):
    """Unusable input data; the message is one line naming the file, line or key.

    Defined here, before the submodules are imported, so that each of them can raise it.
    """


from nmt.data.corpus import EncodedCorpus, read_text_split  # noqa: E402
from nmt.data.preprocess import is_fresh, preprocess  # noqa: E402
from nmt.data.tokenizer import Tokenizer, load_tokenizers  # noqa: E402

__all__ = [
    "DataError",
    "EncodedCorpus",
    "Tokenizer",
    "is_fresh",
    "load_tokenizers",
    "preprocess",
    "read_text_split",
]
