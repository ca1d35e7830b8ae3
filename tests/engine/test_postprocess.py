import numpy as np
import pytest
import torch

from lcm_live.engine.postprocess import to_pil, to_uint8_hwc


def test_pixels_are_identical_to_diffusers_pil_output():
    from diffusers.image_processor import VaeImageProcessor

    decoded = torch.randn(3, 3, 24, 40, generator=torch.Generator().manual_seed(0)).clamp(-1.2, 1.2)
    # exact ties of x * 255 (k + 0.5) / 255 too: both must round them half to even
    decoded[0, 0, 0, :8] = (torch.arange(8) + 0.5) / 255 * 2 - 1
    processor = VaeImageProcessor()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = decoded.to(dtype)
        expected = processor.postprocess(x, output_type="pil")
        ours = to_pil(processor.postprocess(x, output_type="pt"))
        assert [im.size for im in ours] == [(40, 24)] * 3 and {im.mode for im in ours} == {"RGB"}
        for a, b in zip(ours, expected, strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b)), dtype


def test_uint8_layout_and_grayscale():
    x = torch.zeros(2, 3, 4, 5)
    x[1, 2] = 1.0  # the second image's blue channel
    array = to_uint8_hwc(x)
    assert array.dtype == np.uint8 and array.shape == (2, 4, 5, 3)
    assert array[1, :, :, 2].min() == 255 and array[1, :, :, :2].max() == 0 and array[0].max() == 0
    gray = to_pil(torch.full((1, 1, 4, 5), 0.5))
    assert gray[0].mode == "L" and np.asarray(gray[0]).max() == 128  # 127.5 rounds half to even


def test_a_wrong_shape_names_the_shape():
    with pytest.raises(ValueError, match=r"\(3, 8, 8\)"):
        to_uint8_hwc(torch.zeros(3, 8, 8))
