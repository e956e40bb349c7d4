"""On the bundled trained model: a circuit of the heads that attribution ranks highest on IOI
is far more faithful than one of as many random heads (skips until the model is built)."""

import random

from tdb_agent import circuits as C
from tdb_agent import ops
from tdb_agent.ops.runs import RunCache

IOI = C.Behaviour(task="ioi", n=16, seed=0)
N_HEADS = 6


def top_and_random(engine, n_random: int = 3) -> tuple[float, list[float], list[str]]:
    """Heads ranked by act x grad against the corrupted prompt (attribution patching, which
    sees indirect effects too) summed over 8 pairs; both circuits keep every MLP block, which
    the IOI heads read (MLP0 works as an extended embedding)."""
    cache = RunCache(engine)
    pairs = IOI.resolve()
    total: dict[str, float] = {}
    for p in pairs[:8]:
        r = ops.attribute(engine, p.prompt, p.target, p.distractor, method="act_times_grad",
                          corrupted_prompt=p.corrupted_prompt, kinds=["head"], top_k=None, cache=cache)
        for row in r.rows:
            total[row.id] = total.get(row.id, 0.0) + row.effect
    top = sorted(total, key=lambda k: -total[k])[:N_HEADS]
    mlps = [f"L{l}.MLP" for l in range(engine.spec.n_layers)]
    others = [h for h in total if h not in top]

    def f(heads):
        g = C.new_circuit("c", behaviour=IOI)
        for n in heads + mlps:
            C.add_node(g, n, engine=engine)
        return C.validate(engine, g, mode="resample", necessity=False, cache=cache).faithfulness
    return f(top), [f(random.Random(s).sample(others, N_HEADS)) for s in range(n_random)], top


def test_top_attributed_heads_beat_random_heads(bundled):
    top, rand, heads = top_and_random(bundled)
    assert top > 0.5, (top, heads)
    assert top > max(rand) + 0.3, (top, rand, heads)
