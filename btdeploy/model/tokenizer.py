"""A RoBERTa-style byte-level BPE tokenizer trained locally, so presets need no model hub."""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from btdeploy.imports import serial_imports

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, as in RoBERTa


def vocabulary_problem(tokenizer: Any, vocab_size: int) -> str | None:
    """Why a checkpoint's tokenizer cannot make the model's token ids, or None. Where a checkpoint
    lacks its vocabulary files, transformers still builds a tokenizer: of the special tokens alone,
    which turns every word into <unk>, and the model answers every text alike."""
    entries = len(tokenizer)
    if entries >= vocab_size // 2:
        return None
    return (
        f"no usable processor: its tokenizer has {entries} entries for the model's vocabulary of {vocab_size}: "
        "the checkpoint lacks its tokenizer files (tokenizer.json, or vocab.json and merges.txt); "
        "copy them in beside config.json"
    )


_SUBJECTS = [
    "a cat",
    "two cats",
    "a dog",
    "a man",
    "a woman",
    "a child",
    "a football player",
    "a bird",
    "an old car",
    "a red bus",
    "a horse",
    "the chef",
    "a group of people",
    "a little girl",
]
_VERBS = [
    "sitting on",
    "looking out of",
    "chilling on",
    "running across",
    "standing next to",
    "sleeping on",
    "jumping over",
    "walking along",
    "holding",
    "scoring a goal near",
    "eating near",
]
_OBJECTS = [
    "a couch",
    "the window",
    "a grassy field",
    "the beach",
    "a wooden table",
    "a busy street",
    "the kitchen",
    "a snowy mountain",
    "the river",
    "a large building",
    "a park bench",
]
_EXTRAS = ["", " at night", " in the sun", " on a rainy day", " with a ball", " in the background"]


def training_sentences() -> list[str]:
    """A few hundred caption-like sentences, deterministic, covering the seed document's examples."""
    combos = itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _EXTRAS)
    sentences = [f"{s} {v} {o}{e}" for s, v, o, e in itertools.islice(combos, 0, None, 7)]
    sentences += [
        "An image of two cats chilling on a couch",
        "A football player scoring a goal",
        "a cat looking out of the window",
    ]
    return sentences


def pseudo_words() -> Iterator[str]:
    """Pronounceable filler words (ba, be, ..., baba, ...), in a fixed order."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    for count in itertools.count(1):
        for parts in itertools.product(syllables, repeat=count):
            yield "".join(parts)


def build_tokenizer(vocab_size: int, trained_size: int = 1000) -> Any:
    """Train a byte-level BPE and wrap it as transformers' RobertaTokenizer (the fast one).

    A few hundred sentences train about `trained_size` tokens; the vocabulary is then filled
    up to the model's `vocab_size` with pseudo-words (marked with the byte-level space, so
    they decode as words). Encoding never produces them, but a model with random weights
    predicts them, and the masked-LM example then prints words instead of nothing.
    """
    from tokenizers import AddedToken, ByteLevelBPETokenizer

    with serial_imports():
        from transformers import RobertaTokenizer

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(
        training_sentences(),
        vocab_size=min(vocab_size, trained_size),
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    with tempfile.TemporaryDirectory() as folder:
        trainer.save_model(folder)
        vocab_path = Path(folder) / "vocab.json"
        vocab: dict[str, int] = json.loads(vocab_path.read_text())
        words = pseudo_words()
        while len(vocab) < vocab_size:
            token = "\u0120" + next(words)  # "Ġ": the byte-level encoding of a leading space
            vocab.setdefault(token, len(vocab))
        vocab_path.write_text(json.dumps(vocab))
        # transformers 5.x: the files go in as vocab=/merges=; vocab_file=/merges_file= are ignored silently.
        return RobertaTokenizer(
            vocab=str(Path(folder) / "vocab.json"),
            merges=str(Path(folder) / "merges.txt"),
            # lstrip: "a <mask> cat" masks the word with its space, as RoBERTa's own tokenizer does
            mask_token=AddedToken("<mask>", lstrip=True, rstrip=False),  # type: ignore[arg-type]
        )
