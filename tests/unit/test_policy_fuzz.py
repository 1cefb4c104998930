"""Property: whatever is done to a valid policy, loading it either succeeds or
fails with located errors; it never raises anything else."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpguard.policy import Policy, PolicyErrors, load_text

ROOT = Path(__file__).resolve().parents[2]
BASES = [p.read_text() for p in sorted(ROOT.glob("policies/**/*.yaml"))]
# FILE:LINE:COL: field: message, where a field never contains ": "
LOCATED = re.compile(r"^fuzz\.yaml:\d+:\d+: (?:(?!: ).)+: .+", re.DOTALL)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["25", "1h", "0s", "20/minute", "0/minute", "block", "limit", "allow",
                     "flag", "throttle", "destinations", "10.0.0.0/8", "::/0", "{vm}",
                     "default", "52:54:00:aa:bb:cc", "https://x", "-1", "1e999"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, (*prefix, i))
    return out


def check(text: str) -> None:
    try:
        got = load_text(text, "fuzz.yaml")
    except PolicyErrors as exc:
        assert exc.errors, "an error without a message"
        for line in exc.errors:
            assert LOCATED.match(line), line
    else:
        assert isinstance(got, Policy)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(BASES), data=st.data())
def test_structural_mutations_give_located_errors(base: str, data: st.DataObject) -> None:
    doc = yaml.safe_load(base) or {}
    for _ in range(data.draw(st.integers(1, 3))):
        doc = copy.deepcopy(doc)
        target = data.draw(st.sampled_from(paths(doc)))
        op = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if not target:
            doc = data.draw(values) if op == "replace" else doc
            continue
        parent = doc
        for part in target[:-1]:
            parent = parent[part]
        last = target[-1]
        if op == "replace":
            parent[last] = data.draw(values)
        elif op == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8))] = data.draw(values)
        else:
            parent.insert(int(last), data.draw(values))
    try:
        text = yaml.safe_dump(doc)
    except yaml.YAMLError:
        return
    check(text)


@settings(max_examples=300, deadline=None)
@given(base=st.sampled_from(BASES), data=st.data())
def test_textual_mutations_give_located_errors(base: str, data: st.DataObject) -> None:
    text = base
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 40)))
        junk = data.draw(st.text(alphabet=st.sampled_from(list(":-[]{}&*!|>'\"#%@`, \n\t0a")),
                                 max_size=6))
        text = text[:i] + junk + text[j:]
    check(text)
