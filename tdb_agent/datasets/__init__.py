"""Activation datasets: a streaming top-k builder, the on-disk store and its queries."""

from tdb_agent.datasets.config import BuildConfig
from tdb_agent.datasets.corpus import documents_from_corpus, documents_from_text
from tdb_agent.datasets.pipeline import build
from tdb_agent.datasets.store import ActivationDataset, DatasetMismatch, Example

__all__ = ["ActivationDataset", "BuildConfig", "DatasetMismatch", "Example", "build", "documents_from_corpus",
           "documents_from_text"]
