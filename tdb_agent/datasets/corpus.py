"""The corpus of a dataset build: documents as token ids (each read alone, from the BOS token
when the tokenizer has one), grouped into batches, and the batches cut into chunks that are
built alone and merged in order (`pipeline.build`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tdb_agent.datasets.config import BuildConfig
from tdb_agent.engine.tokens import bos_prefix


def documents_from_text(path: str | Path, tokenizer, n_ctx: int) -> Iterator[list[int]]:
    """Token ids of each non-empty line (BOS first, if the tokenizer has one), split into
    pieces of at most n_ctx."""
    prefix = bos_prefix(tokenizer)
    step = n_ctx - len(prefix)
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            ids = tokenizer(line, add_special_tokens=False)["input_ids"]
            for i in range(0, len(ids), step):
                yield prefix + ids[i:i + step]


def documents_from_corpus(n_docs: int, seed: int, tokenizer, n_ctx: int) -> Iterator[list[int]]:
    """Token ids of `n_docs` documents of the built-in synthetic corpus (BOS first, if the
    tokenizer has one), cut at n_ctx."""
    from tdb_agent.tasks import corpus_documents

    prefix = bos_prefix(tokenizer)
    for i in range(0, n_docs, 1024):
        for text in corpus_documents(min(1024, n_docs - i), seed=seed + i):
            yield (prefix + tokenizer(text, add_special_tokens=False)["input_ids"])[:n_ctx]


def batched(docs: Iterable[list[int]], batch_size: int, sort_buffer: int = 16) -> Iterator[list[list[int]]]:
    """Batches of documents; within a buffer of sort_buffer batches, documents of similar
    length go together (less padding); the order is deterministic."""
    buf: list[list[int]] = []
    for d in docs:
        if len(d) < 2:
            continue
        buf.append(d)
        if len(buf) == batch_size * sort_buffer:
            buf.sort(key=len)
            for i in range(0, len(buf), batch_size):
                yield buf[i:i + batch_size]
            buf = []
    buf.sort(key=len)
    for i in range(0, len(buf), batch_size):
        yield buf[i:i + batch_size]


@dataclass
class Chunk:
    """Consecutive batches built alone: index in the build, the global index of its first
    document, token and batch."""
    index: int
    batches: list[list[list[int]]]
    doc0: int
    tok0: int
    batch0: int

    @property
    def n_tokens(self) -> int:
        return sum(len(d) for b in self.batches for d in b)


def plan_chunks(docs: Iterable[list[int]], cfg: BuildConfig, max_tokens: int | None = None) -> Iterator[Chunk]:
    """The corpus as chunks: chunk 0 is the warm-up (batches until `warmup_docs` documents:
    they fix the quantile edges every later chunk uses), then `checkpoint_every` batches each.
    Lazy: reads the documents as the chunks are consumed."""
    n_doc = n_tok = n_batch = 0
    cur: list[list[list[int]]] = []
    start = (0, 0, 0)
    index = 0
    for batch in batched(docs, cfg.batch_size, cfg.sort_buffer):
        if max_tokens is not None and n_tok >= max_tokens:
            break
        if not cur:
            start = (n_doc, n_tok, n_batch)
        cur.append(batch)
        n_doc, n_tok, n_batch = n_doc + len(batch), n_tok + sum(map(len, batch)), n_batch + 1
        if (n_doc >= cfg.warmup_docs) if index == 0 else len(cur) == cfg.checkpoint_every:
            yield Chunk(index, cur, *start)
            index, cur = index + 1, []
    if cur:
        yield Chunk(index, cur, *start)
