"""Tokenizer, text sources (jsonl:, text:, builtin:facts) and the gpt recipe fields."""

import json

import pandas as pd
import pytest
import torch
from helpers import write_recipe

from adamshap_core.data import TextDataset, load_dataset
from adamshap_core.data.facts import LEVELS, RELATIONS, generate
from adamshap_core.errors import UserError
from adamshap_core.recipe import recipe_from_dict
from adamshap_core.tokenizer import BOS_ID, EOS_ID, IGNORE, PAD_ID, SPECIALS, UNK_ID, WordTokenizer

# ---------------------------------------------------------------- tokenizer


def test_tokenizer_vocabulary_ids_and_layout():
    tok = WordTokenizer.build(["The cat sat.", "the dog, sat"])
    assert tok.vocab == [*SPECIALS, "the", "cat", "sat", ".", "dog", ","]
    assert tok.encode("THE Cat") == [4, 5]
    x, y = tok.batch(["cat sat", "dog"])
    assert x.tolist() == [[BOS_ID, 5, 6], [BOS_ID, 8, PAD_ID]]
    assert y.tolist() == [[5, 6, EOS_ID], [8, EOS_ID, IGNORE]]


def test_max_words_keeps_a_longer_texts_first_words_and_predicts_the_next():
    tok = WordTokenizer.build(["a b c d e", "b c"])
    a, b, c, d = tok.encode("a b c d")
    x, y = tok.batch(["a b c d e", "b c", "a b c"], max_words=3)
    assert x.tolist() == [[BOS_ID, a, b, c], [BOS_ID, b, c, PAD_ID], [BOS_ID, a, b, c]]
    assert y.tolist() == [[a, b, c, d], [b, c, EOS_ID, IGNORE], [a, b, c, EOS_ID]]  # the first goes on


def test_a_long_line_among_short_ones_is_noted_and_max_words_cuts_it(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("\n".join([f"short line {i}" for i in range(200)] + [" ".join(["long"] * 60)]) + "\n")
    ds = load_dataset(_recipe(f"text:{p}").data)
    assert ds.input_shape == (61,)
    note = next(n for n in ds.notes if "padded to the longest" in n)
    assert note.startswith(
        "every batch is padded to the longest training text, 60 words, where the median has 3"
    )
    assert note.endswith(
        "data.max_words: 3 would cut the 1 of 199 texts that are longer to their first 3 words."
    )
    p.write_text(
        "\n".join(["a b"] * 95 + [" ".join(["long"] * 60)] * 6) + "\n"
    )  # 6%: the 99th is the longest
    note = next(n for n in load_dataset(_recipe(f"text:{p}").data).notes if "padded" in n)
    assert note.endswith(
        "data.max_words: 2 would cut the 6 of 99 texts that are longer to their first 2 words."
    )
    cut = load_dataset(_recipe(f"text:{p}", max_words=3).data)
    assert cut.input_shape == (4,) and not any("padded" in n for n in cut.notes)
    p.write_text("\n".join(f"line number {i}" for i in range(200)) + "\n")  # even lengths: no note
    assert not any("padded" in n for n in load_dataset(_recipe(f"text:{p}").data).notes)


def test_unseen_words_become_unk():
    tok = WordTokenizer.build(["the cat sat"])
    assert tok.encode("the zebra sat") == [4, UNK_ID, 6]
    assert tok.unknown_words("the zebra and the yak") == ["zebra", "and", "yak"]


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_an_empty_text_is_a_user_error(text):
    tok = WordTokenizer.build(["the cat sat"])
    with pytest.raises(UserError, match="query 7 is empty"):
        tok.batch(["the cat", text], names=["query 6", "query 7"])


def test_tokenizer_round_trips_through_json():
    tok = WordTokenizer.build(["a b c", "c d"])
    again = WordTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again == tok and again.vocab == tok.vocab
    with pytest.raises(UserError, match="not a word tokenizer"):
        WordTokenizer.from_dict({"vocab": "abc"})


# ---------------------------------------------------------------- builtin:facts


def test_facts_generator_is_seeded_and_consistent():
    facts, queries = generate(30, seed=3)
    assert (facts, queries) == generate(30, seed=3)
    assert facts != generate(30, seed=4)[0]
    assert len({f.entity for f in facts}) == 30  # one fact per entity
    assert [f.id for f in facts] == list(range(30))
    assert len(queries) == 4 * 30 and len({q.id for q in queries}) == 4 * 30
    by_rel = {r.name: r for r in RELATIONS}
    for f in facts:
        qs = {q.level: q for q in queries if q.source_id == f.id}
        assert set(qs) == set(LEVELS)
        rel = by_rel[f.relation]
        assert qs["exact"].text == f.text
        for level in ("paraphrase", "heavy"):  # same content words, other phrasing
            assert qs[level].text != f.text
            assert f.entity in qs[level].text.split() and f.value in qs[level].text.split()
        assert any(qs["paraphrase"].text == t.format(e=f.entity, v=f.value) for t in rel.templates)
        assert any(qs["heavy"].text == t.format(e=f.entity, v=f.value) for t in rel.heavy)
        # the answer is the fact-bearing word: whichever of entity and value comes second
        for level in ("exact", "paraphrase", "heavy"):
            words = qs[level].text.split()
            later = f.entity if words.index(f.entity) > words.index(f.value) else f.value
            assert qs[level].answer == later
        words = qs["topic"].text.split()
        assert words.index(qs["topic"].answer) > words.index(f.entity)  # the topic's own value
        # topic: the same entity in a training phrasing of another relation
        topic = [r.name for r in RELATIONS if _states(qs["topic"].text, f.entity, r)]
        assert topic and f.relation not in topic


def _states(text: str, entity: str, rel) -> bool:
    """Whether ``text`` is a training phrasing of ``rel`` about ``entity``."""
    return any(text == t.format(e=entity, v=v) for t in rel.templates for v in rel.values)


def test_builtin_facts_splits_are_the_queries():
    r = recipe_from_dict(
        {
            "name": "f",
            "data": {"source": "builtin:facts", "facts": {"n_facts": 24, "seed": 1}},
            "model": {"kind": "gpt"},
        }
    )
    ds = load_dataset(r.data)
    assert isinstance(ds, TextDataset) and ds.n_train == 24 and len(ds.queries) == 96
    assert ds.example_id.tolist() == list(range(24))
    x, y = ds.tokenizer.batch([q.text for q in ds.queries if q.level == "paraphrase"])
    assert torch.equal(ds.x_val, x) and torch.equal(ds.y_val, y)
    assert len(ds.y_test) == 24  # the heavy queries
    assert ds.n_classes == len(ds.tokenizer) and ds.input_shape[0] >= ds.x_train.shape[1]


# ---------------------------------------------------------------- jsonl: and text:


def _jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _recipe(path_source, **data):
    return recipe_from_dict(
        {
            "name": "t",
            "data": {"source": path_source, "val_size": 1, "test_size": 1, **data},
            "model": {"kind": "gpt"},
        }
    )


def test_jsonl_ids_become_example_ids(tmp_path):
    recs = [{"id": 100 + i, "text": f"text number {i} here"} for i in range(8)]
    ds = load_dataset(_recipe(f"jsonl:{_jsonl(tmp_path / 'c.jsonl', recs)}").data)
    assert ds.n_train == 6
    by_id = {r["id"]: r["text"] for r in recs}
    assert all(by_id[int(e)] == t for e, t in zip(ds.example_id, ds.texts, strict=True))
    assert ds.run_files()["tokenizer.json"]["vocab"][:4] == list(SPECIALS)


def test_jsonl_without_ids_uses_line_numbers(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "a b"}\n\n{"text": "c d"}\n{"text": "e f"}\n{"text": "g h"}\n')
    ds = load_dataset(_recipe(f"jsonl:{p}").data)
    texts = {0: "a b", 2: "c d", 3: "e f", 4: "g h"}
    assert all(texts[int(e)] == t for e, t in zip(ds.example_id, ds.texts, strict=True))


@pytest.mark.parametrize(
    "lines, fragment",
    [
        (['{"text": "a"}', "not json", '{"text": "b"}'], "line 2 of"),
        (
            ['{"text": "a", "id": 1}', '{"text": "b"}', '{"text": "c", "id": 3}'],
            "has no `id`, but other lines do",
        ),
        (['{"text": "a", "id": 1}', '{"text": "b", "id": 1}', '{"text": "c", "id": 3}'], "share the id '1'"),
        (
            ['{"text": "a", "id": "x"}', '{"text": "b", "id": "y"}', '{"text": "c", "id": "z"}'],
            "expected an integer",
        ),
        (
            ['{"text": "a", "id": 1}', '{"text": "b", "id": 2}', f'{{"text": "c", "id": {2**63}}}'],
            "within int64",
        ),
        (['{"text": "a"}', '{"txt": "b"}', '{"text": "c"}'], "no `text` string"),
        (['{"text": "a"}', '{"text": "  "}', '{"text": "c"}', '{"text": "d"}', '{"text": "e"}'], "is empty"),
        (['["a"]', '{"text": "b"}', '{"text": "c"}'], "not a JSON object"),
    ],
)
def test_bad_jsonl_is_a_user_error_naming_the_line(tmp_path, lines, fragment):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="`data.source`") as e:
        load_dataset(_recipe(f"jsonl:{p}").data)
    assert fragment in str(e.value)


def test_text_source_skips_blank_lines_with_a_note(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("first line\n\nsecond line\nthird line\n   \nfourth line\nfifth line\n")
    ds = load_dataset(_recipe(f"text:{p}").data)
    lines = p.read_text().splitlines()
    assert ds.n_train == 3
    assert all(lines[int(e)] == t for e, t in zip(ds.example_id, ds.texts, strict=True))
    assert any("skipped 2 blank line" in n for n in ds.notes)


def test_lines_are_split_at_line_feeds_only(tmp_path):
    """A form feed or U+2028 inside a line (which str.splitlines splits at), or a lone carriage
    return (which reading as text splits at), leaves the ids the line numbers; a raw U+2028 inside a
    JSON string is valid JSON; CRLF line ends are dropped."""
    lines = [
        "page one\x0cpage two",
        "next\u2028line",
        "a lone\rreturn",
        *(f"line number {i}" for i in range(3, 9)),
    ]
    p = tmp_path / "c.txt"
    p.write_bytes("\r\n".join(lines).encode() + b"\r\n")
    ds = load_dataset(_recipe(f"text:{p}").data)
    assert ds.n_train == 7 and not ds.notes
    assert all(lines[int(e)] == t for e, t in zip(ds.example_id, ds.texts, strict=True))
    j = tmp_path / "c.jsonl"
    j.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in lines) + "\n")
    ds = load_dataset(_recipe(f"jsonl:{j}").data)
    assert all(lines[int(e)] == t for e, t in zip(ds.example_id, ds.texts, strict=True))


def test_text_source_paths_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(f"line {i}" for i in range(6)))
    rec = {
        "name": "t",
        "data": {"source": "text:c.txt", "val_size": 1, "test_size": 1},
        "model": {"kind": "gpt"},
    }
    from adamshap_core.recipe import load_recipe

    r = load_recipe(write_recipe(tmp_path, rec))
    assert r.data.source == f"text:{tmp_path / 'c.txt'}"


# ---------------------------------------------------------------- recipe fields and model/data pairing


@pytest.mark.parametrize(
    "data, model, fragment",
    [
        ({"source": "builtin:facts", "val_size": 10}, {"kind": "gpt"}, "`data.val_size` does not apply"),
        ({"source": "sklearn:iris", "facts": {"n_facts": 5}}, {"kind": "mlp"}, "`data.facts` only applies"),
        ({"source": "builtin:facts", "target": "y"}, {"kind": "gpt"}, "`data.target` only applies"),
        (
            {"source": "sklearn:iris", "max_words": 5},
            {"kind": "mlp"},
            "`data.max_words` only applies to text",
        ),
        ({"source": "builtin:facts", "max_words": 0}, {"kind": "gpt"}, "greater than or equal to 1"),
        (
            {"source": "builtin:facts"},
            {"kind": "gpt", "d_model": 10, "n_head": 3},
            "multiple of `model.n_head`",
        ),
        ({"source": "builtin:facts", "facts": {"n_facts": 1}}, {"kind": "gpt"}, "data.facts.n_facts"),
        (
            {"source": "builtin:facts", "facts": {"n_facts": 10**9}},
            {"kind": "gpt"},
            "less than or equal to 100000",
        ),
    ],
)
def test_bad_text_recipes_name_the_field(data, model, fragment):
    with pytest.raises(UserError) as e:
        recipe_from_dict({"name": "t", "data": data, "model": model})
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    "data, model, fragment",
    [
        ({"source": "builtin:facts"}, {"kind": "mlp"}, "expected model.kind: gpt"),
        (
            {"source": "sklearn:iris", "val_size": 20, "test_size": 30},
            {"kind": "gpt"},
            "expected model.kind: mlp",
        ),
        ({"source": "builtin:facts"}, {"kind": "gpt", "block_size": 3}, "`model.block_size` is 3"),
        ({"source": "builtin:facts", "label_noise": 0.1}, {"kind": "gpt"}, "`data.label_noise`"),
    ],
)
def test_model_and_data_must_fit(data, model, fragment):
    from adamshap_core.train import prepare

    r = recipe_from_dict({"name": "t", "data": data, "model": model, "train": {"device": "cpu"}})
    with pytest.raises(UserError) as e:
        prepare(r)
    assert fragment in str(e.value)


def test_a_text_run_keeps_texts_and_its_tokenizer(tmp_path, monkeypatch):
    from helpers import cli

    monkeypatch.setenv("ADAMSHAP_RUNS", str(tmp_path / "runs"))
    rec = {
        "name": "txt",
        "data": {"source": "builtin:facts", "facts": {"n_facts": 8}},
        "model": {"kind": "gpt", "n_layer": 1, "d_model": 8},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu"},
    }
    res = cli("train", write_recipe(tmp_path, rec), "-q")
    assert res.exit_code == 0, res.output
    assert "next-token accuracy" in res.output
    run = tmp_path / "runs" / "txt"
    values = pd.read_parquet(run / "values.parquet")
    assert "text" in values.columns and "label" not in values.columns
    assert values["text"].tolist() == [f.text for f in generate(8, 0)[0]]
    vocab = json.loads((run / "tokenizer.json").read_text())["vocab"]
    assert vocab[:4] == list(SPECIALS) and len(vocab) > 4


def test_a_boolean_id_in_jsonl_is_refused(tmp_path):
    """JSON's true is no integer id, though Python's bool is an int."""
    p = tmp_path / "c.jsonl"
    records = ['{"text": "a b", "id": true}', *(f'{{"text": "b c {i}", "id": {i}}}' for i in range(2, 7))]
    p.write_text("\n".join(records) + "\n")
    with pytest.raises(UserError, match=r"line 1 of .* has `id` True; expected an integer"):
        load_dataset(_recipe(f"jsonl:{p}").data)


def test_entity_names_are_distinct_and_never_a_corpus_word_in_a_large_corpus():
    """One fact per entity is the ground truth attribution is scored against: at 20,000 facts the
    names, drawn from syllables as some ordinary words are ("baker"), must still be distinct words."""
    from adamshap_core.data.facts import _vocabulary

    names = [f.entity for f in generate(20_000, seed=0)[0]]
    assert len(set(names)) == len(names)
    assert not set(names) & _vocabulary()
