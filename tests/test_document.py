"""The results document and the README's summary of it are generated from the committed JSON: regenerating them
changes nothing, and a number typed into the template's prose is refused."""
import json
from pathlib import Path

import pytest

from gmmcond.experiments import document

REPO = Path(__file__).resolve().parent.parent


def test_the_results_document_and_the_readme_summary_regenerate_byte_for_byte():
    for path, text in document.build(REPO).items():
        assert path.read_text() == text, f"{path.relative_to(REPO)} is stale: run python launch/reproduce.py document"


def test_the_readme_summarises_the_numbers_of_the_results_document():
    results = (REPO / "launch" / "figures" / "RESULTS.md").read_text()
    readme = (REPO / "README.md").read_text()
    block = document.summary(readme)
    assert block.strip() and block == document.summary(results)


def test_the_readme_is_a_manual_of_at_most_400_lines_of_120_characters():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 400
    assert [i for i, line in enumerate(lines, 1) if len(line) > 120] == []
    assert lines.index("## Quickstart") < 25  # the two commands come first


def test_placeholders_are_filled_from_the_json(tmp_path):
    result = {"arms": {"a": {"x": {"mean": 0.5, "std": 0.25, "n": 2},
                             "per_seed": [{"seed": 0, "x": 0.3}, {"seed": 1, "x": 0.7}]},
                       "b": {"per_seed": [{"seed": 0, "x": 0.1}, {"seed": 1, "x": 0.2}]}},
              "t": 12.3456}
    (tmp_path / "r.json").write_text(json.dumps(result))
    text = "{{v|r.json|t|.2f}} / {{pm|r.json|arms>a>x|2}} / {{paired|r.json|a|b|x|2}} / {{x|r.json|arms>a>x>mean|t|3}}"
    assert document.render(text, tmp_path) == "12.35 / 0.50 +- 0.25 / +0.35 +- 0.21 (2 of 2 > 0) / 0.041x"


def test_a_per_seed_index_names_the_seed_not_the_position(tmp_path):
    """Parallel workers finish seeds out of order: per_seed>1 is seed 1's record wherever it sits, and a seed the
    records lack is an error that lists the seeds they hold."""
    result = {"arms": {"a": {"per_seed": [{"seed": 2, "x": 0.9}, {"seed": 0, "x": 0.1}, {"seed": 1, "x": 0.5}]}},
              "plain": [10, 20, 30]}
    (tmp_path / "r.json").write_text(json.dumps(result))
    assert document.render("{{v|r.json|arms>a>per_seed>1>x|.1f}} {{v|r.json|plain>1|d}}", tmp_path) == "0.5 20"
    with pytest.raises(document.DocumentError, match=r"seed 3 \(the records hold seeds \[0, 1, 2\]\)"):
        document.render("{{v|r.json|arms>a>per_seed>3>x|.1f}}", tmp_path)
    from gmmcond.experiments.runner import summarise_records
    assert [r["seed"] for r in summarise_records(result["arms"]["a"]["per_seed"])["per_seed"]] == [0, 1, 2]


def test_a_paired_placeholder_reads_its_base_from_another_json_by_seed(tmp_path):
    """paired_with: the base arm ran under another command; seeds pair by number, a seed only one side has is left
    out, and the same arm in one file pairs exactly as paired does."""
    new = {"arms": {"a": {"per_seed": [{"seed": 0, "x": 0.5}, {"seed": 2, "x": 0.9}]}}}
    (tmp_path / "new.json").write_text(json.dumps(new))
    (tmp_path / "old.json").write_text(json.dumps({"arms": {"b": _per_seed([0.0, 0.1, 0.2])}}))
    assert document.render("{{paired_with|new.json|a|old.json|b|x|2}}", tmp_path) == "+0.60 +- 0.14 (2 of 2 > 0)"
    # the verdict on the same differences (0.5 and 0.7: the mean 0.6 is six standard errors above zero)
    assert document.render("{{verdict_with|new.json|a|old.json|b|x|higher}}", tmp_path) == "held"
    assert document.render("{{verdict_with|new.json|a|old.json|b|x|lower}}", tmp_path) == "did not hold"
    with pytest.raises(document.DocumentError, match="KeyError"):
        document.render("{{paired_with|new.json|a|old.json|c|x|2}}", tmp_path)


def test_a_placeholder_that_cannot_be_filled_names_itself(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(document.DocumentError, match=r"\{\{v\|r.json\|b\|d\}\}.*KeyError"):
        document.render("{{v|r.json|b|d}}", tmp_path)
    with pytest.raises(document.DocumentError, match="no such JSON"):
        document.render("{{v|missing.json|a|d}}", tmp_path)


def test_numbers_typed_into_the_prose_are_refused_and_settings_in_code_spans_are_not():
    assert document.check_template("conformity 0.846 on four seeds") == ["conformity 0.846 on four seeds"]
    assert document.check_template("defects fell to 4.9% here") != []
    assert document.check_template("sampled at `renoise: 0.5`, 6000 steps, Sec. 3.3, {{v|a.json|b|.3f}}") == []
    assert document.check_template("a `multi-line\ncode span 0.5` and [a link](x_0.5.png)") == []


def _per_seed(values):
    return {"per_seed": [{"seed": s, "x": v} for s, v in enumerate(values)]}


@pytest.mark.parametrize("arm, claimed, text", [
    # differences 0.3, 0.5, 0.4: mean 0.4, std 0.1, standard error 0.0577; decided either way round
    ([0.3, 0.5, 0.4], "higher", "held"),
    ([0.3, 0.5, 0.4], "lower", "did not hold"),
    # differences 0.1, -0.02, 0.1: mean 0.06, std 0.0693; 2 std / sqrt(n) is 0.0620 at n = 5 and 0.0566 at n = 6
    ([0.1, -0.02, 0.1], "higher", "undecided at this scale (about 6 seeds would decide a gap this size)"),
    # differences 0.1, -0.1, 0.001: a mean of 0.000333 against a std near 0.1
    ([0.1, -0.1, 0.001], "higher", "undecided at this scale, no lean (more than 100 seeds would decide a gap this size)"),
    ([0.1, -0.1], "higher", "undecided at this scale, no lean (the paired differences average to zero)"),
    ([0.1], "higher", "undecided at this scale (one seed)"),  # no spread to judge by
])
def test_a_verdict_placeholder_applies_the_twice_the_standard_error_rule(tmp_path, arm, claimed, text):
    result = {"arms": {"a": _per_seed(arm), "b": _per_seed([0.0] * len(arm))}}
    (tmp_path / "r.json").write_text(json.dumps(result))
    assert document.render(f"{{{{verdict|r.json|a|b|x|{claimed}}}}}", tmp_path) == text
    with pytest.raises(document.DocumentError, match="'higher' or 'lower'"):
        document.render("{{verdict|r.json|a|b|x|up}}", tmp_path)


def test_the_budget_table_orders_arms_by_steps_with_the_ratio_of_their_means():
    def result(steps, seen, held):
        stat = lambda m: {"mean": m, "std": 0.01, "n": 3}  # noqa: E731
        return {"steps": steps, "arms": {"tokens": {"conformity_seen": stat(seen), "conformity_held_out": stat(held),
                                                    "defects_held_out": stat(0.05)}}}

    longer = result(12000, 0.9, 0.81)
    recipe = result(6000, 0.8, 0.4)
    recipe["arms"]["dropout"] = recipe["arms"]["tokens"]  # measured at one length only: left out
    table = document.TABLES["budget"](longer, recipe)
    rows = table.splitlines()[2:]
    assert rows == ["| tokens | 6000 | 3 | 0.800 +- 0.010 | 0.400 +- 0.010 | 0.50x | 0.050 +- 0.010 |",
                    "| tokens | 12000 | 3 | 0.900 +- 0.010 | 0.810 +- 0.010 | 0.90x | 0.050 +- 0.010 |"]
