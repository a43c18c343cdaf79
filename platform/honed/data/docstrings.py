"""A second worked example, from source-code documentation: question/answer pairs about a Python library's public
functions, read from the docstrings of the installed package (NumPy by default: BSD-3-Clause, a dependency of
honed, so nothing is downloaded).

    python -m honed.data.docstrings runs/pydocs/raw                                # numpy's public functions
    python -m honed.data.docstrings runs/pydocs/raw --modules mylib mylib.io       # your own library's

Writes `<out>/api_qa.csv`, one row per question, with columns `question, answer, function, question_type` —
deliberately not honed's field names, as a user's own files would have them: `jobs/prepare_pydocs.yaml` maps
them with `fields: {prompt: question, response: answer, group: function}`. Three questions per function,
grouped by the function, so a held-out function is unseen in training:

- `summary`:    "What does `numpy.linalg.solve` do?" → the docstring's first paragraph
- `parameters`: "What are the parameters of `numpy.linalg.solve`?" → "a, b" (from the signature, or for
                ufuncs and builtins from the signature line their docstring opens with)
- `lookup`:     "Which numpy function does this: Solve a linear matrix equation, …?" → "numpy.linalg.solve"

A function reachable under two names (`numpy.round`, `numpy.around`) or sharing its summary with an earlier one
(`numpy.ma.sum` and `numpy.sum`) is kept once, under the first name in module order, so a lookup question has one
answer. Functions without a docstring, and summaries over `MAX_SUMMARY_CHARS`, are skipped. The questions depend
on the installed version of the library (NumPy 2.4.6: the default modules give 561 functions, 1,677 questions).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import re
from pathlib import Path

DEFAULT_MODULES = ("numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma")
MAX_SUMMARY_CHARS = 300   # longer first paragraphs are explanations rather than a summary
COLUMNS = ("question", "answer", "function", "question_type")
SIGNATURE_LINE = re.compile(r"^[\w.]+\((.*)\)")


def api_functions(modules: list[str]) -> list[dict]:
    """`{name, summary, parameters}` for each public documented function of `modules`, in module order."""
    functions, seen_objects, seen_summaries = [], set(), set()
    for module_name in modules:
        module = importlib.import_module(module_name)
        for attr in public_names(module):
            obj = getattr(module, attr, None)
            if not callable(obj) or inspect.isclass(obj) or id(obj) in seen_objects:
                continue
            doc = inspect.getdoc(obj) or ""
            summary = first_paragraph(doc)
            if not summary or len(summary) > MAX_SUMMARY_CHARS or summary in seen_summaries:
                continue
            seen_objects.add(id(obj))
            seen_summaries.add(summary)
            functions.append({"name": f"{module_name}.{attr}", "summary": summary,
                              "parameters": parameter_names(obj, doc)})
    return functions


def public_names(module) -> list[str]:
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    return sorted(n for n in names if not n.startswith("_"))


def first_paragraph(doc: str) -> str:
    """The docstring's first paragraph on one line, after a leading signature line (`add(x1, x2, /, ...)`)."""
    paragraphs = [" ".join(p.split()) for p in doc.strip().split("\n\n") if p.strip()]
    if paragraphs and SIGNATURE_LINE.match(paragraphs[0]) and "\n" not in doc.strip().split("\n\n")[0]:
        paragraphs = paragraphs[1:]
    return paragraphs[0] if paragraphs else ""


def parameter_names(obj, doc: str) -> list[str]:
    """Parameter names (`*args`, `**kwargs` marked), from the signature or the docstring's signature line."""
    try:
        return [("*" if p.kind == p.VAR_POSITIONAL else "**" if p.kind == p.VAR_KEYWORD else "") + p.name
                for p in inspect.signature(obj).parameters.values()]
    except (TypeError, ValueError):
        match = SIGNATURE_LINE.match(doc.strip().split("\n", 1)[0]) if doc else None
        if not match:
            return []
        parts = (p.strip().strip("[]").split("=")[0].strip() for p in match.group(1).replace("[", ",").split(","))
        return [p for p in parts if p and p not in ("/", "*")]


def questions(function: dict, library: str) -> list[dict]:
    """The three question rows of one function (`parameters` only when its signature is known)."""
    name = function["name"]
    rows = [(f"What does `{name}` do?", function["summary"], "summary")]
    if function["parameters"]:
        rows.append((f"What are the parameters of `{name}`?", ", ".join(function["parameters"]), "parameters"))
    rows.append((f"Which {library} function does this: {function['summary']}", name, "lookup"))
    return [{"question": q, "answer": a, "function": name, "question_type": kind} for q, a, kind in rows]


def write_api_corpus(out_dir: str | Path, modules: list[str] | tuple[str, ...] = DEFAULT_MODULES) -> Path:
    """Write `out_dir/api_qa.csv`; returns its path."""
    library = modules[0].split(".")[0]
    path = Path(out_dir) / "api_qa.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for function in api_functions(list(modules)):
            writer.writerows(questions(function, library))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m honed.data.docstrings",
                                     description="Write question/answer pairs from a library's docstrings as CSV.")
    parser.add_argument("out_dir", help="directory for api_qa.csv")
    parser.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES),
                        help="importable modules whose public functions are asked about (default: numpy's)")
    args = parser.parse_args(argv)
    try:
        path = write_api_corpus(args.out_dir, args.modules)
    except ImportError as err:
        parser.exit(2, f"python -m honed.data.docstrings: cannot import {err.name!r}: install it, or name modules "
                       f"that are installed\n")
    rows = sum(1 for _ in open(path, encoding="utf-8")) - 1
    print(f"[honed.data.docstrings] {rows} questions → {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
