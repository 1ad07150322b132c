"""Image decoding: RGB conversion of every mode, EXIF orientation, resize + crop, buckets, bad images."""

from __future__ import annotations

import numpy as np
import pytest
from images_testutil import png_header_only, random_rgb
from PIL import Image

from semroute.shared import images as im


def opts(**kw) -> im.ImageOptions:
    return im.ImageOptions(**{"resolution": 32, **kw})


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------
def test_16bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.array([0, 257 * 64, 257 * 128, 65535], dtype=np.uint16).repeat(8), (32, 1))  # 32x32
    path = tmp_path / "gray16.png"
    Image.fromarray(ramp).save(path)  # uint16 -> mode I;16
    assert Image.open(path).mode.startswith("I")  # really a 16-bit image on disk
    pixels, _ = im.load_image(str(path), opts(resample="nearest"))
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.uint8
    row = pixels[0, 0, ::8].tolist()
    assert row == [0, 64, 128, 255]  # convert("L") would have clipped all but the first to 255
    assert (pixels[0] == pixels[1]).all() and (pixels[1] == pixels[2]).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    pixels, _ = im.load_image(str(path), opts())
    r, g, b = (pixels[c].mean() for c in range(3))
    assert r > 240 and g < 15 and b < 15


@pytest.mark.parametrize("background, expect", [("white", (255, 255, 255)), ("black", (0, 0, 0)),
                                                 ("10,20,30", (10, 20, 30))])
def test_palette_png_with_transparency_is_composited(tmp_path, background, expect):
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 255, 0] + [0, 0, 255] + [0, 0, 0] * 254)  # index 0 green (transparent), 1 blue
    img.paste(1, (16, 0, 32, 32))
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)
    pixels, _ = im.load_image(str(path), opts(background=im.parse_background(background), resample="nearest"))
    assert tuple(pixels[:, 5, 5]) == expect  # the transparent half shows the background, never green
    assert tuple(pixels[:, 5, 25]) == (0, 0, 255)


def test_rgba_and_la_alpha_blend(tmp_path):
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    pixels, _ = im.load_image(str(tmp_path / "rgba.png"), opts())
    assert tuple(pixels[:, 0, 0]) == (255, 127, 127)  # half red over white
    Image.new("LA", (32, 32), (0, 0)).save(tmp_path / "la.png")  # fully transparent black
    pixels, _ = im.load_image(str(tmp_path / "la.png"), opts(background=(1, 2, 3)))
    assert tuple(pixels[:, 3, 3]) == (1, 2, 3)


def test_grayscale_and_bilevel(tmp_path):
    Image.new("L", (32, 32), 77).save(tmp_path / "l.png")
    Image.new("1", (32, 32), 1).save(tmp_path / "one.png")
    assert (im.load_image(str(tmp_path / "l.png"), opts())[0] == 77).all()
    assert (im.load_image(str(tmp_path / "one.png"), opts())[0] == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    # Stored 64 wide x 32 tall, left half red, right half blue; orientation 6 says "rotate 90 degrees
    # clockwise to display", so the displayed image is 32 x 64 with red on top.
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[im.ExifTags.Base.Orientation] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    probe = im.probe_image(str(path), opts(buckets=((32, 64), (64, 32))))
    assert (probe.width, probe.height, probe.orientation) == (64, 32, 6)
    assert probe.oriented == (32, 64)
    assert probe.target == 0  # the tall bucket
    pixels, box = im.load_image(str(path), opts(), target=(32, 64))
    assert box == (0.0, 0.0, 32.0, 64.0)
    top, bottom = pixels[:, 4:28].reshape(3, -1).mean(1), pixels[:, 36:60].reshape(3, -1).mean(1)
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


# ---------------------------------------------------------------------------------------------
# Resize and crop, buckets
# ---------------------------------------------------------------------------------------------
def test_resize_shorter_side_then_center_crop(tmp_path):
    img = random_rgb(96, 64, seed=1)
    img.save(tmp_path / "a.png")
    pixels, box = im.load_image(str(tmp_path / "a.png"), opts())
    assert box == (16.0, 0.0, 80.0, 64.0)  # the central 64x64 of the 96x64 image
    # The reference: resize the shorter side to 32 (96x64 -> 48x32), then crop the central 32x32.
    expect = np.asarray(img.resize((48, 32), Image.Resampling.BICUBIC).crop((8, 0, 40, 32)))
    assert np.array_equal(pixels.transpose(1, 2, 0), expect)


def test_auto_buckets_have_equal_area_and_nearest_aspect():
    buckets = im.auto_buckets(256, 16, max_aspect=2.0)
    assert (256, 256) in buckets and (336, 192) in buckets
    assert {(h, w) for w, h in buckets} == set(buckets)  # portrait sizes mirror landscape ones
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert abs(w * h - 256 * 256) / (256 * 256) < 0.1
        assert max(w / h, h / w) <= 2.0
    o = im.ImageOptions(resolution=256, buckets=tuple(buckets))
    assert o.targets[o.nearest_target(300, 300)] == (256, 256)
    w, h = o.targets[o.nearest_target(1000, 500)]
    assert 1.7 < w / h <= 2.0
    assert im.parse_buckets("64x32,32x64", 64, 8) == ((32, 64), (64, 32))
    with pytest.raises(im.SemrouteError, match="multiple of 16"):
        im.parse_buckets("60x32", 64, 16)
    assert im.parse_buckets("auto", 64, 8) == tuple(im.auto_buckets(64, 8, 2.0))
    assert im.parse_buckets("auto:3", 64, 8) == tuple(im.auto_buckets(64, 8, 3.0))


@pytest.mark.parametrize("spec", ["auto:0.5", "auto:0", "auto:-1", "auto:nan", "auto:inf", "auto:x"])
def test_auto_buckets_below_one_or_not_a_number_are_refused(spec):
    """No bucket fits an aspect bound below 1: it read as no buckets, i.e. a square crop, without a word."""
    with pytest.raises(im.SemrouteError, match=r"expected auto or auto:MAX_ASPECT with MAX_ASPECT >= 1"):
        im.parse_buckets(spec, 64, 8)


# ---------------------------------------------------------------------------------------------
# Bad images: each has a reason, none is ever replaced by something else
# ---------------------------------------------------------------------------------------------
def _bad_files(tmp_path):
    random_rgb(64, 64, 0).save(tmp_path / "good.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image\n" * 20)
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    random_rgb(64, 64, 0).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    random_rgb(6, 40, 0).save(tmp_path / "small.png")
    png_header_only(tmp_path / "bomb.png", 40000, 40000)
    random_rgb(200, 200, 0).save(tmp_path / "big.png")


@pytest.mark.parametrize("name, reason, at_probe", [
    ("missing.jpg", im.MISSING, True),
    ("empty.jpg", im.ZERO_BYTE, True),
    ("text.jpg", im.NOT_AN_IMAGE, True),
    ("truncated.jpg", im.TRUNCATED, False),  # a valid header: only decoding finds it
    ("truncated.png", im.TRUNCATED, False),
    ("small.png", im.TOO_SMALL, True),
    ("bomb.png", im.BOMB, True),  # 1.6 G pixels claimed in the header: refused before any decoding
])
def test_bad_images_are_reported_with_reason(tmp_path, name, reason, at_probe):
    _bad_files(tmp_path)
    path = str(tmp_path / name)
    probe = im.probe_image(path, opts())
    if at_probe:
        assert probe.reason == reason and probe.detail
    else:
        assert probe.ok
    with pytest.raises(im.BadImage) as err:
        im.load_image(path, opts())
    assert err.value.reason == reason and name in str(err.value)


def test_an_image_url_in_a_manifest_is_named_as_a_url(tmp_path):
    """It was "missing: no such file" (a manifest's images are local files; nothing is requested)."""
    probe = im.probe_image("s3://bkt/a.png", opts())
    assert probe.reason == im.MISSING and probe.detail.startswith("an image URL: a manifest's images are read from "
                                                                  "local files")
    assert im.probe_image(str(tmp_path / "missing.png"), opts()).detail == "no such file"

def test_pixel_cap_and_upscale_options(tmp_path):
    _bad_files(tmp_path)
    big = str(tmp_path / "big.png")
    assert im.probe_image(big, opts()).ok
    capped = opts(max_pixels=100 * 100)
    assert im.probe_image(big, capped).reason == im.BOMB
    with pytest.raises(im.BadImage, match="--max-pixels"):
        im.load_image(big, capped)
    small = str(tmp_path / "small.png")
    assert im.probe_image(small, opts(allow_upscale=True)).ok
    pixels, _ = im.load_image(small, opts(allow_upscale=True))
    assert pixels.shape == (3, 32, 32)


def test_background_parsing():
    assert im.parse_background("white") == (255, 255, 255)
    assert im.parse_background("#102030") == (16, 32, 48)
    with pytest.raises(im.SemrouteError, match="--background"):
        im.parse_background("nocolor")
