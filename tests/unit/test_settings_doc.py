"""Settings declared once: generated .env.example and docs reference match; declarations fill the objects."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from etl_service.settings import docgen
from etl_service.settings.declared import DECLARED, JOB_SETTINGS, SERVICE_SETTINGS
from etl_service.settings.model import JobConfig, Settings
from etl_service.settings.reading import load

ROOT = Path(__file__).resolve().parents[2]
BASE = {"PG_DSN": "postgresql://etl:s3cret@db.example:5432/app", "CLICK_DSN": "chdb:///var/lib/etl/chdb",
        "ETL_SOURCE_TABLE": "public.orders"}
BEGIN = ("<!-- settings-reference:begin (generated from etl_service/settings/declared.py by"
         " `python -m etl_service.settings --reference`; do not edit) -->")
END = "<!-- settings-reference:end -->"


def test_env_example_is_the_generated_one() -> None:
    assert (ROOT / ".env.example").read_text(encoding="utf-8") == docgen.env_example(), \
        "regenerate it: python -m etl_service.settings --env-example > .env.example"


def test_docs_reference_is_the_generated_one() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines.count(BEGIN) == 1 and lines.count(END) == 1, "docs/configuration.md lost its marker lines"
    section = "\n".join(lines[lines.index(BEGIN) + 1:lines.index(END)])
    assert section.strip() == docgen.reference().strip(), \
        "regenerate the part between the markers: python -m etl_service.settings --reference"


def test_every_key_of_the_jobs_example_is_a_declared_job_setting() -> None:
    data = tomllib.loads((ROOT / "config" / "jobs.example.toml").read_text(encoding="utf-8"))
    keys = {setting.key for setting in JOB_SETTINGS}
    used = set(data["defaults"]) | {key for table in data["jobs"].values() for key in table}
    assert used - keys == set()
    assert len(used) >= 10  # the example shows most of what a jobs file can set


def test_the_declarations_fill_every_attribute_of_the_settings_objects() -> None:
    # A job setting's key is its JobConfig attribute; the name comes from ETL_JOB_NAME or [jobs.NAME].
    assert {f.name for f in dataclasses.fields(JobConfig)} == {s.key for s in JOB_SETTINGS} | {"name"}
    built_from_several = {"pg_dsn", "pg_display", "clickhouse", "jobs", "env_file_values"}
    assert {f.name for f in dataclasses.fields(Settings)} == {s.attr for s in SERVICE_SETTINGS} | built_from_several


def test_every_declared_default_is_valid_and_is_the_default() -> None:
    defaults = {s.variable: s.default for s in DECLARED.values() if s.default}
    assert len(defaults) > 25
    assert load(environ={**BASE, **defaults}) == load(environ=BASE)


def test_the_env_example_shows_every_default() -> None:
    lines = dict(line.lstrip("#").split("=", 1) for line in docgen.env_example().splitlines()
                 if re.match(r"#?[A-Z_]+=", line))
    assert set(lines) == set(DECLARED)
    shown = {var: value.strip('"') for var, value in lines.items()}
    assert shown["ETL_SCHEDULE"] == "*/5 * * * *" and shown["ETL_SOURCE_TABLE"] == "public.orders"
    assert [v for v, s in DECLARED.items() if s.example is None and shown[v] != (s.default or "")] == []


def test_test_hooks_are_commented_out_and_not_in_the_reference() -> None:
    hooks = [s.variable for s in DECLARED.values() if s.hidden]
    assert hooks == ["ETL_CRASH_AT", "ETL_FAIL_AT"]
    example, reference = docgen.env_example(), docgen.reference()
    for variable in hooks:
        assert f"\n#{variable}=\n" in example and variable not in reference
    assert "`ETL_BATCH_SIZE` | `batch_size` | `100000` |" in reference


def test_the_generator_prints_both_texts(capsys: pytest.CaptureFixture[str]) -> None:
    assert docgen.main(["--reference"]) == 0
    assert capsys.readouterr().out == docgen.reference()
    assert docgen.main(["--env-example"]) == 0
    assert capsys.readouterr().out == docgen.env_example()


def test_the_module_map_names_every_module() -> None:
    package = ROOT / "etl_service"
    modules = {str(p.relative_to(ROOT)) for p in package.rglob("*.py")}
    text = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(etl_service/[\w/]+\.py)`", text.split("## Module map", 1)[1]))
    assert modules - named == set(), "add these modules to the module map in docs/development.md"
    assert named - modules == set(), "these modules in docs/development.md no longer exist"
