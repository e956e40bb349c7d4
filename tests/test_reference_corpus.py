"""Mean ablation averages over the model folder's own `reference.txt` where there is one."""

import shutil

import torch

from tdb_agent.engine import Engine
from tdb_agent.ops.runs import REFERENCE_FILE, reference_documents, reference_means
from tdb_agent.tasks import corpus_documents


def test_model_folder_reference_corpus(tiny_dirs, tmp_path):
    folder = shutil.copytree(tiny_dirs["gpt2"], tmp_path / "m")
    plain = Engine.load(folder)
    assert reference_documents(plain)[:3] == corpus_documents(48, seed=4242)[:3]

    docs = ["Mary went to the store", "John gave a drink to Mary", "the cat sat"]
    (folder / REFERENCE_FILE).write_text("\n".join(docs) + "\n\n")
    engine = Engine.load(folder)
    assert reference_documents(engine) == docs
    site = "blocks.0.hook_resid_post"
    got = reference_means(engine, [site])[site]
    # by hand: a plain transformers forward over the three documents, every token averaged
    hs = []
    for d in docs:
        ids = engine.to_tokens(d)
        out = engine.model(ids, output_hidden_states=True)
        hs.append(out.hidden_states[1][0])
    want = torch.cat(hs).mean(0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_reference_documents_longer_than_the_context_are_cut(tiny_dirs, tmp_path):
    """Mean ablation on a model whose context is shorter than a reference document: the
    document's first n_ctx tokens count, no PromptTooLong."""
    folder = shutil.copytree(tiny_dirs["gpt2"], tmp_path / "m")
    engine = Engine.load(folder)
    n_ctx = engine.spec.n_ctx
    long_doc = " ".join(["Mary"] * (n_ctx + 20))
    (folder / REFERENCE_FILE).write_text(long_doc + "\n")
    engine = Engine.load(folder)
    site = "blocks.0.hook_resid_post"
    got = reference_means(engine, [site])[site]
    ids = engine.to_tokens(long_doc, truncate=True)
    assert ids.shape[1] == n_ctx
    want = engine.model(ids, output_hidden_states=True).hidden_states[1][0].mean(0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
