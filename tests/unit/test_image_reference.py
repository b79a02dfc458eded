"""Reference parsing: Docker Hub defaults, error messages, and a property test."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kata_ipu.image.reference import InvalidReference, Reference, parse_reference

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(("text", "expected"), [
    ("busybox", Reference("docker.io", "library/busybox", "latest")),
    ("busybox:1.36", Reference("docker.io", "library/busybox", "1.36")),
    ("user/app", Reference("docker.io", "user/app", "latest")),
    ("index.docker.io/library/alpine:3", Reference("docker.io", "library/alpine", "3")),
    ("localhost/app", Reference("localhost", "app", "latest")),
    ("localhost:5000/a/b/c:t", Reference("localhost:5000", "a/b/c", "t")),
    ("127.0.0.1:5000/app@" + D, Reference("127.0.0.1:5000", "app", None, D)),
    ("ghcr.io/o/r:v1@" + D, Reference("ghcr.io", "o/r", "v1", D)),
    ("[::1]:5000/x", Reference("[::1]:5000", "x", "latest")),
    ("a.b-c/x__y.z-w:T_1.2-3", Reference("a.b-c", "x__y.z-w", "T_1.2-3")),
])
def test_parse(text, expected):
    assert parse_reference(text) == expected
    assert parse_reference(str(expected)) == expected  # canonical form round-trips


@pytest.mark.parametrize(("text", "part"), [
    ("", "empty"),
    ("Busybox", "'Busybox' must be lowercase"),
    ("docker.io/Library/x", "'Library' must be lowercase"),
    ("busybox:", "tag ''"),
    ("busybox:-bad", "tag '-bad'"),
    ("busybox@sha256:123", "digest part 'sha256:123'"),
    ("busybox@md5:" + "a" * 32, "unsupported algorithm 'md5'"),
    ("reg.io:99999/x", "port '99999'"),
    ("reg_io.com:5000/x", "host 'reg_io.com'"),
    ("reg.io//x", "empty path component"),
    ("reg.io/", "missing repository"),
    ("a b", "whitespace"),
    ("x/" + "a" * 300, "longer than 255"),
])
def test_reject_names_the_bad_part(text, part):
    with pytest.raises(InvalidReference) as info:
        parse_reference(text)
    assert part in str(info.value)
    assert repr(text) in str(info.value)


def test_loopback_detection():
    assert parse_reference("127.0.0.2:5000/a").is_loopback
    assert parse_reference("localhost/a").is_loopback
    assert parse_reference("[::1]:5000/a").is_loopback
    assert not parse_reference("10.0.0.1:5000/a").is_loopback
    assert not parse_reference("busybox").is_loopback


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("abAZ09._-:/@[]sha256 \n"), max_size=40) | st.text())
def test_arbitrary_strings_parse_or_fail_cleanly(text):
    try:
        ref = parse_reference(text)
    except InvalidReference as exc:
        assert exc.text == text and exc.why
        return
    # Anything accepted is normalised and stable.
    assert parse_reference(str(ref)) == ref
    assert ref.tag or ref.digest


_comp = st.from_regex(r"[a-z0-9]{1,5}(?:[._-][a-z0-9]{1,5}){0,2}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["docker.io", "reg.example:5000", "127.0.0.1:5000", "localhost"]),
       st.lists(_comp, min_size=1, max_size=3),
       st.none() | st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True))
def test_valid_references_round_trip(registry, parts, tag):
    text = f"{registry}/{'/'.join(parts)}" + (f":{tag}" if tag else "")
    ref = parse_reference(text)
    assert ref.registry == registry
    assert ref.tag == (tag or "latest")
    repo = "/".join(parts)
    assert ref.repository == (f"library/{repo}" if registry == "docker.io" and len(parts) == 1
                              else repo)
