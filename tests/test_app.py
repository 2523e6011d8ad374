"""The real app as a subprocess: readiness, Gradio API, OpenAI-style API, queue limits, errors, metrics, auth."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import threading
import time

import PIL.Image
import pytest

from zimage.appprocess import ROOT, AppProcess, free_port, http
from zimage.images import read_parameters

SMALL = {"size": "256x256", "steps": 2}


@pytest.fixture(scope="module")
def app(tmp_path_factory, cache_dir):
    with AppProcess(tmp_path_factory.mktemp("app"), cache_dir) as server:
        yield server


def post(server, body, headers=None, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    status, hdrs, payload = http("POST", server.url + "/v1/images/generations", data,
                                 {"Content-Type": "application/json", **(headers or {})})
    return status, hdrs, json.loads(payload) if payload else None


def metric(server, name: str, labels: str = "") -> float:
    status, _, text = http("GET", server.url + "/metrics")
    assert status == 200
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(?:\{\})?") + r" ([0-9.e+-]+)"
    match = re.search(pattern, text.decode())
    return float(match.group(1)) if match else 0.0


def test_readyz_goes_503_then_200_while_healthz_serves(app):
    assert 503 in app.readyz_seen and app.readyz_seen[-1] == 200
    first_503 = app.readyz_seen.index(503)
    assert app.healthz_seen[first_503] == 200  # alive while warming
    status, _, body = http("GET", app.url + "/readyz")
    ready = json.loads(body)
    assert ready["state"] == "ready" and ready["model"] == "tiny" and ready["warm_shapes"][0]["preset"] == "Draft"


def test_generate_through_gradio_api(app):
    from gradio_client import Client

    client = Client(app.url, verbose=False)
    gallery, info, details = client.predict("a red circle", "Draft", "16:9", 5, False, 1, api_name="/generate")
    assert details["seeds"] == [5] and "seed 5" in info and "1024×576" in info
    image = PIL.Image.open(gallery[0]["image"])
    assert image.size == (1024, 576)


def test_openai_generation_png_roundtrips_parameters_and_is_saved(app):
    status, _, body = post(app, {"prompt": "a blue star", "n": 2, "seed": 11, **SMALL})
    assert status == 200, body
    assert [d["seed"] for d in body["data"]] == [11, 12] and body["size"] == "256x256"
    png = base64.b64decode(body["data"][1]["b64_json"])
    image = PIL.Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (256, 256)
    meta = read_parameters(png)
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["width"]) == ("a blue star", 12, 2, 256)
    assert "Seed: 12" in image.text["parameters"] and "Steps: 2" in image.text["parameters"]

    index = app.outputs / "history.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        entries = [json.loads(line) for line in index.read_text().splitlines()] if index.exists() else []
        saved = [e for e in entries if e["prompt"] == "a blue star"]
        if len(saved) == 2:
            break
        time.sleep(0.2)
    assert sorted(e["seed"] for e in saved) == [11, 12]
    for entry in saved:
        path = app.outputs / entry["file"]
        assert "star" not in path.name and read_parameters(path)["seed"] == entry["seed"]
    assert not list(app.outputs.rglob("*.tmp"))


@pytest.mark.parametrize("fmt,pil_format", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_openai_jpeg_and_webp(app, fmt, pil_format):
    status, _, body = post(app, {"prompt": "a cat", "seed": 1, "output_format": fmt, **SMALL})
    assert status == 200 and body["output_format"] == fmt
    assert PIL.Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).format == pil_format


BAD_BODIES = [
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": "a", "size": "500x512"}, "size", "multiple of 16"),
    ({"prompt": "a", "size": "128x128"}, "size", "256 to 2048"),
    ({"prompt": "a", "size": "4096x4096"}, "size", "256 to 2048"),
    ({"prompt": "a", "size": "100x100"}, "size", "size '100x100': width 100"),
    ({"prompt": "a", "size": "1024x"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "a", "size": "-16x16"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "a", "size": "99999999999x1"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "a", "n": 0}, "n", "1 to 4"),
    ({"prompt": "a", "n": 5}, "n", "1 to 4"),
    ({"prompt": "a", "n": "two"}, "n", "integer"),
    ({"prompt": "a", "quality": "Extreme"}, "quality", "Draft, Standard"),
    ({"prompt": "a", "response_format": "url"}, "response_format", "b64_json"),
    ({"prompt": "a", "output_format": "gif"}, "output_format", "png, jpeg or webp"),
    ({"prompt": "a", "seed": -5}, "seed", "-1 for random"),
    ({"size": "1024x1024"}, "prompt", "required"),
    (["a", "list"], None, "JSON object"),
]


@pytest.mark.parametrize("body,param,phrase", BAD_BODIES, ids=[str(i) for i in range(len(BAD_BODIES))])
def test_bad_input_gets_4xx_with_message(app, body, param, phrase):
    status, _, answer = post(app, body)
    assert status == 400
    error = answer["error"]
    assert phrase in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"


def test_malformed_json_then_good_request_succeeds(app):
    status, _, answer = post(app, None, raw=b'{"prompt": "a cat",')
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, _, answer = post(app, {"prompt": "a cat", "seed": 2, **SMALL})
    assert status == 200 and len(answer["data"]) == 1


def test_gradio_api_bad_input_gets_message(app):
    from gradio_client import Client

    client = Client(app.url, verbose=False)
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict("   ", "Draft", "1:1", 1, False, 1, api_name="/generate")


def test_four_concurrent_clients_share_one_gpu(app):
    from gradio_client import Client

    results, errors = [], []

    def via_gradio(i):
        try:
            out = Client(app.url, verbose=False).predict(f"cat {i}", "Draft", "1:1", i, False, 1,
                                                          api_name="/generate")
            results.append(out[2]["seeds"])
        except Exception as exc:  # reported below
            errors.append(exc)

    def via_http(i):
        status, _, body = post(app, {"prompt": f"dog {i}", "seed": i, "size": "512x512", "steps": 4})
        (results if status == 200 else errors).append(status if status == 200 else body)

    threads = [threading.Thread(target=f, args=(i,)) for i, f in enumerate([via_gradio, via_http] * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and len(results) == 4
    assert metric(app, "zimage_engine_max_concurrency") == 1
    assert metric(app, "zimage_engine_max_waiting") >= 2  # they really overlapped


def test_metrics_move(app):
    before = metric(app, "zimage_requests_total", 'route="openai",status="ok"')
    invalid_before = metric(app, "zimage_requests_total", 'route="openai",status="invalid"')
    assert post(app, {"prompt": "a dog", "seed": 3, **SMALL})[0] == 200
    assert post(app, {"prompt": ""})[0] == 400
    assert metric(app, "zimage_requests_total", 'route="openai",status="ok"') == before + 1
    assert metric(app, "zimage_requests_total", 'route="openai",status="invalid"') == invalid_before + 1
    text = http("GET", app.url + "/metrics")[2].decode()
    for name in ("zimage_generation_seconds_bucket", 'zimage_stage_seconds_count{stage="denoise"}',
                 "zimage_queue_depth", "zimage_inflight", 'zimage_oom_total{kind="handled"}', "zimage_cancelled_total",
                 "process_resident_memory_bytes", 'zimage_engine_state{state="ready"} 1.0'):
        assert name in text, name


@pytest.fixture(scope="module")
def small_queue_app(tmp_path_factory, cache_dir):
    with AppProcess(tmp_path_factory.mktemp("queue1"), cache_dir, "--queue-size", "1", "--warmup", "off") as server:
        yield server


def test_full_queue_answers_429_with_retry_after(small_queue_app):
    answers = []

    def slow_request(i):
        answers.append(post(small_queue_app, {"prompt": f"slow {i}", "seed": i, "size": "1024x1024", "steps": 4}))

    threads = [threading.Thread(target=slow_request, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(timeout=600)
    statuses = sorted(a[0] for a in answers)
    assert 200 in statuses and 429 in statuses, statuses
    busy = next(a for a in answers if a[0] == 429)
    assert int(busy[1]["retry-after"]) >= 1 and "busy" in busy[2]["error"]["message"]
    assert post(small_queue_app, {"prompt": "after the rush", "seed": 1, **SMALL})[0] == 200


def test_full_ui_queue_says_busy(small_queue_app):
    from gradio_client import Client

    client = Client(small_queue_app.url, verbose=False)
    jobs = [client.submit(f"ui {i}", "Standard", "1:1", i, False, 1, api_name="/generate") for i in range(4)]
    outcomes = []
    for job in jobs:
        try:
            job.result(timeout=600)
            outcomes.append("ok")
        except Exception as exc:
            outcomes.append(str(exc))
    assert "ok" in outcomes
    assert any("full" in o.lower() or "busy" in o.lower() for o in outcomes if o != "ok"), outcomes


@pytest.fixture(scope="module")
def auth_app(tmp_path_factory, cache_dir):
    with AppProcess(tmp_path_factory.mktemp("auth"), cache_dir, "--auth", "ann:s3cret", "--warmup", "off") as server:
        yield server


def test_auth_rejects_wrong_credentials(auth_app):
    basic = lambda up: {"Authorization": "Basic " + base64.b64encode(up.encode()).decode()}  # noqa: E731
    assert http("GET", auth_app.url + "/healthz")[0] == 200
    for headers in ({}, basic("ann:wrong"), basic("bob:s3cret"), {"Authorization": "Bearer nope"}):
        status, hdrs, body = post(auth_app, {"prompt": "a cat", **SMALL}, headers)
        assert status == 401 and json.loads(json.dumps(body))["error"]["type"] == "authentication_error"
    assert http("GET", auth_app.url + "/metrics")[0] == 401
    assert post(auth_app, {"prompt": "a cat", "seed": 1, **SMALL}, basic("ann:s3cret"))[0] == 200
    assert post(auth_app, {"prompt": "a cat", "seed": 1, **SMALL}, {"Authorization": "Bearer s3cret"})[0] == 200

    from gradio_client import Client

    with pytest.raises(Exception):
        Client(auth_app.url, auth=("ann", "wrong"), verbose=False)
    client = Client(auth_app.url, auth=("ann", "s3cret"), verbose=False)
    assert client.predict("a cat", "Draft", "1:1", 1, False, 1, api_name="/generate")[2]["seeds"] == [1]


def test_port_in_use_exits_with_clear_error(cache_dir, tmp_path):
    port = free_port()
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        proc = subprocess.run([sys.executable, "app.py", "--model", "tiny", "--port", str(port), "--cache-dir",
                               str(cache_dir), "--outputs", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 1
    assert f"127.0.0.1:{port}" in proc.stderr and "in use" in proc.stderr and "--port" in proc.stderr


def test_missing_model_exits_with_instructions(tmp_path):
    proc = subprocess.run([sys.executable, "app.py", "--model", str(tmp_path / "absent"), "--port",
                           str(free_port()), "--outputs", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 1
    assert "hf download Tongyi-MAI/Z-Image-Turbo" in proc.stderr and "--model tiny" in proc.stderr


def test_api_docs_work_offline(app):
    """/docs loads Swagger UI from the app itself (a fresh install has no CDN to reach)."""
    status, _, html = http("GET", app.url + "/docs")
    assert status == 200 and b"/docs-assets/swagger-ui-bundle.js" in html and b"cdn." not in html
    status, headers, js = http("GET", app.url + "/docs-assets/swagger-ui-bundle.js")
    assert status == 200 and "javascript" in headers["content-type"] and len(js) > 100_000
    assert http("GET", app.url + "/docs-assets/..%2F..%2Fswagger_ui_bundle%2F__init__.py")[0] == 404
    assert http("GET", app.url + "/openapi.json")[0] == 200


def test_preset_size_is_reported_as_that_preset(app):
    """The README's own curl: quality Standard with Standard's 1024x1024 is Standard, not Custom."""
    status, _, body = post(app, {"prompt": "a cat", "quality": "Standard", "size": "1024x1024", "seed": 3,
                                 "steps": 1, "output_format": "jpeg"})
    assert status == 200 and body["quality"] == "Standard" and not body["zimage"]["warnings"]
    status, _, body = post(app, {"prompt": "a cat", "quality": "Standard", "size": "512x512", "seed": 3,
                                 "steps": 1, "output_format": "jpeg"})
    assert status == 200 and body["quality"] == "Custom"
    assert any("not a Standard preset size" in w for w in body["zimage"]["warnings"])
    assert 'zimage_generation_seconds_count{preset="Standard"}' in http("GET", app.url + "/metrics")[2].decode()


def test_start_up_log_has_no_library_chatter_and_user_mistakes_no_traceback(app):
    """A new user reads import-time deprecation notes and tracebacks as errors (issue 18, item 8)."""
    from gradio_client import Client

    with pytest.raises(Exception, match="empty"):
        Client(app.url, verbose=False).predict("   ", "Draft", "1:1", 1, False, 1, api_name="/generate")
    log = app.log_path.read_text()
    assert "_pytree" not in log and "Unable to import `torchao`" not in log
    assert "Traceback" not in log


def test_gradio_rest_route_answers_client_mistakes_with_4xx(app):
    """Issue 13 item 9: Gradio's REST route used to answer an empty prompt or seed -5 with HTTP 500."""
    for data in (["", "Draft", "1:1", 1, False, 1], ["a cat", "Draft", "1:1", -5, False, 1]):
        status, _, payload = http("POST", app.url + "/gradio_api/run/generate", json.dumps({"data": data}).encode(),
                                  {"Content-Type": "application/json"})
        assert status == 400, (status, payload)
        assert json.loads(payload)["title"] in ("Invalid request", "Error")  # ours, or Gradio's own input check


def test_gradio_api_lists_generate_alone_with_an_integer_count(app):
    """UI-only events (/on_quality, /lambda, ...) used to be listed, and `count` was a float."""
    status, _, body = http("GET", app.url + "/gradio_api/info")
    assert status == 200
    info = json.loads(body)
    assert set(info["named_endpoints"]) == {"/generate"}, list(info["named_endpoints"])
    count = next(p for p in info["named_endpoints"]["/generate"]["parameters"] if p["label"] == "Images")
    assert count["type"]["type"] == "integer"
