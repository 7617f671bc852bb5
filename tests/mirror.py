"""Test fixtures for downloads: a faulty HTTP mirror on 127.0.0.1 and real archives.

`Mirror` serves a folder over HTTP/1.1 from a `ThreadingHTTPServer` bound to
127.0.0.1 (never another address), honours `Range: bytes=N-`, counts the body
bytes it sends per path, logs every request, and can be told to misbehave per
path: drop the connection after N bytes, answer 500 a few times, flip one byte,
answer 404, or ignore Range and send the whole file with 200. The builders
write what the real hosts serve, in miniature: COCO 2014 archives (a few dozen
small JPEGs made with Pillow and the real annotation schema, `coco_url`
included), Flickr image archives with Karpathy caption files, and archives with
members that try to escape the extraction folder.
"""

from __future__ import annotations

import io
import json
import random
import re
import sys
import tarfile
import threading
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image

COCO_HOST = "http://images.cocodataset.org"


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # Clients hanging up (a finished keep-alive session, a cut transfer) are
        # expected here; anything else is still printed.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class Request:
    path: str
    range: str | None
    status: int


class Mirror:
    """A folder served on 127.0.0.1 with switchable faults; use as a context manager."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.lock = threading.Lock()
        self.bytes_sent: Counter[str] = Counter()
        self.requests: list[Request] = []
        self.cut_after: dict[str, int] = {}  # one-shot: drop the connection after N body bytes
        self.fail: dict[str, int] = {}  # answer 500 this many more times
        self.corrupt: dict[str, int] = {}  # flip the byte at this offset, every time
        self.missing: set[str] = set()  # answer 404
        self.ignore_range: set[str] = set()  # always 200 with the whole file
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "mirror not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def reset_log(self) -> None:
        """Forget the requests and byte counts seen so far."""
        with self.lock:
            self.bytes_sent.clear()
            self.requests.clear()

    def paths_requested(self) -> list[str]:
        with self.lock:
            return [r.path for r in self.requests]

    def __enter__(self) -> Mirror:
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                mirror._serve(self)

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def _log(self, path: str, range_header: str | None, status: int, sent: int = 0) -> None:
        with self.lock:
            self.requests.append(Request(path, range_header, status))
            self.bytes_sent[path] += sent

    def _reply(self, handler, status: int, body: bytes = b"", headers=None) -> None:
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        path = unquote(urlsplit(handler.path).path)
        range_header = handler.headers.get("Range")
        file = (self.folder / path.lstrip("/")).resolve()
        with self.lock:
            fail = self.fail.get(path, 0)
            if fail:
                self.fail[path] = fail - 1
            cut = self.cut_after.pop(path, None)
            corrupt_at = self.corrupt.get(path)
            ignore_range = path in self.ignore_range
            missing = path in self.missing
        if missing or not file.is_relative_to(self.folder.resolve()) or not file.is_file():
            self._log(path, range_header, 404)
            return self._reply(handler, 404, b"not found")
        if fail:
            self._log(path, range_header, 500)
            return self._reply(handler, 500, b"try again")
        data = bytearray(file.read_bytes())
        if corrupt_at is not None:
            data[corrupt_at] ^= 0xFF
        total = len(data)
        status, start = 200, 0
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
        if match and not ignore_range:
            start = int(match.group(1))
            if start >= total:
                self._log(path, range_header, 416)
                return self._reply(handler, 416, b"", {"Content-Range": f"bytes */{total}"})
            end = min(int(match.group(2)), total - 1) if match.group(2) else total - 1
            data = data[start : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        body = bytes(data)
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        # The full length is announced even when the body will be cut short.
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if cut is not None:
            body = body[:cut]
            handler.close_connection = True
        # Logged before writing: a client can finish reading before this thread
        # gets to run again, and the tests read the count right after.
        self._log(path, range_header, status, len(body))
        handler.wfile.write(body)
        handler.wfile.flush()


# ------------------------------------------------------------------ builders


def jpeg(rng: random.Random, width: int, height: int) -> bytes:
    """A small, real JPEG of random blocks (noise keeps it from compressing to nothing)."""
    image = Image.new("RGB", (width, height))
    pixels = [
        (rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(width * height)
    ]
    image.putdata(pixels)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


@dataclass
class CocoFixture:
    """What a COCO mirror holds: caption files and image bytes per split."""

    captions: dict[str, dict] = field(default_factory=dict)
    images: dict[str, dict[str, bytes]] = field(default_factory=dict)


WORDS = ("a", "man", "woman", "dog", "cat", "sits", "on", "the", "red", "bench", "near", "blue")


def _caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 10))).capitalize() + "."


def build_coco_mirror(folder: Path, n_train: int = 24, n_val: int = 12, seed: int = 0):
    """Write `zips/{train,val}2014.zip`, `annotations/annotations_trainval2014.zip`
    and the loose images (for `coco_url` fetches) under `folder`, as the COCO host
    lays them out. Returns a CocoFixture."""
    rng = random.Random(seed)
    fixture = CocoFixture()
    ann_zip = folder / "annotations" / "annotations_trainval2014.zip"
    ann_zip.parent.mkdir(parents=True, exist_ok=True)
    ids = rng.sample(range(1, 600_000), n_train + n_val)
    next_ann = 1
    with zipfile.ZipFile(ann_zip, "w", zipfile.ZIP_DEFLATED) as annotations:
        annotations.writestr("annotations/", b"")
        for split, split_ids in (("train2014", ids[:n_train]), ("val2014", ids[n_train:])):
            images, captions, instances, keypoints = [], [], [], []
            files: dict[str, bytes] = {}
            for image_id in sorted(split_ids):
                width, height = rng.randint(32, 64), rng.randint(24, 48)
                name = f"COCO_{split}_{image_id:012d}.jpg"
                files[name] = jpeg(rng, width, height)
                images.append(
                    {
                        "license": 1,
                        "file_name": name,
                        "coco_url": f"{COCO_HOST}/{split}/{name}",
                        "height": height,
                        "width": width,
                        "date_captured": "2013-11-14 16:28:13",
                        "flickr_url": f"http://farm4.staticflickr.com/0/{image_id}_x.jpg",
                        "id": image_id,
                    }
                )
                for _ in range(5):
                    captions.append(
                        {"image_id": image_id, "id": next_ann, "caption": _caption(rng)}
                    )
                    next_ann += 1
                box = [1.0, 2.0, width / 2, height / 2]
                instances.append(
                    {
                        "segmentation": [[1.0, 2.0, width / 2, 2.0, width / 2, height / 2]],
                        "area": box[2] * box[3] / 2,
                        "iscrowd": 0,
                        "image_id": image_id,
                        "bbox": box,
                        "category_id": 18,
                        "id": next_ann,
                    }
                )
                keypoints.append({**instances[-1], "num_keypoints": 1, "keypoints": [3, 4, 2] * 17})
                next_ann += 1
            info = {
                "description": "COCO 2014 Dataset",
                "url": "http://cocodataset.org",
                "version": "1.0",
                "year": 2014,
                "contributor": "COCO Consortium",
                "date_created": "2017/09/01",
            }
            licenses = [
                {"url": "http://creativecommons.org/licenses/by/2.0/", "id": 1, "name": "BY"}
            ]
            categories = [{"supercategory": "animal", "id": 18, "name": "dog"}]
            person = [
                {
                    "supercategory": "person",
                    "id": 1,
                    "name": "person",
                    "keypoints": [f"k{i}" for i in range(17)],
                    "skeleton": [[16, 14], [14, 12]],
                }
            ]
            caption_file = {
                "info": info,
                "licenses": licenses,
                "images": images,
                "annotations": captions,
            }
            fixture.captions[split] = caption_file
            fixture.images[split] = files
            members = {
                f"annotations/captions_{split}.json": caption_file,
                f"annotations/instances_{split}.json": {
                    **caption_file,
                    "annotations": instances,
                    "categories": categories,
                },
                f"annotations/person_keypoints_{split}.json": {
                    **caption_file,
                    "annotations": keypoints,
                    "categories": person,
                },
            }
            for member, content in members.items():
                annotations.writestr(member, json.dumps(content))
            image_zip = folder / "zips" / f"{split}.zip"
            image_zip.parent.mkdir(parents=True, exist_ok=True)
            loose = folder / split
            loose.mkdir(parents=True, exist_ok=True)
            # Real COCO zips store the JPEGs (they do not deflate) under `<split>/`.
            with zipfile.ZipFile(image_zip, "w", zipfile.ZIP_STORED) as zf:
                zf.writestr(f"{split}/", b"")
                for name, data in files.items():
                    zf.writestr(f"{split}/{name}", data)
                    (loose / name).write_bytes(data)
    return fixture


def member_data_offset(archive: Path, member: str) -> int:
    """Offset of `member`'s data in the zip file (to corrupt a byte of an image)."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(member)
    with open(archive, "rb") as fh:
        fh.seek(info.header_offset + 26)
        name_len = int.from_bytes(fh.read(2), "little")
        extra_len = int.from_bytes(fh.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len


def build_flickr_mirror(folder: Path, dataset: str = "flickr8k", n: int = 12, seed: int = 1):
    """Write a Flickr image archive and Karpathy captions under `folder`.

    flickr8k: `Flickr8k_Dataset.zip` (images under `Flicker8k_Dataset/`, plus
    macOS resource forks) and `caption_datasets.zip` holding
    `dataset_flickr8k.json`; flickr30k: `flickr30k-images.tar.gz` and a bare
    `dataset_flickr30k.json`. Returns (karpathy dict, {filename: bytes}).
    """
    rng = random.Random(seed)
    splits = ["train"] * (n - 4) + ["val"] * 2 + ["test"] * 2
    images, files, sentid = [], {}, 0
    for imgid, split in enumerate(splits):
        if dataset == "flickr8k":
            name = f"{rng.randrange(10**9, 10**10)}_{rng.getrandbits(40):010x}.jpg"
        else:
            name = f"{rng.randrange(10**9, 10**10)}.jpg"
        files[name] = jpeg(rng, rng.randint(32, 64), rng.randint(24, 48))
        sentences = []
        for _ in range(5):
            raw = _caption(rng)
            tokens = raw.lower().rstrip(".").split()
            sentences.append({"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "sentids": [s["sentid"] for s in sentences],
                "imgid": imgid,
                "sentences": sentences,
                "split": split,
                "filename": name,
            }
        )
    karpathy = {"images": images, "dataset": dataset}
    folder.mkdir(parents=True, exist_ok=True)
    if dataset == "flickr8k":
        with zipfile.ZipFile(folder / "Flickr8k_Dataset.zip", "w") as zf:
            zf.writestr("Flicker8k_Dataset/", b"")
            for name, data in files.items():
                zf.writestr(f"Flicker8k_Dataset/{name}", data)
                zf.writestr(f"__MACOSX/Flicker8k_Dataset/._{name}", b"\x00\x05\x16\x07junk")
        with zipfile.ZipFile(folder / "caption_datasets.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"dataset_{dataset}.json", json.dumps(karpathy))
            zf.writestr("dataset_coco.json", json.dumps({"images": [], "dataset": "coco"}))
    else:
        with tarfile.open(folder / "flickr30k-images.tar.gz", "w:gz") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(f"flickr30k-images/{name}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        (folder / f"dataset_{dataset}.json").write_text(json.dumps(karpathy))
    return karpathy, files


def build_escaping_archives(folder: Path) -> dict[str, Path]:
    """Archives whose members try to leave the extraction folder, by kind."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for kind, member in (("dotdot", "train2014/../../evil.txt"), ("absolute", "/tmp/evil.txt")):
        path = folder / f"{kind}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("train2014/ok.txt", b"fine")
            zf.writestr(member, b"pwned")
        made[kind] = path
    path = folder / "symlink.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("train2014/ok.txt", b"fine")
        link = zipfile.ZipInfo("train2014/link")
        link.create_system = 3  # unix, so the mode bits below are honoured
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "../../../etc")
    made["symlink"] = path
    path = folder / "symlink.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("train2014/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc"
        tf.addfile(info)
    made["tar-symlink"] = path
    return made
