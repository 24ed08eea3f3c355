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
    help: str  # what it is, in the error that lists the sources


SOURCES: dict[str, Source] = {}


def register_source(scheme: str, *, names: tuple[str, ...] | None = None, help: str = ""):
    def deco(fn: Callable) -> Callable:
        SOURCES[scheme] = Source(scheme, fn, names, help)
        return fn

    return deco


def split_source(source: str) -> tuple[str, str]:
    scheme, sep, rest = source.partition(":")
    return (scheme.strip(), rest.strip()) if sep else ("", source.strip())


def takes_path(source: str) -> bool:
    """Whether the source's ``rest`` is a file path (resolved against the recipe's folder)."""
    src = SOURCES.get(split_source(source)[0])
    return src is not None and src.names is None


def check_source(source: str) -> None:
    """Raise ValueError (with the accepted forms) unless ``source`` names a registered source."""
    scheme, rest = split_source(source)
    src = SOURCES.get(scheme)
    if src is None or not rest or (src.names is not None and rest not in src.names):
        forms = [
            f"{s.scheme}:{'|'.join(s.names) if s.names else 'PATH'}" + (f" ({s.help})" if s.help else "")
            for s in SOURCES.values()
        ]
        raise ValueError(f"unknown dataset {source!r}; expected one of: {'; '.join(forms)}")
