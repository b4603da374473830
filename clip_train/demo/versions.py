"""The versions of the demo's data, recorded in its stats.json: the figures the README reports hold
for these Debian packages' and this npm package's images, and would move with them."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from importlib import metadata
from pathlib import Path

# Debian packages per demo source (images and captions); the evaluation sets' packages as well
DEBIAN_PACKAGES = {
    "tuxpaint": ("tuxpaint-stamps-default", "librsvg2-bin"),
    "openclipart": ("openclipart-png", "openclipart-svg"),
    "evaluation": ("dataset-fashion-mnist", "unicode-data"),
}


def debian_version(package: str) -> str | None:
    """The installed version of a Debian package; None where it is not installed (or no dpkg)."""
    if shutil.which("dpkg-query") is None:
        return None
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status} ${Version}", package], capture_output=True, text=True
    )
    status, _, version = done.stdout.rpartition(" ")
    return version if done.returncode == 0 and status.endswith("installed") else None


def npm_package_version(package: Path) -> dict | None:
    """{"name", "version"} from the package.json of an `npm pack` tarball or its extracted folder."""
    try:
        if package.is_file():
            with tarfile.open(package, "r:*") as tar:
                member = next(m for m in tar if m.name.endswith("package.json") and m.name.count("/") <= 1)
                manifest = json.load(tar.extractfile(member))
        else:
            found = [
                p for p in (package / "package" / "package.json", package / "package.json") if p.is_file()
            ]
            manifest = json.loads(found[0].read_text())
    except (StopIteration, IndexError, OSError, tarfile.TarError, ValueError):
        return None
    return {"name": manifest.get("name"), "version": manifest.get("version")}


def demo_data_versions(sources: list[str], emoji_package: str | Path | None) -> dict:
    """What the demo shards (and the demo's evaluation sets) were built from."""
    wanted = [pkg for source in (*sources, "evaluation") for pkg in DEBIAN_PACKAGES.get(source, ())]
    versions: dict = {"debian": {pkg: debian_version(pkg) for pkg in wanted}}
    if "emoji" in sources and emoji_package is not None:
        versions["npm"] = npm_package_version(Path(emoji_package))
        # the emoji captions are the names the PyPI `emoji` package gives the code points
        versions["pypi"] = {"emoji": metadata.version("emoji")}
    return versions
