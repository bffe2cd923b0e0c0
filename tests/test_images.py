"""Reading user images: input expansion, EXIF orientation, odd modes, corrupt and huge files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from vprompt.data.images import DEFAULT_MAX_PIXELS, expand_image_inputs, load_image
from vprompt.errors import ImageLoadError

# --------------------------------------------------------------------------- helpers


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int, *, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR claims ``width x height`` (8-bit gray) but holds little or no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = png_chunk(b"IHDR", ihdr)
    if idat:
        body += png_chunk(b"IDAT", idat)
    return b"\x89PNG\r\n\x1a\n" + body + png_chunk(b"IEND", b"")


def pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    value = img.getpixel(xy)
    assert isinstance(value, tuple)
    return value  # type: ignore[return-value]


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 0) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/{b.png, a.jpg, notes.txt, sub/{c.PNG, deep/d.webp, readme.md}, empty/, text/x.txt}"""
    root = tmp_path / "root"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "text").mkdir()
    img = Image.new("RGB", (4, 4), (10, 20, 30))
    img.save(root / "b.png")
    img.save(root / "a.jpg")
    img.save(root / "sub" / "c.PNG", format="PNG")
    img.save(root / "sub" / "deep" / "d.webp")
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "readme.md").write_text("# hi")
    (root / "text" / "x.txt").write_text("x")
    return root


# --------------------------------------------------------------------------- expand_image_inputs


def test_expand_files_keep_input_order(tree):
    files, errors = expand_image_inputs([tree / "b.png", str(tree / "a.jpg")])
    assert errors == []
    assert files == [tree / "b.png", tree / "a.jpg"]
    assert all(isinstance(f, Path) for f in files)


def test_expand_folder_is_recursive_sorted_and_skips_non_images(tree):
    files, errors = expand_image_inputs([tree])
    assert errors == []
    assert files == [
        tree / "a.jpg",
        tree / "b.png",
        tree / "sub" / "c.PNG",
        tree / "sub" / "deep" / "d.webp",
    ]


def test_expand_glob_patterns(tree):
    files, errors = expand_image_inputs([str(tree / "*.png")])
    assert (files, errors) == ([tree / "b.png"], [])
    files, errors = expand_image_inputs([str(tree / "**" / "*.webp")])
    assert (files, errors) == ([tree / "sub" / "deep" / "d.webp"], [])
    files, errors = expand_image_inputs([str(tree / "**" / "*")])
    assert errors == []
    # A glob is taken as the user wrote it: folders are skipped, every matched file kept.
    assert tree / "sub" / "c.PNG" in files
    assert tree / "notes.txt" in files
    assert not any(f.is_dir() for f in files)
    assert files == sorted(files)


def test_expand_reports_missing_paths_empty_folders_and_empty_globs(tree):
    missing = tree / "nope.png"
    files, errors = expand_image_inputs(
        [missing, tree / "empty", tree / "text", str(tree / "*.gif"), tree / "b.png"]
    )
    assert files == [tree / "b.png"]  # the good input still comes through
    assert len(errors) == 4
    assert errors[0].startswith(str(missing))
    assert "no such file or folder" in errors[0]
    assert errors[1].startswith(str(tree / "empty"))
    assert "holds no images" in errors[1]
    assert errors[2].startswith(str(tree / "text"))
    assert "holds no images" in errors[2]
    assert errors[3].startswith(str(tree / "*.gif"))
    assert "matched no files" in errors[3]


def test_expand_removes_duplicates(tree, monkeypatch):
    monkeypatch.chdir(tree)
    files, errors = expand_image_inputs(
        [
            "b.png",
            tree / "b.png",
            "sub/../b.png",
            tree,
            str(tree / "*.png"),
            "./sub/deep/d.webp",
        ]
    )
    assert errors == []
    # First spelling wins; each file appears once.
    assert files == [
        Path("b.png"),
        tree / "a.jpg",
        tree / "sub" / "c.PNG",
        tree / "sub" / "deep" / "d.webp",
    ]
    assert len({f.resolve() for f in files}) == len(files)


def test_expand_user_home(tree, monkeypatch):
    monkeypatch.setenv("HOME", str(tree))
    files, errors = expand_image_inputs(["~/b.png", "~/sub"])
    assert errors == []
    assert [f.resolve() for f in files] == [
        (tree / "b.png").resolve(),
        (tree / "sub" / "c.PNG").resolve(),
        (tree / "sub" / "deep" / "d.webp").resolve(),
    ]


def test_expand_nothing():
    assert expand_image_inputs([]) == ([], [])


# --------------------------------------------------------------------------- load_image: modes


def test_rgb_png_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    img = load_image(tmp_path / "x.png")
    assert img.mode == "RGB"
    assert img.size == (5, 7)
    assert np.array_equal(np.asarray(img), arr)


def test_exif_orientation_is_applied(tmp_path):
    # 40 wide x 20 high: left half red, right half blue.
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(tmp_path / "rot.jpg") as raw:
        assert raw.size == (40, 20)
        assert raw.getexif()[0x0112] == 6
    img = load_image(tmp_path / "rot.jpg")
    assert img.mode == "RGB"
    assert img.size == (20, 40)
    # The left (red) half of the stored image is on top once upright.
    assert close(pixel(img, (10, 5)), (255, 0, 0), tol=40)
    assert close(pixel(img, (10, 35)), (0, 0, 255), tol=40)


def test_grayscale_l(tmp_path):
    Image.new("L", (3, 2), 77).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.mode == "RGB"
    assert img.size == (3, 2)
    assert pixel(img, (0, 0)) == (77, 77, 77)


def test_one_bit(tmp_path):
    im = Image.new("1", (4, 2), 0)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "b.png")
    img = load_image(tmp_path / "b.png")
    assert img.mode == "RGB"
    assert pixel(img, (0, 0)) == (0, 0, 0)
    assert pixel(img, (1, 0)) == (255, 255, 255)


def _palette_image() -> Image.Image:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    return im


def test_palette_without_transparency(tmp_path):
    _palette_image().save(tmp_path / "p.png")
    img = load_image(tmp_path / "p.png")
    assert img.mode == "RGB"
    assert pixel(img, (0, 0)) == (255, 0, 0)
    assert pixel(img, (1, 0)) == (0, 255, 0)


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_with_transparency_becomes_white(tmp_path, fmt):
    path = tmp_path / f"p.{fmt}"
    _palette_image().save(path, transparency=0)  # the red entry is transparent
    with Image.open(path) as raw:
        assert raw.mode == "P"
        assert "transparency" in raw.info
    img = load_image(path)
    assert img.mode == "RGB"
    assert pixel(img, (0, 0)) == (255, 255, 255)
    assert pixel(img, (1, 0)) == (0, 255, 0)


def test_rgba_transparent_pixels_become_white(tmp_path):
    arr = np.array(
        [[(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)]], dtype=np.uint8
    )  # hidden red, opaque blue, half-transparent black
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB"
    assert pixel(img, (0, 0)) == (255, 255, 255)
    assert pixel(img, (1, 0)) == (0, 0, 255)
    assert close(pixel(img, (2, 0)), (127, 127, 127), tol=1)


def test_la_transparent_pixels_become_white(tmp_path):
    arr = np.array([[(0, 0), (40, 255)]], dtype=np.uint8)
    Image.fromarray(arr, "LA").save(tmp_path / "la.png")
    with Image.open(tmp_path / "la.png") as raw:
        assert raw.mode == "LA"
    img = load_image(tmp_path / "la.png")
    assert pixel(img, (0, 0)) == (255, 255, 255)
    assert pixel(img, (1, 0)) == (40, 40, 40)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as raw:
        assert raw.mode == "CMYK"
    img = load_image(tmp_path / "c.jpg")
    assert img.mode == "RGB"
    assert close(pixel(img, (4, 4)), (255, 0, 0), tol=30)


def test_16_bit_grayscale_png_scales_to_8_bit(tmp_path):
    values = np.array([[0, 65535, 128 * 257, 257]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I")
    img = load_image(tmp_path / "g16.png")
    assert img.mode == "RGB"
    assert [pixel(img, (x, 0))[0] for x in range(4)] == [0, 255, 128, 1]
    assert pixel(img, (1, 0)) == (255, 255, 255)


def test_dark_16_bit_image_stays_dark(tmp_path):
    # All values <= 255 are still 16-bit values: 255/65535 of full scale is nearly black.
    Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint16)).save(tmp_path / "dark.png")
    img = load_image(tmp_path / "dark.png")
    assert [pixel(img, (x, 0))[0] for x in range(3)] == [0, 0, 1]


def test_float_tiff(tmp_path):
    unit = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    with Image.open(tmp_path / "unit.tif") as raw:
        assert raw.mode == "F"
    img = load_image(tmp_path / "unit.tif")
    assert img.mode == "RGB"
    assert np.asarray(img)[..., 0].tolist() == [[0, 64], [128, 255]]
    # Values beyond [0, 1] are taken as 0..255 and clipped; NaN becomes 0.
    wide = np.array([[-5.0, 100.0], [300.0, np.nan]], dtype=np.float32)
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    assert np.asarray(load_image(tmp_path / "wide.tif"))[..., 0].tolist() == [[0, 100], [255, 0]]


# --------------------------------------------------------------------------- load_image: errors


def test_missing_file(tmp_path):
    path = tmp_path / "missing.png"
    with pytest.raises(ImageLoadError, match="no such file") as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert info.value.path == path


def test_folder_is_not_an_image(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path)


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, not an image\n" * 10, bytes(range(256)) * 4],
    ids=["empty", "text", "bin"],
)
def test_non_image_bytes(tmp_path, data):
    path = tmp_path / "fake.png"
    path.write_bytes(data)
    with pytest.raises(ImageLoadError, match="not a recognised image format") as info:
        load_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truncated_files(tmp_path, fmt):
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # nothing in vprompt's imports turned it on
    with pytest.raises(ImageLoadError, match="cannot decode image") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_oversized_image_is_refused_before_decoding(tmp_path, monkeypatch):
    # The header claims 3000 x 3000 but the pixel data is missing: decoding would fail, so a
    # "limit" error proves the size was checked from the header first.
    path = tmp_path / "claims.png"
    path.write_bytes(png_header_only(3000, 3000, idat=zlib.compress(b"\0" * 10)))
    decoded = []
    original = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    with pytest.raises(ImageLoadError, match="more than the limit") as info:
        load_image(path, max_pixels=1_000_000)
    assert "3000x3000 = 9000000 pixels" in str(info.value)
    assert str(path) in str(info.value)
    assert decoded == []
    # Under a large enough limit, the same file does get decoded (and fails as truncated).
    with pytest.raises(ImageLoadError, match="cannot decode"):
        load_image(path, max_pixels=10_000_000)
    assert decoded


def test_small_max_pixels_on_a_real_image(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
    with pytest.raises(
        ImageLoadError, match="40x30 = 1200 pixels, more than the limit of 1000 pixels"
    ):
        load_image(tmp_path / "x.png", max_pixels=1000)
    assert load_image(tmp_path / "x.png", max_pixels=1200).size == (40, 30)


def test_huge_header_with_default_limit_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(20000, 20000))
    assert 2 * DEFAULT_MAX_PIXELS < 20000 * 20000
    with pytest.raises(ImageLoadError, match="too large") as info:
        load_image(path)
    assert str(path) in str(info.value)


@pytest.fixture(scope="module")
def big_one_bit_png(tmp_path_factory) -> Path:
    """A real, valid 12000 x 12000 1-bit PNG (144 MP, about 18 kB on disk)."""
    path = tmp_path_factory.mktemp("big") / "big.png"
    Image.new("1", (12000, 12000)).save(path)
    return path


def test_real_large_image_over_the_default_limit(big_one_bit_png):
    assert DEFAULT_MAX_PIXELS < 12000 * 12000 < 2 * DEFAULT_MAX_PIXELS
    with pytest.raises(ImageLoadError, match="too large") as info:
        load_image(big_one_bit_png)
    assert str(big_one_bit_png) in str(info.value)


def test_real_large_image_with_explicit_limit(big_one_bit_png):
    # The message names the caller's limit, not only Pillow's own threshold.
    with pytest.raises(ImageLoadError, match="more than the limit of 1000000 pixels"):
        load_image(big_one_bit_png, max_pixels=1_000_000)


def test_max_pixels_above_pillows_threshold_allows_larger_images(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # restored after the test
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "x.png")
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(tmp_path / "x.png", max_pixels=400)
    img = load_image(tmp_path / "x.png", max_pixels=5000)
    assert img.size == (40, 30)
    assert pixel(img, (0, 0)) == (1, 2, 3)


def test_benchmark_suite_reads_images_as_the_reference_code(tmp_path):
    """Dassl's read_image is ``Image.open(path).convert("RGB")``: no EXIF rotation, alpha
    dropped (not composited on white). The suite's readers do the same; user images keep
    EXIF-aware loading (``load_image``)."""
    import numpy as np

    from vprompt.data.items import Datum, ItemDataset

    rng = np.random.default_rng(0)
    rotated = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when shown
    rotated.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    rgba = rng.integers(0, 255, (16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: the hidden colours are what the reference sees
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "clear.png")
    items = [Datum("rotated.jpg", 0, "a"), Datum("clear.png", 1, "b")]
    suite = ItemDataset(tmp_path, items, ["a", "b"], reader="reference")
    for index, name in enumerate(("rotated.jpg", "clear.png")):
        with Image.open(tmp_path / name) as raw:
            expected = np.asarray(raw.convert("RGB"))
        assert np.array_equal(np.asarray(suite[index][0]), expected), name
    user = load_image(tmp_path / "rotated.jpg")
    assert user.size == (20, 30)  # upright for people
    assert suite[0][0].size == (30, 20)  # as stored, as the papers' code reads it
    assert suite.identity(0) != ItemDataset(tmp_path, items, ["a", "b"]).identity(0)


def test_suite_tasks_use_the_reference_reader(tmp_path):
    from vprompt.data.suite.synthetic import write_fake_dataset
    from vprompt.data.tasks import load_suite_task

    write_fake_dataset("dtd", tmp_path, num_classes=2, images_per_class=(2, 1, 1))
    task = load_suite_task("dtd", tmp_path, shots=1, seed=1)
    assert task.train.reader == task.test.reader == "reference"


# ------------------------------------------------------------------- images as people hold them
def test_arrays_and_tensors_become_the_same_rgb_images() -> None:
    import numpy as np
    import torch

    from vprompt.data.images import array_to_pil

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(rgb))
    assert array_to_pil(rgb).size == (7, 5)  # arrays are (H, W), PIL sizes (W, H)
    for same in (
        rgb,
        rgb.astype(np.float32) / 255,  # skimage / matplotlib floats
        torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,  # ToTensor's C x H x W
        torch.from_numpy(rgb).permute(2, 0, 1),  # uint8 tensor
    ):
        assert np.array_equal(np.asarray(array_to_pil(same)), want)
    grey = rgb[:, :, 0]
    assert np.array_equal(np.asarray(array_to_pil(grey))[:, :, 1], grey)
    assert np.asarray(array_to_pil(grey > 127)).max() == 255
    rgba = np.dstack([rgb, np.zeros((5, 7), np.uint8)])  # fully transparent: white
    assert (np.asarray(array_to_pil(rgba)) == 255).all()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((4, 4, 2), np.uint8), "expected H x W, H x W x 3 or 4"),
        (np.zeros((0, 4), np.uint8), "expected H x W"),
        (np.full((2, 2), 2.0), "values in \\[2, 2\\]; expected 0-1"),
        (np.full((2, 2), np.nan), "NaN or infinite"),
        (np.zeros((2, 2), np.int64), "dtype int64"),
        ([1, 2, 3], "expected an image"),
    ],
)
def test_arrays_that_are_not_images_are_one_line_errors(bad, message) -> None:
    from vprompt.data.images import array_to_pil
    from vprompt.errors import ImageLoadError

    with pytest.raises(ImageLoadError, match=message):
        array_to_pil(bad)


def test_predict_and_segment_take_arrays(tiny_clip, photos_dir) -> None:
    import torch

    from vprompt import ZeroShotClassifier, load_backbone
    from vprompt.segment.segmenter import Segmenter

    photo = Image.open(photos_dir / "coffee.png").convert("RGB")
    array = np.array(photo)  # writable, as people usually hold them
    method = ZeroShotClassifier(tiny_clip, ["cup", "cat"])
    by_pil = method.predict_proba([photo])
    assert torch.equal(method.predict_proba([array]), by_pil)
    assert torch.equal(method.predict_proba([torch.from_numpy(array).permute(2, 0, 1)]), by_pil)
    seg = Segmenter(load_backbone("sam:tiny", "none"))
    assert seg.embed_image(array).key == seg.embed_image(photo).key  # the same content


def test_torchvision_style_datasets_train_and_evaluate(tiny_clip, tiny_folder, tmp_path) -> None:
    import torch
    from torchvision.datasets import ImageFolder as TorchvisionFolder

    from vprompt.data.folder import ImageFolder
    from vprompt.engine import evaluate, fit
    from vprompt.methods.coop import CoOp, CoOpConfig, coop_optim

    theirs = TorchvisionFolder(str(tiny_folder / "train"))  # .classes, (PIL, int) items
    ours = ImageFolder(tiny_folder / "train")
    config = CoOpConfig(n_ctx=2, augment=False, optim=coop_optim(epochs=1, batch_size=4))
    results = []
    for data in (theirs, ours):
        torch.manual_seed(0)
        method = CoOp(tiny_clip, list(ours.classnames), config)
        fit(method, data, out_dir=tmp_path / str(len(results)), progress=False)
        results.append(evaluate(method, data, progress=False).accuracy)
    assert results[0] == results[1]
