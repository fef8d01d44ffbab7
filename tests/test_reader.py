"""The img2dataset shard reader on hand-made tars: untrusted names, duplicates, missing parts, truncation."""

from __future__ import annotations

import os

from helpers import jpeg_bytes, png_bytes, sample_members, write_img2dataset_parquet, write_tar

from vecap import vocab
from vecap.reader import ShardReader, list_shards, read_alt_texts, split_member_name


def _read(images):
    reader = ShardReader(str(images), "00000")
    samples = {s.key: s for s in reader}
    return samples, reader.report


def test_plain_shard_keys_images_and_alt_texts(tmp_path):
    images = tmp_path / "images"
    members = sample_members("0000001", jpeg_bytes(), "Nike shoe &amp; box") + sample_members(
        "0000002", png_bytes(), "Kyoto"
    )
    write_tar(images / "00000.tar", members)
    write_img2dataset_parquet(
        images / "00000.parquet",
        [
            {"key": "0000001", "caption": "Nike shoe &amp; box"},
            {"key": "0000002", "caption": "Kyoto"},
            {"key": "0000003", "caption": "lost", "status": "failed_to_download", "error_message": "404"},
        ],
    )
    samples, report = _read(images)
    assert list_shards(str(images)) == ["00000"]
    assert set(samples) == {"0000001", "0000002", "0000003"}
    assert samples["0000001"].alt_text == "Nike shoe &amp; box"  # raw: cleaning is the fuse stage's job
    assert samples["0000001"].image == jpeg_bytes() and samples["0000001"].ext == "jpg"
    assert samples["0000001"].url == "http://x/0000001"
    assert samples["0000003"].status == vocab.DOWNLOAD_FAILED and samples["0000003"].error == "404"
    assert samples["0000003"].image is None
    assert report.statuses == {vocab.OK: 2, vocab.DOWNLOAD_FAILED: 1}
    assert not report.truncated
    assert read_alt_texts(str(images), "00000")["0000002"]["alt_text"] == "Kyoto"


def test_path_traversal_member_is_recorded_never_written(tmp_path):
    images = tmp_path / "images"
    members = [("../evil.jpg", jpeg_bytes()), ("/etc/evil.txt", b"x"), ("sub/dir.jpg", jpeg_bytes())]
    members += sample_members("0000001", jpeg_bytes())
    write_tar(images / "00000.tar", members)
    cwd = os.getcwd()
    os.chdir(images)
    try:
        samples, _ = _read(images)
    finally:
        os.chdir(cwd)
    assert samples["0000001"].status == vocab.OK
    bad = {k: s for k, s in samples.items() if k != "0000001"}
    assert set(bad) == {"../evil.jpg", "/etc/evil.txt", "sub/dir.jpg"}
    assert all(s.status == vocab.INVALID_KEY and s.image is None for s in bad.values())
    assert not (tmp_path / "evil.jpg").exists() and not (images / "sub").exists()
    assert sorted(p.name for p in images.iterdir()) == ["00000.tar"]
    assert split_member_name("../evil.jpg") is None and split_member_name("..jpg") is None


def test_duplicate_key_and_missing_parts(tmp_path):
    images = tmp_path / "images"
    members = sample_members("0000001", jpeg_bytes(), "first")
    members += sample_members("0000002", png_bytes(), alt=None)  # no .txt
    members += [("0000003.txt", b"text but no image"), ("0000003.json", b"{}")]
    members += sample_members("0000001", png_bytes(), "again")  # the same key later in the tar
    members += [("0000004.jpg", jpeg_bytes()), ("0000004.png", png_bytes()), ("0000004.txt", b"two images")]
    write_tar(images / "00000.tar", members)
    reader = ShardReader(str(images), "00000")
    samples = list(reader)
    by_key = [(s.key, s.status) for s in samples]
    assert by_key == [
        ("0000001", vocab.OK),
        ("0000002", vocab.OK),
        ("0000003", vocab.MISSING_IMAGE),
        ("0000001", vocab.DUPLICATE_KEY),
        ("0000004", vocab.DUPLICATE_KEY),
    ]
    assert samples[0].alt_text == "first" and samples[3].image is None
    assert samples[1].alt_text is None and reader.report.missing_txt == 1
    assert reader.report.statuses[vocab.DUPLICATE_KEY] == 2


def test_truncated_tar_yields_what_it_holds_and_reports_the_rest(tmp_path):
    images = tmp_path / "images"
    keys = [f"00000{i:02d}" for i in range(6)]
    members = []
    for k in keys:
        members += sample_members(k, jpeg_bytes(size=(64, 64)), f"alt {k}")
    tar = write_tar(images / "00000.tar", members)
    write_img2dataset_parquet(images / "00000.parquet", [{"key": k, "caption": f"alt {k}"} for k in keys])
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    samples, report = _read(images)
    assert report.truncated and report.error
    assert set(samples) == set(keys)  # every key accounted for, once
    ok = [k for k, s in samples.items() if s.status == vocab.OK]
    lost = [k for k, s in samples.items() if s.status == vocab.MISSING_FROM_TAR]
    assert ok and lost and len(ok) + len(lost) == len(keys)
    assert all(samples[k].image for k in ok)
    assert all(samples[k].alt_text == f"alt {k}" for k in lost)  # from the Parquet


def test_oversized_image_member_is_not_read(tmp_path):
    images = tmp_path / "images"
    write_tar(images / "00000.tar", sample_members("0000001", b"\xff\xd8\xff" + b"0" * 5000))
    samples = {s.key: s for s in ShardReader(str(images), "00000", max_image_bytes=1000)}
    assert samples["0000001"].status == vocab.IMAGE_TOO_LARGE and samples["0000001"].image is None
