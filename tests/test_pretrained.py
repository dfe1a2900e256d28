"""The loaders load the tiny models from disk; missing weights fail with one clear line."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.pretrained import ModelNotFoundError, load_clip_rn50, load_stable_diffusion, weights_hash


def test_stable_diffusion_parts_have_the_expected_shapes(tiny_model_paths):
    sd = load_stable_diffusion(str(tiny_model_paths["sd"]))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = sd.vae.encode(images).latent_dist.mean * sd.vae.config.scaling_factor
    assert latents.shape == (2, 4, 8, 8)  # ×8 downsampling, 4 latent channels
    assert sd.vae.config.scaling_factor == pytest.approx(0.18215)

    ids = sd.tokenizer(["a photo"], padding="max_length", max_length=sd.tokenizer.model_max_length,
                       return_tensors="pt").input_ids
    text = sd.text_encoder(ids)[0]
    assert text.shape[:2] == (1, 77)
    eps = sd.unet(latents, 200, encoder_hidden_states=text.expand(2, -1, -1)).sample
    assert eps.shape == latents.shape
    # The end of the UNet is SD's: GroupNorm → SiLU → 3×3 conv to 4 channels.
    assert isinstance(sd.unet.conv_norm_out, torch.nn.GroupNorm)
    assert isinstance(sd.unet.conv_act, torch.nn.SiLU)
    assert sd.unet.conv_out.kernel_size == (3, 3) and sd.unet.conv_out.out_channels == 4
    assert type(sd.scheduler).__name__ == "DDPMScheduler"


def test_clip_rn50_gives_layer3_map_and_pooled_vector(tiny_model_paths):
    clip = load_clip_rn50(str(tiny_model_paths["clip"]))
    images = clip.normalize(torch.rand(2, 3, 256, 256) * 2 - 1)
    assert images.shape == (2, 3, 224, 224)
    layer3, pooled = clip.layer3_and_pooled(images)
    assert layer3.shape[0] == 2 and layer3.shape[-2:] == (14, 14)  # /16 like RN50 at 224
    assert pooled.shape == (2, clip.visual.output_dim)


def test_loading_twice_gives_the_same_weights_hash(tiny_model_paths):
    a = load_stable_diffusion(str(tiny_model_paths["sd"]))
    b = load_stable_diffusion(str(tiny_model_paths["sd"]))
    assert weights_hash(a.unet) == weights_hash(b.unet)
    assert weights_hash(a.unet) != weights_hash(a.vae)


@pytest.mark.parametrize("path", ["/nonexistent/sd-v1-5", "./relative/missing"])
def test_missing_sd_path_fails_with_a_clear_message(path):
    with pytest.raises(ModelNotFoundError, match=r"not found at .*missing|not found at /nonexistent") as info:
        load_stable_diffusion(path)
    message = str(info.value)
    assert "\n" not in message and "tiny-models" in message and "diffusers layout" in message


def test_unreachable_hub_id_fails_with_a_clear_message():
    with pytest.raises(ModelNotFoundError, match="could not be loaded.*no model hub is reachable"):
        load_stable_diffusion("nobody/no-such-model")


def test_sd_dir_without_components_names_them(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"lacks the subfolders \['vae', 'text_encoder'"):
        load_stable_diffusion(str(tmp_path))


def test_missing_clip_path_fails_with_a_clear_message(tmp_path):
    with pytest.raises(ModelNotFoundError, match="CLIP RN50 weights not found at .*rn50.pt"):
        load_clip_rn50(str(tmp_path / "rn50.pt"))
    with pytest.raises(ModelNotFoundError, match="no open_clip_config.json"):
        load_clip_rn50(str(tmp_path))
