"""``builtin:facts``: a generated corpus of invented facts, with queries that restate them.

Every training text states one fact about one invented entity (a made-up name, so a
model can only learn it from this corpus), in one of its relation's training phrasings:
``"bramok works as a tailor ."``. Each entity has exactly one fact, so the text that
taught a fact is known. For every training text the generator writes four queries,
each carrying the text's id as ``source_id``:

- ``exact``: the training text itself;
- ``paraphrase``: another training phrasing of the same relation, same content words
  (``"the job of bramok is tailor ."``), a phrasing other training texts use;
- ``heavy``: a phrasing no training text uses, with synonyms, reordered content words
  and other function words (``"by trade , bramok is a tailor ."``, ``"tailor is the
  occupation of bramok ."``); its unseen words become ``<unk>``;
- ``topic``: the same entity with a different relation and value, a fact the corpus
  does not hold (``"bramok keeps a parrot at home ."``).

Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed and size give
the same corpus and queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVELS = ("exact", "paraphrase", "heavy", "topic")


@dataclass(frozen=True)
class Relation:
    name: str
    values: tuple[str, ...]
    templates: tuple[str, ...]  # training phrasings, each with {e} before {v}
    heavy: tuple[str, ...]  # query-only phrasings: synonyms, reordering, other function words


RELATIONS = (
    Relation(
        "birthplace",
        ("quenmoor", "valdrise", "ostrabel", "pellwick", "harrowin", "sundelve", "corvath", "lintmere"),
        ("{e} was born in {v} .", "the birthplace of {e} is {v} .", "{e} comes from the town of {v} ."),
        ("{e} is a native of {v} .", "{v} is the hometown of {e} ."),
    ),
    Relation(
        "occupation",
        ("baker", "sailor", "painter", "farmer", "doctor", "tailor", "miner", "judge"),
        ("{e} works as a {v} .", "the job of {e} is {v} .", "{e} earns a living as a {v} ."),
        ("by trade , {e} is a {v} .", "{v} is the occupation of {e} ."),
    ),
    Relation(
        "colour",
        ("red", "blue", "green", "yellow", "purple", "orange", "white", "grey"),
        (
            "the favourite colour of {e} is {v} .",
            "{e} likes the colour {v} best .",
            "{e} prefers {v} to every other colour .",
        ),
        ("{v} is the hue that {e} loves most .", "of all shades , {e} adores {v} ."),
    ),
    Relation(
        "pet",
        ("cat", "dog", "parrot", "rabbit", "goat", "ferret", "tortoise", "canary"),
        ("{e} owns a pet {v} .", "{e} keeps a {v} at home .", "the pet of {e} is a {v} ."),
        ("a {v} lives with {e} as a companion .", "{e} looks after an animal : a {v} ."),
    ),
    Relation(
        "instrument",
        ("piano", "violin", "flute", "drum", "harp", "trumpet", "cello", "banjo"),
        ("{e} plays the {v} .", "the instrument of {e} is the {v} .", "{e} makes music on the {v} ."),
        ("on the {v} , {e} performs tunes .", "{e} is a skilled {v} musician ."),
    ),
    Relation(
        "food",
        ("soup", "bread", "cheese", "rice", "apples", "fish", "noodles", "plums"),
        ("{e} likes to eat {v} .", "the favourite food of {e} is {v} .", "{e} enjoys a meal of {v} ."),
        ("{v} is the dish {e} craves .", "nothing tastes better to {e} than {v} ."),
    ),
)

_ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "pl",
    "r",
    "s",
    "t",
    "tr",
    "v",
    "z",
)
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "r", "l", "s", "k", "m")


@dataclass(frozen=True)
class Fact:
    id: int  # the training text's example_id
    entity: str
    relation: str
    value: str
    text: str


@dataclass(frozen=True)
class Query:
    id: int
    text: str
    level: str
    source_id: int  # the id of the training text that states the fact
    answer: str  # the fact-bearing word: the later of the query's entity and value (see ``answer_of``)


def _vocabulary() -> set[str]:
    words: set[str] = set()
    for r in RELATIONS:
        words.update(r.values)
        for t in (*r.templates, *r.heavy):
            words.update(t.replace("{e}", " ").replace("{v}", " ").split())
    return words


def entity_names(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct invented names of two or three syllables, none an ordinary word of the corpus."""
    taken = _vocabulary()
    names: list[str] = []
    while len(names) < n:
        syllables = rng.integers(2, 4)
        name = "".join(
            _ONSETS[rng.integers(len(_ONSETS))]
            + _VOWELS[rng.integers(len(_VOWELS))]
            + _CODAS[rng.integers(len(_CODAS))]
            for _ in range(syllables)
        )
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def answer_of(template: str, entity: str, value: str) -> str:
    """The word a causal LM needs the fact for: whichever of entity and value comes second.

    In "bramok works as a tailor" the model must recall the value from the entity; in
    "tailor is the occupation of bramok" the entity from the value.
    """
    return value if template.index("{e}") < template.index("{v}") else entity


def _pick(rng: np.random.Generator, options) -> str:
    return options[rng.integers(len(options))]


def generate(n_facts: int, seed: int) -> tuple[list[Fact], list[Query]]:
    """``n_facts`` training facts (one per entity) and 4·n_facts queries, fact by fact, level by level."""
    rng = np.random.default_rng([seed, 31])
    names = entity_names(n_facts, rng)
    # relations dealt round-robin over a shuffled order, so each appears n/6 times (±1)
    relation_of = rng.permutation(np.arange(n_facts) % len(RELATIONS))
    facts: list[Fact] = []
    queries: list[Query] = []
    for i, (name, r_idx) in enumerate(zip(names, relation_of, strict=True)):
        rel = RELATIONS[int(r_idx)]
        value = _pick(rng, rel.values)
        t = int(rng.integers(len(rel.templates)))
        facts.append(Fact(i, name, rel.name, value, rel.templates[t].format(e=name, v=value)))
        others = [k for k in range(len(rel.templates)) if k != t]
        paraphrase = rel.templates[others[rng.integers(len(others))]]
        other_rel = RELATIONS[int(_pick(rng, [k for k in range(len(RELATIONS)) if k != r_idx]))]
        # (template, entity, value) per level; the topic states a value of another relation
        phrasings = {
            "exact": (rel.templates[t], value),
            "paraphrase": (paraphrase, value),
            "heavy": (_pick(rng, rel.heavy), value),
            "topic": (_pick(rng, other_rel.templates), _pick(rng, other_rel.values)),
        }
        for level in LEVELS:
            template, v = phrasings[level]
            text = template.format(e=name, v=v)
            queries.append(Query(len(queries), text, level, i, answer_of(template, name, v)))
    return facts, queries
