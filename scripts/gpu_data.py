"""An image folder packed into pieces small enough to travel to the device machine, and back.

A device call carries at most 64 MiB with the working tree, so a data set goes as a tar.xz of its
files (the JPEG or PNG bytes themselves: no pixel changes) split in pieces of at most --piece-mib,
with a manifest of their SHA-256 digests. Pieces carried by earlier calls stay on a warm machine,
so a set larger than one call's share arrives over two calls.

    python scripts/gpu_data.py pack .data/cifar10 .gpu-data/cifar10     # here
    python scripts/gpu_data.py unpack .gpu-data/cifar10 .data/cifar10   # there
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

MANIFEST = "manifest.json"


def pack(folder: Path, dest: Path, piece_mib: float) -> list[Path]:
    """``dest``/part-NN pieces of the tar.xz of ``folder``'s train/ and test/, and the manifest."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz", preset=1) as tar:
        for split in ("train", "test"):
            tar.add(folder / split, arcname=split)
    data = buffer.getvalue()
    size = int(piece_mib * 2**20)
    dest.mkdir(parents=True, exist_ok=True)
    pieces = []
    for i, start in enumerate(range(0, len(data), size)):
        piece = dest / f"part-{i:02d}"
        piece.write_bytes(data[start : start + size])
        pieces.append(piece)
    manifest = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "pieces": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in pieces},
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return pieces


def unpack(source: Path, folder: Path) -> None:
    """Check every piece against the manifest, join them and extract train/ and test/ into
    ``folder``; a missing or damaged piece is an error naming it (nothing is extracted)."""
    manifest = json.loads((source / MANIFEST).read_text())
    parts = []
    for name, digest in sorted(manifest["pieces"].items()):
        path = source / name
        if not path.exists():
            raise SystemExit(f"{path} is missing: carry it in this call or an earlier one")
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != digest:
            raise SystemExit(f"{path} is damaged (its SHA-256 is not the manifest's)")
        parts.append(blob)
    data = b"".join(parts)
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise SystemExit(f"the pieces of {source} do not join into the packed archive")
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        tar.extractall(folder, filter="data")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="FOLDER -> DEST/part-NN and DEST/manifest.json")
    a.add_argument("folder", type=Path)
    a.add_argument("dest", type=Path)
    a.add_argument("--piece-mib", type=float, default=40.0)
    b = sub.add_parser("unpack", help="SOURCE (pieces and manifest) -> FOLDER/train, FOLDER/test")
    b.add_argument("source", type=Path)
    b.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    if args.command == "pack":
        pieces = pack(args.folder, args.dest, args.piece_mib)
        total = sum(x.stat().st_size for x in pieces) / 2**20
        print(f"{len(pieces)} pieces, {total:.1f} MiB, in {args.dest}")
    else:
        unpack(args.source, args.folder)
        print(f"unpacked {args.source} into {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
