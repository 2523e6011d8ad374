"""Hardening (issue 13, items 1-6), against the real app with the demo model on loopback.

What is served (history.jsonl never, the UI's images yes), Host allow-list (DNS rebinding), no CORS and no cross-site
POSTs, JSON-only API, Unicode credentials compared as bytes and throttled, prompts sanitised before tokenizing,
body limits enforced while reading (with an RSS bound), and refusing a public bind without auth.
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.client import HTTPConnection
from http.cookiejar import CookieJar
from pathlib import Path

import psutil
import pytest

from zimage.appprocess import ROOT, AppProcess, free_port, http
from zimage import security
from zimage.request import GenerationRequest, RequestError, resolve
from zimage.settings import Settings, SettingsError

SMALL = {"size": "256x256", "steps": 1}
JSON = {"Content-Type": "application/json"}
USER, PASSWORD = "üser", "pässwörd 🔑"  # any Unicode, in both halves
FOREIGN_HOST = "rebind.attacker.example"


@pytest.fixture(scope="module")
def app(tmp_path_factory, cache_dir):
    with AppProcess(tmp_path_factory.mktemp("sec"), cache_dir, "--warmup", "off") as server:
        yield server


@pytest.fixture(scope="module")
def auth_app(tmp_path_factory, cache_dir):
    with AppProcess(tmp_path_factory.mktemp("sec-auth"), cache_dir, "--warmup", "off", "--allowed-hosts",
                    "zimage.example.com", env={"ZIMAGE_AUTH": f"{USER}:{PASSWORD}"}) as server:
        yield server


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def as_client(address: str) -> dict:
    """uvicorn trusts X-Forwarded-For from 127.0.0.1 (a local proxy), so each test can be its own client."""
    return {"X-Forwarded-For": address}


def generate(server, prompt: str, headers: dict | None = None) -> dict:
    status, _, body = http("POST", server.url + "/v1/images/generations",
                           json.dumps({"prompt": prompt, "seed": 1, **SMALL}).encode(), {**JSON, **(headers or {})})
    assert status == 200, body[:300]
    return json.loads(body)


def wait_for_index(server, timeout: float = 30) -> Path:
    index = server.outputs / "history.jsonl"
    deadline = time.monotonic() + timeout
    while not (index.exists() and index.stat().st_size and list(server.outputs.glob("*/*.png"))):
        assert time.monotonic() < deadline, "nothing was saved"
        time.sleep(0.2)
    return index


def file_urls(server, path: Path) -> list[str]:
    """Every way Gradio's file route could be asked for `path`."""
    relative = os.path.relpath(path, ROOT)  # the app's cwd is the repository
    quoted = urllib.parse.quote(str(path), safe="")
    return [f"/gradio_api/file={path}", f"/gradio_api/file={relative}", f"/gradio_api/file={quoted}",
            f"/gradio_api/file/{path}", f"/gradio_api/file={path.parent}/./{path.name}"]


def login_opener(server) -> urllib.request.OpenerDirector:
    """A urllib opener holding Gradio's session cookie, logged in with the Unicode credentials."""
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    form = urllib.parse.urlencode({"username": USER, "password": PASSWORD}).encode()
    with opener.open(urllib.request.Request(server.url + "/login", form, headers=as_client("192.0.2.50"))) as resp:
        assert resp.status == 200 and json.loads(resp.read()) == {"success": True}
    return opener


def fetch(opener, url: str) -> tuple[int, str, bytes]:
    try:
        with opener.open(url, timeout=60) as resp:
            return resp.status, resp.headers.get("content-type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("content-type", ""), exc.read()


def history_gallery_urls(server, opener) -> list[str]:
    """What the History tab shows: call its (private) refresh event the way the browser does."""
    _, _, config = fetch(opener, server.url + "/config")
    deps = json.loads(config)["dependencies"]
    fn_index = next(i for i, d in enumerate(deps) if d.get("api_name") == "history_items")
    request = urllib.request.Request(server.url + "/gradio_api/run/predict", json.dumps(
        {"fn_index": fn_index, "data": [], "session_hash": "sectest"}).encode(), JSON)
    with opener.open(request, timeout=60) as resp:
        gallery = json.loads(resp.read())["data"][0]
    return [item["image"]["url"] for item in gallery]


# ---- 1. what is served -------------------------------------------------------------------------------------
def check_outputs_not_served(server, opener) -> None:
    index = wait_for_index(server)
    png = sorted(server.outputs.glob("*/*.png"))[0]
    for target in (index, png, server.outputs, png.parent):
        for url in file_urls(server, target):
            status, _, body = fetch(opener, server.url + url)
            assert status in (403, 404), (url, status, body[:200])
            assert b"prompt" not in body
    urls = history_gallery_urls(server, opener)
    assert urls, "the History tab is empty"
    for url in urls:
        assert str(server.outputs) not in urllib.parse.unquote(url)  # Gradio's cached copy, not the original
        status, content_type, body = fetch(opener, url)
        assert status == 200 and content_type == "image/png" and body.startswith(b"\x89PNG"), (url, status)


def test_history_index_is_not_served_but_history_images_are(app):
    generate(app, "a secret prompt about a red circle")
    check_outputs_not_served(app, urllib.request.build_opener())


def test_history_index_is_not_served_to_a_logged_in_user_either(auth_app):
    generate(auth_app, "another secret prompt", basic(USER, PASSWORD))
    check_outputs_not_served(auth_app, login_opener(auth_app))


def test_generated_image_reaches_the_ui(app):
    from gradio_client import Client

    gallery, _, details = Client(app.url, verbose=False).predict("a blue square", "Draft", "1:1", 4, False, 1,
                                                                  api_name="/generate")
    assert details["seeds"] == [4] and Path(gallery[0]["image"]).stat().st_size > 0  # fetched from its URL


# ---- 2. Host allow-list, CORS, Origin ------------------------------------------------------------------------
ROUTES = [("GET", "/"), ("GET", "/config"), ("GET", "/gradio_api/info"), ("GET", "/metrics"),
          ("POST", "/v1/images/generations"), ("POST", "/gradio_api/queue/join"), ("GET", "/docs")]


@pytest.mark.parametrize("method,path", ROUTES, ids=[p for _, p in ROUTES])
@pytest.mark.parametrize("host", [f"{FOREIGN_HOST}:{{port}}", FOREIGN_HOST, "0.0.0.0:{port}", "127.0.0.1.nip.io",
                                  "localhost.attacker.example", "[::2]:{port}"])
def test_foreign_host_gets_400(app, method, path, host):
    body = json.dumps({"prompt": "a red circle", **SMALL}).encode() if method == "POST" else None
    status, _, answer = http(method, app.url + path, body, {**JSON, "Host": host.format(port=app.port)})
    assert status == 400, (status, answer[:200])
    assert b"--allowed-hosts" in answer


def test_loopback_hosts_work_and_config_does_not_echo_foreign_hosts(app):
    for host in ("127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "LOCALHOST"):
        status, _, config = http("GET", app.url + "/config", headers={"Host": host.format(port=app.port)})
        assert status == 200 and FOREIGN_HOST.encode() not in config
    for path in ("/healthz", "/readyz"):  # probes may use an IP as Host: exempt, they reveal nothing private
        assert http("GET", app.url + path, headers={"Host": "10.1.2.3:7860"})[0] == 200


def test_allowed_hosts_adds_names(auth_app):
    status, _, _ = http("GET", auth_app.url + "/metrics", headers={"Host": "zimage.example.com",
                                                                   **basic(USER, PASSWORD)})
    assert status == 200
    assert http("GET", auth_app.url + "/metrics", headers={"Host": "evil.example.com"})[0] == 400


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "[::1]:{port}", "localhost:{port}"])
def test_no_cors_headers_for_foreign_origins(app, host):
    """Gradio reflects any Origin with Allow-Credentials when Host is not one of its localhost aliases ([::1] or a
    real name); nothing here is meant to be read cross-origin, so every CORS header is removed."""
    headers = {"Host": host.format(port=app.port), "Origin": "https://evil.example"}
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    for method, path, extra in (("GET", "/config", {}), ("GET", "/gradio_api/info", {}),
                                ("OPTIONS", "/gradio_api/queue/join", preflight)):
        status, answer_headers, _ = http(method, app.url + path, headers={**headers, **extra})
        assert status < 500
        assert not [k for k in answer_headers if k.startswith("access-control-")], (path, answer_headers)


def test_no_cors_headers_behind_a_real_name(auth_app):
    opener_headers = {"Host": "zimage.example.com", "Origin": "https://evil.example"}
    status, answer_headers, _ = http("GET", auth_app.url + "/config", headers=opener_headers)
    assert not [k for k in answer_headers if k.startswith("access-control-")], answer_headers


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:1", "http://localhost:{port}"])
def test_cross_site_posts_are_refused(app, origin):
    origin = origin.format(port=app.port)  # localhost:port is another origin than 127.0.0.1:port (Host below)
    body = json.dumps({"prompt": "csrf", **SMALL}).encode()
    for path, content_type in (("/v1/images/generations", "application/json"),
                               ("/gradio_api/queue/join", "application/json"),
                               ("/gradio_api/upload", "multipart/form-data; boundary=x"),
                               ("/login", "application/x-www-form-urlencoded")):
        status, _, answer = http("POST", app.url + path, body, {"Content-Type": content_type, "Origin": origin})
        assert status == 403 and b"cross-origin" in answer, (path, status, answer[:200])


def test_same_origin_posts_work(app):
    origin = {"Origin": app.url}
    assert generate(app, "same origin", origin)["data"]
    status, _, _ = http("POST", app.url + "/v1/images/generations", b'{"prompt": ""}',
                        {**JSON, "Origin": f"http://localhost:{app.port}", "Host": f"localhost:{app.port}"})
    assert status == 400  # reached the route (empty prompt), not refused as cross-site


# ---- 3. JSON only on the JSON API -----------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None,
                                          "multipart/form-data; boundary=x", "application/jsonp", "text/json"])
def test_json_api_refuses_other_content_types(app, content_type):
    before = http("GET", app.url + "/metrics")[2]
    conn = HTTPConnection("127.0.0.1", app.port, timeout=60)  # urllib would add a Content-Type itself
    conn.request("POST", "/v1/images/generations", json.dumps({"prompt": "csrf", **SMALL}).encode(),
                 {"Content-Type": content_type} if content_type else {})
    resp = conn.getresponse()
    status, payload = resp.status, resp.read()
    conn.close()
    assert status == 415, payload[:200]
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"} and "application/json" in error["message"]
    after = http("GET", app.url + "/metrics")[2]

    def openai_counts(text: bytes) -> list[str]:
        return [line for line in text.decode().splitlines() if line.startswith('zimage_requests_total{route="openai"')]

    assert openai_counts(after) == openai_counts(before)  # refused before the route: nothing counted, nothing run


def test_json_api_accepts_json_with_charset(app):
    status, _, body = http("POST", app.url + "/v1/images/generations", json.dumps({"prompt": "a", **SMALL}).encode(),
                           {"Content-Type": "Application/JSON; charset=utf-8"})
    assert status == 200, body[:200]


# ---- 4. credentials ---------------------------------------------------------------------------------------
def test_unicode_credentials_work_for_basic_bearer_and_gradio_login(auth_app):
    client = as_client("192.0.2.10")
    assert http("GET", auth_app.url + "/metrics", headers={**basic(USER, PASSWORD), **client})[0] == 200
    assert generate(auth_app, "a red circle", {**basic(USER, PASSWORD), **client})["data"]
    bearer = {"Authorization": f"Bearer {PASSWORD}".encode()}  # raw UTF-8 bytes, as curl sends them
    assert http("GET", auth_app.url + "/metrics", headers={**bearer, **client})[0] == 200

    from gradio_client import Client

    gradio = Client(auth_app.url, auth=(USER, PASSWORD), verbose=False)
    assert gradio.predict("a red circle", "Draft", "1:1", 2, False, 1, api_name="/generate")[2]["seeds"] == [2]
    with pytest.raises(ValueError, match="Could not login"):
        Client(auth_app.url, auth=(USER, "pässwörd"), verbose=False)


def test_latin1_clients_match_too():
    """requests' HTTPBasicAuth and http.client send str credentials as ISO-8859-1."""
    header = b"Basic " + base64.b64encode("ann:pässwörd".encode("latin-1"))
    assert security.credentials_match(header, "ann", "pässwörd")
    assert security.credentials_match("Bearer pässwörd".encode("latin-1"), "ann", "pässwörd")
    assert not security.credentials_match(header, "ann", "passwörd")


WRONG = [
    basic(USER, "pässwörd"), basic("user", PASSWORD), basic(USER, PASSWORD + " "), basic("🔑", "🔑"),
    {"Authorization": b"Basic " + base64.b64encode(b"\xff\xfe:\xed\xa0\x80")},  # invalid UTF-8, a surrogate
    {"Authorization": b"Basic " + base64.b64encode(USER.encode())},  # no colon
    {"Authorization": "Basic !!!not base64"}, {"Authorization": "Basic"}, {"Authorization": "Bearer"},
    {"Authorization": b"Bearer \xff\xfe\xfd"}, {"Authorization": "Bearer pässwörd".encode("latin-1")},
    {"Authorization": "Digest username=x"}, {},
]


@pytest.mark.parametrize("headers", WRONG, ids=[str(i) for i in range(len(WRONG))])
def test_wrong_credentials_get_401_never_500(auth_app, headers):
    client = as_client(f"192.0.2.{100 + WRONG.index(headers)}")
    for method, path in (("GET", "/metrics"), ("POST", "/v1/images/generations")):
        body = json.dumps({"prompt": "a", **SMALL}).encode() if method == "POST" else None
        status, answer_headers, payload = http(method, auth_app.url + path, body, {**JSON, **headers, **client})
        assert status == 401, (path, status, payload[:200])
        assert json.loads(payload)["error"]["type"] == "authentication_error"
        assert "basic" in answer_headers["www-authenticate"].lower()


def test_failed_logins_are_throttled_per_address(auth_app):
    attacker, other = as_client("198.51.100.7"), as_client("198.51.100.8")
    statuses = [http("GET", auth_app.url + "/metrics", headers={**basic(USER, f"guess{i}"), **attacker})[0]
                for i in range(security.LOGIN_MAX_FAILURES)]
    assert statuses == [401] * security.LOGIN_MAX_FAILURES
    status, headers, payload = http("GET", auth_app.url + "/metrics", headers={**basic(USER, PASSWORD), **attacker})
    assert status == 429 and 1 <= int(headers["retry-after"]) <= security.LOGIN_WINDOW_SECONDS, payload
    assert json.loads(payload)["error"]["code"] == "login_throttled"
    form = urllib.parse.urlencode({"username": USER, "password": PASSWORD}).encode()
    form_headers = {"Content-Type": "application/x-www-form-urlencoded"}
    assert http("POST", auth_app.url + "/login", form, {**form_headers, **attacker})[0] == 429  # one throttle
    assert http("GET", auth_app.url + "/metrics", headers={**basic(USER, PASSWORD), **other})[0] == 200


def test_gradio_login_failures_are_throttled(auth_app):
    client = {"Content-Type": "application/x-www-form-urlencoded", **as_client("198.51.100.20")}
    wrong = urllib.parse.urlencode({"username": USER, "password": "nope"}).encode()
    statuses = [http("POST", auth_app.url + "/login", wrong, client)[0] for _ in range(security.LOGIN_MAX_FAILURES)]
    assert statuses == [400] * security.LOGIN_MAX_FAILURES  # Gradio's "Incorrect credentials."
    right = urllib.parse.urlencode({"username": USER, "password": PASSWORD}).encode()
    status, headers, _ = http("POST", auth_app.url + "/login", right, client)
    assert status == 429 and int(headers["retry-after"]) >= 1
    bearer = {"Authorization": f"Bearer {PASSWORD}".encode(), **as_client("198.51.100.20")}
    assert http("GET", auth_app.url + "/metrics", headers=bearer)[0] == 429  # the API shares the throttle


def test_throttle_window_slides():
    now = [0.0]
    throttle = security.LoginThrottle(max_failures=3, window=10, clock=lambda: now[0])
    for t in (0, 1, 2):
        now[0] = t
        assert throttle.retry_after("a") is None
        throttle.failed("a")
    assert throttle.retry_after("a") == 8 and throttle.retry_after("b") is None
    now[0] = 10.5
    assert throttle.retry_after("a") is None  # the first failure aged out: one more try
    small = security.LoginThrottle(max_failures=1, window=10, max_addresses=2, clock=lambda: now[0])
    for address in "xyz":
        small.failed(address)
    assert small.retry_after("x") is None and small.retry_after("z") is not None  # bounded table


# ---- 5. prompts --------------------------------------------------------------------------------------------
SURROGATES = ['"a \\ud800"', '"\\udc00 a red circle"', '"a \\ud83d"']


@pytest.mark.parametrize("prompt", SURROGATES)
def test_lone_surrogate_gets_400_on_the_json_api(app, prompt):
    raw = ('{"prompt": %s, "size": "256x256", "steps": 1}' % prompt).encode()
    status, _, payload = http("POST", app.url + "/v1/images/generations", raw, JSON)
    assert status == 400, payload[:300]
    error = json.loads(payload)["error"]
    assert "surrogate" in error["message"] and error["param"] == "prompt"


def test_surrogate_pair_is_fine(app):
    raw = b'{"prompt": "a red circle \\ud83d\\ude00", "size": "256x256", "steps": 1}'
    status, _, payload = http("POST", app.url + "/v1/images/generations", raw, JSON)
    assert status == 200 and json.loads(payload)["data"][0]["revised_prompt"] == "a red circle 😀"


def gradio_queue_call(server, api_name: str, data_json: bytes, session: str) -> dict:
    """Join Gradio's queue the way the browser does (raw JSON, so a lone surrogate escape reaches the server:
    gradio_client would fail to encode it on our side) and return the process_completed message."""
    deps = json.loads(http("GET", server.url + "/config")[2])["dependencies"]
    fn_index = next(i for i, d in enumerate(deps) if d.get("api_name") == api_name)
    raw = b'{"data": %s, "fn_index": %d, "session_hash": "%s"}' % (data_json, fn_index, session.encode())
    status, _, answer = http("POST", server.url + "/gradio_api/queue/join", raw, JSON)
    assert status == 200, answer[:200]
    with urllib.request.urlopen(f"{server.url}/gradio_api/queue/data?session_hash={session}", timeout=120) as resp:
        for line in resp:
            if line.startswith(b"data:"):
                message = json.loads(line[5:])
                if message["msg"] == "process_completed":
                    return message
    raise AssertionError("no process_completed message")


def test_lone_surrogate_gets_a_clear_error_on_the_gradio_api(app):
    done = gradio_queue_call(app, "generate", b'["a \\ud800 circle", "Draft", "1:1", 1, false, 1]', "surrogate1")
    assert done["success"] is False
    assert "surrogate" in done["output"]["error"] and "TypeError" not in done["output"]["error"], done
    done = gradio_queue_call(app, "generate", b'["a red\\u0085 circle", "Draft", "1:1", 1, false, 1]', "c1")
    assert done["success"] is True and "control characters" in json.dumps(done["output"]["data"][2]["warnings"])


def test_c1_and_format_controls_are_removed_with_a_warning(app):
    prompt = "a red\x85 circle\x9b on a\x00 blue\u202e background\ufeff\u200b"
    status, _, payload = http("POST", app.url + "/v1/images/generations",
                              json.dumps({"prompt": prompt, "seed": 1, **SMALL}).encode(), JSON)
    answer = json.loads(payload)
    assert status == 200 and answer["data"][0]["revised_prompt"] == "a red circle on a blue background"
    warning = next(w for w in answer["zimage"]["warnings"] if "control characters" in w)
    for code in ("U+0085", "U+009B", "U+0000", "U+202E", "U+FEFF", "U+200B"):
        assert code in warning


@pytest.mark.parametrize("prompt,expected,warned", [
    ("line one\nline two\twith a tab", "line one\nline two\twith a tab", False),
    ("windows\r\nline", "windows\nline", False),
    ("old mac\rline", "old macline", True),
    *[(text, text, False) for text in ["family 👨\u200d👩\u200d👧 and مي\u200cخواهم"]],  # ZWJ, ZWNJ kept
    ("tag\U000e0041\U000e0042 smuggling", "tag smuggling", True),
    ("soft\xadhyphen", "softhyphen", True),
    ("\x1b[31mred\x1b[0m", "[31mred[0m", True),
    ("蓝色背景上的红色圆形", "蓝色背景上的红色圆形", False),
])
def test_prompt_sanitising_rules(prompt, expected, warned):
    job = resolve(GenerationRequest(prompt, width=256, height=256, steps=1, seed=1))
    assert job.prompt == expected
    assert any("control characters" in w for w in job.warnings) == warned


def test_only_controls_is_an_empty_prompt():
    with pytest.raises(RequestError, match="prompt is empty"):
        resolve(GenerationRequest("\x85\u200b\ufeff", width=256, height=256, steps=1))


# ---- 6. body limits ---------------------------------------------------------------------------------------
def rss_watch(pid: int):
    """Peak RSS of `pid` while the returned stop() is not yet called; stop() gives (baseline, peak) bytes."""
    proc = psutil.Process(pid)
    baseline = proc.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()

    def stop():
        done.set()
        thread.join()
        return baseline, peak[0]

    return stop


def stream_body(port: int, path: str, total: int, headers: dict, prefix: bytes = b"", chunk: int = 1 << 20):
    """POST a chunked body of `total` bytes, stopping as soon as the server answers; (status line, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode())
    sent, data = 0, b"x" * chunk
    try:
        if prefix:
            sock.sendall(b"%x\r\n%s\r\n" % (len(prefix), prefix))
            sent += len(prefix)
        while sent < total and not select.select([sock], [], [], 0)[0]:
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
            sent += len(data)
        else:
            if sent >= total:
                sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server may close while we send; its answer is still in our socket buffer
    answer = b""
    try:
        while b"\r\n" not in answer:
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
    except OSError:
        pass
    sock.close()
    return answer.split(b"\r\n")[0].decode(), sent


MULTIPART_HEAD = (b'--zimageboundary\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
                  b"Content-Type: image/png\r\n\r\n")


@pytest.mark.parametrize("path,headers,prefix,limit", [
    ("/v1/images/generations", JSON, b"", security.BODY_LIMIT),
    ("/gradio_api/queue/join", JSON, b"", security.BODY_LIMIT),
    ("/gradio_api/run/generate", JSON, b"", security.BODY_LIMIT),
    ("/login", {"Content-Type": "application/x-www-form-urlencoded"}, b"username=a&password=", security.BODY_LIMIT),
    ("/gradio_api/upload", {"Content-Type": "multipart/form-data; boundary=zimageboundary"}, MULTIPART_HEAD,
     security.BODY_LIMITS["/gradio_api/upload"]),
], ids=["openai", "queue-join", "run", "login", "upload"])
def test_streamed_oversized_body_is_cut_off_and_memory_stays_bounded(app, path, headers, prefix, limit):
    stop = rss_watch(app.proc.pid)
    status, sent = stream_body(app.port, path, 400 << 20, headers, prefix)
    baseline, peak = stop()
    assert status.startswith("HTTP/1.1 413"), status
    assert sent < limit + (32 << 20), f"the server read {sent >> 20} MiB before refusing"
    assert peak - baseline < 64 << 20, f"RSS grew by {(peak - baseline) >> 20} MiB"
    assert http("GET", app.url + "/healthz")[0] == 200


def test_unauthenticated_oversized_body_is_refused_before_auth(auth_app):
    stop = rss_watch(auth_app.proc.pid)
    status, sent = stream_body(auth_app.port, "/gradio_api/queue/join", 300 << 20, JSON)
    baseline, peak = stop()
    assert status.startswith("HTTP/1.1 413") and sent < 64 << 20 and peak - baseline < 64 << 20, (status, sent)


@pytest.mark.parametrize("path,length", [("/v1/images/generations", 1_000_000_000),
                                         ("/gradio_api/queue/join", 300_000_000),
                                         ("/gradio_api/upload", security.BODY_LIMITS["/gradio_api/upload"] + 1),
                                         ("/", 2 << 20)])
def test_declared_oversized_body_gets_413_at_once(app, path, length):
    """Content-Length over the limit: 413 without waiting for (or reading) a single byte of the body."""
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode())
        t0 = time.monotonic()
        answer = sock.recv(65536)
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
                answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0]):
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.monotonic() - t0 < 5 and str(length).encode() in answer


def test_a_slightly_oversized_body_still_gets_its_413_with_urllib(app):
    """urllib sends the whole body before reading and says Connection: close; the 413 must still arrive."""
    status, _, payload = http("POST", app.url + "/v1/images/generations",
                              json.dumps({"prompt": "a" * (2 << 20)}).encode(), JSON)
    assert status == 413 and json.loads(payload)["error"]["code"] == "request_too_large"


def test_a_png_upload_within_the_limit_works(app, tmp_path):
    import io

    import numpy as np
    import PIL.Image

    png = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (1400, 1400, 3), dtype=np.uint8)).save(png, "PNG")
    assert png.tell() > security.BODY_LIMIT  # bigger than the default limit: the upload route has its own
    body = MULTIPART_HEAD + png.getvalue() + b"\r\n--zimageboundary--\r\n"
    status, _, payload = http("POST", app.url + "/gradio_api/upload", body,
                              {"Content-Type": "multipart/form-data; boundary=zimageboundary"})
    assert status == 200 and json.loads(payload)[0].endswith("big.png"), payload[:200]


# ---- start-up: a public bind needs auth ------------------------------------------------------------------------
@pytest.mark.parametrize("args,env", [(["--host", "0.0.0.0"], {}), ([], {"ZIMAGE_HOST": "0.0.0.0"}),
                                      (["--host", "::"], {}), (["--host", "192.0.2.1"], {})])
def test_public_bind_without_auth_exits_2(tmp_path, args, env):
    proc = subprocess.run([sys.executable, "app.py", "--model", "tiny", "--port", str(free_port()),
                           "--outputs", str(tmp_path / "out"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "ZIMAGE_AUTH": "", **env})
    assert proc.returncode == 2, proc.stderr
    assert "--allow-public-no-auth" in proc.stderr and "--auth" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before anything started


def test_exposure_rules():
    def check(*argv, env=None):
        security.check_exposure(Settings.load(list(argv), env=env or {}))

    check()  # 127.0.0.1
    check("--host", "localhost")
    check("--host", "::1")
    check("--host", "127.0.0.2")
    check("--host", "0.0.0.0", "--auth", "ann:s3cret")
    check("--host", "0.0.0.0", "--allow-public-no-auth")
    check("--host", "0.0.0.0", env={"ZIMAGE_ALLOW_PUBLIC_NO_AUTH": "1"})
    for host in ("0.0.0.0", "::", "10.0.0.5", "myhost.example.com"):
        with pytest.raises(SettingsError, match="allow-public-no-auth"):
            check("--host", host)
    with pytest.raises(SettingsError, match="allow-public-no-auth"):
        check("--host", "0.0.0.0", "--allow-public-no-auth", "off")


@pytest.mark.parametrize("raw,needle", [("*,example.com", "alone"), ("http://x.example", "not a host"),
                                        ("a b", "not a host"), ("x:99999", "not a host")])
def test_allowed_hosts_values_are_checked(raw, needle):
    with pytest.raises(SettingsError) as info:
        Settings.load(["--allowed-hosts", raw], env={})
    assert "--allowed-hosts" in str(info.value) and "ZIMAGE_ALLOWED_HOSTS" in str(info.value)
    assert needle in str(info.value)


def test_host_list_rules():
    hosts = security.HostList.for_settings(Settings.load(["--host", "10.0.0.5", "--allowed-hosts",
                                                          "Zimage.Example.com,proxy.lan:8443"], env={}))
    for ok in ("localhost", "localhost:7860", "127.0.0.1:7860", "[::1]:7860", "10.0.0.5:7860", "zimage.example.com",
               "ZIMAGE.example.com.:443", "proxy.lan:8443"):
        assert hosts.allows(ok), ok
    for bad in (None, "", "evil.example", "zimage.example.com.evil.example", "proxy.lan:8444", "10.0.0.6",
                "localhost@evil.example", "127.0.0.1 evil", "[::1", "[::1]x", "0.0.0.0:7860"):
        assert not hosts.allows(bad), bad
    assert security.HostList.for_settings(Settings.load(["--allowed-hosts", "*"], env={})).allows("anything")
    assert not security.HostList.for_settings(Settings.load(["--host", "0.0.0.0"], env={})).allows("0.0.0.0")


def test_auth_must_be_text():
    with pytest.raises(SettingsError, match="UTF-8"):
        Settings.load([], env={"ZIMAGE_AUTH": "ann:p\udcffss"})  # what an undecodable env byte turns into
    assert Settings.load([], env={"ZIMAGE_AUTH": f"{USER}:{PASSWORD}"}).auth_pair() == (USER, PASSWORD)


# ---- in a real browser: Unicode login, History tab images ------------------------------------------------------
@pytest.mark.browser
def test_unicode_login_and_history_in_a_browser(auth_app):
    from tests.test_browser import CHROMIUM

    if not Path(CHROMIUM).exists():
        if os.environ.get("ZIMAGE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"chromium not found at {CHROMIUM}")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    generate(auth_app, "a yellow star for the history tab", basic(USER, PASSWORD))
    wait_for_index(auth_app)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(auth_app.url, wait_until="load", timeout=60_000)
            page.get_by_label("username").fill(USER)
            page.get_by_label("password").fill("pässwörd")  # wrong: refused, the page stays on the form
            page.get_by_role("button", name="Login").click()
            page.get_by_text("Incorrect", exact=False).first.wait_for(timeout=30_000)
            page.get_by_label("username").fill(USER)  # the form clears itself after a failure
            page.get_by_label("password").fill(PASSWORD)
            page.get_by_role("button", name="Login").click()
            page.get_by_text("ready").first.wait_for(timeout=60_000)
            page.get_by_role("tab", name="History").click()
            image = page.locator("img[src*='/gradio_api/file=']").first
            image.wait_for(state="visible", timeout=60_000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                                   timeout=30_000)
            assert str(auth_app.outputs) not in urllib.parse.unquote(image.get_attribute("src"))
        finally:
            browser.close()


def test_expect_100_continue_gets_413_without_sending_the_body(app):
    """curl sends 'Expect: 100-continue' for bodies over 1 MiB: the 413 comes instead of the 100, and no body."""
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {2 << 20}\r\nExpect: 100-continue\r\n\r\n".encode())
        t0 = time.monotonic()
        answer = sock.recv(65536)
        elapsed = time.monotonic() - t0
        sock.settimeout(1.5)
        try:
            while piece := sock.recv(65536):
                answer += piece
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 413") and elapsed < 2, answer[:100]
    assert b"100 Continue" not in answer  # the body was not asked for
