"""Reads back what a W&B run wrote offline: its ``.wandb`` transaction log (LevelDB log format of protobuf records).

Tests use it to assert on what was really logged; nothing of wandb is mocked.
"""

from __future__ import annotations

import glob
import json
import os
import struct

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str):
    with open(path, "rb") as f:
        data = f.read()
    pos, chunks = HEADER, []  # the file starts with a 7-byte ":W&B" header
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        chunks.append(payload)
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


class OfflineRun:
    """History rows, summary, config and table files of the one offline run under ``root``."""

    def __init__(self, root: str) -> None:
        runs = glob.glob(os.path.join(root, "**", "offline-run-*"), recursive=True)
        assert len(runs) == 1, runs
        self.dir = runs[0]
        self.history, self.summary, self.config = [], {}, {}
        for r in records(glob.glob(os.path.join(self.dir, "run-*.wandb"))[0]):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                self.history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
            elif kind == "summary":
                self.summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
            elif kind == "config":
                self.config.update({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "run":
                self.config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})

    def tables(self) -> list[dict]:
        files = glob.glob(os.path.join(self.dir, "files", "media", "table", "**", "*.table.json"), recursive=True)
        return [json.load(open(f)) for f in sorted(files)]

    def scalar(self, key: str) -> list[float]:
        return [row[key] for row in self.history if key in row]


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)
