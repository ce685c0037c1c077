"""Reading a recipe file: safe YAML, with numbers in scientific notation.

PyYAML's safe loader, guarded against alias bombs, deep nesting and duplicate keys, and
reading ``1e-3`` as a number, as YAML 1.2 and JSON do (YAML 1.1 wants a dot in the
mantissa, ``1.0e-3``, and makes ``1e-3`` a string). Errors are one line naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line naming the file and key."""


def read_yaml(path: Path) -> Any:
    """The YAML document of a recipe file (at most 1 MB of UTF-8 text)."""
    where = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"{where}: recipe file not found") from None
    except OSError as e:
        raise RecipeError(f"{where}: cannot read recipe: {e.strerror}") from None
    if len(data) > 1_000_000:
        raise RecipeError(f"{where}: recipe file is larger than 1 MB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{where}: not a UTF-8 text file") from None
    return _safe_yaml(text, where)


def yaml_value(text: str) -> Any:
    """A ``--set key=value``'s value as YAML reads it (the text itself if it is not YAML)."""
    try:
        return yaml.load(text, Loader=_Loader) if text.strip() else ""  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError:
        return text


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading 1e-3 and 5E+4 as numbers, as YAML 1.2 and JSON do
    (YAML 1.1 wants a dot in the mantissa: 1.0e-3); they were strings before."""


class Scientific(float):
    """A number written like 1e-3, with its text: a key that takes a string gets the text
    (``valid_split: 2e1`` stays the split "2e1")."""

    text = ""


def _scientific(loader, node) -> Scientific:
    value = Scientific(loader.construct_scalar(node).replace("_", ""))
    value.text = node.value
    return value


_SCIENTIFIC = "tag:nmt,2026:scientific"
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    _SCIENTIFIC, re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."),
)
_Loader.add_constructor(_SCIENTIFIC, _scientific)


def _safe_yaml(text: str, where: str) -> Any:
    class _Guarded(_Loader):
        pass

    aliases = 0

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = key_node.value
            if not isinstance(key, str):  # a list or mapping as a key: PyYAML's own error says so
                continue
            if key in keys:
                raise RecipeError(f"{where}: line {key_node.start_mark.line + 1}: key {key!r} given twice")
            keys.add(key)
        return yaml.SafeLoader.construct_mapping(self, node, deep)

    def compose_node(self, parent, index):
        nonlocal aliases
        if self.check_event(yaml.events.AliasEvent):
            aliases += 1
            if aliases > 20:
                raise RecipeError(f"{where}: too many YAML aliases (a recipe needs none)")
        if getattr(self, "_depth", 0) > 20:
            raise RecipeError(f"{where}: YAML nested too deeply")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            return yaml.SafeLoader.compose_node(self, parent, index)
        finally:
            self._depth -= 1

    _Guarded.compose_node = compose_node
    _Guarded.construct_mapping = construct_mapping
    try:
        return yaml.load(text, Loader=_Guarded)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{where}:{line}: not valid YAML: {problem}") from None
