"""API fuzzing: hostile bodies to POST /v1/images/generations never get a 5xx, and every 4xx says why; hostile
Host/Origin/Content-Type headers and Unicode credentials never get through, nor a 5xx.

Hypothesis mutates a small valid body (prompt, 256x256, 1 step) with hostile values for known fields and
unknown extra fields; hand-picked nasties cover what random search rarely finds. Bodies that happen to be
valid are kept cheap (a CPU runs them): if the app's own validator says a body would render more than
512x512x4 steps worth of pixels, its size is swapped for 256x256 before sending.

    python -m tests.fuzz --examples 500     # longer run; CI runs ZIMAGE_FUZZ_EXAMPLES (default 120)
"""

from __future__ import annotations

import base64
import itertools
import json
import os
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zimage.appprocess import AppProcess, http
from zimage.api import ApiError, parse_generation_body
from zimage.request import RequestError, resolve

EXAMPLES = int(os.environ.get("ZIMAGE_FUZZ_EXAMPLES", "120"))
BASE = {"prompt": "a red circle", "size": "256x256", "steps": 1}
FIELDS = ["prompt", "n", "size", "quality", "aspect", "response_format", "output_format", "seed", "steps"]
COST_LIMIT = 512 * 512 * 4  # pixels x steps x images a fuzz case may cost


@pytest.fixture(scope="module")
def app(tmp_path_factory, cache_dir):
    with AppProcess(tmp_path_factory.mktemp("fuzz"), cache_dir, "--warmup", "off") as server:
        yield server


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) |
                          st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
hostile = {
    "prompt": st.one_of(st.text(max_size=200), json_value,  # + surrogates, controls, format characters:
                        st.text(st.characters(categories=("Cs", "Cc", "Cf", "Zl", "Zp", "Co")), max_size=12)
                        .map(lambda t: "a red circle " + t)),
    "n": st.one_of(st.integers(-3, 8), st.sampled_from(["2", "two", "1.5", ""]), json_value),
    "size": st.one_of(st.sampled_from(["256x256", "1024x", "0x0", "-16x16", "99999999999x1", "x", "256X256",
                                       " 256 x 256 ", "auto", "2048x2048x2", "٣٢٠x٣٢٠", "256x256\x00"]),
                      st.from_regex(r"-?\d{0,5}[xX×]-?\d{0,5}", fullmatch=True), json_value),
    "quality": st.one_of(st.sampled_from(["Draft", "standard", "HIGH", "ultra", "hd", "low", "auto", "Extreme", ""]),
                         json_value),
    "aspect": st.one_of(st.sampled_from(["1:1", "16:9", "9:21", "5:4", "1:0", ""]), json_value),
    "response_format": st.one_of(st.sampled_from(["b64_json", "url", "B64_JSON"]), json_value),
    "output_format": st.one_of(st.sampled_from(["png", "jpeg", "webp", "gif", "JPEG"]), json_value),
    "seed": st.one_of(st.integers(-2**40, 2**40), st.sampled_from([-1, "-1", "42", 2**32 - 1, 2**32]), json_value),
    "steps": st.one_of(st.integers(-2, 20), json_value),
}
bodies = st.builds(lambda changes, extra: {**BASE, **changes, **extra},
                   st.fixed_dictionaries({}, optional=hostile),
                   st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELDS), json_value,
                                   max_size=2))


def cheap(body):
    """Keep valid bodies affordable on a CPU (see the module docstring)."""
    try:
        request, _ = parse_generation_body(body)
        job = resolve(request)
    except (RequestError, ApiError):
        return body  # invalid: the app must say so, cheaply
    if job.width * job.height * job.steps * len(job.seeds) > COST_LIMIT:
        return {**body, "size": "256x256", "steps": 1}
    return body


def check(app, raw: bytes) -> int:
    status, _, payload = http("POST", app.url + "/v1/images/generations", raw, {"Content-Type": "application/json"},
                              timeout=300)
    assert status < 500, (status, raw[:300], payload[:300])
    if 400 <= status < 500:
        error = json.loads(payload)["error"]
        assert isinstance(error["message"], str) and error["message"].strip(), payload[:300]
    else:
        assert status == 200 and json.loads(payload)["data"], payload[:300]
    return status


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(body=bodies)
def test_fuzzed_bodies_never_5xx(app, body):
    raw = json.dumps(cheap(body), allow_nan=True).encode()
    check(app, raw)


NASTIES = [
    ("1 MB prompt", json.dumps({**BASE, "prompt": "a" * (1 << 20)}).encode(), 413),
    ("100 KB prompt", json.dumps({**BASE, "prompt": "a" * 100_000}).encode(), 400),
    ("NUL bytes", json.dumps({**BASE, "prompt": "a red\x00 circle\x00"}).encode(), 200),
    ("right-to-left and emoji", json.dumps({**BASE, "prompt": "\u202eelcric der a 🔴🎨 שלום"}).encode(), 200),
    ("Chinese", json.dumps({**BASE, "prompt": "蓝色背景上的红色圆形"}).encode(), 200),
    ("size 1024x", json.dumps({**BASE, "size": "1024x"}).encode(), 400),
    ("size 0x0", json.dumps({**BASE, "size": "0x0"}).encode(), 400),
    ("size -16x16", json.dumps({**BASE, "size": "-16x16"}).encode(), 400),
    ("size 99999999999x1", json.dumps({**BASE, "size": "99999999999x1"}).encode(), 400),
    ("n as a numeric string", json.dumps({**BASE, "n": "2"}).encode(), 200),
    ("n as a word", json.dumps({**BASE, "n": "two"}).encode(), 400),
    ("unknown fields", json.dumps({**BASE, "model": "dall-e-3", "user": "u1", "style": "vivid"}).encode(), 200),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', 400),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, 400),
    ("NaN seed", b'{"prompt": "a", "size": "256x256", "steps": 1, "seed": NaN}', 400),
    ("empty body", b"", 400),
    ("JSON string", b'"a red circle"', 400),
    ("huge integer n", json.dumps({**BASE, "n": 10**400}).encode(), 400),
    ("lone high surrogate", b'{"prompt": "a \\ud800", "size": "256x256", "steps": 1}', 400),
    ("lone low surrogate", b'{"prompt": "\\udfff a", "size": "256x256", "steps": 1}', 400),
    ("reversed surrogate pair", b'{"prompt": "a \\ude00\\ud83d", "size": "256x256", "steps": 1}', 400),
    ("surrogate pair (an emoji)", b'{"prompt": "a \\ud83d\\ude00", "size": "256x256", "steps": 1}', 200),
    ("C1 controls and bidi override", json.dumps({**BASE, "prompt": "a red\x85 circle\x9b\u202e"}).encode(), 200),
    ("only invisible characters", json.dumps({**BASE, "prompt": "\u200b\ufeff\x85"}).encode(), 400),
]


@pytest.mark.parametrize("name,raw,expected", NASTIES, ids=[n for n, _, _ in NASTIES])
def test_hand_picked_nasties(app, name, raw, expected):
    assert check(app, raw) == expected


def test_still_serving_after_the_fuzz(app):
    assert check(app, json.dumps({**BASE, "seed": 1}).encode()) == 200
    assert http("GET", app.url + "/readyz")[0] == 200


# ---- hostile headers ------------------------------------------------------------------------------------------
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60)
HOSTS = ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "rebind.attacker.example:{port}", "0.0.0.0:{port}",
         "127.0.0.1.nip.io", "localhost.attacker.example", "127.0.0.1@evil.example", "[::1", "", "LOCALHOST",
         "127.0.0.1:{port}, evil.example", "127.0.0.1:99999", "xn--80ak6aa92e.com"]
ORIGINS = [None, "http://127.0.0.1:{port}", "http://localhost:{port}", "https://evil.example", "null",
           "http://127.0.0.1:{port}.evil.example", "http://127.0.0.1", "file://", "http://[::1]:{port}"]
CONTENT_TYPES = [None, "application/json", "application/json; charset=utf-8", "text/plain", "text/plain; a=json",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json-patch",
                 "APPLICATION/JSON", " application/json", "application/jsonx"]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(host=st.one_of(st.sampled_from(HOSTS), header_text), origin=st.one_of(st.sampled_from(ORIGINS), header_text),
       content_type=st.one_of(st.sampled_from(CONTENT_TYPES), header_text))
def test_hostile_headers_never_get_through(app, host, origin, content_type):
    """A request reaches the JSON API (and says "prompt is empty") only with a loopback Host, no Origin or this
    site's, and a JSON Content-Type; everything else is refused with 400/403/415, and nothing is a 5xx."""
    headers = {"Host": host.replace("{port}", str(app.port))}
    if origin is not None:
        headers["Origin"] = origin.replace("{port}", str(app.port))
    if content_type is not None:
        headers["Content-Type"] = content_type
    headers = {k: v.encode("latin-1") for k, v in headers.items()}
    try:
        status, _, payload = http("POST", app.url + "/v1/images/generations", b'{"prompt": ""}', headers, timeout=60)
    except ValueError:
        return  # http.client refuses to send it (illegal header value): nothing to test
    assert status < 500, (headers, status, payload[:300])
    if b"prompt is empty" in payload:  # it reached the route: it must have been harmless
        sent = {k: v.decode("latin-1").strip() for k, v in headers.items()}
        host = sent["Host"].lower()
        name = host.split("]")[0] + "]" if host.startswith("[") else host.split(":")[0].rstrip(".")
        assert name in ("127.0.0.1", "localhost", "[::1]"), headers
        if sent.get("Origin"):
            origin_name = urlsplit(sent["Origin"]).hostname or ""
            assert origin_name.lower() == name.strip("[]"), headers
        assert sent.get("Content-Type", "").split(";")[0].strip().lower() == "application/json", headers
    else:
        assert status in (400, 403, 415), (headers, status, payload[:300])


# ---- Unicode credentials -----------------------------------------------------------------------------------
FUZZ_USER, FUZZ_PASSWORD = "fuzz", "pässwörd 🔑"
_addresses = itertools.count(1)


@pytest.fixture(scope="module")
def auth_app(tmp_path_factory, cache_dir):
    with AppProcess(tmp_path_factory.mktemp("fuzz-auth"), cache_dir, "--warmup", "off",
                    env={"ZIMAGE_AUTH": f"{FUZZ_USER}:{FUZZ_PASSWORD}"}) as server:
        yield server


any_text = st.text(st.characters(codec=None, categories=None), max_size=24)  # any code point, surrogates included
FIELD_BYTES = [b for b in range(256) if b == 9 or 0x20 <= b != 0x7F]  # what HTTP allows in a header value (h11
header_bytes = st.lists(st.sampled_from(FIELD_BYTES), max_size=40).map(bytes)  # answers anything else with 400)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(scheme=st.sampled_from(["Basic", "Bearer", "basic", "BEARER", "Digest", ""]),
       user=any_text, password=any_text, raw=st.one_of(st.none(), header_bytes))
def test_unicode_credentials_never_5xx(auth_app, scheme, user, password, raw):
    if raw is None:
        secret = (user + ":" + password if scheme.lower() == "basic" else password).encode("utf-8", "surrogatepass")
        value = base64.b64encode(secret) if scheme.lower() == "basic" else secret
    else:
        value = raw
    header = (scheme.encode() + b" " + value).strip()
    if not set(header) <= set(FIELD_BYTES):
        return  # not a valid header value (a control character in a raw Bearer password): h11 answers 400
    right = (scheme.lower() == "bearer" and value.strip() == FUZZ_PASSWORD.encode()) or (
        scheme.lower() == "basic" and raw is None and (user, password) == (FUZZ_USER, FUZZ_PASSWORD))
    client = {"X-Forwarded-For": f"10.77.{next(_addresses) % 250}.{next(_addresses) % 250 + 1}"}
    status, _, payload = http("GET", auth_app.url + "/metrics", None, {"Authorization": header, **client}, timeout=60)
    assert status < 500, (header, status, payload[:300])
    assert status == (200 if right else 401) or status == 429, (header, status, payload[:300])


def test_right_unicode_credentials_still_work(auth_app):
    basic = base64.b64encode(f"{FUZZ_USER}:{FUZZ_PASSWORD}".encode()).decode()
    assert http("GET", auth_app.url + "/metrics", None, {"Authorization": "Basic " + basic})[0] == 200
    assert http("GET", auth_app.url + "/metrics", None, {"Authorization": f"Bearer {FUZZ_PASSWORD}".encode()})[0] == 200
