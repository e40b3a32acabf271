"""Messy image folders: every kind of bad or odd file, generated here; and `check-data`."""

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.images import class_image, encode, write_class_folders
from tf_finetune import check_data, cli, data


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's first bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + b"\0" * 64
    )


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A real JPEG whose frame header is rewritten to claim width x height."""
    raw = bytearray(encode(class_image(0, (16, 16)), "JPEG"))
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def _pil(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture
def messy(tmp_path):
    """Two classes of good images plus one of every bad/odd kind the reader must survive."""
    root = tmp_path / "messy"
    write_class_folders(root, num_classes=2, per_class=8)
    red, green = root / "class_0", root / "class_1"
    good_jpeg = encode(class_image(0, (30, 20)), "JPEG")
    readable = {
        # odd but fine: each must be decoded to RGB and kept
        "cmyk.jpg": _pil(class_image(0).convert("CMYK"), "JPEG"),
        "sixteen_bit.png": _pil(
            Image.fromarray((np.full((12, 12), 40000)).astype(np.uint16)), "PNG"
        ),
        "palette.png": encode(class_image(0, mode="P"), "PNG"),
        "rgba.png": encode(class_image(0, mode="RGBA"), "PNG"),
        "gray.jpg": encode(class_image(0, mode="L"), "JPEG"),
        "UPPER.JPG": good_jpeg,
        "naïve café ☃.jpg": good_jpeg,
        "png_named.jpg": encode(class_image(0), "PNG"),  # content decides, not the extension
    }
    for name, blob in readable.items():
        (red / name).write_bytes(blob)
    frames = [class_image(0, (16, 16)), class_image(1, (16, 16))]
    frames[0].save(red / "animated.gif", save_all=True, append_images=frames[1:])
    (red / "nested" / "deeper").mkdir(parents=True)
    (red / "nested" / "deeper" / "inner.png").write_bytes(encode(class_image(0), "PNG"))
    (red / "link.png").symlink_to(root / "class_0" / "img_000.jpg")  # a symlinked file
    (red / "nested" / "loop").symlink_to(red, target_is_directory=True)  # a folder loop
    bad = {
        "zero.jpg": b"",
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "text.png": b"this is a text file, not a PNG\n",
        "huge.png": _png_header_only(50_000, 40_000),
        "huge.jpg": _jpeg_with_size(60_000, 60_000),
    }
    for name, blob in bad.items():
        (green / name).write_bytes(blob)
    (green / "dangling.jpg").symlink_to(root / "no_such_file.jpg")
    non_utf8 = os.path.join(os.fsencode(green), b"bad\xffname.jpg")
    with open(non_utf8, "wb") as f:
        f.write(good_jpeg)
    # Hidden and non-image files are ignored, never reported as unreadable.
    (green / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (green / "._img_000.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    (green / "notes.txt").write_text("ignored")
    (root / ".hidden_class").mkdir()
    (root / ".hidden_class" / "x.jpg").write_bytes(good_jpeg)
    expected_bad = {
        "zero.jpg": "empty file (0 bytes)",
        "truncated.jpg": "corrupt or truncated JPEG",
        "text.png": "not an image: a text file",
        "huge.png": "PNG too large to decode safely: 50000x40000",
        "huge.jpg": "JPEG too large to decode safely: 60000x60000",
        "dangling.jpg": "broken symbolic link",
        "bad\\xffname.jpg": "not valid UTF-8",
    }
    n_readable = len(readable) + 3  # + animated.gif, nested/deeper/inner.png, link.png
    return root, expected_bad, n_readable


def test_reader_survives_and_reports_every_bad_kind(messy):
    root, expected_bad, n_readable = messy
    dataset = data.load_image_folder(str(root), image_size=16, validation_percent=25)
    assert dataset.class_names == ("class_0", "class_1")  # .hidden_class is not a class
    reasons = {os.path.basename(p): r for p, r in dataset.skipped_files}
    assert set(reasons) == set(expected_bad), reasons
    for name, fragment in expected_bad.items():
        assert fragment in reasons[name], (name, reasons[name])
        assert "{{" not in reasons[name] and "[Op:" not in reasons[name]  # TF noise removed
    # Every readable file once (the folder loop is not walked twice), and all of them decode.
    assert dataset.train.count + dataset.val.count == 16 + n_readable
    images = [x for split in (dataset.train, dataset.val) for x, _ in split.examples()]
    assert len(images) == 16 + n_readable
    assert all(tuple(x.shape) == (16, 16, 3) and x.dtype == np.float32 for x in images)
    json.dumps(dataset.skipped_files)  # goes into metrics.json as is


def test_odd_formats_decode_to_the_right_colours():
    red = (220, 30, 30)
    solid = Image.new("RGB", (16, 16), red)
    cases = {
        "cmyk": _pil(solid.convert("CMYK"), "JPEG", quality=95),
        "rgba": _pil(solid.convert("RGBA"), "PNG"),
        "palette": _pil(solid.quantize(4), "PNG"),
        "16-bit gray": _pil(Image.fromarray(np.full((16, 16), 257 * 200, np.uint16)), "PNG"),
    }
    for name, blob in cases.items():
        pixels = data.decode_and_resize(blob, 8).numpy().reshape(-1, 3).mean(0)
        expected = (200, 200, 200) if "gray" in name else red
        np.testing.assert_allclose(pixels, expected, atol=3, err_msg=name)


def test_header_sizes_are_read_without_decoding(tmp_path):
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("BMP", "bmp")):
        path = tmp_path / f"a.{ext}"
        path.write_bytes(encode(class_image(0, (37, 23)), fmt))
        assert data.image_header(str(path)) == (fmt, 37, 23)
    # A JPEG with a big EXIF block before its frame header.
    exif = Image.Exif()
    exif[0x010E] = "x" * 30_000  # ImageDescription
    path = tmp_path / "exif.jpg"
    path.write_bytes(_pil(class_image(0, (41, 19)), "JPEG", exif=exif.tobytes()))
    assert data.image_header(str(path)) == ("JPEG", 41, 19)
    (tmp_path / "t.jpg").write_text("hello")
    assert data.image_header(str(tmp_path / "t.jpg")) is None


def test_check_data_report(messy, tmp_path, capsys):
    root, expected_bad, _ = messy
    # Leakage: the same photo in train and test; and the same bytes under two labels.
    split_root = tmp_path / "splits"
    for k, (split, n) in enumerate((("train", 6), ("val", 3), ("test", 3))):
        for label in (0, 1):
            folder = split_root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for j in range(n):
                image = class_image(label, seed=100 * k + 10 * label + j)
                ext, fmt = (("jpg", "JPEG"), ("png", "PNG"))[j % 2]
                (folder / f"img_{j:03d}.{ext}").write_bytes(encode(image, fmt))
    (split_root / "test" / "class_0" / "img_000.jpg").write_bytes(
        (split_root / "train" / "class_0" / "img_000.jpg").read_bytes()
    )
    (split_root / "train" / "class_1" / "copy.png").write_bytes(
        (split_root / "train" / "class_0" / "img_001.png").read_bytes()
    )
    for j in range(6, 30):  # class_0 becomes 5x larger than class_1
        (split_root / "train" / "class_0" / f"more_{j}.png").write_bytes(
            encode(class_image(0, (50, 40), seed=j), "PNG")
        )

    report = check_data.check_folder(str(split_root), 20, 32)
    assert report["counts"]["train"] == {"class_0": 30, "class_1": 7}
    assert report["counts"]["test"] == {"class_0": 3, "class_1": 3}
    leaks = [d for d in report["duplicates"] if d["leak"]]
    assert len(leaks) == 1 and leaks[0]["splits"] == ["test", "train"]
    conflicts = [d for d in report["duplicates"] if d["conflicting_labels"]]
    assert len(conflicts) == 1 and conflicts[0]["classes"] == ["class_0", "class_1"]
    assert report["imbalance"]["ratio"] == pytest.approx(30 / 7) and report["imbalance"]["warning"]
    sizes = report["sizes"]
    assert (sizes["width"]["min"], sizes["width"]["max"]) == (24, 50)
    assert sizes["images"] == 37 + 6 + 6
    assert sizes["smaller_than_image_size"] == sizes["images"] - 24  # all but the 50x40 ones

    # Through the CLI, on the messy folder: the reasons are printed, nothing is trained.
    code = cli.main(["check-data", f"--data={root}", "--backbone=digits_cnn"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"Unreadable files (skipped by training): {len(expected_bad)}" in out
    assert "empty file (0 bytes)" in out and "too large to decode safely" in out
    assert "Ignored: 2 hidden file(s), 1 without an image extension" in out
    assert "class_0" in out and "Exact duplicates:" in out


def test_check_data_needs_a_folder(capsys, tmp_path):
    assert cli.main(["check-data"]) == 2
    assert "check-data needs --data" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["check-data", f"--data={empty}"]) == 2
    assert "is an empty folder" in capsys.readouterr().err
    (empty / "loose.jpg").write_bytes(encode(class_image(0), "JPEG"))
    assert cli.main(["check-data", f"--data={empty}"]) == 2
    assert "no class subfolders" in capsys.readouterr().err
