"""A griffe extension: voicefsm's docstrings use reStructuredText roles; the site is Markdown.

``:class:`~voicefsm.service.InterviewService``` becomes a cross-reference that links when the
target is documented on the site and stays plain code when it is not (an optional autoref, so a
reference to another library never fails the build). A ``::`` that introduces an indented code
block becomes ``:``. Loaded by mkdocstrings through ``mkdocs.yml``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:py:)?(?:class|meth|func|attr|mod|data|exc|obj|const|type):`(~?)([^`<>]+?)(\(\))?`"
)
LITERAL_BLOCK = re.compile(r"(\S)::$", re.MULTILINE)


class RstRoles(griffe.Extension):
    """Rewrites the reStructuredText roles in every docstring of the loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite every docstring of ``pkg``, once it is loaded."""
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj.docstring.value, obj, pkg)


def _walk(obj: griffe.Object) -> list[griffe.Object]:
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias and isinstance(member, griffe.Object):
            found += _walk(member)
    return found


def _exists(pkg: griffe.Module, path: str) -> bool:
    if path == pkg.path:
        return True
    if not path.startswith(pkg.path + "."):
        return False
    try:
        pkg[path[len(pkg.path) + 1 :]]
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return True


def _resolve(target: str, obj: griffe.Object, pkg: griffe.Module) -> str:
    """The full path ``target`` means from inside ``obj`` (as written if nothing matches)."""
    scopes: list[str] = []
    scope: griffe.Object | None = obj
    while scope is not None:
        scopes.append(scope.path)
        scope = scope.parent
    for prefix in [*scopes, ""]:
        candidate = f"{prefix}.{target}" if prefix else target
        if _exists(pkg, candidate):
            return candidate
    return target


def _rewrite(text: str, obj: griffe.Object, pkg: griffe.Module) -> str:
    def link(match: re.Match[str]) -> str:
        short, target, call = match.group(1), match.group(2).strip(), match.group(3) or ""
        title = (target.rsplit(".", 1)[-1] if short else target) + call
        identifier = _resolve(target, obj, pkg)
        return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

    return LITERAL_BLOCK.sub(r"\1:", ROLE.sub(link, text))
