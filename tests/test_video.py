"""Video: the tracker and the pooling on their own (no network), then the whole path on clips
made here: the bundled public-domain photo's face moving over a background (always), and six
UTKFace test faces as a group photo the camera pans over (where ../shared has them)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from agegender.cli.main import main
from agegender.cli.video import predict_video
from agegender.core.errors import DataError
from agegender.data.synthetic import Scene, group_pan, write_video
from agegender.data.utkface import parse_name
from agegender.inference.options import InferenceOptions
from agegender.inference.predictor import ASTRONAUT, Predictor
from agegender.inference.tracking import (
    EDGE_WEIGHT,
    LOOK,
    MAX_LOOKS,
    REID_MAX_DIST,
    UNSURE,
    Evidence,
    Tracker,
    VideoError,
    face_like,
    frame_quality,
    open_source,
    sampled,
    signature,
)
from agegender.vision.detect import FacialArea, iou
from agegender.vision.images import decode_rgb

# ----------------------------------------------------------------------------- the tracker


def det(box, score=0.9):
    return SimpleNamespace(box=tuple(float(v) for v in box), score=score)


def out(age=30.0, p=0.8):
    return {"age": age, "p_female": p}


def run(tracker, frames):
    """frames: per frame, a list of (box, score); returns the ids per frame."""
    ids = []
    for i, dets in enumerate(frames):
        faces = [det(b, s) for b, s in dets]
        ids.append(tracker.step(i, i / 25, faces, [out() for _ in faces]))
    return ids


def moving(x0, y0, vx, vy, side=60):
    return lambda i: (x0 + vx * i, y0 + vy * i, x0 + vx * i + side, y0 + vy * i + side)


def test_tracks_follow_moving_faces():
    paths = [moving(10, 10, 3, 0), moving(300, 40, -2, 1), moving(100, 200, 0, -2)]
    ids = run(Tracker(25), [[(p(i), 0.9) for p in paths] for i in range(40)])
    assert ids[0] == [None] * 3  # not a person before MIN_HITS frames
    assert all(row == ids[-1] for row in ids[3:])  # then one id each, never switched
    assert len(set(ids[-1])) == 3


def test_a_face_seen_for_two_frames_is_no_person():
    tracker = Tracker(25)
    frames = [[(moving(10, 10, 2, 0)(i), 0.9)] for i in range(30)]
    frames[10].append(((400, 300, 460, 360), 0.95))
    frames[11].append(((401, 300, 461, 360), 0.95))
    run(tracker, frames)
    assert len(tracker.tracks()) == 1


@pytest.mark.parametrize(("gap", "tracks"), [(5, 1), (40, 2)])
def test_leaving_and_coming_back(gap, tracks):
    """Out of the picture for less than MAX_MISSED_S: the same track, carried; longer: a new
    person (a tracker of boxes cannot tell it is the same face)."""
    tracker = Tracker(max_missed=25)
    box = (100, 100, 160, 160)
    frames = [[(box, 0.9)]] * 20 + [[]] * gap + [[(box, 0.9)]] * 20
    run(tracker, frames)
    assert len(tracker.tracks()) == tracks


def test_low_scores_continue_tracks_but_start_none():
    tracker = Tracker(25)
    frames = [[(moving(10, 10, 2, 0)(i), 0.9 if i < 10 else 0.4)] for i in range(30)]
    frames[5].append(((400, 300, 460, 360), 0.4))  # a doubtful face alone: never a track
    ids = run(tracker, frames)
    assert len(tracker.tracks()) == 1 and ids[-1][0] == ids[9][0]
    assert tracker.tracks()[0]["frames"] == 30


def test_faces_crossing_keep_their_ids():
    """Two faces passing each other, overlapping for a few frames: constant-velocity prediction
    keeps each on its own track."""
    a, b = moving(0, 100, 8, 0), moving(400, 120, -8, 0)
    ids = run(Tracker(25), [[(a(i), 0.9), (b(i), 0.9)] for i in range(50)])
    assert ids[5] == ids[-1] and len(set(ids[-1])) == 2


def test_iou():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], np.float64)
    assert iou(boxes, boxes).round(3).tolist() == [[1.0, 0.333], [0.333, 1.0]]


# ----------------------------------------------------------------------------- pooling


def gaussian(mean, std, k=101):
    ages = np.arange(k)
    p = np.exp(-0.5 * ((ages - mean) / std) ** 2)
    return p / p.sum()


def test_pooled_interval_narrows_then_stops():
    rng = np.random.default_rng(0)
    ev, widths = Evidence(), []
    for _ in range(int(3 * MAX_LOOKS / LOOK)):
        mean = 40 + rng.normal(0, 4)
        ev.add({"age": mean, "p_female": 0.7, "age_probs": gaussian(mean, 6)}, 1.0)
        low, high = ev.estimate()["age_interval"]
        widths.append(high - low)
    cap = round(MAX_LOOKS / LOOK)
    assert widths[0] > widths[cap // 2] > widths[cap]  # evidence narrows it
    assert widths[-1] == pytest.approx(widths[cap], rel=0.1)  # a face repeated adds little
    assert ev.estimate()["p_female"] > 0.7  # agreeing frames make gender surer


def test_pooled_age_beats_single_frames():
    """Frames that err around the truth: the pooled estimate is nearer than a frame is."""
    rng = np.random.default_rng(1)
    pooled, single = [], []
    for truth in rng.uniform(5, 80, 40):
        ev = Evidence()
        for _ in range(30):
            mean = truth + rng.normal(0, 6)
            ev.add({"age": mean, "p_female": 0.6, "age_probs": gaussian(mean, 5)}, 1.0)
            single.append(abs(mean - truth))
        pooled.append(abs(ev.estimate()["age"] - truth))
    assert np.mean(pooled) < 0.5 * np.mean(single)


def test_weights_favour_the_better_frames():
    ev = Evidence()
    ev.add({"age": 20.0, "p_female": 0.5, "age_probs": gaussian(20, 5)}, 1.0)
    ev.add({"age": 60.0, "p_female": 0.5, "age_probs": gaussian(60, 5)}, 0.1)
    assert ev.estimate()["age"] < 30


def test_a_model_without_distribution_pools_the_mean():
    ev = Evidence()
    for age in (30.0, 34.0):
        ev.add({"age": age, "p_female": 0.2}, 1.0)
    est = ev.estimate()
    assert est["age"] == pytest.approx(32.0) and est["age_interval"] is None
    assert est["gender"] == "male"


# ----------------------------------------------------------------------------- sources


def test_sampling_to_fps():
    frames, rate = sampled((np.zeros((4, 4, 3), np.uint8) for _ in range(50)), fps=5)
    got = [f.index for f in frames]
    assert rate == 25.0 and got == list(range(0, 50, 5))


def test_sources_that_cannot_be_read(tmp_path):
    with pytest.raises(VideoError, match="no such video"):
        open_source(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 10)
    with pytest.raises(VideoError, match="not a video"):
        open_source(text)
    with pytest.raises(VideoError, match="camera 97 does not open"):
        open_source(97)


# ----------------------------------------------------------------------------- real faces


@pytest.fixture(scope="module")
def face():
    """The bundled photo's face, cut out with a margin like UTKFace's crops."""
    rgb = decode_rgb(ASTRONAUT.read_bytes())
    return cv2.resize(rgb[40:240, 124:324], (200, 200))


@pytest.fixture(scope="module")
def predictor():
    return Predictor.load("default", detector="yunet-fast", threads=2)


def track(predictor, scene, **kw):
    kw.setdefault("detect_every", 1)  # what each frame's detection does (the default is every 2nd)
    tracking = predictor.track(scene.render(), **kw)
    results = list(tracking)
    return tracking.tracks, results


def test_one_face_panned_and_zoomed(predictor, face):
    scene = Scene([face], [lambda t: (200 + 240 * t, 180 + 20 * math.sin(6 * t), 130 - 40 * t)],
                  frames=40)  # fmt: skip
    tracks, results = track(predictor, scene)
    assert len(tracks) == 1
    t = tracks[0]
    # (her face is a close call for gender at this size: p_female 0.5-0.65, so not checked here)
    assert t["frames"] >= 36
    assert set(t) >= {"track", "first_frame", "last_frame", "start_s", "end_s", "box", "age",
                      "age_interval", "p_female", "best_frame", "age_spread"}  # fmt: skip
    low, high = t["age_interval"]
    assert low < t["age"] < high
    assert t["age_spread"] <= t["frame_age_spread"] + 0.5  # pooling steadies what is shown
    assert [r.index for r in results] == list(range(40))


def test_leaving_for_longer_than_a_second_is_the_same_person(predictor, face):
    """Away for 30 frames (the box tracker has ended the track) and back elsewhere: the
    signature continues the lost track, same id, the evidence of both visits pooled."""
    here = lambda t: None if 0.35 < t < 0.75 else (320 if t < 0.5 else 420, 180, 120)  # noqa: E731
    tracks, results = track(predictor, Scene([face], [here], frames=80))
    (t,) = tracks
    assert t["returns"] == 1 and t["joined"] == []  # joined before its new id was shown
    assert {tid for r in results for tid, _ in r.faces} <= {t["track"], None}
    assert t["frames"] >= 45


def test_two_faces_crossing(predictor, face):
    other = face[:, ::-1].copy()  # mirrored: another "person" with known identity
    left = lambda t: (120 + 400 * t, 150, 110)  # noqa: E731
    right = lambda t: (520 - 400 * t, 215, 110)  # noqa: E731
    scene = Scene([face, other], [left, right], frames=50)
    tracks, results = track(predictor, scene)
    assert len(tracks) == 2

    def owners(i):  # track id -> the face its box lies on, in frame i
        truth = np.array(scene.boxes(i), np.float64)
        return {tid: int(iou(np.array([f.box]), truth)[0].argmax())
                for tid, f in results[i].faces}  # fmt: skip

    assert owners(5) == owners(46) and len(owners(46)) == 2  # no identity switch


def test_detect_every_k_carries_boxes(predictor, face):
    scene = Scene([face], [lambda t: (200 + 200 * t, 180, 120)], frames=30)
    tracks, results = track(predictor, scene, detect_every=3)
    assert len(tracks) == 1
    carried = [r for r in results if not r.detected]
    assert len(carried) == 20  # frames 1, 2, 4, 5, ...; confirmed on frame 6, then carried
    assert all(r.carried for r in carried if r.index > 6)
    _, every_frame = track(predictor, scene)  # where detection finds the face on each frame
    for r in carried[-4:]:
        ((_, box),) = r.carried
        ((_, face),) = every_frame[r.index].faces
        assert iou(np.array([box]), np.array([face.box]))[0, 0] > 0.7  # carried along with it


def test_no_face_is_an_empty_result(predictor):
    blank = Scene([], [], frames=10)
    tracks, results = track(predictor, blank)
    assert tracks == [] and len(results) == 10


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def clip(face, tmp_path_factory):
    scene = Scene([face], [lambda t: (180 + 260 * t, 180, 120)], frames=30)
    return write_video(scene.render(), tmp_path_factory.mktemp("clip") / "walk.mp4")


def test_command_writes_tracks_frames_csv_and_video(clip, tmp_path, capsys):
    names = {"output": "t.jsonl", "frames": "f.jsonl", "csv": "t.csv", "annotate": "a.mp4"}
    files = {k: tmp_path / n for k, n in names.items()}
    argv = ["predict", str(clip), "--quiet"]
    for k, path in files.items():
        argv += [f"--{k}", str(path)]
    assert main(argv) == 0
    (person,) = [json.loads(x) for x in files["output"].read_text().splitlines()]
    assert person["frames"] >= 14  # detected on every 2nd of the 30 frames (the default)
    frames = [json.loads(x) for x in files["frames"].read_text().splitlines()]
    assert len(frames) == 30 and frames[-2]["faces"][0]["track"] == person["track"]
    assert not frames[-1]["detected"] and frames[-1]["faces"][0]["track"] == person["track"]
    (row,) = list(csv.DictReader(files["csv"].open()))
    assert row["track"] == str(person["track"]) and float(row["age_low"]) < float(row["age"])
    cap = cv2.VideoCapture(str(files["annotate"]))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 30
    cap.release()
    assert capsys.readouterr().out == ""


def test_command_prints_persons(clip, capsys):
    assert main(["predict", str(clip), "--quiet", "--detect-every", "2"]) == 0
    text = capsys.readouterr().out
    assert "walk.mp4: 1 person in 30 frames" in text and "#1" in text


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b""), "not a video OpenCV can read"),
        (lambda p: p.write_text("hello"), "not a video OpenCV can read"),
        (None, "no such video"),
    ],
)
def test_bad_videos_are_one_line(tmp_path, capsys, make, message):
    path = tmp_path / "bad.mp4"
    if make:
        make(path)
    assert main(["predict", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_truncated_video_keeps_what_was_read(clip, tmp_path, capsys):
    cut = tmp_path / "cut.mp4"
    data = clip.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    code = main(["predict", str(cut), "--quiet", "--output", str(tmp_path / "t.jsonl")])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:  # the container's index sits at its end: nothing to read, said in one line
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--camera", "0"], "give one video, or --camera N, alone"),
        (["other.mp4"], "give one video, or --camera N, alone"),
        (["--aligned"], "--aligned is for face crops"),
        (["--annotate", "out.avi"], "a video's annotation is an .mp4 file"),
        (["--fps", "0"], "--fps must be in (0, 1000]"),
    ],
)
def test_usage_errors(clip, tmp_path, capsys, extra, message):
    assert main(["predict", str(clip), *extra, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_video_options_on_photos_are_refused(capsys):
    assert main(["predict", str(ASTRONAUT), "--frames", "x.jsonl"]) == 2
    assert "for a video or a camera" in capsys.readouterr().err


def test_output_may_not_replace_the_video(clip, capsys):
    assert main(["predict", str(clip), "--output", str(clip)]) == 2
    assert "give FILE.jsonl, FILE.json, FILE.csv or -" in capsys.readouterr().err
    assert main(["predict", str(clip), "--annotate", str(clip)]) == 2
    assert "is an input" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--output", "--frames", "--csv", "--annotate"])
def test_video_outputs_replace_only_outputs_of_their_kind(clip, tmp_path, capsys, option):
    """Every output is refused, before the model loads, over a file of another kind and
    over the input video under another name (a hard link); nothing is touched."""
    ext = {"--output": ".jsonl", "--frames": ".jsonl", "--csv": ".csv", "--annotate": ".mp4"}
    other = tmp_path / f"notes{ext[option]}.txt"
    other.write_text("keep me\n")
    link = tmp_path / f"link{ext[option]}"
    link.hardlink_to(clip)
    before = clip.read_bytes()
    assert main(["predict", str(clip), option, str(link), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is an input" in err and err.count("\n") == 1, err
    assert clip.read_bytes() == before and link.read_bytes() == before
    if option != "--annotate":  # (an annotation must end in .mp4: refused by name already)
        assert main(["predict", str(clip), option, str(other), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "give FILE.jsonl" in err or "not replacing it" in err, err
    assert other.read_text() == "keep me\n"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_video_outputs_as_csv_and_on_stdout(clip, tmp_path, capsys):
    assert main(["predict", str(clip), "--output", "-", "--quiet"]) == 0
    (person,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert person["frames"] >= 14
    out = tmp_path / "persons.csv"
    assert main(["predict", str(clip), "--output", str(out), "--quiet"]) == 0
    (row,) = list(csv.DictReader(out.open()))
    assert row["track"] == str(person["track"]) and capsys.readouterr().out == ""


def test_interrupted_keeps_the_tracks(face, tmp_path):
    scene = Scene([face], [lambda t: (320, 180, 120)], frames=40)

    def frames():
        for i, rgb in enumerate(scene.render()):
            if i == 25:
                raise KeyboardInterrupt
            yield rgb

    out = tmp_path / "t.jsonl"
    assert predict_video(frames(), InferenceOptions(), output=out, quiet=True) == 130
    (person,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert person["last_frame"] == 24


def test_empty_stream_is_said(tmp_path):
    with pytest.raises(DataError, match="no frame could be read"):
        predict_video(iter([]), InferenceOptions(), quiet=True)


# ----------------------------------------------------------------------------- UTKFace


@pytest.fixture(scope="module")
def six_test_faces(utkface_dir):
    """Three women and three men of five and up from the committed split's test part (no
    bundled model trained on them), a fixed pick."""
    path = Path(__file__).resolve().parents[1] / "splits/utkface.csv"
    with open(path, newline="") as f:
        names = sorted(r["name"] for r in csv.DictReader(f) if r["split"] == "test")
    picked: dict[int, list[str]] = {0: [], 1: []}
    for name in names[::97]:
        age, gender, _ = parse_name(name)
        if age >= 5 and len(picked[gender]) < 3 and (utkface_dir / name).is_file():
            picked[gender].append(name)
    six = [picked[0][0], picked[1][0], picked[0][1], picked[1][1], picked[0][2], picked[1][2]]
    return [decode_rgb((utkface_dir / n).read_bytes()) for n in six], [parse_name(n) for n in six]


def test_group_photo_six_people(predictor, six_test_faces):
    """The camera pans and zooms over six people for 4 s: six tracks, each on its own face,
    genders right but for at most one, pooled ages no worse than single frames, and the
    estimate shown steadier than single frames."""
    faces, labels = six_test_faces
    scene = group_pan(faces, seconds=4)
    tracking = predictor.track(scene.render())
    single_ages: dict[int, list[float]] = {}
    for result in tracking:
        for tid, f in result.faces:
            single_ages.setdefault(tid, []).append(f.age)
    tracks = tracking.tracks
    assert len(tracks) == 6
    owners = []
    for t in tracks:
        truth = np.array([b for b in scene.boxes(t["best_frame"])], np.float64)
        overlap = iou(np.array([t["box"]], np.float64), truth)[0]
        assert overlap.max() > 0.5
        owners.append(int(overlap.argmax()))
    assert sorted(owners) == list(range(6))  # one track per face: no switch, none missed
    right = sum((t["gender"] == "female") == (labels[k][1] == 1) for t, k in zip(tracks, owners))
    assert right >= 5
    pooled = [abs(t["age"] - labels[k][0]) for t, k in zip(tracks, owners)]
    single = [abs(a - labels[k][0]) for t, k in zip(tracks, owners)
              for a in single_ages[t["track"]]]  # fmt: skip
    assert np.mean(pooled) <= np.mean(single) + 0.25
    assert np.median([t["age_spread"] for t in tracks]) < np.median(
        [t["frame_age_spread"] for t in tracks]
    )


# ----------------------------------------------------------------------------- a track is a face


def sig(seed, dim=128):
    v = np.random.default_rng(seed).normal(size=dim)
    return v / np.linalg.norm(v)


def test_a_person_who_leaves_and_returns_keeps_the_id():
    """Face A leaves for 60 frames (over max_missed) and comes back elsewhere while B stays:
    A's signature continues A's track; a third face, C, coming in later is a new person."""
    tracker = Tracker(max_missed=25)
    a, b, c = sig(1), sig(2), sig(3)
    ids = []
    for i in range(160):
        faces, outs = [det((400, 100, 460, 160))], [{**out(p=0.2), "signature": b}]
        if i < 40 or 100 <= i < 130:
            x = 10 if i < 40 else 200
            faces.append(det((x, 100, x + 60, 160)))
            outs.append({**out(), "signature": a})
        if i >= 140:
            faces.append(det((300, 250, 360, 310)))
            outs.append({**out(), "signature": c})
        ids.append(tracker.step(i, i / 25, faces, outs))
    tracks = {t["track"]: t for t in tracker.tracks()}
    assert len(tracks) == 3
    assert ids[39][1] == ids[129][1] and tracks[ids[39][1]]["returns"] == 1
    assert ids[159][1] not in (ids[39][1], ids[159][0])


def test_a_returning_face_unlike_the_lost_one_is_a_new_person():
    tracker = Tracker(max_missed=25)
    for i in range(100):
        if 30 <= i < 70:  # away
            tracker.step(i, i / 25, [], [])
            continue
        s = sig(1) if i < 30 else sig(2)
        tracker.step(i, i / 25, [det((100, 100, 160, 160))], [{**out(), "signature": s}])
    assert [t["returns"] for t in tracker.tracks()] == [0, 0]


def test_a_short_low_score_thing_is_never_a_person():
    """A bowl the fast detector scores 0.5-0.7 at ~24 px for 5 to 37 frames (clutter tracks
    of benchmarks/video_clips.py average 0.46-0.60 over 5-42 frames), beside a face at 0.9:
    only the face is a person."""
    for n in (5, 37):
        tracker = Tracker(25, frame_side=442)
        frames = [[(moving(10, 10, 1, 0, side=40)(i), 0.9)] for i in range(60)]
        for i in range(n):
            frames[10 + i].append(((300, 200, 324, 224), (0.7, 0.55, 0.62, 0.5)[i % 4]))
        ids = run(tracker, frames)
        assert len(tracker.tracks()) == 1
        assert all(row[1] is None for row in ids[10 : 10 + n])


def test_a_small_real_face_is_still_a_person():
    tracker = Tracker(25, frame_side=442)
    run(tracker, [[(moving(10, 10, 1, 0, side=24)(i), 0.88)] for i in range(20)])
    assert len(tracker.tracks()) == 1


def test_landmark_geometry():
    box = (100.0, 100.0, 160.0, 160.0)
    face = FacialArea(box, 0.9, ((115, 120), (145, 120), (130, 135), (118, 148), (142, 148)))
    upside_down = FacialArea(box, 0.9, ((115, 148), (145, 148), (130, 135), (118, 120),
                                        (142, 120)))  # fmt: skip
    squeezed = FacialArea(box, 0.9, ((128, 120), (132, 120), (130, 135), (128, 148), (132, 148)))
    assert face_like(face) and not face_like(upside_down) and not face_like(squeezed)
    tracker = Tracker(25)
    for i in range(10):  # a detector's confident "face" upside down is not confirmed
        tracker.step(i, i / 25, [upside_down],
                     [{**out(), "quality": frame_quality(upside_down, (360, 640))}])  # fmt: skip
    assert tracker.tracks() == []


def test_an_edge_cut_face_weighs_little_and_gender_stays_unsure():
    """A man's face half out of the top edge, read "female" for a second: the running
    estimate says "?" rather than "female"; once whole frames come, "male"."""
    cut = FacialArea((200.0, -30.0, 260.0, 30.0), 0.9, ((215, -10), (245, -10), (230, 5),
                                                        (218, 18), (242, 18)))  # fmt: skip
    q = frame_quality(cut, (360, 640))
    assert q["edge"] and q["weight"] == pytest.approx(EDGE_WEIGHT)
    # then down into the picture, whole
    whole = FacialArea((200.0, 4.0, 260.0, 64.0), 0.9, ((215, 24), (245, 24), (230, 39),
                                                        (218, 52), (242, 52)))  # fmt: skip
    assert not frame_quality(whole, (360, 640))["edge"]
    # a forehead past the top, eyes and mouth well inside: it loses only what is outside
    brow = FacialArea((200.0, -6.0, 260.0, 54.0), 0.9, ((215, 14), (245, 14), (230, 29),
                                                       (218, 42), (242, 42)))  # fmt: skip
    q_brow = frame_quality(brow, (360, 640))
    assert q_brow["edge"] and q_brow["weight"] == pytest.approx(0.9)
    tracker = Tracker(25)
    for i in range(13):  # a second at detection on every 2nd frame of 25 fps
        tid = tracker.step(i, i / 25, [cut], [{**out(age=18, p=0.9), "quality": q}])[0]
    assert tid is not None  # a person (it is a face), but its gender is not said
    est = tracker.active[0].evidence.estimate()
    assert est["gender"] == UNSURE and est["p_female"] < 0.6
    for i in range(13, 40):
        tracker.step(i, i / 25, [whole], [{**out(age=40, p=0.1), "quality": {"weight": 1.0}}])
    assert tracker.tracks()[0]["gender"] == "male"
    assert tracker.tracks()[0]["low_quality_frames"] == 13


def test_a_new_tracks_gender_is_unsure_at_first():
    ev = Evidence()
    ev.add(out(p=0.95), 0.9)
    assert ev.estimate()["gender"] == UNSURE  # one frame is not enough
    for _ in range(3):
        ev.add(out(p=0.95), 0.9)
    assert ev.estimate()["gender"] == "female"


def test_joined_evidence_pools_both_visits():
    one, two, both = Evidence(), Evidence(), Evidence()
    for k in range(20):
        o = {"age": 30.0 + k, "p_female": 0.7, "age_probs": gaussian(30 + k, 5)}
        (one if k < 8 else two).add(o, 1.0)
        both.add(o, 1.0)
    one.merge(two)
    a, b = one.estimate(), both.estimate()
    assert a["age"] == pytest.approx(b["age"]) and a["p_female"] == pytest.approx(b["p_female"])
    assert a["age_interval"] == pytest.approx(b["age_interval"])
    assert one.frames.std == pytest.approx(both.frames.std)


def test_signatures_tell_utkface_faces_apart(six_test_faces, predictor):
    """The same face at 60 and 130 px, 15 % darker, through JPEG, is nearer itself than any
    other face, and every other face lies beyond REID_MAX_DIST."""
    faces, _ = six_test_faces
    views = []
    for side, light in ((60, 1.0), (130, 0.85)):
        row = []
        for f in faces:
            where = lambda t, side=side: (320, 180, side)  # noqa: E731
            scene = Scene([(f * light).astype(np.uint8)], [where], frames=1)
            rgb = next(scene.render())
            rgb = cv2.imdecode(cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, 70])[1], 1)
            (found,) = predictor.detector.detect_faces(rgb)
            from agegender.vision.detect import face_crop

            row.append(signature(face_crop(rgb, found, predictor.data_config)))
        views.append(np.stack(row))
    d = 1 - views[0] @ views[1].T
    assert np.all(d.argmin(axis=1) == np.arange(6))  # each face nearest to itself
    # single frames; a track pools many, and its visits differ less (the threshold's data)
    assert np.median(np.diag(d)) < REID_MAX_DIST < d[~np.eye(6, dtype=bool)].min()


def test_utkface_faces_leaving_and_returning_are_counted_once(predictor, six_test_faces):
    """Two women, one leaving before the other comes in at another place, then back: two
    persons, and the first keeps her id."""
    faces, labels = six_test_faces
    women = [f for f, lab in zip(faces, labels) if lab[1] == 1][:2]
    first = lambda t: (200, 180, 110) if t < 0.3 or t > 0.75 else None  # noqa: E731
    second = lambda t: (450, 180, 110) if 0.4 < t < 0.65 else None  # noqa: E731
    tracks, _ = track(predictor, Scene(women, [first, second], frames=100))
    assert len(tracks) == 2 and sorted(t["returns"] for t in tracks) == [0, 1]


def test_a_damaged_clip_and_a_missing_camera_print_one_line(tmp_path):
    """OpenCV's and FFmpeg's own warnings are silenced: the user reads our line alone."""
    import subprocess
    import sys

    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for k in range(20):
        writer.write(np.full((48, 64, 3), k * 10, np.uint8))
    writer.release()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[:600])
    for args in ([str(cut)], ["--camera", "97"]):
        run = subprocess.run(
            [sys.executable, "-m", "agegender", "predict", *args], capture_output=True, text=True
        )
        assert run.returncode == 2
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_an_upside_down_camera_is_followed_with_rotations(six_test_faces):
    """A clip filmed upside down: the detector's quarter turns (``rotations``) reach video, and
    the faces it finds turned are confirmed as faces, one track each."""
    faces, _ = six_test_faces
    frames = [np.ascontiguousarray(f[::-1, ::-1]) for f in group_pan(faces, seconds=1).render()]
    found = {}
    for rotations in ((), (180,)):
        p = Predictor.load("default", detector="yunet-fast", threads=2, rotations=rotations)
        tracking = p.track(iter(frames))
        list(tracking)
        found[rotations] = len(tracking.tracks)  # confirmed tracks: persons
    assert found[(180,)] == 6 and found[()] < 6, found
