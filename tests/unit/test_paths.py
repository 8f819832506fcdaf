"""afs.paths: one rule per test, each rejection with its own class and rule name."""
import pytest
from hypothesis import given, strategies as st

from afs import paths
from afs.errors import InvalidInput, InvalidPath, PathTooDeep, ReservedPath


def _rule(exc_info):
    return exc_info.value.details["rule"]


@pytest.mark.parametrize("good,norm", [
    ("/", "/"), ("/a", "/a"), ("/a/b/c", "/a/b/c"), ("/a/", "/a"), ("/a/b/", "/a/b"),
    ("/é/日本", "/é/日本"), ("/a b/c-d_e.f", "/a b/c-d_e.f"), ("/...", "/..."), ("/a/.b", "/a/.b"),
    ("/x/.afs", "/x/.afs"), ("/afs", "/afs"),
])
def test_valid_paths_normalise(good, norm):
    """Valid paths come back normalised; only one trailing slash is dropped."""
    assert paths.normalize(good) == norm


@pytest.mark.parametrize("bad,rule", [
    ("", "empty"),
    ("a/b", "absolute"),
    ("//", "empty_component"),
    ("/a//b", "empty_component"),
    ("/a//", "empty_component"),
    ("/a/./b", "dot_component"),
    ("/a/..", "dot_component"),
    ("/.", "dot_component"),
    ("/a\x00b", "control_char"),
    ("/a\nb", "control_char"),
    ("/a\x7f", "control_char"),
    ("/a\x85", "control_char"),
    ("/a\ud800", "utf8"),
    ("/" + "x" * 256, "name_length"),
    ("/" + "é" * 128, "name_length"),              # 256 bytes, 128 characters
    ("/" + "/".join(["y" * 255] * 17), "path_length"),  # 4352 bytes
])
def test_invalid_paths_rejected_with_rule(bad, rule):
    """Each malformed path raises InvalidPath naming its rule and the path."""
    with pytest.raises(InvalidPath) as ei:
        paths.normalize(bad)
    assert _rule(ei) == rule
    assert "invalid path" in str(ei.value)
    assert ei.value.code == "invalid_path"


def test_non_string_rejected():
    """bytes and None are not paths."""
    for bad in (b"/a", None, 3):
        with pytest.raises(InvalidPath) as ei:
            paths.normalize(bad)
        assert _rule(ei) == "type"


def test_name_of_255_bytes_ok():
    """A 255-byte component (multi-byte characters counted in bytes) is allowed."""
    assert paths.normalize("/" + "x" * 255)
    assert paths.normalize("/" + "é" * 127 + "x")


def test_path_of_4096_bytes_ok():
    """Exactly 4096 bytes is allowed."""
    p = "/" + "/".join(["y" * 255] * 16)   # 16*256 = 4096 bytes
    assert len(p.encode()) == 4096
    assert paths.normalize(p, max_depth=None) == p


def test_depth_limit():
    """Depth over the limit raises PathTooDeep with limit and actual; it is configurable."""
    p64 = "/a" * 64
    assert paths.normalize(p64) == p64
    with pytest.raises(PathTooDeep) as ei:
        paths.normalize(p64 + "/a")
    assert ei.value.details["limit"] == 64 and ei.value.details["actual"] == 65
    assert isinstance(ei.value, InvalidInput)
    assert paths.normalize("/a/b/c", max_depth=3)
    with pytest.raises(PathTooDeep):
        paths.normalize("/a/b/c", max_depth=2)
    assert paths.normalize(p64 + "/a", max_depth=None)


@pytest.mark.parametrize("bad", ["/.afs", "/.afs/status", "/.afsx", "/.afs/"])
def test_reserved_root_names(bad):
    """Names starting with .afs directly under the root are reserved."""
    with pytest.raises(ReservedPath) as ei:
        paths.normalize(bad)
    assert _rule(ei) == "reserved"


def test_error_details_are_wire_safe():
    """Details of a hostile path survive msgpack (no lone surrogates, bounded)."""
    import msgpack
    for bad in ("/a\ud800", "/" + "x" * 100_000):
        with pytest.raises(InvalidPath) as ei:
            paths.normalize(bad)
        msgpack.packb(ei.value.to_wire(), use_bin_type=True)
        assert len(str(ei.value)) < 400


def test_split_components_join_depth_ancestors():
    """The helpers agree with each other on normalised paths."""
    assert paths.split("/a/b/c") == ("/a/b", "c")
    assert paths.split("/a") == ("/", "a")
    with pytest.raises(InvalidPath):
        paths.split("/")
    assert paths.components("/") == []
    assert paths.components("/a/b") == ["a", "b"]
    assert paths.join("/", "a") == "/a"
    assert paths.join("/a", "b", "c") == "/a/b/c"
    for bad in ("", "a/b", ".", "..", "x\x00"):
        with pytest.raises(InvalidPath):
            paths.join("/a", bad)
    with pytest.raises(ReservedPath):
        paths.join("/", ".afs")
    assert paths.depth("/") == 0 and paths.depth("/a/b") == 2
    assert paths.ancestors("/a/b/c") == ["/", "/a", "/a/b"]
    assert paths.ancestors("/") == []
    assert paths.parent("/a/b") == "/a"


def test_is_ancestor_and_is_within():
    """is_ancestor is proper and component-wise; is_within includes the path itself."""
    assert paths.is_ancestor("/", "/a")
    assert paths.is_ancestor("/a", "/a/b/c")
    assert not paths.is_ancestor("/a", "/ab")
    assert not paths.is_ancestor("/a", "/a")
    assert not paths.is_ancestor("/a/b", "/a")
    assert paths.is_within("/a", "/a") and paths.is_within("/a/b", "/a")
    assert not paths.is_within("/ab", "/a")
    assert paths.is_within("/x", "/")


names = st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/"),
                min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))


@given(st.lists(names, min_size=1, max_size=8))
def test_roundtrip_components(parts):
    """normalize(join(components)) is the identity on valid paths."""
    if parts[0].startswith(".afs"):
        parts[0] = "x" + parts[0]
    p = "/" + "/".join(parts)
    assert paths.normalize(p) == p
    assert paths.components(p) == parts
    assert paths.join("/", *parts) == p
    parent, name = paths.split(p)
    assert name == parts[-1] and paths.is_ancestor(parent, p)


def test_normalize_is_fast():
    """A cached normalize costs about a microsecond (the server calls it per request)."""
    import time
    p = "/services/db/primary/host"
    paths.normalize(p)
    t0 = time.perf_counter()
    for _ in range(10000):
        paths.normalize(p)
    assert (time.perf_counter() - t0) / 10000 < 20e-6
