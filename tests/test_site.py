"""Private mode: the static site of agegender.serve.site, run in a real headless Chromium.

The page must find the faces the package finds and agree with it (same genders, ages within a
few years), and ask nothing of any other host.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_UTKFACE, collage
from PIL import Image

from agegender.inference.predictor import ASTRONAUT
from agegender.serve.site import MARKER, SITE, SiteError, detector_bytes, model_file, write_site

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
VENDOR = SITE / "vendor" / "ort"


# --------------------------------------------------------------------------- the folder


def test_vendored_runtime_is_what_version_json_records():
    info = json.loads((VENDOR / "VERSION.json").read_text())
    assert info["package"] == "onnxruntime-web" and info["license"] == "MIT"
    assert "Permission is hereby granted" in (VENDOR / "LICENSE").read_text()
    for name, entry in info["files"].items():
        data = (VENDOR / name).read_bytes()
        if name.endswith(".gz"):
            assert hashlib.sha256(data).hexdigest() == entry["gzip_sha256"]
            data = gzip.decompress(data)
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
    assert sorted(p.name for p in VENDOR.iterdir()) == sorted(
        [*info["files"], "LICENSE", "VERSION.json"]
    )


def test_detector_copy_runs_at_any_size_and_matches_opencv():
    import cv2
    import onnxruntime as ort

    from agegender.vision.detect import YuNetDetector
    from agegender.vision.images import decode_rgb

    session = ort.InferenceSession(detector_bytes(), providers=["CPUExecutionProvider"])
    bgr = cv2.cvtColor(decode_rgb(ASTRONAUT), cv2.COLOR_RGB2BGR)  # 512 x 512
    x = bgr.astype(np.float32).transpose(2, 0, 1)[None]
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))
    assert out["cls_8"].shape == (1, 64 * 64, 1)  # 512 / 8 squared: not 640's 6400
    best = YuNetDetector(refine=0)._run(bgr)[:, 14].max()
    all_scores = [
        np.sqrt(np.clip(out[f"cls_{s}"], 0, 1) * np.clip(out[f"obj_{s}"], 0, 1)).max()
        for s in (8, 16, 32)
    ]
    assert max(all_scores) == pytest.approx(best, abs=1e-4)


def test_write_site_refuses_a_foreign_folder_and_replaces_its_own(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SiteError, match="not empty"):
        write_site(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SiteError, match="not a folder"):
        write_site(tmp_path / "file")
    out = write_site(tmp_path / "site")
    (out / "stale.txt").write_text("old")
    assert write_site(out) == out and not (out / "stale.txt").exists()
    assert (out / MARKER).is_file()
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"index.html", "app.js", "models/yunet.onnx", "models/model.onnx"} <= names
    cfg = json.loads((out / "models/model.json").read_text())
    assert cfg["data_config"]["input_size"] == [1, 128, 128] and cfg["tta"] is False
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(SiteError, match="bundled name"):
        write_site(tmp_path / "other", model="nonesuch")
    assert not (tmp_path / "other").exists()
    assert model_file("accurate").name == "accurate.int8.onnx"


def test_the_page_names_local_files_only():
    from agegender.serve.site import ASSETS, SHARED_FILES

    html = (SITE / "index.html").read_text() + (SITE / "app.js").read_text()
    html += "".join((ASSETS / name).read_text() for name in SHARED_FILES)
    assert "http://" not in html and "https://" not in html and "//cdn" not in html


# --------------------------------------------------------------------------- in Chromium


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def site_url(tmp_path_factory):
    """The site written to a temporary folder, served by ``python -m http.server``."""
    out = write_site(tmp_path_factory.mktemp("site") / "site")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=out,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.kill()
        server.wait()


def _webcam_frames(n: int = 20) -> list[np.ndarray]:
    """The astronaut drifting right then back, 640x480 RGB."""
    rgb = np.asarray(Image.open(ASTRONAUT).convert("RGB").resize((480, 480)))
    frames = []
    for k in range(n):
        frame = np.full((480, 640, 3), 128, np.uint8)
        dx = 40 + 4 * (k if k < n // 2 else n - k)
        frame[:, dx : dx + 480] = rgb
        frames.append(frame)
    return frames


def _webcam_video(path: Path) -> Path:
    """A Y4M clip of :func:`_webcam_frames`: Chromium's fake webcam plays it in a loop."""
    with path.open("wb") as f:
        f.write(b"YUV4MPEG2 W640 H480 F10:1 Ip A1:1 C420jpeg\n")
        for frame in _webcam_frames():
            ycc = np.asarray(Image.fromarray(frame).convert("YCbCr"), np.float64)
            # the browser reads the clip as video does, in limited range (Y 16-235, C 16-240)
            y = 16 + ycc[..., 0] * 219 / 255
            chroma = [
                128 + (ycc[..., c].reshape(240, 2, 320, 2).mean((1, 3)) - 128) * 224 / 255
                for c in (1, 2)
            ]
            f.write(b"FRAME\n" + y.round().astype(np.uint8).tobytes())
            f.write(b"".join(c.round().astype(np.uint8).tobytes() for c in chroma))
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1000,1400")
    # a webcam that plays a clip, allowed without asking
    clip = _webcam_video(tmp_path_factory.mktemp("webcam") / "astronaut.y4m")
    for arg in ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"):
        options.add_argument(arg)
    options.add_argument(f"--use-file-for-fake-video-capture={clip}")
    # the system driver, given explicitly, so selenium never tries to download one
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def _run_page(driver, url: str, photo: Path, aligned: bool = False) -> tuple[list[dict], dict]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 60).until(
        # window.agegender exists once the page's script has run: a wait may come before
        lambda d: d.execute_script(
            "return window.agegender && (window.agegender.ready || window.agegender.error)"
        )
    )
    assert driver.execute_script("return window.agegender.error") is None
    driver.execute_script("window.agegender.lastResult = null")
    if aligned:
        driver.find_element(By.ID, "aligned").click()
    driver.find_element(By.ID, "file").send_keys(str(photo))
    WebDriverWait(driver, 120).until(
        lambda d: d.execute_script("return window.agegender.lastResult !== null")
    )
    return driver.execute_script(
        "return [window.agegender.lastResult, window.agegender.lastTiming]"
    )


def _iou(a, b) -> float:
    from agegender.vision.detect import iou

    return float(iou(np.array([a], float), np.array([b], float))[0, 0])


def _compare(page: list[dict], expected: list) -> list[tuple[float, float]]:
    """Pairs the page's faces with the package's by box; asserts they agree."""
    assert len(page) == len(expected)
    ages = []
    for face in expected:
        centre = np.array([(face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2])
        mine = min(
            page,
            key=lambda f: np.hypot(
                *(centre - [(f["box"][0] + f["box"][2]) / 2, (f["box"][1] + f["box"][3]) / 2])
            ),
        )
        # the package also looks on the photo turned by +-45 degrees and keeps the best-scoring
        # box of each face; the page looks upright only: the same face, a box a little off
        assert _iou(mine["box"], face.box) > 0.75
        assert mine["gender"] == face.gender
        assert abs(mine["age"] - face.age) < 3
        assert mine["score"] == pytest.approx(face.score, abs=0.1)
        assert mine["age_interval"][0] <= mine["age"] <= mine["age_interval"][1]
        ages.append((face.age, mine["age"]))
    return ages


def _local_only(driver, url: str) -> None:
    """Every request the page made went to ``url``'s origin."""
    origin = "/".join(url.split("/")[:3]) + "/"
    names = driver.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name)"
    )
    assert names and [n for n in names if not n.startswith(origin)] == []


def _report(name: str, ages: list, timing: dict) -> None:
    pairs = ", ".join(f"{py:.1f}/{js:.1f}" for py, js in ages)
    print(
        f"\n{name}: ages python/browser {pairs}; "
        f"total {timing['total_ms']:.0f} ms ({timing['per_face_ms']:.0f} ms a face), "
        f"JS {timing['js_ms']:.0f} ms, wasm {timing['wasm_ms']:.0f} ms "
        f"in {timing['detector_runs']} detector runs + model "
        f"{timing['model_ms']:.0f} ms ({timing['model_per_face_ms']:.1f} ms a face)"
    )


@pytest.mark.slow
def test_page_agrees_with_the_package_on_the_astronaut(browser, site_url, tmp_path):
    from agegender import Predictor

    photo = tmp_path / "astronaut.jpg"
    shutil.copyfile(ASTRONAUT, photo)
    page, timing = _run_page(browser, site_url, photo)
    ages = _compare(page, Predictor.load().predict(ASTRONAUT))
    _local_only(browser, site_url)
    browser.save_screenshot("/tmp/agegender_site_astronaut.png")
    _report("astronaut", ages, timing)


@pytest.mark.slow
def test_page_skips_detection_for_a_cropped_face(browser, site_url, tmp_path):
    from agegender import Predictor

    photo = tmp_path / "face.png"  # PNG: the same pixels in both decoders
    Image.open(ASTRONAUT).crop((150, 40, 300, 190)).save(photo)
    page, _ = _run_page(browser, site_url, photo, aligned=True)
    (expected,) = Predictor.load().predict(photo, aligned=True)
    assert len(page) == 1 and page[0]["box"] == [0, 0, 150, 150] and page[0]["score"] == 1
    # int8 kernels differ between wasm and x86: up to ~3 years on a face far from UTKFace framing
    assert page[0]["gender"] == expected.gender and abs(page[0]["age"] - expected.age) < 3


@pytest.mark.slow
def test_page_agrees_with_the_package_on_a_group_photo(browser, site_url, tmp_path):
    from agegender import Predictor
    from agegender.vision.images import decode_rgb

    if not SHARED_UTKFACE.is_dir():
        pytest.skip(f"real UTKFace not found at {SHARED_UTKFACE}")
    files = sorted(SHARED_UTKFACE.glob("*.jpg"))
    # the six faces of test_predict's group photo, as a PNG: the same pixels in both decoders
    canvas, _ = collage([decode_rgb(files[(i * 1531) % len(files)]) for i in range(6)])
    photo = tmp_path / "group.png"
    Image.fromarray(canvas).save(photo)
    page, timing = _run_page(browser, site_url, photo)
    expected = Predictor.load().predict(photo)
    assert len(expected) == 6
    ages = _compare(page, expected)
    _local_only(browser, site_url)
    browser.save_screenshot("/tmp/agegender_site_group.png")
    _report("group of six", ages, timing)


@pytest.mark.slow
def test_webcam_live_tracks_one_person(browser, site_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from agegender import Predictor

    browser.get(site_url)
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return window.agegender.ready"))
    browser.find_element(By.ID, "camera").click()
    WebDriverWait(browser, 20).until(
        lambda d: d.execute_script("return document.getElementById('video').videoWidth > 0")
    )
    browser.find_element(By.ID, "live").click()
    seen = []
    deadline = time.monotonic() + 60
    while len(seen) < 12 and time.monotonic() < deadline:
        result = browser.execute_script("return window.agegender.lastResult")
        if result:
            seen.append(result)
        time.sleep(0.2)
    browser.save_screenshot("/tmp/agegender_site_webcam.png")
    browser.find_element(By.ID, "live").click()
    browser.find_element(By.ID, "camera").click()
    assert len(seen) >= 12
    assert {len(r) for r in seen} == {1} and {r[0]["track"] for r in seen} == {1}
    # the package on the clip's frames, with the detector it uses for video (yunet-fast)
    predictor = Predictor.load(detector="yunet-fast")
    expected = [predictor.predict(f)[0] for f in _webcam_frames()]
    age = float(np.mean([f.age for f in expected]))
    assert seen[-1][0]["gender"] == expected[0].gender
    # per frame, yunet-fast's ages spread over 25-32 on this clip; the pools must agree
    assert abs(seen[-1][0]["age"] - age) < 3
    print(
        f"\nwebcam: track #1 over {len(seen)} polls, pooled age {seen[-1][0]['age']:.1f} "
        f"(python, mean over the clip's frames: {age:.1f})"
    )


@pytest.mark.slow
def test_the_served_pages_private_switch_uploads_nothing(browser, tmp_path):
    """``agegender serve`` mounts the site at /private/ (its content security policy allows
    WebAssembly), the main page links to it, and a photo analysed there never reaches the
    service's API: the service sees no /api/ request."""
    import threading

    import uvicorn
    from selenium.webdriver.common.by import By

    from agegender import Predictor
    from agegender.serve.app import create_app

    predictor = Predictor.load()
    app = create_app(predictor=predictor)
    paths: list[str] = []

    @app.middleware("http")
    async def record(request, call_next):
        paths.append(request.url.path)
        return await call_next(request)

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        browser.get(f"http://127.0.0.1:{port}/")
        browser.find_element(By.CSS_SELECTOR, "a[href='private/']").click()
        url = f"http://127.0.0.1:{port}/private/"
        assert browser.current_url == url
        photo = tmp_path / "astronaut.jpg"
        shutil.copyfile(ASTRONAUT, photo)
        page, _ = _run_page(browser, url, photo)
        _compare(page, predictor.predict(ASTRONAUT))
        _local_only(browser, url)
        assert any(p.startswith("/private/") for p in paths)
        assert not [p for p in paths if p.startswith("/api/")], paths
    finally:
        server.should_exit = True
        thread.join(10)
