"""The shard format: the writer is byte-reproducible; the fast tar reader agrees with tarfile."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from synthbreast.data.shards import Sample, iter_shard, write_shard


def samples(n: int) -> list[Sample]:
    return [Sample(f"k{i:03d}", bytes([i]) * (i * 37 % 700), i % 2, {"i": i}) for i in range(n)]


def test_writer_is_reproducible_and_readable_by_webdataset(tmp_path):
    a = write_shard(tmp_path / "a.tar", samples(20))
    b = write_shard(tmp_path / "b.tar", samples(20))
    assert a["sha256"] == b["sha256"] and a["count"] == 20
    assert a["counts"] == {"0": 10, "1": 10}
    ours = list(iter_shard(tmp_path / "a.tar"))
    theirs = list(wds.tarfile_to_samples()(iter([{"url": str(tmp_path / "a.tar")}])))
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs]
    for x, y in zip(ours, theirs, strict=True):
        assert (x["png"], x["cls"], x["json"]) == (y["png"], y["cls"], y["json"])


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reader_handles_other_writers_long_names_and_folders(tmp_path, fmt):
    path = tmp_path / "x.tar"
    long_folder = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "short"
    members = [
        (f"{long_folder}/sample1.png", b"\x89PNG" * 300),
        (f"{long_folder}/sample1.cls", b"1"),
        ("sample2.png", b""),
        ("sample2.json", '{"patient": "é"}'.encode()),
    ]
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("adir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = list(iter_shard(path))
    assert [s["__key__"] for s in got] == [f"{long_folder}/sample1", "sample2"]
    assert got[0]["png"] == members[0][1] and got[0]["cls"] == b"1"
    assert got[1]["png"] == b"" and got[1]["json"] == members[3][1]


def test_truncated_shard_is_an_error(tmp_path):
    write_shard(tmp_path / "a.tar", samples(5))
    data = (tmp_path / "a.tar").read_bytes()
    for cut in (1500, 3 * 512):  # inside a member, and at a member boundary
        (tmp_path / "b.tar").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            list(iter_shard(tmp_path / "b.tar"))
