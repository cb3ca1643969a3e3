"""The settings' text, generated from their declarations (`declared.SECTIONS`): `.env.example` and the reference.

`python -m etl_service.settings --env-example` prints `.env.example`, `--reference` the Markdown table
that docs/configuration.md holds between its settings-reference markers; unit tests fail when either
checked-in copy differs from what is generated here, so edit the declarations, then regenerate.
"""

from __future__ import annotations

import argparse
import re
import textwrap

from etl_service.settings.declared import SECTIONS, Section, Setting

ENV_HEADER = """\
# etl-service settings. Copy to .env (never commit .env) and edit; restart the service after a change.
# Variables already set in the process environment win over this file.
# Empty means "not set": the default applies. Each setting below is set to its default (or an example).
# Generated from etl_service/settings/declared.py by `python -m etl_service.settings --env-example`: edit it there.
"""


def env_example() -> str:
    """The whole `.env.example`: every setting with its help and default, by section."""
    return ENV_HEADER + "".join(_env_section(section) for section in SECTIONS)


def _env_section(section: Section) -> str:
    lines = ["", f"# ---- {section.title} ----", *_comment(section.notes)]
    for setting in section.settings:
        lines += _comment(setting.help)
        # A test hook is there to be found, not to be set: commented out.
        lines.append(f"{'#' if setting.hidden else ''}{setting.variable}={_env_value(setting)}")
    return "\n".join(lines) + "\n"


def _comment(text: str) -> list[str]:
    # Long URLs and paths stay whole on their line.
    return textwrap.wrap(text, 100, initial_indent="# ", subsequent_indent="# ", break_long_words=False,
                         break_on_hyphens=False)


def _env_value(setting: Setting) -> str:
    value = setting.example if setting.example is not None else setting.default or ""
    if re.search(r"[\s#\"'\\]", value):  # dotenv reads these unquoted as a comment, a cut, or an escape
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def reference() -> str:
    """The settings reference in Markdown: per section, a table of variable, jobs-file key, default and help."""
    return "\n\n".join(filter(None, (_reference_section(section) for section in SECTIONS))) + "\n"


def _reference_section(section: Section) -> str:
    shown = [setting for setting in section.settings if not setting.hidden]
    if not shown:
        return ""
    with_keys = any(setting.key for setting in shown)
    head = ["Variable", *(["Jobs-file key"] if with_keys else []), "Default", "Description"]
    rows = [_row(head), _row(["---"] * len(head))]
    for setting in shown:
        key = [f"`{setting.key}`" if setting.key else "—"] if with_keys else []
        rows.append(_row([f"`{setting.variable}`", *key, _shown_default(setting), setting.help]))
    notes = [section.notes, ""] if section.notes else []
    return "\n".join([f"## {section.title}", "", *notes, *rows])


def _shown_default(setting: Setting) -> str:
    if setting.default is None:
        return "required"
    return f"`{setting.default}`" if setting.default else "(empty)"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def main(argv: list[str]) -> int:
    """`python -m etl_service.settings --env-example | --reference`: print the generated text."""
    parser = argparse.ArgumentParser(prog="python -m etl_service.settings",
                                     description="Print text generated from the settings' declarations.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--env-example", action="store_true", help="the full .env.example")
    which.add_argument("--reference", action="store_true", help="the Markdown settings reference")
    args = parser.parse_args(argv)
    print(env_example() if args.env_example else reference(), end="")
    return 0
