"""Text sources for language models: ``jsonl:PATH``, ``text:PATH`` and ``builtin:facts``.

Each example is one text; the model learns to predict its next words (see
``tokenizer.py`` for the input/target layout). A word-level tokenizer is built from
the *training* texts only and saved in the run folder as ``tokenizer.json``.

- ``jsonl:PATH``: one JSON object per line with a ``text`` string and optionally an
  integer ``id`` (every record or none), which is then the example's ``example_id``
  in every output; without ids, ``example_id`` is the record's 0-based line number.
  Blank lines are skipped.
- ``text:PATH``: one example per line; ``example_id`` is the 0-based line number.
  Blank lines are skipped (a note says how many), so ids keep pointing at lines.

For these two, ``data.val_size`` / ``data.test_size`` texts are held out (seeded by
``data.seed``); the validation target during ``train`` is the mean loss on the
held-out validation texts.

- ``builtin:facts``: the generated corpus of ``facts.py``, sized by ``data.facts``.
  Every generated fact is a training text (each must be learnt to be attributed).
  The validation split is the ``paraphrase`` queries (the facts restated in another
  training phrasing) and the test split the ``heavy`` queries, so the training run is
  valued against "answer the facts when asked in other words"; ``attribute`` replays
  the run against each built-in query separately.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..choices import LANGUAGE_MODELS
from ..errors import UserError, listed
from ..tokenizer import IGNORE, WordTokenizer
from .dataset import Dataset
from .facts import LEVELS, Query, generate
from .registry import register_source

if TYPE_CHECKING:
    from ..recipe import DataCfg

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the ids a table's example_id column holds


@dataclass
class TextDataset(Dataset):
    """A ``Dataset`` of token sequences that also keeps its texts, tokenizer and built-in queries."""

    texts: list[str] = field(default_factory=list)  # training texts, row i ↔ example_id[i]
    # keyword-only: a field without a default after the Dataset's defaulted ones
    tokenizer: WordTokenizer = field(kw_only=True)
    queries: list[Query] = field(default_factory=list)  # built-in queries (builtin:facts), else []

    def example_columns(self) -> dict[str, object]:
        return {
            "text": list(self.texts),
            "is_noisy": self.is_noisy.numpy().astype(bool),
            "source_row": self.source_row.numpy().astype(np.int64),
        }

    def run_files(self) -> dict[str, object]:
        return {"tokenizer.json": self.tokenizer.to_dict()}

    def subset(self, keep) -> TextDataset:
        rows = torch.as_tensor(keep, dtype=torch.long).tolist()
        return dataclasses.replace(super().subset(keep), texts=[self.texts[i] for i in rows])


@dataclass
class Texts:
    """One split before tokenization: the texts, their ids and where each came from."""

    texts: list[str]
    ids: list[int]
    rows: list[int]  # 0-based line in the source file (or index in the generated corpus)
    where: list[str]  # how to name each text in an error message


def text_dataset(
    source: str, train: Texts, val: Texts, test: Texts, *, queries=(), notes=(), max_words: int | None = None
) -> TextDataset:
    """Tokenize the three splits with a tokenizer built from the training texts (``max_words``: see
    ``WordTokenizer.batch``)."""
    tok = WordTokenizer.build(train.texts)
    x_train, y_train = tok.batch(train.texts, train.where, max_words)
    x_val, y_val = tok.batch(val.texts, val.where, max_words)
    x_test, y_test = tok.batch(test.texts, test.where, max_words)
    n = len(train.texts)
    longest = max(x_train.shape[1], x_val.shape[1], x_test.shape[1])
    notes = [*notes, *_padding_note(y_train, max_words)]
    return TextDataset(
        source=source,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
        example_id=torch.tensor(train.ids, dtype=torch.long),
        is_noisy=torch.zeros(n, dtype=torch.bool),
        clean_label=torch.full((n,), -1, dtype=torch.long),  # no class labels in a corpus
        source_row=torch.tensor(train.rows, dtype=torch.long),
        n_classes=len(tok),
        input_shape=(longest,),
        notes=list(notes),
        texts=list(train.texts),
        tokenizer=tok,
        queries=list(queries),
    )


# padded positions per word position past which training is told how to cut the longest texts
PADDING_NOTE = 4.0


def _padding_note(y_train: torch.Tensor, max_words: int | None) -> list[str]:
    """A note where padding to the longest text makes a step cost several times its words."""
    if max_words is not None or not len(y_train):
        return []
    lengths = (y_train != IGNORE).sum(1).double()  # words + 1 (<bos> or <eos>) per text
    padded = y_train.shape[1] / float(lengths.mean())
    if padded < PADDING_NOTE:
        return []
    longest = y_train.shape[1] - 1
    # a cut that leaves nearly every text whole: the 99th percentile, lower where that is the longest
    cut = next(k for k in (int(lengths.quantile(q)) - 1 for q in (0.99, 0.9, 0.5, 0.0)) if k < longest)
    longer = int((lengths - 1 > cut).sum())
    return [
        f"every batch is padded to the longest training text, {longest} words, where the median has "
        f"{int(lengths.median()) - 1}: a step computes {padded:.1f}x the positions of its words. "
        f"data.max_words: {cut} would cut the {longer} of {len(lengths)} texts that are longer to their "
        f"first {cut} words."
    ]


def _no_image(image: bool, source: str) -> None:
    if image:
        raise UserError(
            f"`model.kind` is cnn, which needs image data, but {source!r} is text; "
            f"expected model.kind: {listed(LANGUAGE_MODELS, 'or')}."
        )


def _check_text_options(cfg: DataCfg, source: str) -> None:
    if cfg.label_noise:
        raise UserError(
            f"`data.label_noise` only applies to labelled (tabular) data; {source!r} is text: set it to 0."
        )


def _split(corpus: Texts, cfg: DataCfg, path: str) -> tuple[Texts, Texts, Texts]:
    from .tabular import split_indices

    n = len(corpus.texts)
    if n == 0:
        raise UserError(f"`data.source` {path} holds no texts; expected at least one non-blank line.")
    parts = split_indices(np.zeros(n, dtype=np.int64), cfg.val_size, cfg.test_size, cfg.seed)

    def take(rows) -> Texts:
        rows = [int(r) for r in rows]
        return Texts(*([getattr(corpus, f)[r] for r in rows] for f in ("texts", "ids", "rows", "where")))

    return take(parts[0]), take(parts[1]), take(parts[2])


def _read_lines(path: str, what: str) -> list[str]:
    """The file's lines, split at line feeds only (a carriage return before one dropped), so that
    line i is the i-th line an editor or ``wc -l`` counts: ``str.splitlines`` also splits at form
    feeds, U+2028 and five others, and reading as text splits at a lone carriage return, which
    would number texts off the file's lines and cut JSON strings that hold them."""
    try:
        lines = Path(path).read_bytes().decode("utf-8").split("\n")
    except FileNotFoundError:
        raise UserError(f"{what}: the file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what}: cannot read {path} as UTF-8 text: {e}.") from None
    if lines[-1] == "":  # the file's last line feed ends a line, it does not start one
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _text_source(scheme: str, rest: str, cfg: DataCfg, image: bool) -> str:
    """The source's name, once the options that apply to other sources are found unset."""
    source = f"{scheme}:{rest}"
    _no_image(image, source)
    _check_text_options(cfg, source)
    return source


@register_source("text", help="a UTF-8 text file, one training text per line, blank lines skipped")
def load_text(rest: str, cfg: DataCfg, *, image: bool = False) -> TextDataset:
    source = _text_source("text", rest, cfg, image)
    lines = _read_lines(rest, "`data.source`")
    kept = [i for i, line in enumerate(lines) if line.strip()]
    corpus = Texts(
        [lines[i] for i in kept], kept, kept, [f"`data.source`: line {i + 1} of {rest}" for i in kept]
    )
    notes = []
    if len(kept) < len(lines):
        notes.append(
            f"{rest}: skipped {len(lines) - len(kept)} blank line(s); example_id is the 0-based line number"
        )
    return text_dataset(source, *_split(corpus, cfg, rest), notes=notes, max_words=cfg.max_words)


@register_source("jsonl", help="JSON lines with a `text` field and optionally an integer `id`")
def load_jsonl(rest: str, cfg: DataCfg, *, image: bool = False) -> TextDataset:
    source = _text_source("jsonl", rest, cfg, image)
    records = read_jsonl(rest, "`data.source`")
    check_ids(records, rest, "`data.source`", kinds=(int,))
    texts, ids, rows, where = [], [], [], []
    for row, rec in records:
        name = f"line {row + 1} of {rest}"
        texts.append(record_text(rec, name, "`data.source`"))
        ids.append(rec.get("id", row))
        rows.append(row)
        where.append(f"`data.source`: {name}")
    return text_dataset(source, *_split(Texts(texts, ids, rows, where), cfg, rest), max_words=cfg.max_words)


def read_jsonl(path: str, what: str) -> list[tuple[int, dict]]:
    """(0-based line, object) for every non-blank line of a JSON-lines file; ``what`` names the option."""
    out = []
    for i, line in enumerate(_read_lines(path, what)):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{what}: line {i + 1} of {path} is not valid JSON ({e.msg}).") from None
        if not isinstance(rec, dict):
            raise UserError(f'{what}: line {i + 1} of {path} is not a JSON object; expected {{"text": ...}}.')
        out.append((i, rec))
    if not out:
        raise UserError(f"{what}: {path} holds no records; expected one JSON object per line.")
    return out


def record_text(rec: dict, name: str, what: str) -> str:
    text = rec.get("text")
    if not isinstance(text, str):
        raise UserError(f'{what}: {name} has no `text` string; expected {{"text": "..."}}.')
    return text


def check_ids(records: list[tuple[int, dict]], path: str, what: str, kinds: tuple[type, ...]) -> None:
    """Ids are given for every record or none, are unique, and are of one of ``kinds``."""
    with_id = [(row, rec["id"]) for row, rec in records if "id" in rec]
    if with_id and len(with_id) != len(records):
        missing = next(row for row, rec in records if "id" not in rec)
        raise UserError(
            f"{what}: line {missing + 1} of {path} has no `id`, but other lines do; "
            "give every record an id or none."
        )
    seen: dict = {}
    for row, v in with_id:
        if (
            isinstance(v, bool)
            or not isinstance(v, kinds)
            or (isinstance(v, int) and not INT64_MIN <= v <= INT64_MAX)
        ):
            expected = " or ".join({int: "an integer within int64", str: "a string"}[k] for k in kinds)
            raise UserError(f"{what}: line {row + 1} of {path} has `id` {v!r}; expected {expected}.")
        key = str(v)  # the tables write ids as text: 7 and "7" would be one id there
        if key in seen:
            raise UserError(
                f"{what}: lines {seen[key] + 1} and {row + 1} of {path} share the id {key!r}; ids must be "
                'unique (as text: 7 and "7" are one id).'
            )
        seen[key] = row


@register_source(
    "builtin", names=("facts",), help="a generated corpus of invented facts, with paraphrased queries"
)
def load_builtin(rest: str, cfg: DataCfg, *, image: bool = False) -> TextDataset:
    source = _text_source("builtin", rest, cfg, image)
    assert cfg.facts is not None  # DataCfg fills in the defaults for builtin:facts
    facts, queries = generate(cfg.facts.n_facts, cfg.facts.seed)
    ids = [f.id for f in facts]
    train = Texts([f.text for f in facts], ids, ids, [f"fact {f.id}" for f in facts])

    def level(name: str) -> Texts:
        qs = [q for q in queries if q.level == name]
        return Texts(
            [q.text for q in qs], [q.id for q in qs], [q.id for q in qs], [f"query {q.id}" for q in qs]
        )

    return text_dataset(
        source, train, level("paraphrase"), level("heavy"), queries=queries, max_words=cfg.max_words
    )


__all__ = ["LEVELS", "TextDataset", "Texts", "load_builtin", "load_jsonl", "load_text", "text_dataset"]
