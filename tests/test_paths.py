"""Path mapping: `normalise`, `split_target` and `RouteMap`, by example and by property,
and end to end: no request target sends the proxy anywhere but the model server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.paths import RouteMap, normalise, split_target

from .conftest import fake_upstream, in_process_proxy
from .test_forward import SAFETY, Recorder, request, send

# -- normalise ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/", b"/"),
        (b"", b"/"),
        (b"/a/b", b"/a/b"),
        (b"/a/b/", b"/a/b/"),
        (b"//a///b//", b"/a/b/"),
        (b"//127.0.0.1:9/x", b"/127.0.0.1:9/x"),
        (b"//evil.example/", b"/evil.example/"),
        (b"/http://evil.example/x", b"/http:/evil.example/x"),
        (b"/@evil.example/x", b"/@evil.example/x"),
        (b"/%2F%2Fevil.example/x", b"/%2F%2Fevil.example/x"),  # encoded: not a separator
        (b"/..%2f..%2fetc/passwd", b"/..%2f..%2fetc/passwd"),
        (b"/../../etc/passwd", b"/etc/passwd"),
        (b"/a/../../b", b"/b"),
        (b"/a/./b/.", b"/a/b/"),
        (b"/a/b/..", b"/a/"),
        (b"/a/..", b"/"),
        (b"/..", b"/"),
        (b"/.", b"/"),
        (b"/%2e%2e/%2E%2e/x", b"/x"),
        (b"/a/.%2e/b", b"/b"),
        (b"/a/%2e./b", b"/b"),
        (b"/a/%2e/b", b"/a/b"),
        (b"/...", b"/..."),  # three dots is a name
        (b"/..a/a..", b"/..a/a.."),
        (b"/%252e%252e/x", b"/%252e%252e/x"),  # decoded once by nobody: a name
        (b"a/b", b"/a/b"),  # no leading slash: no segment is lost
    ],
)
def test_normalise(path: bytes, expected: bytes) -> None:
    assert normalise(path) == expected


SEGMENTS = st.sampled_from(
    [b"", b".", b"..", b"%2e", b"%2E%2e", b".%2e", b"%2e.", b"a", b"b.c", b"...", b"%2F", b"@h"]
)
PATHS = st.one_of(
    st.binary(max_size=40),
    st.lists(st.one_of(SEGMENTS, st.binary(max_size=4)), max_size=10).map(b"/".join),
    st.lists(SEGMENTS, max_size=10).map(lambda parts: b"/" + b"/".join(parts)),
)


def is_dot(segment: bytes) -> bool:
    return segment.lower() in {b".", b"..", b"%2e", b".%2e", b"%2e.", b"%2e%2e"}


@given(PATHS)
@example(b"/a/./")
@example(b"//")
@example(b"/%2e%2e/")
def test_normalise_properties(path: bytes) -> None:
    result = normalise(path)
    assert result.startswith(b"/")
    assert not result.startswith(b"//")
    assert b"//" not in result
    assert not any(is_dot(segment) for segment in result.split(b"/"))
    assert normalise(result) == result


@given(st.lists(st.sampled_from([b"a", b"b", b"c"]), max_size=6))
def test_normalise_keeps_plain_paths(segments: list[bytes]) -> None:
    path = b"/" + b"/".join(segments)
    assert normalise(path) == path


# -- split_target -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/sync/x", (b"/sync/x", b"")),
        (b"/sync/x?", (b"/sync/x", b"?")),
        (b"/sync/x?a=%2F&b=+&c=&a=1", (b"/sync/x", b"?a=%2F&b=+&c=&a=1")),
        (b"/sync/x?next=/y?z", (b"/sync/x", b"?next=/y?z")),
        (b"//127.0.0.1:9/x", (b"//127.0.0.1:9/x", b"")),
        (b"http://127.0.0.1:9/sync/x?q=1", (b"/sync/x", b"?q=1")),
        (b"http://127.0.0.1:9", (b"/", b"")),
        (b"https://user@evil.example:443/predict", (b"/predict", b"")),
        (b"*", None),
        (b"127.0.0.1:9", None),
        (b"evil.example", None),
    ],
)
def test_split_target(target: bytes, expected: tuple[bytes, bytes] | None) -> None:
    assert split_target(target) == expected


# -- RouteMap -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "query", "expected"),
    [
        (b"/predict", b"", ("predict", b"/v1/chat")),
        (b"/predict", b"?stream=1", ("predict", b"/v1/chat?stream=1")),
        (b"/sync", b"", ("sync", b"/")),
        (b"/sync/", b"", ("sync", b"/")),
        (b"/sync", b"?a=1", ("sync", b"/?a=1")),
        (b"/sync/v1/models", b"", ("sync", b"/v1/models")),
        (b"/sync//127.0.0.1:9/x", b"", ("sync", b"/127.0.0.1:9/x")),
        (b"/sync/http://evil.example/", b"", ("sync", b"/http:/evil.example/")),
        (b"/sync/%2F%2Fevil.example", b"", ("sync", b"/%2F%2Fevil.example")),
        (b"/sync/@evil.example", b"", ("sync", b"/@evil.example")),
        (b"/sync/../../x", b"", ("sync", b"/x")),
        (b"/sync/..", b"", ("sync", b"/")),
        (b"/sync/%2e%2e/%2e%2e/x", b"?y", ("sync", b"/x?y")),
        (b"/sync/a/..%2f..%2fb", b"", ("sync", b"/a/..%2f..%2fb")),
        (b"/", b"", None),
        (b"/predictx", b"", None),
        (b"/predict/", b"", None),
        (b"/syncx", b"", None),
        (b"/sync..", b"", None),
        (b"//sync/x", b"", None),
        (b"/SYNC/x", b"", None),
    ],
)
def test_route_map(path: bytes, query: bytes, expected: tuple[str, bytes] | None) -> None:
    assert RouteMap("/v1/chat").upstream_target(path, query) == expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", b"/v1/run?model=a"),
        (b"?", b"/v1/run?model=a"),
        (b"?b=2", b"/v1/run?model=a&b=2"),
        (b"?model=b", b"/v1/run?model=a&model=b"),
    ],
)
def test_a_predict_endpoint_with_a_query(query: bytes, expected: bytes) -> None:
    assert RouteMap("/v1/run?model=a").upstream_target(b"/predict", query) == (
        "predict",
        expected,
    )


TARGET_PIECES = st.sampled_from(
    [b"/", b"//", b"/sync", b"/sync/", b"/predict", b"..", b".", b"%2e", b"%2F", b"@", b":",
     b"http://", b"127.0.0.1:9", b"evil", b"?", b"#", b"\\"]
)  # fmt: skip


@given(
    st.one_of(
        st.binary(max_size=40),
        st.lists(TARGET_PIECES, max_size=12).map(b"".join),
        st.lists(st.one_of(TARGET_PIECES, st.binary(max_size=3)), max_size=12).map(
            lambda parts: b"/sync/" + b"".join(parts)
        ),
    )
)
@example(b"/sync//evil/x")
@example(b"http://evil/sync//evil/")
def test_route_map_only_gives_origin_form_targets(target: bytes) -> None:
    split = split_target(target)
    if split is None:
        return
    mapped = RouteMap("/v1/chat").upstream_target(*split)
    if mapped is None:
        return
    route, upstream = mapped
    assert route in ("predict", "sync")
    assert upstream.startswith(b"/")
    assert not upstream.startswith(b"//")
    path = upstream.partition(b"?")[0]
    assert b"//" not in path
    assert not any(is_dot(segment) for segment in path.split(b"/"))


# -- end to end: a decoy server that must never be reached ---------------------------------


async def test_no_request_target_reaches_another_server(tmp_path: Path) -> None:
    decoy_hits: list[bytes] = []

    async def decoy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoy_hits.append(await reader.read(100))
        writer.close()

    decoy_server = await asyncio.start_server(decoy, "127.0.0.1", 0)
    other = f"127.0.0.1:{decoy_server.sockets[0].getsockname()[1]}"
    cases: list[tuple[str, str | None]] = [
        # (request target, what the model server receives; None: the proxy answers itself)
        (f"//{other}/x", None),
        (f"//{other}/sync/x", None),
        (f"http://{other}/sync/x", "/x"),
        (f"http://{other}/predict?q=1", "/predict?q=1"),
        (f"http://{other}/", None),
        (f"/sync//{other}/x", f"/{other}/x"),
        (f"/sync/http://{other}/x", f"/http:/{other}/x"),
        (f"/sync/@{other}/x", f"/@{other}/x"),
        (f"/sync/%2F%2F{other}/x", f"/%2F%2F{other}/x"),
        ("/sync/..%2f..%2f", "/..%2f..%2f"),
        ("/sync/../../../etc/passwd", "/etc/passwd"),
        ("/sync/%2e%2e/%2e%2e/x", "/x"),
        ("/sync/a/.%2E/..", "/"),
        (other, None),
        ("*", None),
    ]
    upstream = Recorder()
    try:
        async with (
            fake_upstream(upstream.app) as port,
            in_process_proxy(tmp_path, port) as (_, url),
        ):
            for target, expected in cases:
                for host in ("proxy.test", other):
                    upstream.seen.clear()
                    response = await send(url, request("GET", target, [("Host", host)]))
                    if expected is None:
                        assert response.status in (400, 404), (target, response)
                        assert upstream.seen == []
                    else:
                        assert response.status == 200, (target, response)
                        assert upstream.targets == [expected]
            # CONNECT asks for a tunnel to another host: refused, and nothing is dialled
            connect = await send(url, f"CONNECT {other} HTTP/1.1\r\nHost: {other}\r\n\r\n".encode())
            assert connect.status == 405
    finally:
        decoy_server.close()
        await decoy_server.wait_closed()
    assert decoy_hits == []


async def test_a_redirect_from_the_model_server_is_passed_not_followed(tmp_path: Path) -> None:
    decoy_hits: list[bytes] = []

    async def decoy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoy_hits.append(await reader.read(100))
        writer.close()

    decoy_server = await asyncio.start_server(decoy, "127.0.0.1", 0)
    location = f"http://127.0.0.1:{decoy_server.sockets[0].getsockname()[1]}/x"

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(location)

    app = web.Application()
    app.router.add_get("/go", redirect)
    try:
        async with (
            fake_upstream(app) as port,
            in_process_proxy(tmp_path, port) as (_, url),
            asyncio.timeout(SAFETY),
        ):
            response = await send(url, request("GET", "/sync/go"))
            assert response.status == 302
            assert response.header("location") == location
    finally:
        decoy_server.close()
        await decoy_server.wait_closed()
    assert decoy_hits == []


async def test_absolute_form_keeps_the_query_byte_for_byte(tmp_path: Path) -> None:
    upstream = Recorder()
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        target = "http://ignored.example/sync/q?a=%2F&b=+&c=&a=1"
        async with asyncio.timeout(SAFETY):
            response = await send(url, request("GET", target))
        assert response.status == 200
        assert upstream.targets == ["/q?a=%2F&b=+&c=&a=1"]
