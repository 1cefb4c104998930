"""Read policy YAML (a file, or a directory merged in name order) and report
every error as FILE:LINE:COL: field: message.

Merging a directory (the rules are also written in policies/default.yaml):
mappings merge key by key, later files winning; `relays` and `members`
concatenate in file order; any other list or value is replaced by the later
file's. Errors point into the file that wrote the offending value.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from smtpguard.errors import PolicyError
from smtpguard.policy.fields import AT
from smtpguard.policy.model import Policy

CONCATENATED = {("relays",), ("members",)}


class PolicyErrors(PolicyError):
    """A policy with one or more located errors; str() gives one per line."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class LoadedPolicy:
    """A valid policy and where its parts came from."""

    policy: Policy
    files: tuple[str, ...] = ()
    digest: str = "built-in"
    # dotted field path -> "file:line:col", for explain and logs
    locations: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def where(self, path: str) -> str:
        return self.locations.get(path, "built-in default")


def _mark(node: yaml.Node) -> str:
    m = node.start_mark
    return f"{m.name}:{m.line + 1}:{m.column + 1}"


def _check_keys(node: yaml.Node, errors: list[str], seen: set[int] | None = None) -> None:
    """Duplicate keys are errors (PyYAML would silently keep the last)."""
    seen = seen if seen is not None else set()
    if id(node) in seen:  # aliases
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: dict[Any, yaml.Node] = {}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                if k.value in keys and k.value != "<<":
                    errors.append(f"{_mark(k)}: {k.value}: duplicate key (first at "
                                  f"{_mark(keys[k.value]).rsplit(':', 2)[-2]})")
                keys[k.value] = k
            _check_keys(v, errors, seen)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            _check_keys(v, errors, seen)


def _merge(a: yaml.Node, b: yaml.Node, path: tuple[str, ...] = ()) -> yaml.Node:
    if isinstance(a, yaml.MappingNode) and isinstance(b, yaml.MappingNode):
        out = list(a.value)
        index = {k.value: i for i, (k, _) in enumerate(out) if isinstance(k, yaml.ScalarNode)}
        for k, v in b.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            if key in index:
                i = index[key]
                out[i] = (out[i][0], _merge(out[i][1], v, (*path, str(key))))
            else:
                index[key] = len(out)
                out.append((k, v))
        return yaml.MappingNode(a.tag, out, a.start_mark, a.end_mark, a.flow_style)
    if (path in CONCATENATED and isinstance(a, yaml.SequenceNode)
            and isinstance(b, yaml.SequenceNode)):
        return yaml.SequenceNode(a.tag, a.value + b.value, a.start_mark, a.end_mark)
    return b


def _compose(text: str, name: str) -> yaml.Node | None:
    try:
        loader = yaml.SafeLoader(text)
        loader.name = name
        try:
            return loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else f"{name}:1:1"
        raise PolicyErrors([f"{where}: yaml: {exc.problem or exc}"]) from exc
    except yaml.YAMLError as exc:
        raise PolicyErrors([f"{name}:1:1: yaml: {exc}"]) from exc


def _node_at(root: yaml.Node, loc: tuple[int | str, ...], at_key: bool) -> yaml.Node:
    node = root
    for n, part in enumerate(loc):
        last = n == len(loc) - 1
        if isinstance(node, yaml.MappingNode):
            nxt = None
            # pydantic reports a bad mapping key as (..., key, "[key]")
            key_error = n + 1 < len(loc) and loc[n + 1] == "[key]"
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                    nxt = k if ((at_key and last) or key_error) else v
            if nxt is None:
                return node
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and \
                part < len(node.value):
            node = node.value[part]
        else:
            return node
    return node


def _split_at(msg: str) -> tuple[tuple[str, ...], str]:
    """'@a.b: text' -> (('a', 'b'), 'text')."""
    msg = msg.removeprefix("Value error, ")
    if not msg.startswith(AT):
        return (), msg
    path, _, text = msg[1:].partition(": ")
    return tuple(path.split(".")), text


def _field_part(part: int | str) -> str:
    """A field path element, quoted when odd, never containing ': '."""
    text = str(part)
    if re.fullmatch(r"[A-Za-z0-9_\-\[\]]+", text):
        return text
    return repr(text).replace(": ", ":\\x20")


def _locate(root: yaml.Node, exc: ValidationError) -> list[str]:
    errors = []
    for err in exc.errors():
        loc: tuple[int | str, ...] = tuple(err["loc"])
        sub, msg = _split_at(err["msg"])
        loc = loc + tuple(int(p) if p.isdigit() else p for p in sub)
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        node = _node_at(root, loc, at_key=err["type"] == "extra_forbidden")
        fieldname = ".".join(_field_part(p) for p in loc) or "policy"
        errors.append(f"{_mark(node)}: {fieldname}: {msg}")
    return errors


def _locations(node: yaml.Node, prefix: str = "") -> dict[str, str]:
    out = {prefix or "policy": _mark(node)}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                out.update(_locations(v, f"{prefix}.{k.value}" if prefix else str(k.value)))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.update(_locations(v, f"{prefix}.{i}"))
    return out


def load_documents(docs: list[tuple[str, str]]) -> LoadedPolicy:
    """Validate (name, text) documents merged in order."""
    errors: list[str] = []
    root: yaml.Node | None = None
    for name, text in docs:
        try:
            node = _compose(text, name)
        except PolicyErrors as exc:
            errors.extend(exc.errors)
            continue
        if node is None or (isinstance(node, yaml.ScalarNode)
                            and node.tag == "tag:yaml.org,2002:null"):
            # An empty or comment-only file is a truncated write (config
            # management, an editor), not "all defaults": relays and classes
            # would vanish.
            errors.append(f"{name}:1:1: version: required, and this file is empty "
                          "(only comments or whitespace)")
            continue
        if not isinstance(node, yaml.MappingNode):
            errors.append(f"{_mark(node)}: policy: must be a mapping of settings")
            continue
        _check_keys(node, errors)
        root = node if root is None else _merge(root, node)
    if errors:
        raise PolicyErrors(errors)
    if root is None:
        raise PolicyErrors([f"{docs[0][0] if docs else '<policy>'}:1:1: version: required"])
    # Said once for the whole policy: in a directory, any one file may say it.
    errors = [] if any(isinstance(k, yaml.ScalarNode) and k.value == "version"
                       for k, _ in root.value) else [
        f"{root.start_mark.name}:1:1: version: required (the schema's version: `version: 1`)"]
    try:
        data = yaml.SafeLoader("").construct_document(root)
    except yaml.MarkedYAMLError as exc:  # e.g. a tag (`!foo`) no safe constructor knows
        mark = exc.problem_mark or exc.context_mark
        where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}" if mark else _mark(root)
        raise PolicyErrors([*errors, f"{where}: policy: {exc.problem or exc.context}"]) from exc
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyErrors([*errors, *_locate(root, exc)]) from exc
    if errors:
        raise PolicyErrors(errors)
    digest = hashlib.sha256("\0".join(t for _, t in docs).encode()).hexdigest()[:12]
    return LoadedPolicy(policy, tuple(n for n, _ in docs), digest, _locations(root))


def load_text(text: str, name: str = "<policy>") -> Policy:
    """Parse and validate one policy document."""
    return load_documents([(name, text)]).policy


def policy_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir()
                      if p.suffix in (".yaml", ".yml") and not p.name.startswith("."))
    return [path]


def load_path(path: Path | None, extra: list[tuple[str, str]] | None = None) -> LoadedPolicy:
    """A policy file or directory; the built-in default when path is None.
    `extra` documents (name, text) come after the files (the fleet's, from etcd)."""
    if path is None:
        return load_documents(extra) if extra else LoadedPolicy(Policy())
    docs = []
    try:
        files = policy_files(path)
        for f in files:
            docs.append((str(f), f.read_text()))
    except OSError as exc:
        raise PolicyErrors([f"{exc.filename or path}:1:1: file: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise PolicyErrors([f"{path}:1:1: file: not UTF-8 text ({exc.reason})"]) from exc
    if not docs:
        raise PolicyErrors([f"{path}:1:1: file: no *.yaml files in this directory"])
    return load_documents(docs + list(extra or ()))


def load_policy(path: Path | None) -> Policy:
    return load_path(path).policy
