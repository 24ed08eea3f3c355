"""Registry of data sources: ``scheme:rest`` -> a loader that builds a ``Dataset``.

A loader is ``fn(rest: str, cfg: DataCfg, *, image: bool) -> Dataset``.
Register a new source (a text corpus, say) with ``@register_source("jsonl")``;
names a scheme accepts (``sklearn:digits``) are declared with ``names=``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    scheme: str
    loader: Callable
    names: tuple[str, ...] | None  # the values ``rest`` may take; None = any (a path, say)
    help: str
    kind: str = "tabular"  # "tabular" (features and class labels) or "text" (a corpus for a language model)


SOURCES: dict[str, Source] = {}


def register_source(
    scheme: str, *, names: tuple[str, ...] | None = None, help: str = "", kind: str = "tabular"
):
    def deco(fn: Callable) -> Callable:
        SOURCES[scheme] = Source(scheme, fn, names, help, kind)
        return fn

    return deco


def split_source(source: str) -> tuple[str, str]:
    scheme, sep, rest = source.partition(":")
    return (scheme.strip(), rest.strip()) if sep else ("", source.strip())


def known_sources() -> list[str]:
    out = []
    for s in SOURCES.values():
        out += [f"{s.scheme}:{n}" for n in s.names] if s.names else [f"{s.scheme}:PATH"]
    return out


def source_kind(source: str) -> str:
    """ "tabular" or "text" for a registered source ("" for an unknown one)."""
    src = SOURCES.get(split_source(source)[0])
    return src.kind if src else ""


def takes_path(source: str) -> bool:
    """Whether the source's ``rest`` is a file path (resolved against the recipe's folder)."""
    src = SOURCES.get(split_source(source)[0])
    return src is not None and src.names is None


def check_source(source: str) -> None:
    """Raise ValueError (with the accepted forms) unless ``source`` names a registered source."""
    scheme, rest = split_source(source)
    src = SOURCES.get(scheme)
    if src is None or not rest or (src.names is not None and rest not in src.names):
        raise ValueError(f"unknown dataset {source!r}; expected one of: {', '.join(known_sources())}")
