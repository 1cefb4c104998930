"""Read policy YAML and report every error as FILE:LINE:COL: field: message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from smtpguard.errors import PolicyError
from smtpguard.policy.model import Policy


class PolicyErrors(PolicyError):
    """A policy with one or more located errors; str() gives one per line."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _node_at(root: yaml.Node | None, loc: tuple[int | str, ...],
             at_key: bool = False) -> yaml.Node | None:
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == part:
                    nxt = v
                    # An unknown key is best shown at the key itself.
                    if at_key and part == loc[-1]:
                        nxt = k
            if nxt is None:
                return node
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return node
            node = node.value[part]
        else:
            return node
    return node


def load_text(text: str, name: str = "<policy>") -> Policy:
    """Parse and validate one policy document."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise PolicyErrors([f"{name}:{line}:{col}: yaml: {exc.problem or exc}"]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyErrors([f"{name}:1:1: policy: must be a mapping of settings"])
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            node = _node_at(root, loc, at_key=err["type"] == "extra_forbidden")
            line, col = (node.start_mark.line + 1, node.start_mark.column + 1) if node else (1, 1)
            field = ".".join(str(p) for p in loc) or "policy"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            errors.append(f"{name}:{line}:{col}: {field}: {msg}")
        raise PolicyErrors(errors) from exc


def load_policy(path: Path | None) -> Policy:
    """A policy file, or the built-in default when path is None."""
    if path is None:
        return Policy()
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyErrors([f"{path}:1:1: file: {exc.strerror}"]) from exc
    return load_text(text, str(path))
