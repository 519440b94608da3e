"""The one folder scanner (agegender.vision.scan): links to folders followed once, FIFOs,
sockets and devices skipped and counted, never opened (opening a FIFO blocks for ever)."""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
from pathlib import Path

import pytest

from agegender.core.errors import DataError
from agegender.data.cache import open_cache
from agegender.data.decode import hash_file
from agegender.data.manifest import read_manifest
from agegender.data.prepare import prepare
from agegender.data.synthetic import draw_face
from agegender.vision.images import decode_rgb, face_config, load_photo, open_image
from agegender.vision.scan import find_images, scan_images

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and symlinks")


@pytest.fixture(autouse=True)
def no_hang():
    """A test that blocks on a FIFO fails (the whole run stops, with the stack) instead of
    hanging for ever."""
    faulthandler.dump_traceback_later(60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _face(path: Path, age: int = 30) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_face(age, 0, 1, 48, seed=age).save(path)
    return path


def _name(age: int) -> str:
    return f"{age}_0_1_201701160000000{age:02d}.jpg.chip.jpg"


def test_symlinked_folder_is_followed(tmp_path):
    data, other = tmp_path / "data", tmp_path / "other"
    _face(data / "a.jpg")
    _face(other / "deep" / "b.jpg")
    (data / "more").symlink_to(other, target_is_directory=True)
    found = scan_images([data])
    assert found.files == [data / "a.jpg", data / "more" / "deep" / "b.jpg"]
    assert found.skipped == []


def test_link_loop_and_second_link_walked_once(tmp_path):
    data = tmp_path / "data"
    _face(data / "sub" / "a.jpg")
    (data / "sub" / "up").symlink_to(data, target_is_directory=True)  # a loop
    (data / "again").symlink_to(data / "sub", target_is_directory=True)  # a second way in
    found = scan_images([data, data / "sub"])  # and the folder given twice
    assert len(found.files) == 1 and found.files[0].name == "a.jpg"


def test_fifo_in_a_folder_is_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    _face(data / "a.jpg")
    os.mkfifo(data / "pipe.jpg")
    os.mkfifo(data / "pipe.txt")  # not named as an image: not looked at at all
    found = scan_images([data])
    assert found.files == [data / "a.jpg"]
    assert found.skipped == [(data / "pipe.jpg", "not a regular file (a FIFO)")]
    with pytest.warns(UserWarning, match=r"skipped .*pipe\.jpg \(not a regular file \(a FIFO\)\)"):
        assert find_images([data]) == [data / "a.jpg"]


@pytest.mark.skipif(sys.platform == "win32", reason="unix sockets")
def test_socket_in_a_folder_is_skipped(tmp_path):
    data = tmp_path / "d"
    _face(data / "a.jpg")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(data / "s.png"))
        assert scan_images([data]).skipped == [(data / "s.png", "not a regular file (a socket)")]


def test_fifo_named_directly_is_refused_in_one_line(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"^\S*photo\.jpg: not a regular file \(a FIFO\)$"):
        scan_images([fifo])
    with pytest.raises(DataError, match="not a regular file"):
        scan_images(["/dev/null"])
    for read in (open_image, decode_rgb, load_photo):
        with pytest.raises(ValueError, match=r"^not a regular file \(a FIFO\)$"):
            read(fifo)
    assert hash_file(fifo) == ("", "unreadable: not a regular file (a FIFO)")


def test_prepare_counts_what_it_skipped(tmp_path):
    data = tmp_path / "data"
    for age in (20, 30, 40, 50):
        _face(data / _name(age), age)
    os.mkfifo(data / _name(60))
    (data / "loop").symlink_to(data, target_is_directory=True)
    s = prepare([data], tmp_path / "c", face_config(32), quiet=True, workers=1)
    assert (s["files_found"], s["skipped"], s["parsed"], s["kept"]) == (5, 1, 4, 4)
    status = {Path(r["path"]).name: r["status"] for r in read_manifest(tmp_path / "c")}
    assert status[_name(60)] == "skipped: not a regular file (a FIFO)"
    assert len(open_cache(tmp_path / "c")) == 4
    # unchanged: the cache is reused, the skipped file still counted
    again = prepare([data], tmp_path / "c", face_config(32), quiet=True, workers=1)
    assert again["reused"] and again["skipped"] == 1
    with pytest.raises(DataError, match="not a regular file"):
        prepare([data / _name(60)], tmp_path / "c2", quiet=True, workers=1)


def test_a_labels_file_row_on_a_fifo_is_unreadable_not_hanging(tmp_path):
    _face(tmp_path / "a.jpg", 30)
    os.mkfifo(tmp_path / "b.jpg")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,age,gender\na.jpg,30,m\nb.jpg,40,f\n")
    s = prepare([], tmp_path / "c", face_config(32), labels=[labels], aligned=True, quiet=True)
    status = {Path(r["path"]).name: r["status"] for r in read_manifest(tmp_path / "c")}
    assert status["b.jpg"] == "unreadable: not a regular file (a FIFO)"
    assert s["kept"] == 1
