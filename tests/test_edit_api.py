"""POST /v1/images/edits on the real app (tiny demo model, CPU): the official `openai` SDK's images.edit, raw
multipart requests, 4xx in OpenAI's error shape for bad inputs, and the PNG metadata of an edit."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import uuid

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest

from zimage.appprocess import AppProcess, http
from zimage.demo.scenes import COLOURS
from zimage.images import read_parameters
from tests.test_edit import png, png_header

BLUE = COLOURS["blue"][0]


@pytest.fixture(scope="module")
def app(tmp_path_factory, cache_dir):
    with AppProcess(tmp_path_factory.mktemp("edit-app"), cache_dir) as server:
        yield server


@pytest.fixture(scope="module")
def client(app):
    from openai import OpenAI

    return OpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0)


def blue_png(size=(256, 256)) -> bytes:
    return png(PIL.Image.new("RGB", size, BLUE))


def openai_mask(size=(256, 256)) -> bytes:
    """Opaque everywhere but a transparent disc: the disc is the area to repaint (OpenAI's convention)."""
    mask = PIL.Image.new("RGBA", size, (0, 0, 0, 255))
    PIL.ImageDraw.Draw(mask).ellipse((64, 64, 192, 192), fill=(0, 0, 0, 0))
    return png(mask)


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, ctype) in files.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                  f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def post_edit(app, fields: dict, files: dict):
    body, ctype = multipart(fields, files)
    status, headers, payload = http("POST", app.url + "/v1/images/edits", body, {"Content-Type": ctype})
    return status, json.loads(payload) if payload else None


def test_openai_sdk_inpaints(app, client):
    source = blue_png()
    result = client.images.edit(image=("blue.png", source, "image/png"), mask=("mask.png", openai_mask(), "image/png"),
                                prompt="a red circle on a blue background", n=2, size="256x256",
                                response_format="b64_json", extra_body={"seed": 5, "steps": 4})
    assert len(result.data) == 2
    first = base64.b64decode(result.data[0].b64_json)
    image = PIL.Image.open(io.BytesIO(first))
    assert image.size == (256, 256)
    # Outside the transparent disc the picture is the input's, exactly (the input is pasted back there).
    corner = np.asarray(image.convert("RGB"))[:32, :32]
    assert (corner == np.array(BLUE, dtype=np.uint8)).all()
    meta = read_parameters(first)
    assert meta["task"] == "inpaint" and meta["strength"] == 1.0 and meta["seed"] == 5
    assert meta["input_sha256"] == hashlib.sha256(source).hexdigest()
    assert "Task: inpaint, Denoising strength: 1.0, Input sha256: " in image.text["parameters"]


def test_openai_sdk_image_to_image_at_the_inputs_size(app, client):
    result = client.images.edit(image=("blue.png", blue_png((300, 200)), "image/png"), prompt="a yellow star",
                                extra_body={"seed": 1, "steps": 2, "strength": "0.5"})
    image = PIL.Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (384, 256)
    assert read_parameters(image)["task"] == "image-to-image"


def test_raw_multipart_answers_the_zimage_details(app):
    status, body = post_edit(app, {"prompt": "a red circle", "seed": "3", "steps": "2", "strength": "0.6",
                                   "output_format": "jpeg"}, {"image": ("b.webp", png(PIL.Image.new("RGB", (256, 256), BLUE), "WEBP"), "image/webp")})
    assert status == 200, body
    assert body["zimage"]["task"] == "image-to-image" and body["zimage"]["strength"] == 0.6
    assert body["output_format"] == "jpeg" and body["size"] == "256x256"
    assert PIL.Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).format == "JPEG"


@pytest.mark.parametrize("fields, files, status, param, words", [
    ({"prompt": "x"}, {}, 400, "image", "required"),
    ({}, {"image": ("b.png", blue_png(), "image/png")}, 400, "prompt", "required"),
    ({"prompt": "x"}, {"image": ("b.txt", b"hello", "text/plain")}, 400, "image", "PNG, JPEG or WebP"),
    ({"prompt": "x"}, {"image": ("big.png", png_header(20000, 20000), "image/png")}, 400, "image", "too large"),
    ({"prompt": "x"}, {"image": ("b.png", blue_png(), "image/png"), "mask": ("m.png", openai_mask((128, 128)),
                                                                             "image/png")}, 400, "mask", "size"),
    ({"prompt": "x", "strength": "2"}, {"image": ("b.png", blue_png(), "image/png")}, 400, "strength", "range"),
    ({"prompt": "x", "size": "300x300"}, {"image": ("b.png", blue_png(), "image/png")}, 400, "size", "multiple"),
    ({"prompt": "x", "response_format": "url"}, {"image": ("b.png", blue_png(), "image/png")}, 400,
     "response_format", "b64_json"),
])
def test_bad_edits_are_4xx_in_openai_shape(app, fields, files, status, param, words):
    got, body = post_edit(app, fields, files)
    assert got == status, body
    assert body["error"]["param"] == param and words in body["error"]["message"], body
    assert body["error"]["type"] == "invalid_request_error"


def test_oversized_and_non_multipart_bodies_are_refused(app):
    import http.client as httpclient

    from zimage.api import MAX_EDIT_BODY_BYTES

    # A declared length past the limit is refused before a byte of the body is read.
    conn = httpclient.HTTPConnection("127.0.0.1", app.port, timeout=60)
    conn.putrequest("POST", "/v1/images/edits")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Content-Length", str(10 * MAX_EDIT_BODY_BYTES))
    conn.endheaders(b"--x\r\n")
    response = conn.getresponse()
    assert response.status == 413 and "limit" in json.loads(response.read())["error"]["message"]
    conn.close()
    # A chunked body (no length declared) is refused once it passes the limit.
    body, ctype = multipart({"prompt": "x"}, {"image": ("b.png", b"\0" * (MAX_EDIT_BODY_BYTES + 1000), "image/png")})
    conn = httpclient.HTTPConnection("127.0.0.1", app.port, timeout=60)
    conn.request("POST", "/v1/images/edits", body=iter([body[i:i + 1 << 20] for i in range(0, len(body), 1 << 20)]),
                 headers={"Content-Type": ctype}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and "limit" in json.loads(response.read())["error"]["message"]
    conn.close()
    status, _, payload = http("POST", app.url + "/v1/images/edits", b'{"prompt": "x"}',
                              {"Content-Type": "application/json"})
    assert status == 415 and "multipart/form-data" in json.loads(payload)["error"]["message"]
    # The service is unaffected: a good edit still works.
    status, body = post_edit(app, {"prompt": "a red circle", "steps": "1"}, {"image": ("b.png", blue_png(), "image/png")})
    assert status == 200, body


def test_the_ui_has_an_edit_tab_and_the_gradio_api_still_lists_generate_alone(app):
    status, _, body = http("GET", app.url + "/config")
    assert status == 200
    config = json.loads(body)
    props = [c.get("props", {}) for c in config["components"]]
    assert "Edit" in {p.get("label") for p in props}
    assert {"Send to Edit", "Send selected to Edit"} <= {p.get("value") for p in props if isinstance(p.get("value"), str)}
    types = {c.get("type") for c in config["components"]}
    assert "imageeditor" in types
    from gradio_client import Client

    info = Client(app.url, verbose=False).view_api(return_format="dict", print_info=False)
    assert set(info["named_endpoints"]) == {"/generate"}


@pytest.mark.parametrize("field, value", [
    ("strength", "nan"), ("strength", "inf"), ("strength", "1e400"), ("strength", "-0.1"), ("n", "0"),
    ("n", "five"), ("seed", "abc"), ("seed", "4294967296"), ("steps", "0"), ("steps", "1.5"), ("quality", "Extreme"),
    ("output_format", "gif"), ("size", "256x"), ("aspect", "5:4"), ("prompt", "\x00"), ("prompt", "x" * 20000),
])
def test_hostile_edit_fields_are_4xx_never_5xx(app, field, value):
    fields = {"prompt": "a red circle", "steps": "1", field: value}
    status, body = post_edit(app, fields, {"image": ("b.png", blue_png(), "image/png")})
    assert status == 400, body
    assert body["error"]["message"] and body["error"]["param"] == field


def test_the_edit_route_is_documented_in_openapi(app):
    status, _, body = http("GET", app.url + "/openapi.json")
    assert status == 200
    form = json.loads(body)["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"image", "mask", "prompt", "strength"} <= set(form["schema"]["properties"])
