"""Speed switches (zimage/speed.py, zimage/cudagraph.py) that can be checked without a GPU."""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch

from zimage import cudagraph, fastattn, memory, speed, tiny


def test_switches_parse_and_env(monkeypatch):
    assert speed.Switches.parse("") == speed.DEFAULT_SWITCHES
    sw = speed.Switches.parse("-real_rope,+block_graphs")
    assert not sw.real_rope and sw.block_graphs and sw.vae_compile
    with pytest.raises(ValueError, match="unknown speed switch"):
        speed.Switches.parse("+warp_drive")
    monkeypatch.setenv("ZIMAGE_SPEED", "-vae_compile")
    assert not speed.switches().vae_compile


def test_flash_attn_namespace_alone_is_not_fa2(monkeypatch):
    """flash-attn-4 installs `flash_attn.cute` only: `auto` must not pick diffusers' FA2 backend for it."""
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args):
        if name == "flash_attn":
            return types.SimpleNamespace(name="flash_attn")  # the namespace exists...
        if name == "flash_attn.flash_attn_interface":
            return None  # ...but not FA2's interface
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    assert not speed.flash_attn_2_available()
    assert speed.available_attention_backends("cpu") == ["native"]
    assert speed.choose_attention_backend("auto", "cpu") == "native"
    assert speed.choose_attention_backend("_native_cudnn", "cpu") == "_native_cudnn"


def test_fa4_absent_on_this_machine_is_handled():
    if not fastattn.fa4_importable():
        assert not fastattn.fa4_supported("cuda")
        with pytest.raises(RuntimeError, match="flash-attn-4"):
            speed.apply_attention_backend(types.SimpleNamespace(), "fa4")


@pytest.mark.parametrize("capability,fa4,first", [((9, 0), True, "fa4"), ((10, 0), True, "fa4"),
                                                   ((9, 0), False, "native"), ((8, 9), True, "native")])
def test_auto_attention_picks_fa4_where_installed_and_supported(monkeypatch, capability, fa4, first):
    """auto: FlashAttention-4 first on Hopper/Blackwell when flash-attn-4 imports (measured fastest in the engine on
    the H100), else SDPA (cuDNN); never FA4 below sm90."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(fastattn, "fa4_importable", lambda: fa4)
    monkeypatch.setattr(speed, "flash_attn_3_available", lambda: False)
    monkeypatch.setattr(speed, "flash_attn_2_available", lambda: False)
    assert speed.choose_attention_backend("auto", "cuda") == first


def test_settings_accept_fa4():
    from zimage.settings import Settings

    assert Settings.load(["--attention", "fa4"]).attention == "fa4"


def test_compiled_vae_keeps_tiled_decode_working(monkeypatch):
    """Tiled decode runs the decoder eagerly (force_eager) and gives the same pixels as before."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**{**tiny.VAE, "sample_size": 64}).eval()
    latents = torch.randn(1, 16, 24, 24)
    vae.enable_tiling()
    with torch.no_grad():
        reference = vae.decode(latents).sample
    compiled = []
    monkeypatch.setattr(vae.decoder, "compile", lambda *a, **k: compiled.append(True))
    stances = []
    real_stance = torch.compiler.set_stance
    monkeypatch.setattr(torch.compiler, "set_stance", lambda s, **k: stances.append(s) or real_stance(s, **k))
    speed.compile_vae_decoder(vae)
    speed.compile_vae_decoder(vae)  # idempotent: tiled decode wrapped once
    with torch.no_grad():
        out = vae.decode(latents).sample
    assert compiled and stances == ["force_eager"]
    assert torch.allclose(out, reference, atol=1e-5)
    assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_apply_switches_cpu_does_nothing():
    pipe = types.SimpleNamespace(vae=None, transformer=None)
    assert speed.apply_switches(pipe, "cpu", compiled=True, profile="full",
                                sw=speed.Switches(block_graphs=True)) == []


def test_graphed_blocks_keep_modules_and_fall_back_on_cpu():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(**tiny.TRANSFORMER).eval()
    keys = list(model.state_dict())
    x = [torch.randn(16, 1, 16, 16)]
    cap = [torch.randn(9, tiny.TRANSFORMER["cap_feat_dim"])]
    t = torch.tensor([0.5])
    with torch.no_grad():
        reference = model(x, t, cap, return_dict=False)[0][0]
    graphed = cudagraph.install(model)
    assert cudagraph.install(model) is graphed and list(model.state_dict()) == keys
    assert len(list(iter(graphed))) == len(model.layers)  # no CUDA: plain iteration
    with torch.no_grad():
        out = model(x, t, cap, return_dict=False)[0][0]
    assert torch.equal(out, reference) and graphed.captures == 0
    cudagraph.uninstall(model)
    assert type(model.layers) is torch.nn.ModuleList and list(model.state_dict()) == keys


def test_compile_transformer_is_shape_generic_unless_told():
    calls = []

    class Fake(torch.nn.Module):
        def compile_repeated_blocks(self, **kwargs):
            calls.append(kwargs["dynamic"])

    speed.compile_transformer(Fake())
    speed.compile_transformer(Fake(), dynamic=False)
    assert calls == [True, False]


def test_text_encoder_without_mask_gives_the_prompt_rows_of_the_masked_call():
    """The premise of the encoder's CUDA graphs (which drop the attention mask): the encoder is causal and padding
    comes after the prompt, so the prompt's rows are the same with or without the mask."""
    pipe = tiny.build_pipeline()
    inputs = pipe.tokenizer(["a red circle on the left"], padding="max_length", max_length=32, return_tensors="pt")
    mask = inputs.attention_mask.bool()
    assert 0 < int(mask.sum()) < 32 and not mask[0, -1]  # right-padded
    with torch.no_grad():
        masked = pipe.text_encoder(input_ids=inputs.input_ids, attention_mask=mask, output_hidden_states=True)
        bare = pipe.text_encoder(input_ids=inputs.input_ids, output_hidden_states=True)
        # what the graphs pass: transformers' per-layer-type mapping, so it builds no mask even while capturing
        mapped = pipe.text_encoder(input_ids=inputs.input_ids, attention_mask=cudagraph.GraphedTextEncoder(
            pipe.text_encoder)._no_mask, output_hidden_states=True)
    assert torch.equal(mapped.hidden_states[-2], bare.hidden_states[-2])
    rows = mask[0]
    assert torch.allclose(masked.hidden_states[-2][0][rows], bare.hidden_states[-2][0][rows], atol=1e-5)
    assert not torch.allclose(masked.hidden_states[-2][0][~rows], bare.hidden_states[-2][0][~rows], atol=1e-3)


def test_graphed_text_encoder_runs_the_original_forward_off_cuda_and_is_dropped_on_moves():
    pipe = tiny.build_pipeline()
    encoder = pipe.text_encoder
    with torch.no_grad():
        reference, _ = pipe.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False,
                                          max_sequence_length=64)
    graphed = cudagraph.install_text_encoder(encoder)
    assert cudagraph.install_text_encoder(encoder) is graphed is cudagraph.text_encoder_graphs(encoder)
    assert "forward" not in dict(encoder.named_modules()) and list(encoder.state_dict())  # weights untouched
    with torch.no_grad():
        out, _ = pipe.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False,
                                    max_sequence_length=64)
    assert torch.equal(out[0], reference[0]) and graphed.captures == graphed.replays == 0  # CPU: original forward
    assert cudagraph._right_padded(None) and cudagraph._right_padded(torch.tensor([[1, 1, 0, 0]]))
    assert not cudagraph._right_padded(torch.tensor([[0, 1, 1, 1]]))  # left padding: the mask matters
    assert not cudagraph._right_padded(torch.ones(2, 4))  # a batch: not graphed
    graphed.graphs["x"] = object()
    placement = memory.Placement(pipe, "cuda", memory.profile_spec("full", False), fp8=False)
    monkey_moves = []
    encoder.to = lambda device: monkey_moves.append(device)  # no GPU here: record the move instead
    assert placement.shed_text_encoder() and monkey_moves == ["cpu"] and not graphed.graphs
    graphed.graphs["x"] = object()
    placement.before_encode()
    assert monkey_moves == ["cpu", "cuda"] and not graphed.graphs


def test_transformer_graphs_run_the_plain_forward_off_the_gpu(tmp_path):
    """GraphedTransformer (step_graphs) replaces the transformer's forward; CPU tensors take the original forward, so
    the output is unchanged and nothing is captured. A LoRA runtime keys the graphs by its branch state."""
    from tests.test_fastattn import inputs, run, small_transformer
    from zimage import lora

    model = small_transformer(torch.float32)
    x, t, cap = inputs(torch.float32)
    reference = run(model, x, t, cap)
    graphed = cudagraph.install_transformer(model)
    assert cudagraph.install_transformer(model) is graphed is cudagraph.transformer_graphs(model)
    assert torch.equal(run(model, x, t, cap), reference)
    assert graphed.captures == 0 and not graphed.seen and not graphed.graphs
    runtime = lora.LoraRuntime(lora.LoraLibrary(tmp_path), model, "cpu", torch.float32, rank=4, cache_bytes=0,
                               mode="branch")
    runtime._write(None)
    assert runtime._branch_active in graphed.key_parts


def test_the_execution_device_comes_from_the_placement(monkeypatch):
    """diffusers' `_execution_device` walks every module of every component per pipeline call; the engine's
    pipelines answer it from the placement instead, and task pipelines built from them stay correct."""
    from diffusers.hooks import group_offloading

    from zimage import stages

    pipe = tiny.build_pipeline()
    original_class = type(pipe)
    stages.pin_execution_device(pipe, "cpu")
    stages.pin_execution_device(pipe, "cpu")  # idempotent: one subclass, not a chain
    assert type(pipe).__mro__[1] is original_class and isinstance(pipe, original_class)
    assert type(pipe).__name__ == original_class.__name__

    def walked(*args, **kwargs):
        raise AssertionError("walked the modules")

    monkeypatch.setattr(group_offloading, "_get_group_onload_device", walked)
    assert pipe._execution_device == torch.device("cpu")
    assert set(stages.task_pipelines(pipe)) == set(stages.TASK_PIPELINES)


def test_decode_graphs_fall_back_off_the_gpu_and_pixels_match_diffusers(shared_engine):
    """GraphedDecode (decode_graphs) answers None for CPU latents, so the stage decodes eagerly, and the decode both
    paths share (stages.decode_to_pixels) gives diffusers' own pixels (VaeImageProcessor.postprocess)."""
    import numpy as np

    from zimage import stages

    pipe = shared_engine.pipeline
    graphed = cudagraph.install_decode(pipe.vae, stages.decode_to_pixels)
    try:
        assert cudagraph.install_decode(pipe.vae, stages.decode_to_pixels) is graphed
        assert cudagraph.decode_graphs(pipe.vae) is graphed
        latents = torch.randn(1, pipe.vae.config.latent_channels, 32, 32, generator=torch.Generator().manual_seed(3))
        assert graphed(latents) is None and graphed.captures == 0 and not graphed.graphs
        image = shared_engine.stages.to_image(*shared_engine.stages.decode(latents, tiled=False))
        with torch.no_grad():
            scaled = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            decoded = pipe.vae.decode(scaled, return_dict=False)[0]
            expected = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
        assert image.size == expected.size == (256, 256)
        assert np.array_equal(np.asarray(image), np.asarray(expected))
        pixels, finite = stages.decode_to_pixels(pipe.vae, latents)
        assert pixels.dtype == torch.uint8 and pixels.shape == (256, 256, 3) and bool(finite)
        _, finite = stages.decode_to_pixels(pipe.vae, torch.full_like(latents, float("nan")))
        assert not bool(finite)
    finally:
        del pipe.vae.__dict__["_zimage_graphed_decode"]


def test_decode_graphs_are_installed_with_the_compiled_decoder_only(monkeypatch):
    """apply_switches gives the VAE decode graphs only where it compiled the decoder (CUDA, full profile)."""
    calls = []
    monkeypatch.setattr(speed, "compile_vae_decoder",
                        lambda vae, split_norm=False, gemm_attention=False: calls.append("compiled"))
    monkeypatch.setattr(cudagraph, "install_transformer", lambda transformer: types.SimpleNamespace(_pool="pool"))
    monkeypatch.setattr(cudagraph, "install_decode", lambda vae, fn, pool=None, room=None: calls.append((pool, room)))
    monkeypatch.setattr(cudagraph, "install_text_encoder", lambda te: None)
    pipe = types.SimpleNamespace(vae=object(), transformer=object(), text_encoder=object())
    sw = speed.Switches(block_kernels=False)
    applied = speed.apply_switches(pipe, "cuda", True, "full", sw=sw, decode_graph_room=True)
    assert "decode_graphs" in applied and calls[0] == "compiled" and calls[1][0] == "pool" and callable(calls[1][1])
    calls.clear()
    assert "decode_graphs" not in speed.apply_switches(pipe, "cuda", True, "16gb", sw=sw, decode_graph_room=True)
    assert not calls
    assert "decode_graphs" not in speed.apply_switches(pipe, "cuda", True, "full", sw=sw, decode_graph_room=False)
    assert "decode_graphs" not in speed.apply_switches(pipe, "cuda", True, "full", decode_graph_room=True,
                                                       sw=speed.Switches(block_kernels=False, decode_graphs=False))


def test_room_for_decode_graphs_is_decided_up_front():
    """Decode graphs keep a decode's transient in the graph pool and need two of them to capture: a 24 GiB card has
    no room beside the full profile's largest tier, an 80 GiB one has; LoRA memory counts; no GPU, no graphs."""
    assert not memory.room_for_decode_graphs(None, True)
    assert not memory.room_for_decode_graphs(24.0, True) and not memory.room_for_decode_graphs(24.0, False)
    assert memory.room_for_decode_graphs(79.2, True) and memory.room_for_decode_graphs(79.2, False)
    assert memory.room_for_decode_graphs(32.0, True)
    assert not memory.room_for_decode_graphs(32.0, True, extra_gib=6.0)


def test_the_transformer_dtype_is_pinned_until_its_tensors_are_converted(monkeypatch):
    """diffusers' `dtype` walks every submodule and parameter, and the pipelines read `transformer.dtype` every step;
    the engine's transformer answers it from a cache that a conversion (`.to`) drops."""
    from diffusers.models import modeling_utils

    from zimage import stages

    transformer = tiny.build_pipeline().transformer
    original_class = type(transformer)
    stages.pin_dtype(transformer)
    stages.pin_dtype(transformer)  # idempotent: one subclass, not a chain
    assert type(transformer).__mro__[1] is original_class and type(transformer).__name__ == original_class.__name__
    assert transformer.dtype == torch.float32
    walks = []
    real = modeling_utils.get_parameter_dtype
    monkeypatch.setattr(modeling_utils, "get_parameter_dtype", lambda module: walks.append(1) or real(module))
    assert transformer.dtype == torch.float32 and not walks  # cached: nothing walked
    transformer.to(torch.float64)
    assert transformer.dtype == torch.float64 and len(walks) == 1  # the conversion dropped the cache
    assert transformer.dtype == torch.float64 and len(walks) == 1
    import pickle

    copy = pickle.loads(pickle.dumps(transformer))  # pickles (and torch.save) as diffusers' own class
    assert type(copy) is original_class and copy.dtype == torch.float64


def test_decode_graph_capture_bookkeeping(monkeypatch):
    """GraphedDecode's capture path without a GPU (capture and the pool handle stubbed): one graph per shape kept
    least-recently-used first, the pool shared, a failed capture (out of memory or any other error) turns the
    graphs off."""
    pools, captured = [], []

    def fake_capture(fn, device, pool):
        pools.append(pool)
        captured.append(fn())
        return types.SimpleNamespace(replay=lambda: None), captured[-1]

    monkeypatch.setattr(cudagraph, "capture", fake_capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    graphed = cudagraph.GraphedDecode(vae=None, decode_fn=lambda vae, z: (z * 2, torch.tensor(True)), max_graphs=1)
    a, b = torch.ones(1, 4, 2, 2), torch.ones(1, 4, 3, 3)
    entry = graphed._capture("a", a)
    assert torch.equal(entry.output[0], a * 2) and graphed.captures == 1 and list(graphed.graphs) == ["a"]
    graphed._capture("b", b)
    assert list(graphed.graphs) == ["b"] and graphed.captures == 2 and pools == ["pool", "pool"]  # "a" dropped (LRU)

    def out_of_memory(fn, device, pool):
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(cudagraph, "capture", out_of_memory)
    assert graphed._capture("c", a) is None and not graphed.enabled and list(graphed.graphs) == ["b"]
    graphed.enabled = True
    monkeypatch.setattr(cudagraph, "capture", lambda fn, device, pool: 1 / 0)
    assert graphed._capture("d", a) is None and not graphed.enabled


def test_lt_gemms_stay_off_where_cublaslt_cannot_run():
    """The cuBLASLt GEMMs need a CUDA GPU of compute capability >= 9.0 and nvmath-python; elsewhere the switch applies
    nothing and the blocks call torch."""
    from zimage import lt_gemm

    assert not lt_gemm.available("cpu")
    pipe = types.SimpleNamespace(vae=object(), transformer=object(), text_encoder=object())
    assert "lt_gemms" not in speed.apply_switches(pipe, "cpu", False, "full", sw=speed.Switches(lt_gemms=True))


def test_cudnn_fp8_attention_stays_off_where_it_cannot_run():
    """cuDNN's 8-bit attention needs a CUDA GPU of compute capability >= 9.0 and nvidia-cudnn-frontend; elsewhere the
    switch applies nothing, and the fp8 blocks keep their bf16 attention."""
    from zimage import cudnn_attention

    assert not cudnn_attention.available("cpu")
    pipe = types.SimpleNamespace(vae=object(), transformer=object(), text_encoder=object())
    applied = speed.apply_switches(pipe, "cpu", False, "full", sw=speed.Switches(cudnn_fp8_attention=True))
    assert "cudnn_fp8_attention" not in applied
