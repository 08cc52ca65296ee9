"""SCIM filters and PATCH paths: RFC 7644 §3.4.2.2 (filtering) and §3.5.2 (PATCH path)."""

from __future__ import annotations

import copy

import pytest

from api.scim.filter import (
    MAX_DEPTH,
    And,
    AttrPath,
    Compare,
    FilterError,
    Not,
    Or,
    PatchPath,
    Present,
    ValueFilter,
    matches,
    parse_filter,
    parse_path,
    walk_paths,
)

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"


def A(attr: str, sub: str | None = None, uri: str | None = None) -> AttrPath:
    return AttrPath(uri, attr, sub)


def eq(attr: str, value, sub: str | None = None, uri: str | None = None) -> Compare:
    return Compare(A(attr, sub, uri), "eq", value)


def depth(node) -> int:
    """Tree depth, computed without recursion."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        current, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(current, (And, Or)):
            stack += [(current.left, level + 1), (current.right, level + 1)]
        elif isinstance(current, Not):
            stack.append((current.node, level + 1))
        elif isinstance(current, ValueFilter):
            stack.append((current.filter, level + 1))
    return deepest


# --------------------------------------------------------------------------- parsing

PARSE_CASES = [
    # What IdPs send (Entra, Okta, OneLogin, Google, PingOne).
    (
        'userName eq "Test_User_ab6490ee-1e48-479e-a20b-2d77186b5dd1"',
        eq("userName", "Test_User_ab6490ee-1e48-479e-a20b-2d77186b5dd1"),
    ),
    ('externalId eq "5d4b3f1c-9a0e-4c43-9d1e-0123456789ab"', eq("externalId", "5d4b3f1c-9a0e-4c43-9d1e-0123456789ab")),
    ('displayName eq "Group 1"', eq("displayName", "Group 1")),
    (
        'emails[type eq "work"].value eq "x@y.com"',
        ValueFilter(A("emails"), And(eq("type", "work"), eq("value", "x@y.com"))),
    ),
    ('members[value eq "abc"]', ValueFilter(A("members"), eq("value", "abc"))),
    (
        'meta.lastModified gt "2011-05-13T04:42:34Z"',
        Compare(A("meta", "lastModified"), "gt", "2011-05-13T04:42:34Z"),
    ),
    ("title pr", Present(A("title"))),
    (
        'userType eq "Employee" and (emails co "example.com" or emails.value co "example.org")',
        And(
            eq("userType", "Employee"),
            Or(Compare(A("emails"), "co", "example.com"), Compare(A("emails", "value"), "co", "example.org")),
        ),
    ),
    (
        f'{ENTERPRISE}:manager.value eq "x"',
        eq("manager", "x", sub="value", uri=ENTERPRISE),
    ),
    (f'{ENTERPRISE}:employeeNumber eq "701984"', eq("employeeNumber", "701984", uri=ENTERPRISE)),
    (f'{CORE_USER}:userName eq "bjensen"', eq("userName", "bjensen", uri=CORE_USER)),
    # RFC 7644 §3.4.2.2 examples.
    ('name.familyName co "O\'Malley"', Compare(A("name", "familyName"), "co", "O'Malley")),
    ('userName sw "J"', Compare(A("userName"), "sw", "J")),
    ('title pr and userType eq "Employee"', And(Present(A("title")), eq("userType", "Employee"))),
    ('title pr or userType eq "Intern"', Or(Present(A("title")), eq("userType", "Intern"))),
    (
        'schemas eq "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"',
        eq("schemas", "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"),
    ),
    (
        'userType ne "Employee" and not (emails co "example.com" or emails.value co "example.org")',
        And(
            Compare(A("userType"), "ne", "Employee"),
            Not(Or(Compare(A("emails"), "co", "example.com"), Compare(A("emails", "value"), "co", "example.org"))),
        ),
    ),
    (
        'userType eq "Employee" and emails[type eq "work" and value co "@example.com"]',
        And(
            eq("userType", "Employee"),
            ValueFilter(A("emails"), And(eq("type", "work"), Compare(A("value"), "co", "@example.com"))),
        ),
    ),
    (
        'emails[type eq "work" and value co "@example.com"] or ims[type eq "xmpp" and value co "@foo.com"]',
        Or(
            ValueFilter(A("emails"), And(eq("type", "work"), Compare(A("value"), "co", "@example.com"))),
            ValueFilter(A("ims"), And(eq("type", "xmpp"), Compare(A("value"), "co", "@foo.com"))),
        ),
    ),
    # Value paths: not inside, sub-attribute with pr, URN-qualified parent.
    ('emails[not (type eq "work")]', ValueFilter(A("emails"), Not(eq("type", "work")))),
    ('emails[type eq "work"].value pr', ValueFilter(A("emails"), And(eq("type", "work"), Present(A("value"))))),
    (f'{ENTERPRISE}:manager[value eq "42"]', ValueFilter(A("manager", uri=ENTERPRISE), eq("value", "42"))),
    # Every operator, "$ref", and attribute names that look like keywords.
    *[(f"age {op} 30", Compare(A("age"), op, 30)) for op in ("eq", "ne", "gt", "ge", "lt", "le")],
    ('members.$ref ew "/Users/1"', Compare(A("members", "$ref"), "ew", "/Users/1")),
    ("not pr", Present(A("not"))),
    ('and eq "x" and or pr', And(eq("and", "x"), Present(A("or")))),
    ("x-y_z1 pr", Present(A("x-y_z1"))),
    # Precedence (§3.4.2.2 Table 5): not > and > or; parentheses override.
    ("a pr or b pr and c pr", Or(Present(A("a")), And(Present(A("b")), Present(A("c"))))),
    ("a pr and b pr or c pr", Or(And(Present(A("a")), Present(A("b"))), Present(A("c")))),
    ("(a pr or b pr) and c pr", And(Or(Present(A("a")), Present(A("b"))), Present(A("c")))),
    ("not (a pr) and b pr", And(Not(Present(A("a"))), Present(A("b")))),
    ("not (a pr and b pr)", Not(And(Present(A("a")), Present(A("b"))))),
    ("a pr and b pr and c pr", And(And(Present(A("a")), Present(A("b"))), Present(A("c")))),
    ("((a pr))", Present(A("a"))),
]


@pytest.mark.parametrize("text, expected", PARSE_CASES, ids=[c[0][:60] for c in PARSE_CASES])
def test_parse_filter_builds_the_expected_tree(text, expected):
    """RFC 7644 §3.4.2.2: filter ABNF, examples and precedence."""
    assert parse_filter(text) == expected


@pytest.mark.parametrize("text", [c[0] for c in PARSE_CASES], ids=[c[0][:60] for c in PARSE_CASES])
def test_canonical_text_parses_back_to_the_same_tree(text):
    node = parse_filter(text)
    assert parse_filter(str(node)) == node


CANONICAL_CASES = [
    # Keywords and operators are case-insensitive (§3.4.2.2); whitespace is free.
    ('userName EQ "x"', 'userName eq "x"'),
    ('  userName \t eq\t\t"x"   ', 'userName eq "x"'),
    ('userName eq"x"', 'userName eq "x"'),
    ('Not (a Pr) AND b PR OR c pR', "not (a pr) and b pr or c pr"),
    ('not(a pr)', "not (a pr)"),
    ('emails[ type eq "work" ] .value eq "x"', 'emails[type eq "work" and value eq "x"]'),
    ("(a pr or b pr) and c pr", "(a pr or b pr) and c pr"),
    ("a pr and (b pr and c pr)", "a pr and b pr and c pr"),
    ("x eq TRUE", "x eq true"),
    ("x eq False", "x eq false"),
    ("x ne NULL", "x ne null"),
    ('x eq "caf\\u00e9 \\"q\\" \\\\ \\/ \\n"', 'x eq "café \\"q\\" \\\\ / \\n"'),
]


@pytest.mark.parametrize("text, canonical", CANONICAL_CASES)
def test_filter_renders_as_canonical_text(text, canonical):
    """RFC 7644 §3.4.2.2: "attribute operators used in filters are case insensitive"."""
    assert str(parse_filter(text)) == canonical


LITERALS = [
    ('"plain"', "plain"),
    ('""', ""),
    ('"tab\\tquote\\"slash\\/back\\\\"', 'tab\tquote"slash/back\\'),
    ('"\\u00e9\\u20AC"', "é€"),
    ('"\\ud83d\\ude00"', "😀"),
    ("true", True),
    ("FALSE", False),
    ("Null", None),
    ("0", 0),
    ("-12", -12),
    ("3.25", 3.25),
    ("-0.5", -0.5),
    ("1e3", 1000.0),
    ("2.5E-2", 0.025),
]


@pytest.mark.parametrize("literal, value", LITERALS)
def test_comparison_values_are_json_literals(literal, value):
    """RFC 7644 §3.4.2.2: compValue = false / null / true / number / string (RFC 7159)."""
    node = parse_filter(f"x eq {literal}")
    assert node.value == value
    assert type(node.value) is type(value)  # 1 == True in Python; the type must be right


KEY_CASES = [
    ("userName", "username"),
    ("name.givenName", "name.givenname"),
    ("emails.value", "emails.value"),
    ("members.$ref", "members.$ref"),
    (f"{CORE_USER}:userName", "username"),
    (f"{CORE_USER.upper()}:USERNAME", "username"),
    (f"{CORE_USER}:name.familyName", "name.familyname"),
    (f"{CORE_GROUP}:displayName", "displayname"),
    (f"{ENTERPRISE}:manager.value", "urn:ietf:params:scim:schemas:extension:enterprise:2.0:user:manager.value"),
    (f"{ENTERPRISE}:employeeNumber", "urn:ietf:params:scim:schemas:extension:enterprise:2.0:user:employeenumber"),
]


@pytest.mark.parametrize("text, key", KEY_CASES)
def test_attribute_path_key_is_normalised(text, key):
    """RFC 7644 §3.10: a core attribute may carry its schema URN; names are case-insensitive."""
    (path,) = walk_paths(parse_filter(f"{text} pr"))
    assert path.key == key
    assert str(path) == text


def test_urn_version_dots_are_not_sub_attribute_separators():
    """RFC 7644 §3.10: the attribute is after the URN's last colon; "2.0" belongs to the URN."""
    node = parse_filter(f'{ENTERPRISE}:manager.value eq "x"')
    assert node.path == AttrPath(ENTERPRISE, "manager", "value")


# --------------------------------------------------------------------------- errors

ERROR_CASES = [
    ("", "filter is empty"),
    ("   \t ", "filter is empty"),
    ("userName", "expected an operator (eq, ne, co, sw, ew, gt, ge, lt, le or pr) after 'userName' at position 9, found end of filter"),
    ('userName eqq "x"', "unknown operator 'eqq' at position 10"),
    ('userName == "x"', "unexpected character '=' at position 10"),
    ("userName eq", "expected a value after 'eq' (a \"string\", a number, true, false or null) at position 12, found end of filter"),
    ("userName eq bjensen", "found 'bjensen'; strings must be in double quotes"),
    ("userName eq 'bjensen'", "unexpected ' at position 13: strings must be in double quotes"),
    ('userName eq "x" garbage', "expected 'and', 'or' or end of filter at position 17, found 'garbage'"),
    ('userName eq "x" and', "expected an attribute name, '(' or 'not' at position 20, found end of filter"),
    ('(userName eq "x"', "expected ')' at position 17, found end of filter; the '(' at position 1 is not closed"),
    ('userName eq "x")', "unbalanced ')' at position 16"),
    ('emails[type eq "work"', "expected ']' at position 22, found end of filter; the '[' at position 7 is not closed"),
    ('emails[type eq "work"]]', "unbalanced ']' at position 23"),
    ('emails[type eq "work")', "expected ']' at position 22, found ')'"),
    ('not userName eq "x"', "expected '(' after 'not' at position 5, found 'userName'"),
    ("not", "expected '(' after 'not' at position 4, found end of filter"),
    ('userName eq "unterminated', "unterminated string starting at position 13"),
    ('userName eq "bad \\q escape"', "invalid escape in the string at position 13"),
    ('userName eq "\\u12"', "invalid escape in the string at position 13"),
    ("age gt 007", "invalid number '007' at position 8"),
    ("age gt 1.", "invalid number '1.' at position 8"),
    ("age gt 1e999", "number out of range at position 8"),
    ("active gt true", "operator 'gt' cannot be used with true"),
    ("title co null", "operator 'co' cannot be used with null"),
    ("foo:bar pr", "invalid attribute path 'foo:bar' at position 1"),
    ("name.givenName.x pr", "invalid attribute path 'name.givenName.x' at position 1"),
    ("1abc pr", "expected an attribute name, '(' or 'not' at position 1, found '1abc'"),
    ("urn:x pr", "invalid attribute path 'urn:x' at position 1"),
    (f"{ENTERPRISE}: pr", "invalid attribute path"),
    ("user$name pr", "invalid attribute path 'user$name' at position 1"),
    ('emails[emails.type eq "work"]', "expected a sub-attribute name of 'emails' inside '[...]' at position 8, found 'emails.type'"),
    ('emails[a[b pr]]', "value filters cannot be nested (position 9)"),
    ('name.givenName[value pr]', "'[' at position 15 must follow an attribute, not the sub-attribute 'name.givenName'"),
    ('emails[type eq "work"].value', "expected an operator"),
    ('emails[type eq "work"] eq "x"', "expected 'and', 'or' or end of filter at position 24, found 'eq'"),
    ('emails[type eq "work"].', "invalid sub-attribute '.' at position 23"),
    ("a eq \"x\" \x00", "unexpected character U+0000 at position 10"),
    ("()", "expected an attribute name, '(' or 'not' at position 2, found ')'"),
]


@pytest.mark.parametrize("text, message", ERROR_CASES, ids=[repr(c[0])[:50] for c in ERROR_CASES])
def test_bad_filter_is_a_filter_error_with_a_clear_message(text, message):
    """RFC 7644 §3.4.2.2: an invalid filter is a 400 with scimType invalidFilter."""
    with pytest.raises(FilterError) as caught:
        parse_filter(text)
    error = caught.value
    assert message in str(error)
    assert error.scim_type == "invalidFilter" and error.status == 400
    assert "Token" not in str(error) and "object at" not in str(error)


def test_filter_error_is_a_value_error_with_a_position():
    with pytest.raises(ValueError) as caught:
        parse_filter('userName eq "x" or')
    assert caught.value.position == 19


def test_nesting_up_to_the_limit_parses():
    """A hostile filter cannot exhaust the stack: nesting is capped at MAX_DEPTH."""
    text = "(" * MAX_DEPTH + "a pr" + ")" * MAX_DEPTH
    assert parse_filter(text) == Present(A("a"))


@pytest.mark.parametrize(
    "text",
    [
        "(" * (MAX_DEPTH + 1) + "a pr" + ")" * (MAX_DEPTH + 1),
        "not (" * MAX_DEPTH + "a pr" + ")" * MAX_DEPTH,
        "(" * 100_000 + "a pr" + ")" * 100_000,
        "not (" * 10_000,
        "a[" * 1000,
    ],
    ids=["limit+1 parens", "limit nots", "100k parens", "10k unclosed nots", "1000 brackets"],
)
def test_nesting_past_the_limit_is_refused(text):
    with pytest.raises(FilterError, match="nested too deeply|cannot be nested"):
        parse_filter(text)


def test_long_flat_or_stays_shallow_and_evaluates():
    """Given 20,000 `or` terms, the tree is balanced, so evaluation needs no deep recursion."""
    node = parse_filter(" or ".join(f'id eq "{n}"' for n in range(20_000)))
    assert depth(node) <= 16
    assert matches(node, {"id": "19999"}) and not matches(node, {"id": "20000"})
    assert len(list(walk_paths(node))) == 20_000


# --------------------------------------------------------------------------- PATCH paths

PATH_CASES = [
    ("members", PatchPath(A("members")), "members"),
    ('members[value eq "2819c223"]', PatchPath(A("members"), eq("value", "2819c223")), "members"),
    ('emails[type eq "work"].value', PatchPath(A("emails"), eq("type", "work"), "value"), "emails.value"),
    ("name.givenName", PatchPath(A("name", "givenName")), "name.givenname"),
    (
        'addresses[type eq "work"].streetAddress',
        PatchPath(A("addresses"), eq("type", "work"), "streetAddress"),
        "addresses.streetaddress",
    ),
    (
        f"{ENTERPRISE}:manager",
        PatchPath(A("manager", uri=ENTERPRISE)),
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:user:manager",
    ),
    (
        f"{ENTERPRISE}:employeeNumber",
        PatchPath(A("employeeNumber", uri=ENTERPRISE)),
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:user:employeenumber",
    ),
    (f"{CORE_USER}:name.familyName", PatchPath(A("name", "familyName", CORE_USER)), "name.familyname"),
    (
        'emails[type eq "work" and primary eq true].value',
        PatchPath(A("emails"), And(eq("type", "work"), eq("primary", True)), "value"),
        "emails.value",
    ),
    ('  members[ value EQ "x" ]  ', PatchPath(A("members"), eq("value", "x")), "members"),
]


@pytest.mark.parametrize("text, expected, key", PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_parse_path(text, expected, key):
    """RFC 7644 §3.5.2: PATH = attrPath / valuePath [subAttr]."""
    path = parse_path(text)
    assert path == expected
    assert path.key == key
    assert parse_path(str(path)) == path


PATH_ERRORS = [
    ("", "path is empty", "invalidPath"),
    ('members eq "x"', "expected '[' or end of path at position 9, found 'eq'", "invalidPath"),
    ("name.givenName.x", "invalid attribute path 'name.givenName.x' at position 1", "invalidPath"),
    ('name.givenName[value eq "x"]', "must follow an attribute", "invalidPath"),
    ('emails[type eq "work"]value', "expected a '.sub-attribute' or end of path at position 23, found 'value'", "invalidPath"),
    ('emails[type eq "work"].value.x', "expected end of path at position 29, found '.x'", "invalidPath"),
    ("[value pr]", "expected an attribute path at position 1, found '['", "invalidPath"),
    ("members[", "expected an attribute name, '(' or 'not' at position 9, found end of path", "invalidFilter"),
    ("members[value eq]", "expected a value after 'eq'", "invalidFilter"),
    ('members[value eq "x"', "expected ']' at position 21, found end of path", "invalidFilter"),
]


@pytest.mark.parametrize("text, message, scim_type", PATH_ERRORS, ids=[c[0] or "empty" for c in PATH_ERRORS])
def test_bad_path_is_an_error(text, message, scim_type):
    """RFC 7644 §3.12: a bad path is invalidPath; a bad filter inside it is invalidFilter."""
    with pytest.raises(FilterError) as caught:
        parse_path(text)
    assert message in str(caught.value)
    assert caught.value.scim_type == scim_type


# --------------------------------------------------------------------------- walk_paths

WALK_CASES = [
    ('userName eq "x"', ["username"]),
    ('emails[type eq "work"]', ["emails.type"]),
    ('emails[type eq "work"].value eq "x"', ["emails.type", "emails.value"]),
    (
        f'not (title pr) or {ENTERPRISE}:manager[value eq "1"] and name.givenName sw "B"',
        ["title", "urn:ietf:params:scim:schemas:extension:enterprise:2.0:user:manager.value", "name.givenname"],
    ),
]


@pytest.mark.parametrize("text, keys", WALK_CASES)
def test_walk_paths_yields_absolute_paths_in_order(text, keys):
    """Every path a caller must check against its whitelist before translating to SQL."""
    assert [path.key for path in walk_paths(parse_filter(text))] == keys


def test_walk_paths_of_a_value_path_keeps_the_parent_urn():
    (path,) = walk_paths(parse_filter(f'{ENTERPRISE}:manager[value eq "1"]'))
    assert path == AttrPath(ENTERPRISE, "manager", "value")


def test_walk_paths_of_a_patch_path_starts_with_its_target():
    paths = list(walk_paths(parse_path('emails[type eq "work"].value')))
    assert [p.key for p in paths] == ["emails.value", "emails.type"]
    assert [p.key for p in walk_paths(parse_path("name.givenName"))] == ["name.givenname"]


# --------------------------------------------------------------------------- evaluation

USER = {
    "schemas": [CORE_USER, ENTERPRISE],
    "id": "2819c223-7f76-453a-919d-413861904646",
    "externalId": "701984",
    "userName": "bjensen@example.com",
    "name": {"formatted": "Ms. Barbara J Jensen III", "familyName": "Jensen", "givenName": "Barbara"},
    "displayName": "Babs Jensen",
    "nickName": "",
    "userType": "Employee",
    "title": "Tour Guide",
    "active": True,
    "loginCount": 42,
    "score": 7.5,
    "emails": [
        {"value": "bjensen@example.com", "type": "work", "primary": True},
        {"value": "babs@jensen.org", "type": "home"},
    ],
    "phoneNumbers": [],
    "addresses": [{"type": "work", "streetAddress": "100 Universal City Plaza", "locality": "Hollywood"}],
    "roles": ["Admin", "Billing"],
    "meta": {
        "resourceType": "User",
        "created": "2010-01-23T04:56:22Z",
        "lastModified": "2011-05-13T04:42:34Z",
    },
    ENTERPRISE: {
        "employeeNumber": "701984",
        "department": "Tour Operations",
        "manager": {"value": "26118915-6090-4610-87e4-49d8ca9f808d", "displayName": "John Smith"},
    },
}

USER_CASES = [
    # Equality is case-insensitive by default; names are case-insensitive (RFC 7643 §2.1).
    ('userName eq "bjensen@example.com"', True),
    ('userName eq "BJensen@Example.COM"', True),
    ('USERNAME Eq "bjensen@example.com"', True),
    ('userName eq "bjensen"', False),
    ('userName ne "someone@example.com"', True),
    ('userName ne "BJENSEN@example.com"', False),
    ('externalId eq "701984"', True),
    ('externalId eq 701984', False),  # a number never equals a string
    ('id eq "2819c223-7f76-453a-919d-413861904646"', True),
    (f'{CORE_USER}:userName eq "bjensen@example.com"', True),
    # co / sw / ew
    ('name.familyName co "ens"', True),
    ('name.FAMILYNAME sw "JEN"', True),
    ('name.familyName ew "sen"', True),
    ('name.familyName ew "jen"', False),
    ('displayName co ""', True),
    # Multi-valued: any element; without a sub-attribute, a complex element's "value".
    ('emails co "jensen.org"', True),
    ('emails eq "babs@jensen.org"', True),
    ('emails eq "home"', False),
    ('emails.value ew "@example.com"', True),
    ('emails.type eq "home"', True),
    ('emails.type ne "work"', True),  # the "home" element is not "work"
    ('emails.primary eq true', True),
    ('emails.primary eq false', False),
    ('roles eq "admin"', True),
    ('roles co "bill"', True),
    ('roles eq "Owner"', False),
    # Value paths: one element must satisfy the whole bracket.
    ('emails[type eq "work" and value co "@example.com"]', True),
    ('emails[type eq "home" and value co "@example.com"]', False),
    ('emails[type eq "work"].value eq "bjensen@example.com"', True),
    ('emails[type eq "home"].value eq "bjensen@example.com"', False),
    ('emails[type eq "home"].primary pr', False),
    ('emails[not (type eq "work")].value ew ".org"', True),
    ('addresses[type eq "work"].streetAddress sw "100"', True),
    ('phoneNumbers[type eq "work"]', False),
    ('name[givenName eq "barbara"]', True),
    ('roles[value eq "billing"]', True),
    ('displayName[value eq "x"]', False),
    # Numbers.
    ("loginCount gt 41", True),
    ("loginCount ge 42", True),
    ("loginCount lt 42", False),
    ("loginCount le 42.0", True),
    ("loginCount eq 42", True),
    ("score gt 7.25", True),
    ("score lt 1e1", True),
    ('loginCount eq "42"', False),
    ("loginCount co 4", False),
    # Booleans: only eq / ne.
    ("active eq true", True),
    ("active eq TRUE", True),
    ("active ne false", True),
    ("active eq false", False),
    ('active eq "true"', False),
    ("active eq 1", False),
    ("loginCount eq true", False),
    # Date-times (RFC 7643 §2.3.5) compare chronologically, across offsets.
    ('meta.lastModified gt "2011-05-13T04:42:33Z"', True),
    ('meta.lastModified gt "2011-05-13T04:42:34Z"', False),
    ('meta.lastModified ge "2011-05-13T04:42:34Z"', True),
    ('meta.lastModified lt "2011-05-13T06:42:35+02:00"', True),
    ('meta.lastModified gt "2011-05-13T06:42:35+02:00"', False),
    ('meta.lastModified eq "2011-05-13T06:42:34+02:00"', True),
    ('meta.lastModified eq "2011-05-13T04:42:34.000Z"', True),
    ('meta.lastModified gt "2011-05-13"', True),
    ('meta.created lt "2011-01-01T00:00:00Z"', True),
    ('meta.lastModified sw "2011-05"', True),
    # Strings order lexicographically, case-insensitively.
    ('title gt "tour"', True),
    ('title lt "TOUR GUIDE"', False),
    ('title lt "TOUR GUIDF"', True),
    ('title le "tour guide"', True),
    # pr: present and not null / "" / [] (RFC 7644 §3.4.2.2).
    ("title pr", True),
    ("nickName pr", False),
    ("phoneNumbers pr", False),
    ("profileUrl pr", False),
    ("emails pr", True),
    ("emails.primary pr", True),
    ("addresses.country pr", False),
    ("name pr", True),
    ("active pr", True),
    # null: unassigned, null and [] are the same state (RFC 7643 §2.5).
    ("profileUrl eq null", True),
    ("phoneNumbers eq null", True),
    ("nickName eq null", True),
    ("title eq null", False),
    ("title ne null", True),
    ("profileUrl ne null", False),
    ('profileUrl ne "x"', True),
    ('profileUrl eq "x"', False),
    ('profileUrl co ""', False),
    # Extension attributes live under their URN.
    (f'{ENTERPRISE}:employeeNumber eq "701984"', True),
    (f'{ENTERPRISE.lower()}:EMPLOYEENUMBER eq "701984"', True),
    (f'{ENTERPRISE}:manager.value eq "26118915-6090-4610-87e4-49d8ca9f808d"', True),
    (f'{ENTERPRISE}:manager.displayName sw "john"', True),
    (f'{ENTERPRISE}:manager[value sw "2611"]', True),
    (f'{ENTERPRISE}:costCenter pr', False),
    ('employeeNumber eq "701984"', False),  # without its URN it names a core attribute
    ('urn:example:schemas:other:1.0:User:employeeNumber eq "701984"', False),
    # not, and, or, precedence.
    ('not (userName eq "x")', True),
    ('not (userName eq "bjensen@example.com")', False),
    ('userType eq "Employee" and (emails co "example.com" or emails.value co "example.org")', True),
    ('userType eq "Intern" and (emails co "example.com" or emails.value co "example.org")', False),
    ('userType ne "Employee" and not (emails co "example.com" or emails.value co "example.org")', False),
    ('title pr or userType eq "Intern" and active eq false', True),  # and binds tighter
    ('(title pr or userType eq "Intern") and active eq false', False),
    ('not (title pr) or userType eq "Employee"', True),
    ('not (title pr) and userType eq "Employee"', False),
]


@pytest.mark.parametrize("text, expected", USER_CASES, ids=[c[0][:70] for c in USER_CASES])
def test_matches_user(text, expected):
    """RFC 7644 §3.4.2.2 operators (Table 3) and grouping (Table 5) on an RFC 7643 §8.2 user."""
    assert matches(parse_filter(text), USER) is expected


def test_matches_against_keys_of_any_case():
    """RFC 7643 §2.1: attribute names are case-insensitive, in the resource too."""
    resource = {"USERNAME": "bjensen", "Emails": [{"VALUE": "b@x.org", "Type": "work"}], ENTERPRISE.upper(): {"Department": "Ops"}}
    assert matches(parse_filter('userName eq "bjensen"'), resource)
    assert matches(parse_filter('emails[type eq "work"].value eq "b@x.org"'), resource)
    assert matches(parse_filter(f'{ENTERPRISE}:department eq "ops"'), resource)


GROUP = {
    "schemas": [CORE_GROUP],
    "id": "e9e30dba-f08f-4109-8486-d5c6a331660a",
    "externalId": "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159",
    "displayName": "Group 1",
    "members": [
        {"value": "2819c223-7f76-453a-919d-413861904646", "display": "Babs Jensen", "$ref": "https://example.com/v2/Users/2819c223"},
        {"value": "902c246b-6245-4190-8e05-00816be7344a", "display": "Mandy Pepperidge"},
    ],
    "meta": {"resourceType": "Group", "lastModified": "2024-02-29T23:59:59.123+00:00"},
}

GROUP_CASES = [
    ('displayName eq "Group 1"', True),
    ('displayName eq "group 1"', True),
    ('displayName eq "Group 2"', False),
    ('externalId eq "8AA1A0C0-C4C3-4BC0-B4A5-2EF676900159"', True),
    ('members[value eq "2819c223-7f76-453a-919d-413861904646"]', True),
    ('members[value eq "00000000-0000-0000-0000-000000000000"]', False),
    ('members eq "902c246b-6245-4190-8e05-00816be7344a"', True),
    ('members.display co "mandy"', True),
    ('members[display sw "babs" and value sw "9"]', False),
    ("members.$ref pr", True),
    ('members[$ref pr].value eq "902c246b-6245-4190-8e05-00816be7344a"', False),
    ('meta.lastModified ge "2024-03-01T00:59:59.123+01:00"', True),
    ('meta.lastModified gt "2024-03-01T00:00:00Z"', False),
    (f'{CORE_GROUP}:displayName sw "group"', True),
]


@pytest.mark.parametrize("text, expected", GROUP_CASES, ids=[c[0][:70] for c in GROUP_CASES])
def test_matches_group(text, expected):
    """RFC 7644 §3.4.2.2 on an RFC 7643 §8.4 group; members is multi-valued complex."""
    assert matches(parse_filter(text), GROUP) is expected


def test_empty_group_has_no_members():
    group = {**GROUP, "members": []}
    assert not matches(parse_filter('members[value eq "2819c223-7f76-453a-919d-413861904646"]'), group)
    assert matches(parse_filter("members eq null"), group)
    assert not matches(parse_filter("members pr"), group)


CASE_EXACT_CASES = [
    # (filter, attributes that are caseExact, expected)
    ('id eq "2819C223-7F76-453A-919D-413861904646"', {"id"}, False),
    ('id eq "2819c223-7f76-453a-919d-413861904646"', {"id"}, True),
    ('userName eq "BJENSEN@example.com"', {"id"}, True),
    ('emails.value eq "BJENSEN@example.com"', {"emails.value"}, False),
    ('emails eq "BJENSEN@example.com"', {"emails.value"}, False),
    ('emails[type eq "WORK"]', {"emails.type"}, False),
    ('emails[type eq "work"]', {"emails.type"}, True),
    ('name.familyName sw "jen"', {"name.familyname"}, False),
    ('name.familyName sw "Jen"', {"name.familyname"}, True),
    ('title gt "tour"', {"title"}, False),  # "T" < "t" in code points
    (f'{ENTERPRISE}:employeeNumber co "7019"', {f"{ENTERPRISE.lower()}:employeenumber"}, True),
    (f'{ENTERPRISE}:manager[displayName eq "john smith"]', {f"{ENTERPRISE.lower()}:manager.displayname"}, False),
]


@pytest.mark.parametrize("text, exact, expected", CASE_EXACT_CASES, ids=[c[0][:70] for c in CASE_EXACT_CASES])
def test_case_exact_attributes_compare_case_sensitively(text, exact, expected):
    """RFC 7644 §3.4.2.2: string comparison honours the attribute's caseExact (RFC 7643 §2.2)."""
    seen: list[str] = []

    def case_exact(key: str) -> bool:
        seen.append(key)
        return key in exact

    assert matches(parse_filter(text), USER, case_exact) is expected
    assert seen and all(key == key.lower() for key in seen)


def test_case_exact_is_asked_with_the_absolute_key():
    seen: list[str] = []
    matches(parse_filter('emails[type eq "work"].value eq "x" or emails eq "y"'), USER, lambda key: seen.append(key) or False)
    assert set(seen) == {"emails.type", "emails.value"}


ODD_RESOURCE = {
    "userName": 12,
    "name": "not a dict",
    "emails": {"value": "single@x.org"},
    "roles": [None, 3, {"value": None}, ["nested"], "Admin"],
    "active": "True",
    "loginCount": "42",
    "meta": {"lastModified": "yesterday"},
    ENTERPRISE: "not a dict",
    "phoneNumbers": None,
    "flag": 1,
}


@pytest.mark.parametrize(
    "text, expected",
    [
        ('userName eq "12"', False),
        ("userName eq 12", True),
        ("userName sw 1", False),
        ('name.givenName eq "x"', False),
        ("name.givenName pr", False),
        ('name[givenName eq "x"]', False),
        ('emails eq "single@x.org"', True),  # a single complex value is treated like one element
        ('emails.value eq "single@x.org"', True),
        ('roles eq "admin"', True),
        ("roles gt 2", True),
        ('roles[value eq "admin"]', True),
        ("active eq true", False),
        ("active ne true", False),
        ("flag eq true", False),  # 1 == True in Python, not in SCIM
        ("flag eq 1", True),
        ("loginCount gt 41", False),
        ('meta.lastModified gt "2011-05-13T04:42:34Z"', True),  # not a date: compared as text
        (f'{ENTERPRISE}:employeeNumber pr', False),
        (f'{ENTERPRISE}:manager[value pr]', False),
        ('phoneNumbers[type eq "work"]', False),
        ("phoneNumbers eq null", True),
    ],
)
def test_type_mismatch_is_no_match_not_an_exception(text, expected):
    """A resource of unexpected shape never makes evaluation raise."""
    assert matches(parse_filter(text), ODD_RESOURCE) is expected


def test_matches_does_not_modify_the_resource():
    before = copy.deepcopy(USER)
    matches(parse_filter('emails[type eq "work"].value pr and meta.lastModified gt "2000-01-01T00:00:00Z"'), USER)
    assert USER == before


def test_matches_refuses_what_is_not_a_filter():
    with pytest.raises(TypeError):
        matches(parse_path("members"), GROUP)  # type: ignore[arg-type]
    assert matches(parse_filter("id pr"), ["not", "a", "dict"]) is False  # type: ignore[arg-type]


def test_hand_built_nodes_evaluate_like_parsed_ones():
    """Nodes are plain frozen dataclasses a caller can build (RFC 7644 §3.4.2.2 semantics)."""
    node = ValueFilter(AttrPath(None, "emails", None), And(eq("type", "work"), eq("value", "bjensen@example.com")))
    assert node == parse_filter('emails[type eq "work"].value eq "bjensen@example.com"')
    assert matches(node, USER)
    assert hash(node) == hash(parse_filter(str(node)))
