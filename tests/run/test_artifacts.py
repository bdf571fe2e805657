"""samples.md (run/artifacts.py): what a model generated is shown, whitespace included."""

from mistral_qlora.run.artifacts import samples_markdown, shown_answer, visible_whitespace


def test_an_answer_of_newlines_is_shown_as_visible_whitespace_not_as_empty():
    md = samples_markdown(["Q?"], ["\n\n"], [" \n\t"])
    before, after = md.split("**After:**")
    assert "`⏎⏎`" in before and "`␠⏎⇥`" in after
    assert "_(empty)_" not in md


def test_answers_with_text_are_trimmed_and_nothing_generated_is_empty():
    assert shown_answer("\nParis.\n") == "Paris."
    assert shown_answer("") == "_(empty)_"
    assert visible_whitespace("a b\n") == "a␠b⏎"
