"""Settings: env ZIMAGE_* and CLI flags, CLI wins, bad values fail naming the flag, the env var and the choices."""

from pathlib import Path

import pytest

from zimage.settings import OPTIONS, Settings, SettingsError


def test_defaults_are_safe():
    s = Settings.load([], env={})
    assert s.model == "Tongyi-MAI/Z-Image-Turbo" and s.host == "127.0.0.1" and s.port == 7860
    assert s.queue_size == 32 and s.auth == "" and s.auth_pair() is None and s.memory_profile == "auto"


def test_env_is_read_and_cli_wins():
    env = {"ZIMAGE_MODEL": "tiny", "ZIMAGE_HOST": "0.0.0.0", "ZIMAGE_PORT": "9000", "ZIMAGE_OUTPUTS": "/tmp/out",
           "ZIMAGE_AUTH": "ann:secret"}
    s = Settings.load(["--port", "9001"], env=env)
    assert (s.model, s.host, s.port, s.outputs) == ("tiny", "0.0.0.0", 9001, Path("/tmp/out"))
    assert s.auth_pair() == ("ann", "secret")


def test_every_option_has_flag_and_env():
    for opt in OPTIONS:
        assert opt.flag == "--" + opt.name.replace("_", "-") and opt.env == "ZIMAGE_" + opt.name.upper()
        assert hasattr(Settings(), opt.name)


@pytest.mark.parametrize("argv,env,needles", [
    (["--port", "http"], {}, ["--port", "ZIMAGE_PORT", "1 to 65535"]),
    ([], {"ZIMAGE_PORT": "70000"}, ["--port", "ZIMAGE_PORT", "1 to 65535", "from ZIMAGE_PORT"]),
    (["--dtype", "fp16"], {}, ["--dtype", "ZIMAGE_DTYPE", "auto, bf16, fp32"]),
    (["--compile", "maybe"], {}, ["--compile", "auto, on, off"]),
    (["--fp8", "yes"], {}, ["--fp8", "ZIMAGE_FP8", "auto, on, off"]),
    (["--memory-profile", "8gb"], {}, ["--memory-profile", "auto, full, 16gb, 12gb"]),
    (["--attention", "fastest"], {}, ["--attention", "auto", "native", "_native_cudnn"]),
    (["--device", "tpu"], {}, ["--device", "auto, cpu, cuda, cuda:N"]),
    (["--auth", "nopassword"], {}, ["--auth", "ZIMAGE_AUTH", "user:password"]),
    (["--queue-size", "0"], {}, ["--queue-size", "1 to 10000"]),
    (["--model", " "], {}, ["--model", "must not be empty"]),
])
def test_invalid_values_name_flag_env_and_allowed_values(argv, env, needles):
    with pytest.raises(SettingsError) as info:
        Settings.load(argv, env=env)
    for needle in needles:
        assert needle in str(info.value)


def test_cpu_resolution():
    s = Settings.load(["--device", "cpu"], env={})
    import torch

    assert s.torch_device() == "cpu" and s.torch_dtype() == torch.float32 and not s.compile_enabled()
    assert Settings.load(["--device", "cpu", "--compile", "on"], env={}).compile_enabled()


def test_readme_documents_every_setting():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for opt in OPTIONS:
        assert f"`{opt.flag}`" in readme and f"`{opt.env}`" in readme, opt.name


def test_fp8_follows_the_dtype():
    """fp8 replaces bf16 weights only: auto stands down for fp32, on says what to change."""
    import torch

    from zimage import speed

    assert speed.fp8_wanted("auto", "cuda", torch.float32) is False
    assert speed.fp8_wanted("off", "cuda", torch.bfloat16) is False
    with pytest.raises(RuntimeError, match="--fp8 on needs --dtype bf16"):
        speed.fp8_wanted("on", "cuda", torch.float32)
    with pytest.raises(RuntimeError, match="compute capability"):
        speed.fp8_wanted("on", "cpu", torch.bfloat16)
