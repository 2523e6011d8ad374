"""The engine on the real ZImagePipeline with the tiny model: determinism, validation, cancel, OOM ladder."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.faults import raise_in_forward
from zimage import memory
from zimage.request import (EngineUnavailable, GenerationCancelled, GenerationRequest, OutOfMemory, RequestError)
from tests.helpers import generate

SMALL = dict(width=256, height=256, steps=3)


def pixels(result, i=0):
    return np.asarray(result.images[i])


def test_same_seed_same_pixels_different_seed_different_pixels(shared_engine):
    a = generate(shared_engine, GenerationRequest("a red circle", seed=42, **SMALL))
    b = generate(shared_engine, GenerationRequest("a red circle", seed=42, **SMALL))
    c = generate(shared_engine, GenerationRequest("a red circle", seed=43, **SMALL))
    assert a.images[0].size == (256, 256) and a.images[0].mode == "RGB"
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a).astype(int) - pixels(c).astype(int)).mean() > 5


def test_prompt_changes_pixels(shared_engine):
    a = generate(shared_engine, GenerationRequest("a red circle", seed=1, **SMALL))
    b = generate(shared_engine, GenerationRequest("a green square", seed=1, **SMALL))
    assert not np.array_equal(pixels(a), pixels(b))


def test_each_image_of_a_batch_reproduces_alone(shared_engine):
    batch = generate(shared_engine, GenerationRequest("two cats", seed=100, n=3, **SMALL))
    assert batch.seeds == [100, 101, 102] and len(batch.images) == 3
    alone = generate(shared_engine, GenerationRequest("two cats", seed=101, n=1, **SMALL))
    assert np.array_equal(pixels(batch, 1), pixels(alone))


def test_preset_request_gets_preset_size_and_steps(shared_engine):
    steps_seen = []
    result = generate(shared_engine, GenerationRequest("a cat", preset="Draft", aspect="16:9", seed=3),
                                    on_progress=lambda done, total: steps_seen.append((done, total)))
    assert (result.width, result.height, result.steps) == (1024, 576, 6)
    assert result.images[0].size == (1024, 576)
    assert steps_seen == [(i, 6) for i in range(1, 7)]
    assert set(result.timings) >= {"text_encode", "denoise", "decode", "total"}
    assert result.peak_vram_bytes is None  # CPU


@pytest.mark.parametrize("seed", [None, -1, "-1"])
def test_random_seed_is_reported(shared_engine, seed):
    result = generate(shared_engine, GenerationRequest("a cat", seed=seed, **SMALL))
    assert 0 <= result.seeds[0] < 2**32
    again = generate(shared_engine, GenerationRequest("a cat", seed=result.seeds[0], **SMALL))
    assert np.array_equal(pixels(result), pixels(again))


BAD_REQUESTS = [
    (dict(prompt=""), "prompt", "empty"),
    (dict(prompt="   \n\t "), "prompt", "empty"),
    (dict(prompt=None), "prompt", "text"),
    (dict(prompt="x" * 20_000), "prompt", "limit"),
    (dict(prompt="a", width=500, height=256), "width", "multiple of 16: try 496 or 512"),
    (dict(prompt="a", width=256, height=4096), "height", "256 to 2048"),
    (dict(prompt="a", width=128, height=256), "width", "256 to 2048"),
    (dict(prompt="a", width=512), "height", "both width and height"),
    (dict(prompt="a", width="wide", height=256), "width", "integer"),
    (dict(prompt="a", seed=2**32), "seed", "0 to 4294967295"),
    (dict(prompt="a", seed=-2), "seed", "-1 for random"),
    (dict(prompt="a", seed="lucky"), "seed", "integer"),
    (dict(prompt="a", seed=True), "seed", "integer"),
    (dict(prompt="a", preset="Extreme"), "preset", "Draft, Standard, High, Ultra"),
    (dict(prompt="a", aspect="5:4"), "aspect", "1:1"),
    (dict(prompt="a", steps=0), "steps", "1 to 16"),
    (dict(prompt="a", steps=17), "steps", "1 to 16"),
    (dict(prompt="a", n=0), "n", "1 to 4"),
    (dict(prompt="a", n=5), "n", "1 to 4"),
    (dict(prompt="a", n="two"), "n", "integer"),
]


@pytest.mark.parametrize("fields,param,phrase", BAD_REQUESTS, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD_REQUESTS)])
def test_invalid_input_gets_its_message(shared_engine, fields, param, phrase):
    with pytest.raises(RequestError) as info:
        generate(shared_engine, GenerationRequest(**fields))
    assert info.value.param == param
    assert phrase in str(info.value)


def test_preset_names_are_case_insensitive_and_seed_strings_accepted(shared_engine):
    job = shared_engine.resolve(GenerationRequest("a", preset="ultra", seed="12"))
    assert job.preset == "Ultra" and job.seeds == (12,) and job.vae_tiling


def test_long_prompt_is_truncated_with_a_warning(shared_engine):
    prompt = " ".join(f"word{i}" for i in range(600))
    assert shared_engine.count_prompt_tokens(prompt) > 512
    result = generate(shared_engine, GenerationRequest(prompt, seed=1, **SMALL))
    assert any("only the first 512" in w for w in result.warnings)
    assert len(result.images) == 1


def test_control_characters_are_removed_with_a_warning(shared_engine):
    result = generate(shared_engine, GenerationRequest("a red\x00 circle", seed=1, **SMALL))
    assert result.prompt == "a red circle"
    assert any("control characters" in w for w in result.warnings)


def test_cancel_after_step_1_stops_before_step_3(make_engine):
    engine = make_engine()
    cancel, seen = threading.Event(), []

    def on_progress(done, total):
        seen.append(done)
        if done == 1:
            cancel.set()

    with pytest.raises(GenerationCancelled):
        generate(engine, GenerationRequest("a cat", width=256, height=256, steps=8, seed=1),
                        on_progress=on_progress, cancel=cancel)
    assert seen == [1]  # diffusers skips the remaining steps once interrupted
    assert engine.stats.cancelled == 1 and engine.stats.inflight == 0
    assert generate(engine, GenerationRequest("a cat", seed=1, **SMALL)).images  # still serving


def test_cancel_between_images_stops_the_batch(make_engine):
    engine = make_engine()
    cancel, seen = threading.Event(), []

    def on_progress(done, total):
        seen.append(done)
        if done == 3:  # last step of the first of four images
            cancel.set()

    with pytest.raises(GenerationCancelled):
        generate(engine, GenerationRequest("a cat", n=4, seed=1, **SMALL), on_progress=on_progress, cancel=cancel)
    assert max(seen) == 3


@pytest.fixture
def release_calls(monkeypatch):
    """Counts calls of the engine's memory release (the real function still runs)."""
    calls = []
    real = memory.release_memory

    def counting(device, collect=True):
        calls.append(device)
        real(device, collect)

    monkeypatch.setattr(memory, "release_memory", counting)
    return calls


def test_oom_once_in_vae_decode_is_recovered_by_tiled_retry(make_engine, release_calls, caplog):
    engine = make_engine()
    vae = engine.pipeline.vae
    tiling_seen = []
    probe = vae.decoder.register_forward_pre_hook(lambda mod, args: tiling_seen.append(vae.use_tiling))
    try:
        with caplog.at_level(logging.WARNING, "zimage.engine"), raise_in_forward(vae.decoder, times=1) as fault:
            result = generate(engine, GenerationRequest("a cat", width=512, height=512, steps=2, seed=1))
    finally:
        probe.remove()
    assert fault["raised"] == 1
    assert tiling_seen[0] is False and all(tiling_seen[1:]) and len(tiling_seen) > 2  # retry decoded in tiles
    assert result.oom_retries == 1 and result.images[0].size == (512, 512)
    assert any("tiled VAE decode" in w for w in result.warnings)
    assert "oom handled stage=decode" in caplog.text
    assert len(release_calls) >= 2  # after the OOM, and after the request
    assert not vae.use_tiling  # tiling switched back off for the next request
    assert engine.stats.oom["handled"] == 1 and engine.status().state == "ready"


def test_oom_twice_in_decode_gives_typed_error_and_next_request_succeeds(make_engine, release_calls):
    engine = make_engine()
    with raise_in_forward(engine.pipeline.vae.decoder, times=2):
        with pytest.raises(OutOfMemory) as info:
            generate(engine, GenerationRequest("a cat", preset="High", aspect="1:1", steps=1, seed=1))
    message = str(info.value)
    assert info.value.stage == "decode"
    assert "1280x1280" in message and "Standard preset" in message
    assert len(release_calls) >= 3  # after each OOM and after the request
    assert engine.stats.oom["handled"] == 1 and engine.stats.oom["failed"] == 1
    assert generate(engine, GenerationRequest("a cat", seed=1, **SMALL)).images


@pytest.mark.parametrize("stage,module", [("text_encode", "text_encoder"), ("denoise", "transformer")])
def test_oom_in_encode_or_denoise_is_retried(make_engine, caplog, stage, module):
    engine = make_engine()
    with caplog.at_level(logging.WARNING, "zimage.engine"), \
            raise_in_forward(getattr(engine.pipeline, module), times=1) as fault:
        result = generate(engine, GenerationRequest("a fox", seed=1, **SMALL))
    assert fault["raised"] == 1 and result.oom_retries == 1
    assert f"oom handled stage={stage}" in caplog.text
    reference = generate(engine, GenerationRequest("a fox", seed=1, **SMALL))
    assert np.array_equal(pixels(result), pixels(reference))  # the retry computed the same image


def test_too_many_ooms_is_fatal_and_refuses_work(make_engine, caplog):
    engine = make_engine(oom_fatal_count=2, oom_fatal_window=60.0)
    with caplog.at_level(logging.WARNING, "zimage.engine"):
        for _ in range(2):
            with raise_in_forward(engine.pipeline.vae.decoder, times=1):
                generate(engine, GenerationRequest("a cat", seed=1, **SMALL))
    assert engine.status().state == "fatal" and engine.stats.oom["fatal"] == 1
    assert "fatal: 2 out-of-memory errors within 60s" in caplog.text
    with pytest.raises(EngineUnavailable, match="restarted"):
        generate(engine, GenerationRequest("a cat", seed=1, **SMALL))


def test_cuda_error_other_than_oom_is_fatal(make_engine, caplog):
    engine = make_engine()
    boom = lambda: torch.AcceleratorError("CUDA error: an illegal memory access was encountered")  # noqa: E731
    with caplog.at_level(logging.ERROR, "zimage.engine"), \
            raise_in_forward(engine.pipeline.transformer, exc_factory=boom), pytest.raises(torch.AcceleratorError):
        generate(engine, GenerationRequest("a cat", seed=1, **SMALL))
    assert engine.status().state == "fatal" and "fatal: device error" in caplog.text


def test_concurrent_callers_never_share_the_gpu(make_engine):
    engine = make_engine()
    active, peak, lock = [0], [0], threading.Lock()

    def enter(mod, args):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])

    def leave(mod, args, out):
        with lock:
            active[0] -= 1

    # Count generations inside the denoise stage: from the first transformer forward to decode's end.
    h1 = engine.pipeline.text_encoder.register_forward_pre_hook(enter)
    h2 = engine.pipeline.vae.decoder.register_forward_hook(leave)
    errors, results = [], []

    def worker(i):
        try:
            results.append(generate(engine, GenerationRequest(f"cat {i}", seed=i, **SMALL)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    h1.remove()
    h2.remove()
    assert not errors and len(results) == 4
    assert peak[0] == 1


def test_repeated_prompt_skips_the_text_encoder(make_engine):
    engine = make_engine()
    calls = []
    handle = engine.pipeline.text_encoder.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        generate(engine, GenerationRequest("a lighthouse", seed=1, **SMALL))
        generate(engine, GenerationRequest("a lighthouse", seed=2, **SMALL))
        generate(engine, GenerationRequest("a windmill", seed=2, **SMALL))
    finally:
        handle.remove()
    assert len(calls) == 2


def test_engine_refuses_work_until_ready(tiny_settings):
    from zimage.engine import Engine

    engine = Engine(tiny_settings)
    with pytest.raises(EngineUnavailable, match="loading"):
        generate(engine, GenerationRequest("a cat"))
    engine.load()
    assert engine.status().state == "warming"
    with pytest.raises(EngineUnavailable, match="warming up"):
        generate(engine, GenerationRequest("a cat"))
    report = engine.warm_up()
    assert engine.status().state == "ready" and report[0]["seconds"] > 0 and list(engine.status().warm) == report


@pytest.mark.parametrize("prompt", ["a lighthouse", " ".join(f"word{i}" for i in range(150)),
                                    " ".join(f"word{i}" for i in range(600))])
def test_text_encoder_sees_the_prompt_padded_to_a_bucket_with_the_same_embeddings(make_engine, prompt):
    """The engine pads to the next multiple of 64 tokens, not to 512; the causal encoder's states for the
    prompt's own tokens must come out as the pipeline's 512-token encoding gives them."""
    from zimage.stages import MAX_SEQUENCE_LENGTH, encode_length

    engine = make_engine()
    lengths = []
    handle = engine.pipeline.text_encoder.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        bucketed = engine.stages.encode(prompt)
    finally:
        handle.remove()
    n_tokens = engine.count_prompt_tokens(prompt)
    assert lengths == [encode_length(n_tokens)] and lengths[0] % 64 == 0
    assert lengths[0] == MAX_SEQUENCE_LENGTH if n_tokens > MAX_SEQUENCE_LENGTH else lengths[0] < 2 * n_tokens + 64
    full, _ = engine.pipeline.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False,
                                        max_sequence_length=MAX_SEQUENCE_LENGTH)
    assert bucketed[0].shape == full[0].shape == (min(n_tokens, MAX_SEQUENCE_LENGTH), full[0].shape[1])
    torch.testing.assert_close(bucketed[0], full[0], rtol=1e-5, atol=1e-5)


def test_outputs_written_after_close_are_not_lost(shared_engine, tmp_path):
    """A job that finishes while the service shuts down (after the writer closed) is still written, inline."""
    from zimage.outputs import OutputStore

    result = generate(shared_engine, GenerationRequest("a blue square", preset="Draft", seed=2))
    store = OutputStore(tmp_path / "outputs", "tiny-random")
    store.close()
    [path] = [future.result(timeout=60) for future in store.save(result)]
    assert path.is_file() and len((tmp_path / "outputs" / "history.jsonl").read_text().splitlines()) == 1


class HostReads(TorchDispatchMode):
    """Records the order of the model's matmuls and convolutions and of every op that reads tensor values on the
    host (on a GPU each one makes the host wait for the device)."""

    READS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::masked_select",
             "aten::equal"}
    WORK = {"aten::mm", "aten::addmm", "aten::bmm", "aten::convolution"}

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name == "aten::index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if name in self.READS or bool_index:
            self.ops.append("read")
        elif name in self.WORK:
            self.ops.append("work")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("seeds", [1, 2])
def test_no_host_read_between_the_first_and_the_last_model_op(shared_engine, seeds):
    """The stages queue their work without waiting for each other (stages.StageClock): once the text encoder's
    first matmul is issued, nothing reads a tensor value on the host (diffusers' mask indexing, the latents'
    finiteness, the decoded pixels) until the last image's decode has been issued -- on a GPU each such read
    would idle the device while the host catches up."""
    request = GenerationRequest("a red circle", seed=5, n=seeds, **SMALL)
    job = shared_engine.resolve(request)
    recorder = HostReads()
    with recorder:
        result = shared_engine.generate(job)
    first, last = recorder.ops.index("work"), len(recorder.ops) - 1 - recorder.ops[::-1].index("work")
    assert "read" not in recorder.ops[first:last], recorder.ops[first:last].count("read")
    assert recorder.ops[last + 1:].count("read") >= 2 * seeds  # each image's flags are read, after the stages
    assert len(result.images) == seeds and set(result.timings) >= {"text_encode", "denoise", "decode", "total"}


def test_the_requests_collection_runs_while_waiting_for_the_gpu_not_after(make_engine, monkeypatch):
    """The per-request gc.collect runs before the host's one wait for the last stage (Stages.while_waiting), where
    on a GPU it costs the caller nothing, and not again after the pixels are back."""
    import gc

    from zimage import stages

    engine = make_engine()
    events = []
    finish = stages.StageClock.finish
    monkeypatch.setattr(stages.StageClock, "finish", lambda clock: events.append("wait") or finish(clock))

    def on_gc(phase, info):
        if phase == "start" and info["generation"] == 2:
            events.append("collect")

    gc.callbacks.append(on_gc)
    gc.disable()  # only the engine's own collections
    try:
        generate(engine, GenerationRequest("a cat", seed=1, **SMALL))
    finally:
        gc.enable()
        gc.callbacks.remove(on_gc)
    assert events == ["collect", "wait"]
