"""Activation datasets: a streaming top-k builder, the on-disk store and its queries.

The names below load on first use (PEP 562), so that `tdb_agent.datasets.command` (the
`build-dataset` flags, built with every `tdb-agent` command line) loads no model library."""

from __future__ import annotations

_WHERE = {"BuildConfig": "config", "documents_from_corpus": "corpus", "documents_from_text": "corpus",
          "build": "pipeline", "ActivationDataset": "store", "DatasetMismatch": "store", "Example": "store"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from tdb_agent.datasets import config, corpus, pipeline, store
    return getattr({"config": config, "corpus": corpus, "pipeline": pipeline, "store": store}[_WHERE[name]], name)
