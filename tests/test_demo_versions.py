"""The demo shards' stats.json records what they were built from (demo/versions.py)."""

import io
import json
import tarfile

from PIL import Image

from clip_train.demo.build import write_demo
from clip_train.demo.versions import debian_version, npm_package_version

ZOO = ["1f993", "1f418", "1f992", "1f98a", "1f42f", "1f981"]  # zebra, elephant, giraffe, fox, tiger, lion


def _fake_emoji_package(path, version="9.9.9"):
    """An `npm pack` tarball as @lobehub/fluent-emoji-3d's: package/package.json and assets/*.webp."""
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add(
            "package/package.json",
            json.dumps({"name": "@lobehub/fluent-emoji-3d", "version": version}).encode(),
        )
        for i, stem in enumerate(ZOO):
            buffer = io.BytesIO()
            Image.new("RGB", (32, 32), (40 * i, 100, 200 - 30 * i)).save(buffer, format="WEBP")
            add(f"package/assets/{stem}.webp", buffer.getvalue())
    return path


def test_the_npm_version_is_read_from_the_tarball_and_from_its_extracted_folder(tmp_path):
    package = _fake_emoji_package(tmp_path / "emoji.tgz", version="1.2.3")
    assert npm_package_version(package) == {"name": "@lobehub/fluent-emoji-3d", "version": "1.2.3"}
    with tarfile.open(package) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    assert npm_package_version(tmp_path / "extracted")["version"] == "1.2.3"
    assert npm_package_version(tmp_path / "missing.tgz") is None


def test_a_package_that_is_not_installed_has_no_version():
    assert debian_version("clip-train-no-such-package") is None


def test_demo_shards_record_the_versions_of_their_sources(tmp_path):
    package = _fake_emoji_package(tmp_path / "emoji.tgz")
    stats = write_demo(
        tmp_path / "shards", sources=["emoji"], emoji_package=package, val_frac=0.2, max_size=32
    )
    on_disk = json.loads((tmp_path / "shards" / "stats.json").read_text())
    assert on_disk == stats and stats["total"]["train"] + stats["total"]["val"] == len(ZOO)
    versions = stats["data_versions"]
    assert versions["npm"] == {"name": "@lobehub/fluent-emoji-3d", "version": "9.9.9"}
    assert versions["pypi"]["emoji"]
    # the evaluation sets' Debian packages are recorded whatever the sources (None: not installed)
    assert set(versions["debian"]) == {"dataset-fashion-mnist", "unicode-data"}
