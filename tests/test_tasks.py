"""Prompt pairs of the built-in tasks: the corrupted prompt removes what makes the target right."""

from tdb_agent.tasks import task_examples


def test_induction_corrupted_prompt_leaves_nothing_to_copy():
    for ex in task_examples("induction", 300, seed=0):
        clean, corrupt = ex.prompt.split(), ex.corrupted_prompt.split()
        assert len(clean) == len(corrupt) and clean[-1] == corrupt[-1]
        # the clean prompt has the bigram (last word -> target) earlier; the corrupted one must not
        assert any(a == clean[-1] and b == ex.target for a, b in zip(clean, clean[1:]))
        assert not any(a == corrupt[-1] and b == ex.target for a, b in zip(corrupt, corrupt[1:]))
