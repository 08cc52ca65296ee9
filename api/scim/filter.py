"""SCIM 2.0 filters and PATCH paths: a hand-written parser and an in-memory evaluator.

Grammar: RFC 7644 §3.4.2.2 (``filter``) and §3.5.2 (PATCH ``path``)::

    FILTER    = attrExp / logExp / valuePath / *1"not" "(" FILTER ")"
    valuePath = attrPath "[" valFilter "]"
    valFilter = attrExp / logExp / *1"not" "(" valFilter ")"
    attrExp   = (attrPath SP "pr") / (attrPath SP compareOp SP compValue)
    logExp    = FILTER SP ("and" / "or") SP FILTER
    attrPath  = [URI ":"] ATTRNAME *1subAttr
    PATH      = attrPath / valuePath [subAttr]

Choices where the RFC is loose (each is tested in ``tests/api/test_filter.py``):

- Keywords, operators and ``true``/``false``/``null`` are case-insensitive
  (§3.4.2.2: "Attribute names and attribute operators used in filters are
  case insensitive"); whitespace around tokens is optional and may repeat.
- ``not`` must be followed by ``(``.  A word ``not`` followed by an operator is
  an attribute named "not" (the grammar allows it).
- Precedence ``not`` > ``and`` > ``or`` (§3.4.2.2, "Precedence").  A run of the
  same operator is built as a balanced tree (both are associative), so a flat
  ``or`` of thousands of terms stays shallow; nesting is capped at MAX_DEPTH.
- Inside ``attr[...]`` the names are plain sub-attribute names of ``attr``; a
  value path inside a value path, or ``attr.sub[...]``, is refused (RFC 7643
  §2.3.8: a complex attribute has no complex sub-attributes).
- ``emails[type eq "work"].value eq "x"`` (not in the §3.4.2.2 ABNF, sent by
  IdPs) is read as ``ValueFilter(emails, And(type eq "work", value eq "x"))``:
  one element must satisfy both.
- ``gt``/``ge``/``lt``/``le``/``co``/``sw``/``ew`` with ``true``, ``false`` or
  ``null`` is a syntax error (§3.4.2.2 allows ordering only for strings,
  numbers and dates).
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, Union

from models.tables import as_utc

__all__ = [
    "MAX_DEPTH",
    "AttrPath",
    "And",
    "Compare",
    "FilterError",
    "FilterTooLargeError",
    "Node",
    "Not",
    "Or",
    "PatchPath",
    "Present",
    "ValueFilter",
    "matches",
    "parse_filter",
    "parse_path",
    "walk_paths",
]

MAX_DEPTH = 50
"""Deepest nesting accepted, counting parentheses/brackets and tree levels."""

COMPARE_OPS = frozenset({"eq", "ne", "co", "sw", "ew", "gt", "ge", "lt", "le"})
_EQUALITY_OPS = frozenset({"eq", "ne"})
_OP_LIST = "eq, ne, co, sw, ew, gt, ge, lt, le or pr"

# Attributes of these schemas are written with or without the URN (RFC 7644 §3.10).
CORE_SCHEMAS = frozenset(
    {
        "urn:ietf:params:scim:schemas:core:2.0:user",
        "urn:ietf:params:scim:schemas:core:2.0:group",
    }
)

Value = Union[str, int, float, bool, None]


class FilterError(ValueError):
    """A filter or PATCH path that does not parse: a 400 (RFC 7644 §3.12)."""

    status = 400

    def __init__(self, detail: str, position: int | None = None, scim_type: str = "invalidFilter") -> None:
        super().__init__(detail)
        self.detail = detail
        self.position = position  # 1-based character position, when known
        self.scim_type = scim_type  # "invalidFilter", or "invalidPath" for a PATCH path


class FilterTooLargeError(FilterError):
    """A filter longer, or with more comparisons, than the caller allows: 400 tooMany."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, scim_type="tooMany")


# --------------------------------------------------------------------------- nodes


@dataclass(frozen=True)
class AttrPath:
    """``[URI ":"] ATTRNAME ["." subAttr]`` as written (RFC 7644 §3.4.2.2, §3.10)."""

    uri: str | None
    attr: str
    sub: str | None = None
    _attr_l: str = field(init=False, repr=False, compare=False)
    _sub_l: str | None = field(init=False, repr=False, compare=False)
    _ext: str | None = field(init=False, repr=False, compare=False)
    _key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        attr_l = self.attr.lower()
        sub_l = None if self.sub is None else self.sub.lower()
        uri_l = None if self.uri is None else self.uri.lower()
        ext = None if uri_l is None or uri_l in CORE_SCHEMAS else uri_l
        base = attr_l if sub_l is None else f"{attr_l}.{sub_l}"
        setattr_ = object.__setattr__
        setattr_(self, "_attr_l", attr_l)
        setattr_(self, "_sub_l", sub_l)
        setattr_(self, "_ext", ext)
        setattr_(self, "_key", base if ext is None else f"{ext}:{base}")

    @property
    def key(self) -> str:
        """Lowercase dotted name; core-schema URN dropped, extension URN kept."""
        return self._key

    def __str__(self) -> str:
        text = self.attr if self.sub is None else f"{self.attr}.{self.sub}"
        return text if self.uri is None else f"{self.uri}:{text}"


@dataclass(frozen=True)
class Compare:
    """``path op value`` (RFC 7644 §3.4.2.2, Table 3)."""

    path: AttrPath
    op: str
    value: Value
    _fold: str | None = field(init=False, repr=False, compare=False)
    _dt: datetime | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        value = self.value
        is_str = isinstance(value, str)
        object.__setattr__(self, "_fold", value.casefold() if is_str else None)
        object.__setattr__(self, "_dt", _parse_datetime(value) if is_str else None)

    def __str__(self) -> str:
        return _render(self, 0)


@dataclass(frozen=True)
class Present:
    """``path pr`` (RFC 7644 §3.4.2.2)."""

    path: AttrPath

    def __str__(self) -> str:
        return _render(self, 0)


@dataclass(frozen=True)
class And:
    """``left and right``."""

    left: Node
    right: Node

    def __str__(self) -> str:
        return _render(self, 0)


@dataclass(frozen=True)
class Or:
    """``left or right``."""

    left: Node
    right: Node

    def __str__(self) -> str:
        return _render(self, 0)


@dataclass(frozen=True)
class Not:
    """``not (node)``."""

    node: Node

    def __str__(self) -> str:
        return _render(self, 0)


@dataclass(frozen=True)
class ValueFilter:
    """``path[filter]``: some element of ``path`` satisfies ``filter``.

    Paths inside ``filter`` are relative to ``path`` (plain names such as
    ``type``).  ``path[f].sub op v`` is ``ValueFilter(path, And(f, sub op v))``.
    """

    path: AttrPath
    filter: Node

    def __str__(self) -> str:
        return _render(self, 0)


Node = Union[Compare, Present, And, Or, Not, ValueFilter]


@dataclass(frozen=True)
class PatchPath:
    """A PATCH ``path`` (RFC 7644 §3.5.2): ``attrPath / valuePath [subAttr]``."""

    path: AttrPath
    value_filter: Node | None = None
    sub: str | None = None

    @property
    def key(self) -> str:
        """Key of the attribute the operation targets (``emails.value``, ``name.givenname``)."""
        return self.path.key if self.sub is None else f"{self.path.key}.{self.sub.lower()}"

    def __str__(self) -> str:
        text = str(self.path)
        if self.value_filter is not None:
            text += f"[{_render(self.value_filter, 0)}]"
        return text if self.sub is None else f"{text}.{self.sub}"


_PRECEDENCE = {Or: 1, And: 2}


def _render(node: Node, parent: int) -> str:
    """Canonical filter text; parentheses only where precedence needs them."""
    kind = type(node)
    if kind is Compare:
        return f"{node.path} {node.op} {json.dumps(node.value, ensure_ascii=False)}"
    if kind is Present:
        return f"{node.path} pr"
    if kind is Not:
        return f"not ({_render(node.node, 0)})"
    if kind is ValueFilter:
        return f"{node.path}[{_render(node.filter, 0)}]"
    mine = _PRECEDENCE[kind]
    word = "and" if kind is And else "or"
    text = f"{_render(node.left, mine)} {word} {_render(node.right, mine)}"
    return f"({text})" if mine < parent else text


# --------------------------------------------------------------------------- lexer

_TOKEN_RE = re.compile(
    r"""[ \t\r\n]*(?:
        (?P<word>[A-Za-z$][A-Za-z0-9_$:.\-]*)
      | (?P<str>"(?:[^"\\]|\\.)*")
      | (?P<num>-?[0-9][0-9A-Za-z_.+\-]*)
      | (?P<sub>\.[A-Za-z0-9_$\-]*)
      | (?P<punct>[()\[\]])
      | (?P<end>\Z)
    )""",
    re.VERBOSE | re.DOTALL,
)
_WS = " \t\r\n"
_NUMBER_RE = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?\Z")
_NAME = r"(?:[A-Za-z][A-Za-z0-9_\-]*|\$[Rr][Ee][Ff])"
_NAME_RE = re.compile(_NAME + r"\Z")
_PLAIN_PATH_RE = re.compile(rf"({_NAME})(?:\.({_NAME}))?\Z")
_URN_RE = re.compile(r"[Uu][Rr][Nn]:[A-Za-z0-9][A-Za-z0-9\-]*(?::[A-Za-z0-9_.\-]+)+\Z")
_JSON = json.JSONDecoder(strict=False)

# A token: (kind, text, 0-based position, lowercased text for words).
# kind is one of: word str num sub ( ) [ ] end
Token = tuple[str, str, int, str]


def _show(text: str) -> str:
    if len(text) > 40:
        text = text[:37] + "..."
    return f'"{text}"' if "'" in text and '"' not in text else f"'{text}'"


def _tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    append = tokens.append
    match = _TOKEN_RE.match
    pos = 0
    while True:
        m = match(text, pos)
        if m is None:
            while text[pos] in _WS:
                pos += 1
            char = text[pos]
            if char == '"':
                raise FilterError(f"unterminated string starting at position {pos + 1}", pos + 1)
            if char == "'":
                raise FilterError(
                    f"unexpected ' at position {pos + 1}: strings must be in double quotes", pos + 1
                )
            shown = _show(char) if char.isprintable() else f"U+{ord(char):04X}"
            raise FilterError(f"unexpected character {shown} at position {pos + 1}", pos + 1)
        kind = m.lastgroup
        assert kind is not None
        start = m.start(kind)
        if kind == "end":
            append(("end", "", start, ""))
            return tokens
        token_text = m.group(kind)
        if kind == "punct":
            append((token_text, token_text, start, ""))
        else:
            append((kind, token_text, start, token_text.lower() if kind == "word" else ""))
        pos = m.end()


# Caches are keyed on client text: only short keys go in (a real attribute
# path or date-time is far shorter), so 1,024 long junk words cannot pin
# megabytes each.
_CACHED_KEY_LENGTH = 128


def _attr_path(text: str) -> AttrPath | None:
    """The AttrPath a path word spells, or None when it is not a valid attrPath."""
    if len(text) > _CACHED_KEY_LENGTH:
        return _attr_path_uncached(text)
    return _attr_path_cached(text)


def _attr_path_uncached(text: str) -> AttrPath | None:
    uri = None
    rest = text
    if text[:4].lower() == "urn:":
        # The schema URN is everything before the last colon: its own dots
        # ("...:enterprise:2.0:User") are not sub-attribute separators.
        cut = text.rfind(":")
        uri, rest = text[:cut], text[cut + 1 :]
        if not _URN_RE.match(uri):
            return None
    m = _PLAIN_PATH_RE.match(rest)
    if m is None:
        return None
    return AttrPath(uri, m.group(1), m.group(2))


_attr_path_cached = lru_cache(maxsize=1024)(_attr_path_uncached)


def _parse_datetime(text: str) -> datetime | None:
    """An ISO-8601 date or date-time (RFC 7643 §2.3.5) as an aware datetime, else None."""
    if len(text) > _CACHED_KEY_LENGTH:
        return _parse_datetime_uncached(text)
    return _parse_datetime_cached(text)


def _parse_datetime_uncached(text: str) -> datetime | None:
    if len(text) < 10 or not ("0" <= text[0] <= "9") or text[4:5] != "-":
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    try:
        return as_utc(value)
    except OverflowError:
        # 9999-12-31T23:59:59-14:00 is past year 9999 in UTC; aware, it still compares right.
        return value


_parse_datetime_cached = lru_cache(maxsize=256)(_parse_datetime_uncached)


# --------------------------------------------------------------------------- parser


class _Parser:
    """Recursive descent over a token list; grammar methods return (node, tree depth)."""

    __slots__ = ("tokens", "i", "what", "brackets", "terms", "max_terms")

    def __init__(self, text: str, what: str, max_length: int | None = None, max_terms: int | None = None) -> None:
        self.what = what
        self.brackets = 0
        self.i = 0
        self.terms = 0
        self.max_terms = max_terms
        if max_length is not None and len(text) > max_length:
            raise FilterTooLargeError(f"the {what} is {len(text)} characters long; at most {max_length} are allowed")
        try:
            self.tokens = _tokenize(text)
        except FilterError as exc:
            raise self._retag(exc) from None

    # errors ------------------------------------------------------------------

    def _retag(self, exc: FilterError) -> FilterError:
        if self.what == "path" and not self.brackets:
            exc.scim_type = "invalidPath"
        return exc

    def _error(self, message: str, pos: int) -> FilterError:
        return self._retag(FilterError(message, pos + 1))

    def _describe(self, token: Token) -> str:
        if token[0] == "end":
            return f"end of {self.what}"
        return _show(token[1])

    def _expected(self, what: str, token: Token, note: str = "") -> FilterError:
        return self._error(
            f"expected {what} at position {token[2] + 1}, found {self._describe(token)}{note}", token[2]
        )

    def _too_deep(self, pos: int) -> FilterError:
        return self._error(f"{self.what} is nested too deeply at position {pos + 1} (limit {MAX_DEPTH} levels)", pos)

    def _check_depth(self, depth: int, pos: int) -> None:
        if depth > MAX_DEPTH:
            raise self._too_deep(pos)

    # grammar -----------------------------------------------------------------

    def parse_or(self, level: int, outer: AttrPath | None) -> tuple[Node, int]:
        tokens = self.tokens
        start = tokens[self.i][2]
        first = self.parse_and(level, outer)
        token = tokens[self.i]
        if token[0] != "word" or token[3] != "or":
            return first
        items = [first]
        while token[0] == "word" and token[3] == "or":
            self.i += 1
            items.append(self.parse_and(level, outer))
            token = tokens[self.i]
        return self._balanced(Or, items, 0, len(items), start)

    def parse_and(self, level: int, outer: AttrPath | None) -> tuple[Node, int]:
        tokens = self.tokens
        start = tokens[self.i][2]
        first = self.parse_unary(level, outer)
        token = tokens[self.i]
        if token[0] != "word" or token[3] != "and":
            return first
        items = [first]
        while token[0] == "word" and token[3] == "and":
            self.i += 1
            items.append(self.parse_unary(level, outer))
            token = tokens[self.i]
        return self._balanced(And, items, 0, len(items), start)

    def _balanced(self, cls: type, items: list[tuple[Node, int]], lo: int, hi: int, pos: int) -> tuple[Node, int]:
        # "a and b and c" is And(And(a, b), c); longer runs split in the middle.
        if hi - lo == 1:
            return items[lo]
        mid = lo + (hi - lo + 1) // 2
        left, left_depth = self._balanced(cls, items, lo, mid, pos)
        right, right_depth = self._balanced(cls, items, mid, hi, pos)
        depth = max(left_depth, right_depth) + 1
        self._check_depth(depth, pos)
        return cls(left, right), depth

    def parse_unary(self, level: int, outer: AttrPath | None) -> tuple[Node, int]:
        token = self.tokens[self.i]
        kind = token[0]
        if kind == "(":
            return self._group(level, outer, token, negate=False)
        if kind == "word":
            if token[3] == "not":
                after = self.tokens[self.i + 1]
                if after[0] == "(":
                    self.i += 1
                    return self._group(level, outer, after, negate=True)
                # "not pr" / "not eq ..." name an attribute called "not".
                if not (after[0] == "word" and (after[3] in COMPARE_OPS or after[3] == "pr")) and after[0] != "[":
                    raise self._expected("'(' after 'not'", after)
            return self._attr_exp(level, outer)
        raise self._expected("an attribute name, '(' or 'not'", token)

    def _group(self, level: int, outer: AttrPath | None, opening: Token, negate: bool) -> tuple[Node, int]:
        if level >= MAX_DEPTH:
            raise self._too_deep(opening[2])
        self.i += 1
        node, depth = self.parse_or(level + 1, outer)
        closing = self.tokens[self.i]
        if closing[0] != ")":
            raise self._expected("')'", closing, f"; the '(' at position {opening[2] + 1} is not closed")
        self.i += 1
        if negate:
            depth += 1
            self._check_depth(depth, opening[2])
            return Not(node), depth
        return node, depth

    def path(self, token: Token, outer: AttrPath | None) -> AttrPath:
        if outer is not None:
            if _NAME_RE.match(token[1]):
                return AttrPath(None, token[1], None)
            raise self._error(
                f"expected a sub-attribute name of '{outer}' inside '[...]' at position {token[2] + 1}, "
                f"found {_show(token[1])}",
                token[2],
            )
        path = _attr_path(token[1])
        if path is None:
            raise self._error(f"invalid attribute path {_show(token[1])} at position {token[2] + 1}", token[2])
        return path

    def _attr_exp(self, level: int, outer: AttrPath | None) -> tuple[Node, int]:
        token = self.tokens[self.i]
        self.i += 1
        path = self.path(token, outer)
        bracket = self.tokens[self.i]
        if bracket[0] != "[":
            return self._operation(path, token[1]), 1
        if outer is not None:
            raise self._error(f"value filters cannot be nested (position {bracket[2] + 1})", bracket[2])
        node, depth = self.value_filter(path, bracket, level)
        sub = self.tokens[self.i]
        if sub[0] == "sub":
            # emails[type eq "work"].value eq "x": one element with both.
            self.i += 1
            name = self.sub_name(sub)
            condition = self._operation(AttrPath(None, name, None), f"{token[1]}[...].{name}")
            node, depth = And(node, condition), max(depth, 1) + 1
        depth += 1
        self._check_depth(depth, token[2])
        return ValueFilter(path, node), depth

    def value_filter(self, path: AttrPath, bracket: Token, level: int) -> tuple[Node, int]:
        if path.sub is not None:
            raise self._error(
                f"'[' at position {bracket[2] + 1} must follow an attribute, not the sub-attribute "
                f"{_show(str(path))}",
                bracket[2],
            )
        if level >= MAX_DEPTH:
            raise self._too_deep(bracket[2])
        self.i += 1
        self.brackets += 1
        node, depth = self.parse_or(level + 1, path)
        closing = self.tokens[self.i]
        if closing[0] != "]":
            raise self._expected("']'", closing, f"; the '[' at position {bracket[2] + 1} is not closed")
        self.brackets -= 1
        self.i += 1
        return node, depth

    def sub_name(self, token: Token) -> str:
        name = token[1][1:]
        if not _NAME_RE.match(name):
            raise self._error(f"invalid sub-attribute {_show(token[1])} at position {token[2] + 1}", token[2])
        return name

    def _operation(self, path: AttrPath, written: str) -> Node:
        self.terms += 1
        if self.max_terms is not None and self.terms > self.max_terms:
            raise FilterTooLargeError(f"the {self.what} has more than {self.max_terms} comparisons")
        token = self.tokens[self.i]
        if token[0] != "word":
            raise self._expected(f"an operator ({_OP_LIST}) after {_show(written)}", token)
        op = token[3]
        if op == "pr":
            self.i += 1
            return Present(path)
        if op not in COMPARE_OPS:
            raise self._error(
                f"unknown operator {_show(token[1])} at position {token[2] + 1}; expected {_OP_LIST}",
                token[2],
            )
        self.i += 1
        return Compare(path, op, self._value(op))

    def _value(self, op: str) -> Value:
        token = self.tokens[self.i]
        kind = token[0]
        value: Value
        if kind == "str":
            text = token[1]
            if "\\" not in text:
                value = text[1:-1]
            else:
                try:
                    value = _JSON.decode(text)
                    # A \uD800-style escape alone is no character: no database or
                    # JSON encoder can take it (it would surface as a 500).
                    value.encode("utf-8")
                except ValueError:  # UnicodeEncodeError is a ValueError
                    raise self._error(f"invalid escape in the string at position {token[2] + 1}", token[2]) from None
        elif kind == "num":
            value = self._number(token)
        elif kind == "word" and token[3] in ("true", "false", "null"):
            value = None if token[3] == "null" else token[3] == "true"
            if op not in _EQUALITY_OPS:
                raise self._error(
                    f"operator '{op}' cannot be used with {token[3]} (position {token[2] + 1}); only eq and ne can",
                    token[2],
                )
        else:
            hint = "; strings must be in double quotes" if kind == "word" else ""
            raise self._expected(f"a value after '{op}' (a \"string\", a number, true, false or null)", token, hint)
        self.i += 1
        return value

    def _number(self, token: Token) -> int | float:
        text = token[1]
        m = _NUMBER_RE.match(text)
        if m is None:
            raise self._error(f"invalid number {_show(text)} at position {token[2] + 1}", token[2])
        try:
            number: int | float = int(text) if m.group(1) is None and m.group(2) is None else float(text)
        except ValueError:  # more digits than int() accepts
            number = math.inf
        if isinstance(number, float) and not math.isfinite(number):
            raise self._error(f"number out of range at position {token[2] + 1}", token[2])
        return number

    def expect_end(self, expected: str) -> None:
        token = self.tokens[self.i]
        if token[0] != "end":
            if token[0] in (")", "]"):
                raise self._error(f"unbalanced {_show(token[1])} at position {token[2] + 1}", token[2])
            raise self._expected(expected, token)


# --------------------------------------------------------------------------- public parsing


def parse_filter(text: str, *, max_length: int | None = None, max_terms: int | None = None) -> Node:
    """Parse a ``filter`` query parameter (RFC 7644 §3.4.2.2) into a Node.

    Past ``max_length`` characters or ``max_terms`` comparisons it raises
    FilterTooLargeError (checked before, and while, parsing).
    """
    parser = _Parser(text, "filter", max_length, max_terms)
    if parser.tokens[0][0] == "end":
        raise FilterError("filter is empty")
    node, _ = parser.parse_or(0, None)
    parser.expect_end("'and', 'or' or end of filter")
    return node


def parse_path(text: str, *, max_length: int | None = None, max_terms: int | None = None) -> PatchPath:
    """Parse a PATCH operation ``path`` (RFC 7644 §3.5.2); limits as for parse_filter."""
    parser = _Parser(text, "path", max_length, max_terms)
    tokens = parser.tokens
    first = tokens[0]
    if first[0] == "end":
        raise FilterError("path is empty", scim_type="invalidPath")
    if first[0] != "word":
        raise parser._expected("an attribute path", first)
    parser.i = 1
    path = parser.path(first, None)
    value_filter = sub = None
    if tokens[1][0] == "[":
        value_filter, _ = parser.value_filter(path, tokens[1], 0)
        token = tokens[parser.i]
        if token[0] == "sub":
            parser.i += 1
            sub = parser.sub_name(token)
            parser.expect_end("end of path")
        else:
            parser.expect_end("a '.sub-attribute' or end of path")
    else:
        parser.expect_end("'[' or end of path")
    return PatchPath(path, value_filter, sub)


def walk_paths(node: Node | PatchPath) -> Iterator[AttrPath]:
    """Yield every attribute path a filter (or PATCH path) uses, left to right.

    Paths inside ``attr[...]`` come out absolute: ``emails[type eq "work"]``
    yields ``emails.type``.  A PatchPath yields its target first.
    """
    stack: list[tuple[Any, AttrPath | None]]
    if isinstance(node, PatchPath):
        target = node.path if node.sub is None else AttrPath(node.path.uri, node.path.attr, node.sub)
        yield target
        if node.value_filter is None:
            return
        stack = [(node.value_filter, node.path)]
    else:
        stack = [(node, None)]
    while stack:
        current, outer = stack.pop()
        kind = type(current)
        if kind is Compare or kind is Present:
            path = current.path
            yield path if outer is None else AttrPath(outer.uri, outer.attr, path.attr)
        elif kind is And or kind is Or:
            stack.append((current.right, outer))
            stack.append((current.left, outer))
        elif kind is Not:
            stack.append((current.node, outer))
        elif kind is ValueFilter:
            stack.append((current.filter, current.path))
        else:
            raise TypeError(f"not a filter node: {kind.__name__}")


# --------------------------------------------------------------------------- evaluation

_MISSING = object()
_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
}
CaseExact = Callable[[str], bool]


def _never(key: str) -> bool:
    return False


def _lookup(obj: dict, name: str, lowered: str) -> Any:
    """obj[name] with the name matched case-insensitively (RFC 7643 §2.1)."""
    value = obj.get(name, _MISSING)
    if value is not _MISSING:
        return value
    for key, value in obj.items():
        if isinstance(key, str) and key.lower() == lowered:
            return value
    return None


def _resolve(obj: Any, path: AttrPath) -> Any:
    if not isinstance(obj, dict):
        # An element of a multi-valued simple attribute is its own "value".
        return obj if path._attr_l == "value" and path.sub is None else None
    if path._ext is not None:
        obj = _lookup(obj, path.uri, path._ext)  # type: ignore[arg-type]
        if not isinstance(obj, dict):
            return None
    return _lookup(obj, path.attr, path._attr_l)


def _has_value(value: Any) -> bool:
    """RFC 7644 §3.4.2.2 ``pr``: not null, not "", not an empty array or complex value."""
    if value is None:
        return False
    if isinstance(value, str):
        return value != ""
    if isinstance(value, list):
        return any(_has_value(item) for item in value)
    if isinstance(value, dict):
        return any(_has_value(item) for item in value.values())
    return True


def _candidates(obj: Any, path: AttrPath) -> tuple[list[Any], bool]:
    """Values a comparison looks at, and whether they are complex elements' "value"."""
    value = _resolve(obj, path)
    if path._sub_l is not None:
        if isinstance(value, list):
            return [_lookup(item, path.sub, path._sub_l) for item in value if isinstance(item, dict)], False  # type: ignore[arg-type]
        if isinstance(value, dict):
            return [_lookup(value, path.sub, path._sub_l)], False  # type: ignore[arg-type]
        return [], False
    if value is None:
        return [], False
    items = value if isinstance(value, list) else [value]
    complex_ = False
    out = []
    for item in items:
        if isinstance(item, dict):
            # `emails co "x"` compares each element's "value" (RFC 7644 §3.4.2.2).
            complex_ = True
            item = _lookup(item, "value", "value")
        out.append(item)
    return out, complex_


def _match_string(op: str, value: str, node: Compare, exact: bool) -> bool:
    target_dt = node._dt
    if target_dt is not None and op in _ORDER:
        value_dt = _parse_datetime(value)
        if value_dt is not None:
            return _ORDER[op](value_dt, target_dt)
    if exact:
        a, b = value, node.value
    else:
        a, b = value.casefold(), node._fold
    if op == "co":
        return b in a  # type: ignore[operator]
    if op == "sw":
        return a.startswith(b)  # type: ignore[arg-type]
    if op == "ew":
        return a.endswith(b)  # type: ignore[arg-type]
    return _ORDER[op](a, b)


def _eval_compare(node: Compare, obj: Any, case_exact: CaseExact, prefix: str) -> bool:
    values, complex_ = _candidates(obj, node.path)
    op = node.op
    target = node.value
    if target is None:
        # RFC 7643 §2.5: unassigned, null and [] are the same state.
        present = any(_has_value(v) for v in values)
        return (not present) if op == "eq" else (present if op == "ne" else False)
    values = [v for v in values if v is not None]
    if not values:
        # An absent attribute is "not identical" to any value.
        return op == "ne"
    if isinstance(target, bool):
        if op not in _EQUALITY_OPS:
            return False
        want = op == "eq"
        return any(type(v) is bool and (v is target) == want for v in values)
    if isinstance(target, str):
        exact: bool | None = None
        for v in values:
            if type(v) is not str:
                continue
            if exact is None:
                key = prefix + node.path.key + (".value" if complex_ else "")
                exact = bool(case_exact(key))
            if _match_string(op, v, node, exact):
                return True
        return False
    compare = _ORDER.get(op)
    if compare is None:  # co/sw/ew are for strings
        return False
    return any(
        (type(v) is int or type(v) is float) and compare(v, target) for v in values
    )


def _eval_present(node: Present, obj: Any, case_exact: CaseExact, prefix: str) -> bool:
    path = node.path
    value = _resolve(obj, path)
    if path._sub_l is None:
        return _has_value(value)
    if isinstance(value, list):
        return any(isinstance(item, dict) and _has_value(_lookup(item, path.sub, path._sub_l)) for item in value)  # type: ignore[arg-type]
    if isinstance(value, dict):
        return _has_value(_lookup(value, path.sub, path._sub_l))  # type: ignore[arg-type]
    return False


def _eval_value_filter(node: ValueFilter, obj: Any, case_exact: CaseExact, prefix: str) -> bool:
    value = _resolve(obj, node.path)
    if value is None:
        return False
    items = value if isinstance(value, list) else (value,)
    inner = node.filter
    inner_prefix = f"{prefix}{node.path.key}."
    evaluate = _EVAL[type(inner)]
    return any(evaluate(inner, item, case_exact, inner_prefix) for item in items)


def _eval_and(node: And, obj: Any, case_exact: CaseExact, prefix: str) -> bool:
    left, right = node.left, node.right
    return _EVAL[type(left)](left, obj, case_exact, prefix) and _EVAL[type(right)](right, obj, case_exact, prefix)


def _eval_or(node: Or, obj: Any, case_exact: CaseExact, prefix: str) -> bool:
    left, right = node.left, node.right
    return _EVAL[type(left)](left, obj, case_exact, prefix) or _EVAL[type(right)](right, obj, case_exact, prefix)


def _eval_not(node: Not, obj: Any, case_exact: CaseExact, prefix: str) -> bool:
    inner = node.node
    return not _EVAL[type(inner)](inner, obj, case_exact, prefix)


_EVAL: dict[type, Callable[[Any, Any, CaseExact, str], bool]] = {
    Compare: _eval_compare,
    Present: _eval_present,
    And: _eval_and,
    Or: _eval_or,
    Not: _eval_not,
    ValueFilter: _eval_value_filter,
}


def matches(node: Node, resource: dict, case_exact: CaseExact = _never) -> bool:
    """Whether a SCIM resource (a JSON dict) satisfies a filter (RFC 7644 §3.4.2.2).

    Attribute names are matched case-insensitively; a multi-valued attribute
    matches when any element does; strings compare case-insensitively unless
    ``case_exact(key)`` (key as in AttrPath.key, e.g. "emails.value") is true.
    A type mismatch is no match, never an exception.
    """
    evaluate = _EVAL.get(type(node))
    if evaluate is None:
        raise TypeError(f"not a filter node: {type(node).__name__}")
    if not isinstance(resource, dict):
        return False
    return evaluate(node, resource, case_exact, "")
