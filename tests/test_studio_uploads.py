"""Uploads into a studio dataset: what is accepted, and every refusal (zip paths, links, bombs,
non-images, sizes, counts) with a clear message and the dataset folder left exactly as it was."""

from __future__ import annotations

import io
import stat
import zipfile

import pytest
from PIL import Image

from dreamloom.errors import DatasetError
from dreamloom.studio.uploads import MB, UploadLimits, clean_name, save_uploads
from helpers import subject_image


def png(index: int = 0, size: int = 96) -> bytes:
    out = io.BytesIO()
    subject_image(index, size).save(out, "PNG")
    return out.getvalue()


def jpeg(index: int = 0) -> bytes:
    out = io.BytesIO()
    subject_image(index).save(out, "JPEG")
    return out.getvalue()


def gif() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (80, 80)).save(out, "GIF")
    return out.getvalue()


def make_zip(members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for info, data in members:
            archive.writestr(info, data)
    return out.getvalue()


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else None


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "existing.png").write_bytes(png(3))
    return folder


def test_images_and_a_zip_with_captions_are_added_under_safe_unique_names(dataset):
    archive = make_zip([("photos/dog.png", png(1)), ("photos/dog.txt", "sks dog on grass\n".encode()),
                        ("__MACOSX/photos/._dog.png", b"resource fork"), ("photos/.DS_Store", b"\0")])
    added = save_uploads(dataset, [("../../My Photo!.PNG", png(0)), ("existing.png", png(2)),
                                   ("really-a-jpeg.png", jpeg()), ("set.zip", archive)])
    assert [p.name for p in added] == ["My-Photo.png", "existing-2.png", "really-a-jpeg.jpg", "dog.png"]
    assert (dataset / "dog.txt").read_text() == "sks dog on grass"
    assert (dataset / "existing.png").read_bytes() == png(3)  # never overwritten
    assert sorted(p.name for p in dataset.iterdir()) == sorted(
        ["existing.png", "existing-2.png", "My-Photo.png", "really-a-jpeg.jpg", "dog.png", "dog.txt"])


def symlink_member() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("link.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


REFUSALS = {
    "parent path in zip": ([("evil.zip", make_zip([("ok.png", png()), ("../../evil.png", png())]))],
                           "'../../evil.png' points outside the dataset"),
    "absolute path in zip": ([("evil.zip", make_zip([(zipfile.ZipInfo("/etc/evil.png"), png())]))],
                             "'/etc/evil.png' points outside the dataset"),
    "symlink in zip": ([("links.zip", make_zip([(symlink_member(), b"/etc/passwd")]))], "'link.png' is a link"),
    "zip bomb by ratio": ([("bomb.zip", make_zip([("big.bmp", bytes(20 * MB))]))], "that is a zip bomb"),
    "zip inside zip": ([("nested.zip", make_zip([("inner.zip", make_zip([("a.png", png())]))]))],
                       "not an accepted image type"),
    "non-image named .png": ([("photo.png", b"hello, I am text")], "photo.png: not a readable image"),
    "non-image type": ([("notes.txt", b"hello")], "notes.txt: not an accepted image type"),
    "gif named .png": ([("anim.png", gif())], "anim.png: a GIF image; accepted formats: PNG, JPEG, WEBP, BMP"),
    "truncated image": ([("cut.png", png()[:400])], "cut.png: a corrupt or truncated image"),
    "oversized image": ([("huge.png", png() + bytes(26 * MB))], "huge.png: 26.0 MB; an image may be at most 25 MB"),
    "not a zip": ([("broken.zip", b"PK\x03\x04 not really")], "broken.zip: not a readable zip archive"),
    "empty upload": ([], "no images in the upload"),
    "one bad file among good ones": ([("a.png", png()), ("b.png", b"junk")], "b.png: not a readable image"),
    "orphan caption in zip": ([("c.zip", make_zip([("a.png", png()), ("b.txt", b"caption")]))],
                              "'b.txt' is not the caption of an image"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_uploads_say_why_and_change_nothing(dataset, case):
    uploads, message = REFUSALS[case]
    before = snapshot(dataset)
    with pytest.raises(DatasetError) as err:
        save_uploads(dataset, uploads)
    assert str(err.value).startswith("Nothing was added:")
    assert message in str(err.value)
    assert snapshot(dataset) == before


def test_size_count_and_pixel_limits(dataset):
    before = snapshot(dataset)
    four = [(f"s{i}.png", png(i)) for i in range(4)]
    limits = UploadLimits(max_files=3)
    with pytest.raises(DatasetError, match="4 images in one upload; at most 3"):
        save_uploads(dataset, four, limits)
    with pytest.raises(DatasetError, match="unpacks to .* MB; at most 1 MB"):
        save_uploads(dataset, [("z.zip", make_zip([("a.bmp", bytes(2 * MB))]))],
                     UploadLimits(max_unzipped_bytes=MB, max_zip_ratio=1e9))
    with pytest.raises(DatasetError, match="a zip may be at most 0 MB"):
        save_uploads(dataset, [("z.zip", make_zip(four))], UploadLimits(max_zip_bytes=100))
    with pytest.raises(DatasetError, match="96x96 px; an image may have at most 1,000 pixels"):
        save_uploads(dataset, four[:1], UploadLimits(max_pixels=1000))
    assert snapshot(dataset) == before


def test_a_failed_write_leaves_no_partial_files(dataset, monkeypatch):
    before = snapshot(dataset)
    real_write = type(dataset).write_bytes
    calls = []

    def failing_write(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(type(dataset), "write_bytes", failing_write)
    with pytest.raises(DatasetError, match="No space left on device"):
        save_uploads(dataset, [("a.png", png(0)), ("b.png", png(1))])
    monkeypatch.undo()
    assert snapshot(dataset) == before


@pytest.mark.parametrize("name, clean", [("../../x/y z.JPG", "y-z.jpg"), (".bashrc", "bashrc"),
                                         ("C:\\Users\\me\\dog.png", "dog.png"), ("<script>.png", "script.png"),
                                         ("!!!.png", "image.png")])
def test_clean_name(name, clean):
    assert clean_name(name) == clean


def test_a_damaged_zip_member_is_refused_and_nothing_is_added(dataset):
    archive = bytearray(make_zip([("a.png", png(0)), ("b.png", png(1))]))
    offset = archive.find(b"b.png") + len(b"b.png") + 40  # inside b.png's compressed bytes
    archive[offset] ^= 0xFF  # a damaged download: the member's CRC no longer matches
    before = snapshot(dataset)
    with pytest.raises(DatasetError) as err:
        save_uploads(dataset, [("photos.zip", bytes(archive))])
    assert "photos.zip" in str(err.value) and "b.png" in str(err.value) and "damaged" in str(err.value)
    assert snapshot(dataset) == before


def test_links_planted_in_the_dataset_folder_are_never_written_through(dataset, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    # the temp names earlier versions used, and the final name the upload would take
    for name in (".upload-dog.png.tmp", ".upload-dog.txt.tmp", ".dog.png.tmp", "dog.png"):
        (dataset / name).symlink_to(victim)
    archive = make_zip([("dog.png", png(1)), ("dog.txt", b"a caption")])
    added = save_uploads(dataset, [("dog.png", png(0)), ("set.zip", archive)])
    assert victim.read_text() == "precious"
    assert all(not p.is_symlink() for p in added) and {p.name for p in added} == {"dog-2.png", "dog-3.png"}
    assert (dataset / "dog-3.txt").read_text() == "a caption"
