"""The documentation site's build hooks (tools/): generated tables, module pages, docstrings.

``.ci/run`` builds the whole site with ``mkdocs build --strict``; these tests pin down what the
hooks generate and what they refuse, quickly and without a build.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from voicefsm.model import SessionConfig
from voicefsm.web.decoder import ProtocolLimits

if os.environ.get("CI", "").lower() == "true":  # under CI the docs extra must be there
    import griffe
    import mkdocs  # noqa: F401
else:
    pytest.importorskip(
        "mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')"
    )
    griffe = pytest.importorskip("griffe")

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


hooks = _load("mkdocs_hooks")
rst = _load("griffe_rst")


@pytest.mark.parametrize("model", [SessionConfig, ProtocolLimits])
def test_the_field_table_has_every_field_with_its_default(model: type) -> None:
    table = hooks.fields_table(f"{model.__module__}.{model.__name__}")
    assert table.startswith(f'Defined in <autoref identifier="{model.__module__}.{model.__name__}"')
    rows = table.strip().splitlines()[4:]
    fields = model.model_fields  # type: ignore[attr-defined]
    assert [row.split(" | ")[0] for row in rows] == [f"| `{name}`" for name in fields]
    for row, (name, info) in zip(rows, fields.items(), strict=True):
        assert info.description, f"{name} has no description"
        assert info.description.replace("|", "\\|") in row
        default = info.default
        if isinstance(default, float | int) and not isinstance(default, bool):
            whole = float(default).is_integer()
            shown = f"{int(default):,}".replace(",", " ") if whole else str(default)
            assert f"| `{shown}` |" in row, row


def test_the_session_config_table_shows_limits_and_defaults() -> None:
    table = hooks.fields_table("voicefsm.model.SessionConfig")
    assert "\n| `time_limit_s` | `float` | `2 700` | ≥ " in table  # 45 minutes, a lower bound
    assert "| `resume_backoff_jitter` | `float` | `0.5` | ≥ 0, ≤ 1 |" in table
    assert "| `forward_transcripts` | `bool` | `False` |" in table


def test_every_public_module_gets_a_page_and_private_ones_do_not() -> None:
    modules = hooks.public_modules(ROOT)
    assert {"voicefsm", "voicefsm.service", "voicefsm.interview_cli", "voicefsm.testing"} <= set(
        modules
    )
    assert not [m for m in modules if any(part.startswith("_") for part in m.split("."))]


def test_a_public_name_without_a_docstring_is_reported(tmp_path: Path) -> None:
    package = tmp_path / "demo_pkg"
    package.mkdir()
    (package / "__init__.py").write_text('"""A package."""\n')
    (package / "mod.py").write_text(
        '"""A module."""\n\n'
        "def undocumented():\n    pass\n\n"
        'def documented():\n    """Says what it does."""\n\n'
        "def _private():\n    pass\n\n"
        'class Thing:\n    """A thing."""\n\n    def method(self):\n        pass\n'
    )
    (package / "_hidden.py").write_text("def anything():\n    pass\n")
    loaded = griffe.load("demo_pkg", search_paths=[str(tmp_path)], resolve_aliases=False)
    assert sorted(hooks._undocumented(loaded)) == [
        "demo_pkg.mod.Thing.method",
        "demo_pkg.mod.undocumented",
    ]


def test_voicefsm_has_a_docstring_on_every_public_name() -> None:
    loaded = griffe.load("voicefsm", search_paths=[str(ROOT)], resolve_aliases=False)
    assert hooks._undocumented(loaded) == []


def test_rst_roles_become_optional_cross_references() -> None:
    loaded = griffe.load(
        "voicefsm",
        search_paths=[str(ROOT)],
        resolve_aliases=False,
        extensions=griffe.load_extensions(str(ROOT / "tools" / "griffe_rst.py")),
    )
    text = loaded["service.InterviewService"].docstring.value
    assert ":class:" not in text
    assert '<autoref identifier="voicefsm.adk.AdkUpstream" optional><code>AdkUpstream' in text
    # A role naming something outside the package stays code, as an optional reference.
    converted = rst._rewrite("see :class:`google.genai.Client`::", loaded, loaded)
    assert converted == (
        'see <autoref identifier="google.genai.Client" optional>'
        "<code>google.genai.Client</code></autoref>:"
    )
