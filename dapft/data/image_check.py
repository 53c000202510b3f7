"""The image check: every image of a split decoded once in full and its size compared with the
annotation file's, with a cache of verdicts keyed by each file's contents so a second run skips it."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from dapft.data.coco_file import DataError
from dapft.data.flat_split import CocoSplit
from dapft.utils.console import make_progress
from dapft.utils.files import atomic_write_text


def _check_image(path: str) -> tuple[str, str | None, tuple[int, int] | None]:
    if not os.path.isfile(path):
        return path, "missing", None
    try:
        with Image.open(path) as im:
            im.load()  # a full decode: a truncated file fails here, not in a worker mid-run
            # The upright size: photos store their pixels with an EXIF rotation, which COCO tools,
            # labelling tools and dapft's reader apply (orientations 5-8 swap width and height).
            width, height = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
            return path, None, (width, height)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means unreadable
        return path, f"unreadable ({exc.__class__.__name__}: {exc})", None


def _verdict_cache(images: Path) -> Path:
    """Where the images already decoded in full are remembered, so that a second run over the same
    data starts at once: one small JSON per image folder, under $DAPFT_CACHE (~/.cache/dapft)."""
    root = Path(os.environ.get("DAPFT_CACHE", Path.home() / ".cache" / "dapft")).expanduser()
    return root / "checked-images" / (hashlib.sha1(str(images.resolve()).encode()).hexdigest()[:16] + ".json")


def _fingerprint(path: str) -> str:
    """What tells the cache a file is the one it decoded: its inode, size, modification time and
    change time. The change time (ctime) moves whenever the file is written, replaced or has its
    times reset, and no user call can set it back: an image replaced in place with its size and
    mtime kept is checked again. A hash of the contents would do the same by reading every byte of
    the data set at every start (18 GB for COCO train), which is what the cache is there to avoid."""
    st = os.stat(path)
    return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}-{st.st_ctime_ns}"


def _read_cache(cache_file: Path) -> dict:
    """file name -> [fingerprint, width, height]; a cache it cannot read is ignored (and rewritten)."""
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict):
        return {}
    return {k: v for k, v in cache.items() if isinstance(v, list) and len(v) == 3 and isinstance(v[0], str)}


def check_images(split: CocoSplit, progress: bool = False) -> None:
    """Decode every image of the split fully (threads; decoders release the GIL), unless the cache
    says a file of these very contents decoded before; then check each against its declared width
    and height. Paths are plain strings here: at COCO train's size pathlib's objects cost seconds."""
    folder, ann_file = split.source.images, split.source.annotations
    cache_file = _verdict_cache(folder)
    cache = _read_cache(cache_file)
    names = [n.decode() for n in split.names.tolist()]
    paths = [os.path.join(folder, name) for name in names]
    todo, sizes, prints = {}, {}, {}  # path -> file_name still to decode; -> (width, height); -> fingerprint
    for name, path in zip(names, paths):
        try:
            prints[path] = _fingerprint(path)
        except OSError:
            todo[path] = name
            continue
        known = cache.get(name)
        if known and known[0] == prints[path]:
            sizes[path] = tuple(known[1:])
        else:
            todo[path] = name
    bad = []
    if todo:
        with make_progress(disable=not progress or len(todo) < 200) as bar, \
                ThreadPoolExecutor(min(32, (os.cpu_count() or 2) * 2)) as pool:
            task = bar.add_task("checking images", total=len(todo), info="full decode, once")
            for path, why, size in pool.map(_check_image, todo):
                bar.advance(task)
                if why:
                    bad.append((path, why))
                    continue
                sizes[path] = size
                cache[todo[path]] = [prints[path], *size]
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_file, json.dumps(cache))
        except OSError:
            pass  # a read-only home: the check runs again next time, nothing else changes
    if bad:
        listing = "; ".join(f"{p} ({why})" for p, why in bad[:5])
        raise DataError(f"{ann_file}: {len(bad)} of {len(names)} images cannot be read: {listing}"
                        f"{' ...' if len(bad) > 5 else ''}. Fix or remove them from 'images'")
    for path, image_id, declared in zip(paths, split.ids.tolist(), split.sizes.tolist()):
        size = sizes[path]
        if list(size) != declared:
            raise DataError(f"{path}: the image is {size[0]}x{size[1]} but {ann_file} says "
                            f"{declared[0]}x{declared[1]}; fix 'width'/'height' of image id {image_id}")
