"""Behaviour tasks (prompt pairs + metric) and the synthetic corpus of the bundled model."""

from tdb_agent.tasks.generators import (
    TaskExample,
    TaskInfo,
    corpus_documents,
    task_examples,
    task_info,
    task_names,
)

__all__ = ["TaskExample", "TaskInfo", "corpus_documents", "task_examples", "task_info", "task_names"]
