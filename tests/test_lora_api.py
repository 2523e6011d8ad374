"""LoRAs through the real app (tiny demo model, CPU, --lora-dir): GET /v1/loras, the `loras` field of
/v1/images/generations and /v1/images/edits, refusals as 400s, PNG metadata and history, and the Gradio API's
`generate` with its old six inputs and the new `loras` input."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time

import PIL.Image
import pytest

from tests.test_edit_api import blue_png, post_edit
from tests.test_lora import DEMO_LORAS, FIXTURES
from zimage.appprocess import AppProcess, http
from zimage.images import read_parameters

SMALL = {"size": "256x256", "steps": 2}


@pytest.fixture(scope="module")
def app(tmp_path_factory, cache_dir):
    folder = tmp_path_factory.mktemp("api-loras")
    shutil.copy(DEMO_LORAS / "negative.safetensors", folder)
    shutil.copy(FIXTURES / "negative-kohya.safetensors", folder)
    (folder / "broken.safetensors").write_bytes(b"not safetensors at all")
    with AppProcess(tmp_path_factory.mktemp("lora-app"), cache_dir, "--lora-dir", str(folder)) as server:
        server.lora_dir = folder
        yield server


def post(app, body):
    status, _, payload = http("POST", app.url + "/v1/images/generations", json.dumps(body).encode(),
                              {"Content-Type": "application/json"})
    return status, json.loads(payload)


def test_get_loras_lists_the_folder_with_limits(app):
    status, _, body = http("GET", app.url + "/v1/loras")
    assert status == 200
    listing = json.loads(body)
    entries = {e["name"]: e for e in listing["data"]}
    assert set(entries) == {"negative", "negative-kohya", "broken"}
    assert entries["negative"]["ok"] and entries["negative"]["rank"] == 8 and entries["negative"]["modules"] == 35
    assert entries["negative"]["size_bytes"] == (DEMO_LORAS / "negative.safetensors").stat().st_size
    assert not entries["broken"]["ok"] and "safetensors" in entries["broken"]["error"]
    assert listing["max_loras"] == 4 and listing["rank_budget"] == 64 and listing["scale_range"] == [-4, 4]


def test_generation_with_loras_records_them_everywhere(app):
    status, body = post(app, {"prompt": "a red circle on a blue background <lora:negative-kohya:0.5>", "seed": 3,
                              "loras": [{"name": "negative", "scale": 0.8}], **SMALL})
    assert status == 200, body
    loras = body["zimage"]["loras"]
    assert [(e["name"], e["scale"]) for e in loras] == [("negative", 0.8), ("negative-kohya", 0.5)]
    assert all(len(e["hash"]) == 12 and len(e["sha256"]) == 64 for e in loras)
    assert body["data"][0]["revised_prompt"] == "a red circle on a blue background"
    png = base64.b64decode(body["data"][0]["b64_json"])
    assert read_parameters(png)["loras"] == loras
    text = PIL.Image.open(io.BytesIO(png)).text["parameters"]
    assert text.startswith("a red circle on a blue background <lora:negative:0.8> <lora:negative-kohya:0.5>\n")
    assert f'Lora hashes: "negative: {loras[0]["hash"]}, negative-kohya: {loras[1]["hash"]}"' in text
    index = app.outputs / "history.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # written in the background
        entries = [json.loads(line) for line in index.read_text().splitlines()] if index.exists() else []
        mine = [e for e in entries if e.get("seed") == 3 and e.get("loras")]
        if mine:
            break
        time.sleep(0.2)
    assert mine and mine[-1]["loras"] == loras


@pytest.mark.parametrize("body, param, words", [
    ({"loras": [{"name": "nope", "scale": 1}]}, "loras", "unknown LoRA 'nope'"),
    ({"loras": [{"name": "../negative", "scale": 1}]}, "loras", "looks like a path"),
    ({"loras": [{"name": "negative", "scale": 5}]}, "loras", "out of range"),
    ({"loras": ["negative", "negative-kohya", "a", "b", "c"]}, "loras", "at most 4"),
    ({"loras": "broken"}, "loras", "cannot be used"),
    ({"loras": {"name": 3}}, "loras", "non-empty text"),
    ({"prompt": "a cat <lora:nope>"}, "prompt", "unknown LoRA 'nope'"),
])
def test_bad_loras_answer_400_naming_the_field(app, body, param, words):
    status, payload = post(app, {"prompt": "a cat", **SMALL, **body})
    assert status == 400, payload
    assert payload["error"]["param"] == param and words in payload["error"]["message"], payload


def test_edit_takes_loras_as_a_form_field(app):
    status, body = post_edit(app, {"prompt": "a red circle", "seed": "3", "steps": "2", "loras": "negative:0.7"},
                             {"image": ("b.png", blue_png(), "image/png")})
    assert status == 200, body
    assert body["zimage"]["task"] == "image-to-image" and body["zimage"]["loras"][0]["name"] == "negative"
    status, body = post_edit(app, {"prompt": "a red circle", "loras": '[{"name": "nope"}]'},
                             {"image": ("b.png", blue_png(), "image/png")})
    assert status == 400 and body["error"]["param"] == "loras"


def test_gradio_generate_keeps_its_six_inputs_and_takes_loras(app):
    from gradio_client import Client

    client = Client(app.url, verbose=False)
    _, info, details = client.predict("a red circle <lora:negative:1>", "Draft", "1:1", 5, False, 1,
                                      api_name="/generate")
    assert [e["name"] for e in details["loras"]] == ["negative"] and "LoRA negative 1" in info
    _, _, details = client.predict("a red circle", "Draft", "1:1", 5, False, 1, "negative-kohya:0.5",
                                   api_name="/generate")
    assert [(e["name"], e["scale"]) for e in details["loras"]] == [("negative-kohya", 0.5)]
    # Gradio's REST route with the six values of the earlier signature (the new input gets its default).
    status, _, payload = http("POST", app.url + "/gradio_api/run/generate",
                              json.dumps({"data": ["a red circle", "Draft", "1:1", 5, False, 1]}).encode(),
                              {"Content-Type": "application/json"})
    assert status == 200, payload
    assert json.loads(payload)["data"][2]["loras"] == []
    status, _, payload = http("POST", app.url + "/gradio_api/run/generate",
                              json.dumps({"data": ["a cat", "Draft", "1:1", 5, False, 1, "nope"]}).encode(),
                              {"Content-Type": "application/json"})
    assert status == 400 and "unknown LoRA 'nope'" in payload.decode()
