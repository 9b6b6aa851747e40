"""MkDocs hooks for the voicefsm documentation site (``mkdocs.yml`` names this file).

* One API reference page per public module of the package (``reference/<module>.md``, rendered
  by mkdocstrings) is generated and listed in the nav under "API reference", so a new module is
  documented without anyone editing the nav.
* A page of ``docs/`` that the nav does not name is listed under "More", so no guide is hidden.
* ``<!-- fields: dotted.path.Model -->`` in a page becomes a table of that pydantic model's
  fields (name, type, default, allowed values, meaning), read from the model itself.
* ``<!-- cli-help -->`` becomes the ``--help`` of ``voicefsm`` and of each of its commands, from
  the parser itself.
* Every public module, class, function and method without a docstring is reported as a warning,
  which fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any

import griffe
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import get_plugin_logger
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

log = get_plugin_logger("voicefsm")

PACKAGE = "voicefsm"
REFERENCE_SECTION = "API reference"
MORE_SECTION = "More"
FIELDS_MARKER = re.compile(r"<!--\s*fields:\s*([\w.]+)\s*-->")
CLI_MARKER = "<!-- cli-help -->"
# [text](../voicefsm/protocol.py): a link from a page to the repository, outside the site.
SOURCE_LINK = re.compile(
    r"\[([^\]]+)\]\((?:\.\./)+((?:voicefsm|tests|examples|benchmarks)/[^)#\s]+)\)"
)


def _root(config: MkDocsConfig) -> Path:
    return Path(config.config_file_path).resolve().parent


def public_modules(root: Path) -> list[str]:
    """Dotted names of the package's modules, skipping any with a ``_``-prefixed part."""
    names = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if any(part.startswith("_") for part in parts):
            continue
        names.append(".".join(parts))
    return sorted(names)


def _reference_uri(module: str) -> str:
    return f"reference/{module}.md"


def _nav_uris(nav: Any) -> set[str]:
    found: set[str] = set()
    items = nav if isinstance(nav, list) else [nav]
    for item in items:
        if isinstance(item, str):
            found.add(item)
        elif isinstance(item, dict):
            for value in item.values():
                found |= _nav_uris(value)
    return found


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Fill the "API reference" section of the nav with one entry per public module."""
    root = str(_root(config))
    if root not in sys.path:  # document (and import) the checkout being built, not an install
        sys.path.insert(0, root)
    modules = public_modules(_root(config))
    for item in config.nav or []:
        if isinstance(item, dict) and REFERENCE_SECTION in item:
            pages = list(item[REFERENCE_SECTION] or [])
            pages += [{module: _reference_uri(module)} for module in modules]
            item[REFERENCE_SECTION] = pages
            break
    else:
        log.warning("mkdocs.yml's nav has no %r section for the modules", REFERENCE_SECTION)
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Generate the module pages; list pages the nav does not name under "More"."""
    generated = set()
    for module in public_modules(_root(config)):
        content = f"# `{module}`\n\n::: {module}\n"
        files.append(File.generated(config, _reference_uri(module), content=content))
        generated.add(_reference_uri(module))
    named = _nav_uris(config.nav) | generated
    unnamed = sorted(
        file.src_uri for file in files.documentation_pages() if file.src_uri not in named
    )
    if unnamed and config.nav is not None:
        config.nav.append({MORE_SECTION: unnamed})
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Replace the ``fields`` markers with field tables, the ``cli-help`` marker with help."""
    markdown = SOURCE_LINK.sub(lambda match: _source_link(match, page), markdown)
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_help())
    return FIELDS_MARKER.sub(lambda match: fields_table(match.group(1)), markdown)


def _source_link(match: re.Match[str], page: Page) -> str:
    """A link to a module's source file becomes a link to its reference page."""
    text, path = match.group(1), match.group(2)
    module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    if module.startswith(PACKAGE) and not any(p.startswith("_") for p in module.split(".")):
        depth = page.file.src_uri.count("/")
        return f"[{text}]({'../' * depth}{_reference_uri(module)})"
    return text  # a test or a script: no page on the site, keep the words


def cli_help() -> str:
    """``voicefsm --help`` and each command's ``--help``, as Markdown sections."""
    import argparse
    import os

    from voicefsm.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; the page has no terminal
    parser = build_parser()
    sections = [f"```text\n{parser.format_help()}```\n"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                sections.append(f"## `voicefsm {name}`\n\n```text\n{command.format_help()}```\n")
    return "\n".join(sections)


def on_pre_build(config: MkDocsConfig) -> None:
    """Warn about every public module, class, function or method that has no docstring."""
    package = griffe.load(PACKAGE, search_paths=[str(_root(config))], resolve_aliases=False)
    for path in sorted(_undocumented(package)):
        log.warning("no docstring: %s", path)


def _undocumented(obj: griffe.Object) -> list[str]:
    missing = []
    if obj.docstring is None or not obj.docstring.value.strip():
        missing.append(obj.path)
    for name, member in obj.members.items():
        if name.startswith("_") or member.is_alias:
            continue
        if isinstance(member, griffe.Module | griffe.Class) or (
            isinstance(member, griffe.Function) and not _is_overload_or_property_setter(member)
        ):
            missing += _undocumented(member)
    return missing


def _is_overload_or_property_setter(function: griffe.Function) -> bool:
    labels = function.labels
    return "overload" in labels or "setter" in labels or "deleter" in labels


# ------------------------------------------------------------------------------ field tables


def fields_table(dotted: str) -> str:
    """A Markdown table of a pydantic model's fields, from the model itself."""
    module_name, _, name = dotted.rpartition(".")
    model = getattr(importlib.import_module(module_name), name)
    where = f"{model.__module__}.{model.__qualname__}"  # where it is defined, wherever imported
    rows = [
        f'Defined in <autoref identifier="{where}" optional><code>{where}</code></autoref>.',
        "",
        "| field | type | default | allowed | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for field_name, info in model.model_fields.items():
        if not info.description:
            log.warning("%s.%s has no description", dotted, field_name)
        default = info.get_default(call_default_factory=True)
        rows.append(
            "| "
            + " | ".join(
                [
                    f"`{field_name}`",
                    f"`{_type_name(info.annotation)}`",
                    _cell(_format_default(default)),
                    _cell(_constraints(info.metadata)),
                    _cell(info.description or ""),
                ]
            )
            + " |"
        )
    return "\n".join(rows) + "\n"


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _format_default(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"`{value}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int | float):
        text = f"`{value:_}`".replace("_", " ") if isinstance(value, int) else f"`{value:g}`"
        return text
    if isinstance(value, str):
        return f"`{value!r}`" if len(value) <= 30 else f'"{value}"'
    return f"`{value!r}`"


_BOUNDS = {
    "gt": ">",
    "ge": "≥",
    "lt": "<",
    "le": "≤",
    "min_length": "length ≥",
    "max_length": "length ≤",
}


def _constraints(metadata: list[Any]) -> str:
    parts = []
    for item in metadata:
        for attribute, symbol in _BOUNDS.items():
            bound = getattr(item, attribute, None)
            if bound is not None:
                parts.append(
                    f"{symbol} {bound:g}" if isinstance(bound, float) else f"{symbol} {bound}"
                )
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
