"""Image-to-image and inpainting on the shipped demo model (`--model tiny`), on CPU, through the Engine.

Bars (pixel values 0-255, RGB):
- strength 0 returns the input exactly; strength 0.05 (one step at the end of the schedule) stays within
  MEAN_ABS_DIFF_LOW_STRENGTH mean absolute difference of it (the rest is the VAE's round trip).
- inpainting leaves every pixel outside the mask exactly as it was (max difference 0: the input is pasted
  back there) and paints the prompt inside: a red circle asked for in a circular hole of a blue picture fills
  the circle's core box (measure.read, the demo-model tests' bar CORE_MIN_FRACTION) while the input had none.
- the same seed gives the same pixels; bad images and masks are RequestErrors naming the parameter.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest

from zimage import request as requests
from zimage.demo import measure
from zimage.demo.scenes import COLOURS, Scene, Shape
from zimage.engine import Engine
from zimage.request import GenerationRequest, RequestError
from zimage.settings import Settings
from tests.helpers import generate

MEAN_ABS_DIFF_LOW_STRENGTH = 4.0
CORE_MIN_FRACTION = 0.75  # as in test_demo_model.py
BLUE = COLOURS["blue"][0]
PROMPT = "a red circle on a blue background"
RED_CIRCLE = Scene("blue", (Shape("circle", "red"),))


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine.create(Settings(model="tiny", device="cpu", oom_fatal_count=100))  # OOMs are injected below
    engine.mark_ready()
    return engine


def png(image: PIL.Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def blue_picture(size=(256, 256)) -> PIL.Image.Image:
    return PIL.Image.new("RGB", size, BLUE)


def hole(size=(256, 256), box=(64, 64, 192, 192)) -> PIL.Image.Image:
    mask = PIL.Image.new("L", size, 0)
    PIL.ImageDraw.Draw(mask).ellipse(box, fill=255)
    return mask


def diff(a, b) -> np.ndarray:
    return np.abs(np.asarray(a.convert("RGB"), dtype=np.float64) - np.asarray(b.convert("RGB"), dtype=np.float64))


def edit(engine, on_progress=None, **fields):
    fields.setdefault("aspect", None)
    fields.setdefault("seed", 0)
    return generate(engine, GenerationRequest(PROMPT, **fields), on_progress=on_progress)


def test_edit_pipelines_share_the_loaded_components(engine):
    pipes = engine.stages.task_pipes
    assert type(pipes["image-to-image"]).__name__ == "ZImageImg2ImgPipeline"
    assert type(pipes["inpaint"]).__name__ == "ZImageInpaintPipeline"
    for pipe in pipes.values():
        for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
            assert getattr(pipe, name) is getattr(engine.pipeline, name)


def test_strength_zero_returns_the_input_and_low_strength_stays_near_it(engine):
    source = blue_picture()
    result = edit(engine, image=png(source), strength=0)
    assert result.task == "image-to-image" and result.images[0].size == (256, 256)
    assert diff(result.images[0], source).max() == 0
    assert any("no denoising step" in w for w in result.warnings)
    low = edit(engine, image=png(source), strength=0.05)
    assert diff(low.images[0], source).mean() < MEAN_ABS_DIFF_LOW_STRENGTH
    high = edit(engine, image=png(source), strength=0.9)
    assert diff(high.images[0], source).mean() > diff(low.images[0], source).mean()


def test_inpainting_keeps_the_outside_and_paints_the_prompt_inside(engine):
    source, mask = blue_picture(), hole()
    assert measure.read(source, RED_CIRCLE).shapes[0].core_fraction == 0
    result = edit(engine, image=png(source), mask=png(mask), strength=1.0)
    assert result.task == "inpaint" and result.strength == 1.0
    out = result.images[0]
    outside = np.asarray(mask) == 0
    assert diff(out, source)[outside].max() == 0
    reading = measure.read(out, RED_CIRCLE)
    assert reading.shapes[0].core_fraction >= CORE_MIN_FRACTION, reading.summary()


def test_transparent_pixels_of_an_rgba_mask_are_the_area_to_repaint(engine):
    openai_mask = PIL.Image.new("RGBA", (256, 256), (0, 0, 0, 255))
    PIL.ImageDraw.Draw(openai_mask).ellipse((64, 64, 192, 192), fill=(0, 0, 0, 0))
    job = engine.resolve(GenerationRequest(PROMPT, aspect=None, image=png(blue_picture()), mask=png(openai_mask)))
    assert np.array_equal(np.asarray(job.mask), np.asarray(hole()))


def test_same_seed_same_pixels(engine):
    source = png(blue_picture())
    a, b = (edit(engine, image=source, strength=0.6, seed=7).images[0] for _ in range(2))
    assert diff(a, b).max() == 0
    c = edit(engine, image=source, strength=0.6, seed=8).images[0]
    assert diff(a, c).max() > 0
    m = png(hole())
    a, b = (edit(engine, image=source, mask=m, seed=3).images[0] for _ in range(2))
    assert diff(a, b).max() == 0


def test_progress_counts_the_steps_an_edit_runs(engine):
    seen = []
    result = edit(engine, image=png(blue_picture()), strength=0.5, steps=8, n=2,
                  on_progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (8, 8) and len(seen) == 8 and len(result.images) == 2  # 4 steps per image


def test_output_size_is_the_inputs_snapped_or_the_one_asked():
    job = requests.resolve(GenerationRequest(PROMPT, aspect=None, image=png(blue_picture((300, 200)))))
    assert (job.width, job.height) == (384, 256) and job.preset == "Custom"
    assert any("snapped to multiples of 16" in w for w in job.warnings)
    assert not any("preset size" in w for w in job.warnings)
    job = requests.resolve(GenerationRequest(PROMPT, aspect=None, image=png(blue_picture((512, 512)))))
    assert (job.width, job.height) == (512, 512) and job.warnings == ()
    job = requests.resolve(GenerationRequest(PROMPT, aspect=None, width=256, height=256,
                                             image=png(blue_picture((400, 300)))))
    assert job.init_image.size == (256, 256) and any("centre-cropped" in w for w in job.warnings)
    job = requests.resolve(GenerationRequest(PROMPT, preset="Draft", aspect="16:9", image=png(blue_picture())))
    assert (job.width, job.height) == (1024, 576) and job.init_image.size == (1024, 576)
    big = requests.resolve(GenerationRequest(PROMPT, aspect=None, image=png(blue_picture((4000, 3000)), "JPEG")))
    assert big.width % 16 == 0 and big.height % 16 == 0 and big.width * big.height <= requests.MAX_OUTPUT_AREA
    assert abs(big.width / big.height - 4 / 3) < 0.02


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its pixel data is a 1x1 image's)."""
    data = bytearray(png(PIL.Image.new("RGB", (1, 1))))
    ihdr = bytearray(data[12:29])  # "IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.mark.parametrize("fields, param, words", [
    (dict(image=b"not an image"), "image", "PNG, JPEG or WebP"),
    (dict(image=b""), "image", "empty"),
    (dict(image=png_header(20000, 20000)), "image", "too large"),
    (dict(image=png_header(8000, 8000)), "image", "8000x8000 is 64 MP"),
    (dict(image=png(PIL.Image.new("RGB", (8, 8)), "GIF")), "image", "GIF"),
    (dict(image=png(PIL.Image.new("RGB", (64, 64)))[:60]), "image", ""),
    (dict(image=png(blue_picture()), mask=png(hole((128, 128), (0, 0, 64, 64)))), "mask", "the image's size"),
    (dict(image=png(blue_picture()), mask=png(PIL.Image.new("L", (256, 256), 0))), "mask", "empty"),
    (dict(image=png(blue_picture()), mask=b"junk"), "mask", "PNG, JPEG or WebP"),
    (dict(image=png(blue_picture()), strength=1.5), "strength", "out of range"),
    (dict(image=png(blue_picture()), strength="a lot"), "strength", "number"),
    (dict(strength=0.5), "image", "input image"),
    (dict(mask=png(hole())), "image", "input image"),
    (dict(task="inpaint", image=png(blue_picture())), "mask", "needs a mask"),
    (dict(task="text-to-image", image=png(blue_picture())), "image", "no input image"),
    (dict(task="outpaint", image=png(blue_picture())), "task", "unknown task"),
    (dict(image=png(blue_picture()), steps=99), "steps", "out of range"),
])
def test_bad_inputs_are_request_errors(fields, param, words):
    with pytest.raises(RequestError) as err:
        requests.resolve(GenerationRequest(PROMPT, aspect=None, **fields))
    assert err.value.param == param and words in str(err.value)


def test_a_huge_header_is_refused_without_decoding(monkeypatch):
    def no_decode(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", no_decode)
    for side in (20000, 8000):  # past PIL's own bomb limit, and past ours only
        with pytest.raises(RequestError, match="too large"):
            requests.open_image(png_header(side, side))


def test_text_to_image_jobs_are_unchanged():
    job = requests.resolve(GenerationRequest(PROMPT, seed=1))
    assert (job.task, job.strength, job.init_image, job.denoise_steps) == ("text-to-image", None, None, job.steps)


def test_the_ui_editors_strokes_are_the_mask():
    from zimage.ui import editor_inputs, editor_value

    background = PIL.Image.new("RGBA", (256, 256), BLUE + (255,))
    stroke = PIL.Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    PIL.ImageDraw.Draw(stroke).ellipse((64, 64, 192, 192), fill=(255, 255, 255, 255))
    image, mask = editor_inputs({"background": background, "layers": [stroke], "composite": background})
    assert image is background and np.array_equal(np.asarray(mask) > 0, np.asarray(hole()) > 0)
    blank = PIL.Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    assert editor_inputs({"background": background, "layers": [blank], "composite": background}) == (background, None)
    assert editor_inputs(editor_value(background)) == (background, None)
    assert editor_inputs(None) == (None, None)
    job = requests.resolve(GenerationRequest(PROMPT, aspect=None, image=background.convert("RGB"), mask=mask))
    assert job.task == "inpaint" and len(job.input_sha256) == 64


def test_the_edit_tab_event_inpaints_and_sends_results_to_edit(engine, tmp_path):
    """The UI's own event functions, in process: Edit runs through the service's queue; Send to Edit fills the
    editor with a result."""
    import asyncio

    from zimage import ui
    from zimage.gpu_queue import GenerationQueue
    from zimage.metrics import Metrics
    from zimage.outputs import OutputStore

    settings = Settings(model="tiny", device="cpu", outputs=tmp_path / "outputs")
    store, queue = OutputStore(settings.outputs, "tiny"), GenerationQueue(engine, settings.queue_size)
    metrics = Metrics(engine, queue_depth=lambda: 0, max_waiting=lambda: 0, store=store)
    demo = ui.build(engine, queue, store, metrics, settings)
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}
    stroke = PIL.Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    PIL.ImageDraw.Draw(stroke).ellipse((64, 64, 192, 192), fill=(255, 255, 255, 255))
    source = blue_picture()
    value = {"background": source.convert("RGBA"), "layers": [stroke], "composite": source}
    gallery, info, details, seed, pending = asyncio.run(fns["edit"](
        value, PROMPT, 1.0, "Draft", 4, False, None, progress=lambda *a, **k: None))
    assert seed == 4 and "seed 4" in info and pending[0].task == "inpaint"
    assert diff(gallery[0], source)[np.asarray(hole()) == 0].max() == 0
    assert [f.result(timeout=60).suffix for f in pending[1]] == [".png"]
    sent, prompt, _ = fns["send_result_to_edit"](pending, "")
    assert sent["background"] is gallery[0] and prompt == PROMPT
    store.close()
    queue.close()


def test_text_to_image_is_unchanged_by_edits_between(engine):
    """The task pipelines share one scheduler: an edit (which sets a begin index) must not leak into the next
    text-to-image run."""
    request = GenerationRequest(PROMPT, width=256, height=256, steps=4, seed=11)
    before = generate(engine, request).images[0]
    edit(engine, image=png(blue_picture()), strength=0.5)
    edit(engine, image=png(blue_picture()), mask=png(hole()))
    assert diff(generate(engine, request).images[0], before).max() == 0


@pytest.mark.parametrize("module", ["transformer", "vae.encoder"])
def test_an_oom_in_an_edit_takes_the_same_ladder(engine, caplog, module):
    """The input's VAE encode and the denoising both run in the denoise stage: an OOM in either is retried once
    (text encoder shed), and the retry makes the same picture."""
    import logging

    from tests.faults import raise_in_forward

    target = engine.pipeline
    for part in module.split("."):
        target = getattr(target, part)
    fields = dict(image=png(blue_picture()), mask=png(hole()), seed=2)
    with caplog.at_level(logging.WARNING, "zimage.engine"), raise_in_forward(target, times=1) as fault:
        result = edit(engine, **fields)
    assert fault["raised"] == 1 and result.oom_retries == 1 and "oom handled stage=denoise" in caplog.text
    assert diff(result.images[0], edit(engine, **fields).images[0]).max() == 0
