"""The worked example's corpus (honed.data.docstrings): questions from a library's docstrings, written as a CSV with
the user's own column names."""

import csv

import numpy as np
import pytest

from honed.data.docstrings import api_functions, first_paragraph, main, parameter_names, questions, write_api_corpus


def test_first_paragraph_skips_a_signature_line_and_joins_lines():
    assert first_paragraph("add(x1, x2, /, out=None)\n\nAdd arguments\n  element-wise.\n\nMore.") == \
        "Add arguments element-wise."
    assert first_paragraph("Solve a linear matrix equation, or system\nof linear scalar equations.\n\nx") == \
        "Solve a linear matrix equation, or system of linear scalar equations."
    assert first_paragraph("") == ""


def test_parameter_names_from_the_signature_or_the_docstring_line():
    def f(a, b=1, *args, key=None, **kwargs):
        """Do f."""

    assert parameter_names(f, "Do f.") == ["a", "b", "*args", "key", "**kwargs"]
    # `min` has no signature inspect can read: the docstring's first line gives the names
    assert parameter_names(min, "add(x1, x2, /, out=None, *, where=True[, signature])\n\nAdd.") == \
        ["x1", "x2", "out", "where", "signature"]
    assert parameter_names(min, "No signature line.") == []


def test_aliases_and_repeated_summaries_are_kept_once():
    functions = api_functions(["numpy", "numpy.ma"])
    names = [f["name"] for f in functions]
    summaries = [f["summary"] for f in functions]
    assert len(set(summaries)) == len(summaries)
    assert np.abs is np.absolute and "numpy.abs" in names and "numpy.absolute" not in names  # one object
    assert "numpy.sum" in names and "numpy.ma.sum" in names  # two functions, two summaries
    solve = next(f for f in api_functions(["numpy.linalg"]) if f["name"] == "numpy.linalg.solve")
    assert solve["parameters"] == ["a", "b"] and solve["summary"].startswith("Solve a linear matrix equation")


def test_three_questions_per_function_share_its_group():
    rows = questions({"name": "numpy.linalg.solve", "summary": "Solve it.", "parameters": ["a", "b"]}, "numpy")
    assert [(r["question"], r["answer"], r["question_type"]) for r in rows] == [
        ("What does `numpy.linalg.solve` do?", "Solve it.", "summary"),
        ("What are the parameters of `numpy.linalg.solve`?", "a, b", "parameters"),
        ("Which numpy function does this: Solve it.", "numpy.linalg.solve", "lookup")]
    assert {r["function"] for r in rows} == {"numpy.linalg.solve"}
    assert len(questions({"name": "m.f", "summary": "S.", "parameters": []}, "m")) == 2


def test_corpus_csv_has_the_users_column_names(tmp_path, capsys):
    assert main([str(tmp_path), "--modules", "numpy.linalg", "numpy.fft"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "api_qa.csv", encoding="utf-8")))
    assert list(rows[0]) == ["question", "answer", "function", "question_type"]
    assert len(rows) == int(capsys.readouterr().out.split()[1]) > 100
    assert all(r["function"].startswith(("numpy.linalg.", "numpy.fft.")) for r in rows)
    assert write_api_corpus(tmp_path / "again", ["numpy.fft"]).read_text() == \
        write_api_corpus(tmp_path / "twice", ["numpy.fft"]).read_text()  # deterministic


def test_a_module_that_is_not_installed_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--modules", "no_such_library_here"])
    assert exit_info.value.code == 2
    assert "cannot import 'no_such_library_here'" in capsys.readouterr().err
