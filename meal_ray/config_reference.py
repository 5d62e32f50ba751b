"""The configuration reference (docs/configuration.md), generated from the config dataclasses themselves: every key,
its default and the comment written beside it in meal_ray/config.py. A test compares the file with what this module
generates, so the reference cannot drift from the code.

    python -m meal_ray.config_reference > docs/configuration.md
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
from pathlib import Path

from meal_ray import config

#: (heading, dataclass, key prefix, what it is) in the order the reference shows them
SECTIONS = (
    ("Job", config.JobConfig, "", "the top of a job YAML (`meal-ray pretrain|distill|relabel|plan --config`)"),
    ("data", config.DataConfig, "data.", "the dataset, crops and loaders"),
    ("student", config.ModelConfig, "student.", "the model being trained"),
    ("teachers", config.TeachersConfig, "teachers.", "where the soft labels come from"),
    ("teachers.models[]", config.TeacherSpec, "teachers.models.N.", "one teacher (also `args.teachers[]` of a Serve "
                                                                     "config)"),
    ("optim", config.OptimConfig, "optim.", "the schedule and optimizer"),
    ("loss", config.LossConfig, "loss.", "MEAL V2's loss"),
    ("run", config.RunConfig, "run.", "workers, placement, checkpoints, tracking"),
    ("Serve application `args`", config.TeacherAppConfig, "args.",
     "`args:` of the teacher application in a Serve config (`import_path: meal_ray.serve.app:build_app`)"),
    ("args.data", config.TeacherDataConfig, "args.data.", "the training set the replicas read for crop-box requests"),
    ("args.emulate", config.EmulateConfig, "args.emulate.", "benchmark replicas that sleep as a teacher computes"),
)


def _class_source(cls) -> str:
    """A top-level class statement's lines: from its ``class Name`` line to the first line back at column 0. Not
    ``inspect.getsource``, which parses the whole module with ``ast``: CPython 3.11 before 3.11.8 can raise a spurious
    "AST constructor recursion depth mismatch" SystemError there while other threads run (Ray's, in the test suite;
    CPython issue 106905)."""
    lines = Path(inspect.getsourcefile(cls)).read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if re.match(rf"class {cls.__name__}\b", line))
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t"):
        end += 1
    return "".join(lines[start:end])


def field_comments(cls) -> dict:
    """Field name -> the comment beside it in the class body (a trailing comment, continued on comment-only lines
    below it)."""
    source = _class_source(cls)
    comments: dict = {}
    continued: set = set()  # comment-only lines indented past the "#" (they continue the comment above them)
    code_lines: set = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments.setdefault(tok.start[0], tok.string.lstrip("#").strip())
            if tok.string.startswith("#  "):
                continued.add(tok.start[0])
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    names = {f.name for f in dataclasses.fields(cls)}
    out, current, above = {}, None, ""
    for number, line in enumerate(source.splitlines(), start=1):
        head = line.strip().split(":", 1)[0]
        if line.startswith("    ") and not line.startswith("     ") and head in names and ":" in line:
            current = head
            out[current] = " ".join(t for t in (above, comments.get(number, "")) if t)
            above = ""
        elif number in code_lines:
            current, above = None, ""
        elif number in comments and number not in continued and line.startswith("    #"):  # above the next field
            above = f"{above} {comments[number]}".strip()
            current = None
        elif current and number in comments:  # a comment-only line continuing the field's trailing comment
            out[current] = f"{out[current]} {comments[number]}".strip()
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def reference_markdown() -> str:
    lines = ["# Configuration reference", "",
             "Every key of a job config (`jobs/*.yaml`, `--set section.key=value`) and of the Serve teacher "
             "application's `args`, with its default and what it does. Generated from `meal_ray/config.py` by "
             "`python -m meal_ray.config_reference > docs/configuration.md`; `tests/test_layout.py` checks it is "
             "current. Unknown keys and bad values are refused by name before anything starts.", ""]
    for heading, cls, prefix, what in SECTIONS:
        comments = field_comments(cls)
        lines += [f"## {heading}", "", f"{what[0].upper()}{what[1:]}.", "", "| key | default | what it does |",
                  "|---|---|---|"]
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or f.name in ("data", "student", "teachers", "optim", "loss", "run") \
                    and cls is config.JobConfig:
                continue
            text = comments.get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{prefix}{f.name}` | `{_default(f)}` | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
