"""The web service: every status the API promises, through FastAPI's TestClient and a live
uvicorn server, and the page in a real headless Chromium when the Debian packages are there."""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
import time

import hypothesis
import numpy as np
import pytest
import schemathesis
from conftest import bomb_png
from fastapi.testclient import TestClient
from PIL import Image
from schemathesis.specs.openapi.checks import positive_data_acceptance

from agegender.inference.model_files import bundled
from agegender.inference.predictor import ASTRONAUT, Predictor
from agegender.serve.app import create_app, decode_upload, uvicorn_config
from agegender.serve.uploads import ServiceLimits

LOCAL = "http://127.0.0.1:8000"  # a client of the default loopback service


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load("default", threads=2)


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor=predictor), base_url=LOCAL) as c:
        yield c


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def face_crop(request) -> bytes:
    """A 200x200 aligned face: a real UTKFace crop when ../shared is there, else the astronaut's
    face cut from the bundled photo."""
    try:
        utk = request.getfixturevalue("utkface_dir")
        return next(utk.glob("*.jpg")).read_bytes()
    except pytest.skip.Exception:
        img = Image.open(ASTRONAUT).crop((150, 40, 350, 240))
        return encode(img)


def post(client, data: bytes, name: str = "x.jpg", **form) -> object:
    return client.post("/api/predict", files={"image": (name, data)}, data=form)


def test_health_page_and_docs(client, predictor):
    health = client.get("/health").json()
    assert health["status"] == "ok"
    sidecar = json.loads(bundled("default").with_suffix(".json").read_text())
    assert health["model"] == sidecar["model"]["name"]  # the bundled default's own network
    assert health["input"] == {"size": 128, "color": "gray"}
    assert health["device"] == "cpu"
    assert health["spin"] is predictor.backend.spin  # the shared predictor's own setting
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # no CDN: the page, and the two files it shares with the private page, work offline
    assert "https://" not in page.text and "//cdn" not in page.text
    for name, kind in (("faces.css", "text/css"), ("faces.js", "text/javascript")):
        assert f'"/assets/{name}"' in page.text
        asset = client.get(f"/assets/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert "https://" not in asset.text
    assert client.get("/assets/index.html").status_code == 404  # those two only
    assert 'id="file"' in page.text and "getUserMedia" in page.text
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/predict", "/api/predict/batch", "/health"} <= set(paths)


def test_predict_photo(client):
    r = post(client, ASTRONAUT.read_bytes(), "astronaut.jpg")
    assert r.status_code == 200, r.text
    body = r.json()
    w, h = Image.open(ASTRONAUT).size
    assert (body["width"], body["height"]) == (w, h)
    assert body["ms"] > 0
    (face,) = body["faces"]
    assert set(face) == {"box", "score", "age", "age_interval", "gender", "p_female"}
    x0, y0, x1, y1 = face["box"]
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert face["age_interval"][0] <= face["age"] <= face["age_interval"][1]
    assert face["gender"] in ("male", "female")


def test_predict_aligned_crop_and_formats(client, predictor, request):
    data = face_crop(request)
    img = Image.open(io.BytesIO(data))
    for fmt in ("JPEG", "PNG", "WEBP"):
        r = post(client, encode(img, fmt), f"face.{fmt.lower()}", aligned="true")
        assert r.status_code == 200, (fmt, r.text)
        (face,) = r.json()["faces"]
        assert face["box"] == [0, 0, 200, 200] and face["score"] == 1.0
    # the same file gives the same answer as the Python API (and `predict --aligned`)
    (face,) = post(client, data, aligned="true").json()["faces"]
    assert face == predictor.predict(data, aligned=True)[0].to_dict()
    r = post(client, data[: len(data) // 2], aligned="true")
    assert r.status_code == 422 and "corrupt image" in r.json()["detail"]


def _no_face(size=(320, 240)) -> Image.Image:
    """A picture with no face in it: a gradient with a little noise."""
    w, h = size
    grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
    noise = np.random.default_rng(0).normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(grad + noise, 0, 255).astype(np.uint8))


def test_no_face_is_an_empty_list(client):
    r = post(client, encode(_no_face()))
    assert r.status_code == 200 and r.json()["faces"] == []


def test_an_image_that_decodes_to_nothing_is_refused(client):
    # what a JPEG cut short decodes to: its header's size, the rest filled with flat grey
    full = encode(Image.fromarray(np.asarray(_no_face((900, 700)))), "JPEG")
    r = post(client, full[: len(full) // 12])
    assert (r.status_code == 422 and "one flat colour" in r.json()["detail"]) or "corrupt" in r.text
    blank = encode(Image.new("RGB", (320, 240), (128, 128, 128)))
    r = post(client, blank)
    assert r.status_code == 422 and "one flat colour" in r.json()["detail"]


@pytest.mark.parametrize(
    "case, status, words",
    [
        ("text", 415, "not an image"),
        ("gif", 415, "unsupported image format GIF"),
        ("truncated", 422, "corrupt image"),
        ("empty", 422, "empty file"),
        ("bomb", 422, "decompression bomb"),
    ],
)
def test_bad_uploads(client, tmp_path, case, status, words):
    if case == "text":
        data = b"hello, this is not an image\n" * 10
    elif case == "gif":
        data = encode(Image.new("RGB", (64, 64)), "GIF")
    elif case == "truncated":
        data = ASTRONAUT.read_bytes()[:5000]
    elif case == "empty":
        data = b""
    else:
        bomb_png(tmp_path / "bomb.png", side=100_000)
        data = (tmp_path / "bomb.png").read_bytes()
    r = post(client, data)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert words in detail and "Traceback" not in detail and "\n" not in detail


def test_missing_field_is_422(client):
    r = client.post("/api/predict", data={"aligned": "true"})
    assert r.status_code == 422


def test_limits(predictor):
    app = create_app(predictor=predictor, max_upload_mb=0.02, max_pixels=100 * 100, max_batch=2)
    big = ASTRONAUT.read_bytes()  # ~ 30 kB > 20 kB
    assert len(big) > 20_000
    small = encode(Image.new("RGB", (150, 150)))
    with TestClient(app, base_url=LOCAL) as c:
        r = post(c, big)
        assert r.status_code == 413 and "upload too large" in r.json()["detail"]
        r = post(c, small)
        assert r.status_code == 422 and "too many pixels: 150x150" in r.json()["detail"]

        # a body without Content-Length (chunked) is counted as it streams in
        def chunks():
            yield b"--b\r\nContent-Disposition: form-data; name=image; filename=x.jpg\r\n\r\n"
            for _ in range(120):  # past the 20 kB limit and the 64 kB of slack
                yield b"\0" * 1000

        r = c.post(
            "/api/predict",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert r.status_code == 413, r.text
        files = [("images", (f"{i}.png", encode(Image.new("L", (8, 8)), "PNG"))) for i in range(3)]
        r = c.post("/api/predict/batch", files=files)
        assert r.status_code == 413 and "at most 2" in r.json()["detail"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--workers", "0"], "workers must be 1-256, got 0 (--request-threads)"),
        (["--queue", "-1"], "queue must be 0-100000, got -1 (--queue)"),
        (["--max-upload-mb", "0"], "max_upload_mb must be 0.001-4096, got 0.0 (--max-upload-mb)"),
        (["--max-upload-mb", "nan"], "max_upload_mb must be 0.001-4096, got nan (--max-upload-mb)"),
        (
            ["--max-upload-mb", "1e308"],
            "max_upload_mb must be 0.001-4096, got 1e+308 (--max-upload-mb)",
        ),
        (
            ["--max-upload-mb", "1e-7"],
            "max_upload_mb must be 0.001-4096, got 1e-07 (--max-upload-mb)",
        ),
        (
            ["--max-video-mb", "inf"],
            "max_video_mb must be 0.01-1e+06, got inf (--max-video-mb)",
        ),
        (["--port", "99999"], "port must be 0-65535 (0: any free port), got 99999"),
        (["--port", "-1"], "port must be 0-65535 (0: any free port), got -1"),
    ],
)
def test_serve_cli_bad_options_are_one_line(capsys, args, words):
    from agegender.cli.main import main

    assert main(["serve", *args]) == 2
    out, err = capsys.readouterr()
    assert err == f"agegender serve: error: {words}\n" and out == ""


def test_serve_cli_port_in_use_is_refused_before_announcing(capsys):
    from agegender.cli.main import main

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert err == f"agegender serve: error: port {port} is in use: pick another with --port\n"
    assert "serving on" not in out


def test_create_app_bad_limits_are_config_errors(predictor):
    from agegender.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"max_batch must be 1-10000, got 0 \(--max-batch\)"):
        create_app(predictor=predictor, max_batch=0)
    with pytest.raises(ConfigError, match="unknown service setting 'max_fces'"):
        create_app(predictor=predictor, max_fces=3)
    with pytest.raises(ConfigError, match="max_faces must be"):
        ServiceLimits(max_faces=True)  # a bool is no count


def test_batch_answers_an_oversized_file_in_its_own_result(predictor):
    app = create_app(predictor=predictor, max_upload_mb=0.02, max_batch=3)
    big = ASTRONAUT.read_bytes()  # ~ 30 kB > 20 kB
    small = encode(_no_face((100, 100)), "JPEG")  # a few kB, under the limit
    files = [("images", (n, d)) for n, d in [("a.png", small), ("big.jpg", big), ("b.png", small)]]
    with TestClient(app, base_url=LOCAL) as c:
        r = c.post("/api/predict/batch", files=files)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["status"] for x in results] == [200, 413, 200]
        assert "upload too large" in results[1]["error"] and results[1]["faces"] == []
        assert results[0]["error"] is None and results[2]["faces"] == []
        # only a request over max_batch files' worth in total is refused whole
        r = c.post("/api/predict/batch", files=[("images", ("x.jpg", b"\0" * 200_000))])
        assert r.status_code == 413 and "per request" in r.json()["detail"]


def test_batch_reports_each_image(client):
    files = [
        ("images", ("astronaut.jpg", ASTRONAUT.read_bytes())),
        ("images", ("notes.txt", b"not an image at all")),
        ("images", ("blank.png", encode(_no_face((100, 100)), "PNG"))),
    ]
    r = client.post("/api/predict/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["astronaut.jpg", "notes.txt", "blank.png"]
    assert [x["status"] for x in results] == [200, 415, 200]
    assert len(results[0]["faces"]) == 1 and results[0]["error"] is None
    assert "not an image" in results[1]["error"]
    assert results[2]["faces"] == []


def test_decode_upload_applies_exif(tmp_path):
    img = Image.new("RGB", (60, 40), (200, 10, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert decode_upload(buf.getvalue()).shape == (60, 40, 3)


# ------------------------------------------------------------------------- a live server


class _Slow:
    """A predictor stand-in whose batches wait for a signal: makes the queue fill up."""

    def __init__(self, real: Predictor) -> None:
        self.real, self.release, self.started = real, threading.Event(), threading.Event()
        self.meta, self.backend, self.checkpoint = real.meta, real.backend, real.checkpoint
        self.size, self.color, self.tta = real.size, real.color, real.tta
        self.batches: list[int] = []

    def locate_all(self, images, aligned=False):
        self.batches.append(len(images))
        self.started.set()
        self.release.wait(30)
        return self.real.locate_all(images, aligned)

    def finish(self, located):
        return self.real.finish(located)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", self.port, "warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def test_queue_batches_then_answers_503_and_health_stays_responsive(predictor):
    import httpx

    slow = _Slow(predictor)
    app = create_app(predictor=slow, workers=1, queue=2)
    files = {"image": ("a.jpg", ASTRONAUT.read_bytes())}
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        results: list[int] = []

        def call():
            results.append(http.post("/api/predict", files=files).status_code)

        threads = [threading.Thread(target=call) for _ in range(3)]  # one runs, two wait
        threads[0].start()
        assert slow.started.wait(10)
        for t in threads[1:]:
            t.start()
        deadline = time.monotonic() + 10
        while http.get("/health").json()["in_flight"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        start = time.perf_counter()
        health = http.get("/health")
        assert health.status_code == 200 and time.perf_counter() - start < 1.0
        busy = http.post("/api/predict", files=files)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert "busy" in busy.json()["detail"]
        slow.release.set()
        for t in threads:
            t.join(30)
        assert results == [200, 200, 200]
        assert slow.batches == [1, 2]  # the two that waited went through the network together


# ------------------------------------------------------------------ a real browser (Chromium)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian chromium + chromium-driver")
def test_page_in_headless_chromium(predictor, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=390,844")  # a phone-sized screen
    # the system driver, given explicitly, so selenium never tries to download one
    service = Service(executable_path=CHROMEDRIVER)
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(ASTRONAUT.read_bytes())
    with LiveServer(create_app(predictor=predictor)) as server:
        driver = webdriver.Chrome(options=options, service=service)
        try:
            driver.get(server.url + "/")
            assert driver.title == "agegender"
            driver.find_element(By.ID, "file").send_keys(str(photo))
            cell = WebDriverWait(driver, 30).until(
                ec.visibility_of_element_located((By.CSS_SELECTOR, "#faces td.label"))
            )
            expected = predictor.predict(ASTRONAUT)[0].label()
            assert cell.text == expected
            assert "1 face in" in driver.find_element(By.ID, "status").text
            canvas = driver.find_element(By.ID, "canvas")
            assert canvas.is_displayed() and int(canvas.get_attribute("width")) > 0
            # the page fits the phone's width: no horizontal scrolling
            assert driver.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth"
            )
        finally:
            driver.quit()


def test_batcher_never_strands_an_upload():
    """Uploads submitted in many orders, also right as the previous answer arrives, each get
    their own answer, and none waits forever."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from agegender.serve.app import _Batcher

    async def main() -> int:
        with ThreadPoolExecutor(1) as pool:
            batcher = _Batcher(lambda items: [len(d) for d, _ in items], pool, 1, 4)

            async def one(k: int) -> int:
                for _ in range(k % 3):
                    await asyncio.sleep(0)  # stagger the arrivals by a few loop turns
                (n,) = await batcher.submit([(b"x" * k, False)])
                return n

            async def chain() -> None:  # each submit right as the previous answer arrives
                for k in range(50):
                    assert await batcher.submit([(b"x" * k, False)]) == [k]

            await asyncio.wait_for(chain(), timeout=10)
            answered = 0
            for round_ in range(200):
                sizes = range(1, 2 + round_ % 7)
                got = await asyncio.wait_for(asyncio.gather(*map(one, sizes)), timeout=10)
                assert got == list(sizes)
                answered += len(got)
            return answered

    assert asyncio.run(main()) == sum(1 + r % 7 for r in range(200))


# --------------------------------------------------------------------------- attacks and abuse


def _raw_post(port: int, path: str, body: bytes, chunked: bool = False) -> tuple[int, dict]:
    """A POST as Python's http.client sends it: the whole body first (no Expect), then read."""
    import http.client

    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"'
        "\r\nContent-Type: image/jpeg\r\n\r\n"
    ).encode()
    data = head + body + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if chunked:
        conn.request(
            "POST",
            path,
            body=iter([data[i : i + 65536] for i in range(0, len(data), 65536)]),
            headers={**headers, "Transfer-Encoding": "chunked"},
            encode_chunked=True,
        )
    else:
        conn.request("POST", path, body=data, headers=headers)
    r = conn.getresponse()
    return r.status, json.loads(r.read())


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_every_client_reads_the_413_of_an_over_limit_upload(predictor, chunked):
    app = create_app(predictor=predictor, max_upload_mb=1)
    with LiveServer(app) as server:
        status, body = _raw_post(server.port, "/api/predict", b"\xff" * 3_000_000, chunked)
        assert status == 413 and "upload too large" in body["detail"]
        # the connection's next request is answered as usual
        status, body = _raw_post(server.port, "/api/predict", ASTRONAUT.read_bytes(), chunked)
        assert status == 200 and len(body["faces"]) == 1


def test_pixels_are_budgeted_before_decoding(client):
    # a small PNG that claims 6000 x 6000: refused from its header, at once
    huge = encode(Image.new("L", (6000, 6000), 7), "PNG")
    assert len(huge) < 200_000
    t0 = time.perf_counter()
    r = post(client, huge)
    assert r.status_code == 422 and "too many pixels" in r.json()["detail"]
    assert time.perf_counter() - t0 < 0.5
    # a batch of five 14 MP images: the fifth is past the request's budget of 64 MP
    big = encode(_no_face((4000, 3500)), "JPEG")
    files = [("images", (f"{k}.jpg", big)) for k in range(5)]
    results = client.post("/api/predict/batch", files=files).json()["results"]
    assert [x["status"] for x in results] == [200, 200, 200, 200, 422]
    assert "budget of 64 MP" in results[4]["error"]


def test_only_the_services_own_host_names_are_answered(predictor):
    with TestClient(create_app(predictor=predictor), base_url=LOCAL) as c:
        r = c.get("/health", headers={"Host": "attacker.example"})  # DNS rebinding
        assert r.status_code == 400 and "unknown host 'attacker.example'" in r.json()["detail"]
        assert c.get("/health", headers={"Host": "localhost:8000"}).status_code == 200
    app = create_app(predictor=predictor, allow_hosts=("faces.lab",))
    with TestClient(app, base_url="http://faces.lab") as c:
        assert c.get("/health").status_code == 200


def test_a_post_from_another_origin_is_refused(client):
    files = {"image": ("a.jpg", ASTRONAUT.read_bytes())}
    r = client.post("/api/predict", files=files, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    same = client.post("/api/predict", files=files, headers={"Origin": LOCAL})
    assert same.status_code == 200


def test_every_answer_carries_the_security_headers_and_docs_stay_local(client):
    for r in (client.get("/"), client.get("/health"), client.get("/docs"), post(client, b"x")):
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
    docs = client.get("/docs").text
    assert "/api/predict/batch" in docs and "<script" not in docs and "https://" not in docs


def test_an_api_key_guards_the_api(predictor):
    files = {"image": ("a.jpg", ASTRONAUT.read_bytes())}
    with TestClient(create_app(predictor=predictor, api_key="s3cret"), base_url=LOCAL) as c:
        assert c.post("/api/predict", files=files).status_code == 401
        wrong = c.post("/api/predict", files=files, headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 401
        ok = c.post("/api/predict", files=files, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert (
            c.post("/api/predict", files=files, headers={"X-API-Key": "s3cret"}).status_code == 200
        )
        assert c.get("/health").json()["api_key"] is True  # the page asks for the key


def test_half_sent_headers_are_timed_out(predictor):
    with LiveServer(create_app(predictor=predictor, header_timeout_s=0.5)) as server:
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the end
        slow.settimeout(5)
        t0 = time.monotonic()
        assert slow.recv(100) == b""  # closed by the server
        assert time.monotonic() - t0 < 3
        slow.close()


def test_the_schema_documents_every_error(client):
    schema = client.get("/openapi.json").json()
    for path in ("/api/predict", "/api/predict/batch"):
        answers = schema["paths"][path]["post"]["responses"]
        for code in ("200", "400", "401", "403", "413", "415", "422", "503"):
            assert code in answers, (path, code)
        assert answers["413"]["content"]["application/json"]["schema"]["$ref"].endswith("Detail")


@pytest.fixture(scope="module")
def api_schema(predictor):
    # schemathesis calls the app as host "testserver"
    app = create_app(predictor=predictor, allow_hosts=("testserver",))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_the_api_answers_what_its_schema_says(api_schema):
    """A few dozen generated requests per endpoint: no 500, every answer as documented (driven
    through schemathesis's core: its pytest plugin does not load with this pytest)."""
    operations = [op.ok() for op in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/predict", "/api/predict/batch", "/health"}
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=25, deadline=None, suppress_health_check=list(hypothesis.HealthCheck)
        )
        def answers_as_documented(case):
            # "schema-valid data accepted" cannot hold: a schema says "binary", not "a JPEG"
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        answers_as_documented()


# --------------------------------------------------------------------------- video and webcam


def _face_frames(n: int, moving: bool = True) -> list[bytes]:
    """JPEG frames of the bundled photo's face walking over a background."""
    import cv2

    from agegender.data.synthetic import Scene
    from agegender.vision.images import decode_rgb

    face = cv2.resize(decode_rgb(ASTRONAUT.read_bytes())[40:240, 124:324], (200, 200))
    scene = Scene([face], [lambda t: (200 + (200 * t if moving else 0), 180, 120)], frames=n)
    return [encode(Image.fromarray(f)) for f in scene.render()]


def _track(client, data: bytes, session: str):
    return client.post("/api/track", files={"image": ("f.jpg", data)}, data={"session": session})


def test_live_frames_keep_one_track_per_session(client):
    frames = _face_frames(8)
    answers = []
    for data in frames:
        r = _track(client, data, "tab-one-1")
        assert r.status_code == 200
        answers.append(r.json())
    assert [len(a["faces"]) for a in answers] == [1] * 8
    tracks = [a["faces"][0]["track"] for a in answers]
    assert tracks[:2] == [None, None] and set(tracks[2:]) == {tracks[2]}  # a person from frame 3
    last = answers[-1]["faces"][0]
    assert set(last["frame"]) == {"age", "age_interval", "gender", "p_female"}
    assert last["age_interval"][0] < last["age"] < last["age_interval"][1]
    # another tab is another session: its face is not yet a person
    r = _track(client, frames[0], "tab-two-2")
    assert r.json()["faces"][0]["track"] is None


@pytest.mark.parametrize("session", ["short", "no spaces allowed", "x" * 65, "semi;colon1"])
def test_live_session_ids_are_checked(client, session):
    r = client.post("/api/track", files={"image": ("f.jpg", _face_frames(1)[0])},
                    data={"session": session})  # fmt: skip
    assert r.status_code == 422 and "session must be" in r.json()["detail"]


def test_live_sessions_are_bounded(predictor, monkeypatch):
    """The service holds at most MAX_SESSIONS trackers, the least recently used dropped first,
    and forgets one idle for SESSION_IDLE_S."""
    from agegender.serve import video as serve_video

    sessions = serve_video.Sessions(predictor, max_sessions=2, idle_s=60)
    a, b = sessions.get("aaaaaaaa"), sessions.get("bbbbbbbb")
    assert sessions.get("aaaaaaaa") is a  # a used again: b is now the least recent
    sessions.get("cccccccc")
    assert list(sessions.held) == ["aaaaaaaa", "cccccccc"] and sessions.get("bbbbbbbb") is not b
    clock = [time.monotonic()]
    monkeypatch.setattr(serve_video.time, "monotonic", lambda: clock[0])
    sessions.get("dddddddd")
    clock[0] += 61
    sessions.get("eeeeeeee")
    assert list(sessions.held) == ["eeeeeeee"]


def test_video_upload_answers_its_persons(client, tmp_path):
    from agegender.data.synthetic import write_video

    frames = [decode_upload(f) for f in _face_frames(30)]
    clip = write_video(frames, tmp_path / "walk.mp4")
    r = client.post("/api/video", files={"video": ("walk.mp4", clip.read_bytes())},
                    data={"fps": "25"})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["frames"] == 30 and len(body["tracks"]) == 1
    assert {"track", "age", "age_interval", "gender", "p_female", "box"} <= set(body["tracks"][0])


@pytest.mark.parametrize(
    ("data", "form", "status", "words"),
    [
        (b"this is not a video" * 100, {}, 422, "not a video"),
        (b"", {}, 422, "not a video"),
        (None, {"fps": "0"}, 422, "fps must be in"),
        (None, {"fps": "nan"}, 422, "fps must be in"),
    ],
)
def test_bad_video_uploads(client, tmp_path, data, form, status, words):
    if data is None:
        data = b"\x00" * 100
    r = client.post("/api/video", files={"video": ("x.mp4", data)}, data=form)
    assert r.status_code == status and words in r.json()["detail"]


def test_video_limits(predictor, tmp_path):
    from agegender.data.synthetic import write_video

    frames = [decode_upload(f) for f in _face_frames(50, moving=False)]
    clip = write_video(frames, tmp_path / "two_s.mp4").read_bytes()  # 2 s at 25 fps
    app = create_app(predictor=predictor, max_video_mb=len(clip) / 1e6 * 2, max_video_s=1.0)
    with TestClient(app, base_url=LOCAL) as c:
        r = c.post("/api/video", files={"video": ("c.mp4", clip)})
        assert r.status_code == 422 and "the limit is 1 s" in r.json()["detail"]
        r = c.post("/api/video", files={"video": ("c.mp4", clip * 3)})
        assert r.status_code == 413 and "video too large" in r.json()["detail"]


def _y4m(frames: list[np.ndarray], path) -> None:
    """A YUV4MPEG2 file: what Chromium's fake camera plays (in a loop)."""
    import cv2

    h, w = frames[0].shape[:2]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F25:1 Ip A1:1 C420jpeg\n".encode())
        for rgb in frames:
            f.write(b"FRAME\n" + cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).tobytes())


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian chromium + chromium-driver")
def test_page_live_webcam_in_headless_chromium(predictor, tmp_path):
    """The page's webcam mode, with Chromium's fake camera playing a clip of a face: Live
    sends frames to /api/track and labels the person with its track number."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    camera = tmp_path / "camera.y4m"
    _y4m([decode_upload(f) for f in _face_frames(50, moving=False)], camera)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={camera}"):  # fmt: skip
        options.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER)
    with LiveServer(create_app(predictor=predictor)) as server:
        driver = webdriver.Chrome(options=options, service=service)
        try:
            driver.get(server.url + "/")
            driver.find_element(By.ID, "camera").click()
            live = WebDriverWait(driver, 20).until(ec.element_to_be_clickable((By.ID, "live")))
            live.click()

            # The table is redrawn with every frame's answer: read it in one script call, since
            # an element found first and read after may already have been replaced (stale)
            def text(selector: str) -> str:
                return driver.execute_script(
                    "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''",
                    selector,
                )

            WebDriverWait(driver, 60).until(lambda d: text("#faces td.label").startswith("#"))
            assert text("#faces td.label").startswith("#1 ")  # the first person of this session
            assert text("#status").startswith("live: 1 person")
            driver.find_element(By.ID, "live").click()  # stops
            assert driver.find_element(By.ID, "live").text == "Live"
        finally:
            driver.quit()


# ----------------------------------------------------------------------------- hardening


def test_limits_are_one_validated_object():
    limits = ServiceLimits()
    assert limits.replace(max_faces=3).max_faces == 3 and limits.max_faces != 3
    for bad in (float("nan"), float("inf"), 1e308, -1.0):
        with pytest.raises(
            Exception, match=r"^max_upload_mb must be 0\.001-4096, got .* \(--max-upload-mb\)$"
        ):
            ServiceLimits(max_upload_mb=bad)


def _slow_post(port: int, path: str, length: int, first: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
    )
    s.sendall(head.encode() + first)
    return s


def test_a_trickling_body_is_cut_off(predictor, caplog):
    app = create_app(predictor=predictor, body_timeout_s=1.0, min_body_kbps=1.0)
    with LiveServer(app) as server, caplog.at_level("INFO"):
        slow = _slow_post(server.port, "/api/predict", 100_000, b"--b\r\n")
        t0 = time.monotonic()
        slow.settimeout(0.5)
        closed = False
        while time.monotonic() - t0 < 8 and not closed:
            try:
                slow.sendall(b"x")  # a byte every half second: far under 1 kB/s
                closed = slow.recv(100) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
        slow.close()
        assert closed and time.monotonic() - t0 < 4
        # a body that keeps up is not cut: the service still answers at once
        status, _ = _raw_post(server.port, "/api/predict", ASTRONAUT.read_bytes())
        assert status == 200
    # one warning, no traceback, for the connection cut off
    assert not any(r.exc_info for r in caplog.records)
    assert [r.levelname for r in caplog.records if r.name == "agegender.serve"] == ["WARNING"]


def _posted(port: int, image: bytes) -> socket.socket:
    """A connection that has sent a whole /api/predict request and waits for its answer."""
    body = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n--b--\r\n"
    )
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(
        b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
        b"boundary=b\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    return s


def test_connections_are_capped_with_a_503_and_a_bounded_log(predictor, caplog):
    """Connections doing work fill the slots: one more is answered 503, logged once."""
    slow = _Slow(predictor)
    app = create_app(predictor=slow, max_connections=2, header_timeout_s=30)
    with LiveServer(app) as server:
        held = [_posted(server.port, ASTRONAUT.read_bytes()) for _ in range(2)]
        assert slow.started.wait(20)
        time.sleep(1.5)  # past the grace after which a silent connection could be evicted
        with caplog.at_level("WARNING", logger="agegender.serve"):
            for _ in range(10):
                extra = socket.create_connection(("127.0.0.1", server.port))
                extra.settimeout(5)
                answer = b""
                while chunk := extra.recv(4096):
                    answer += chunk
                extra.close()
                assert answer.startswith(b"HTTP/1.1 503 ") and b"--max-connections" in answer
                assert b"x-frame-options: DENY" in answer
        refused = [r for r in caplog.records if r.name == "agegender.serve"]
        assert len(refused) == 1 and not any(r.exc_info for r in caplog.records)
        slow.release.set()
        for s in held:
            s.settimeout(20)
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
            s.close()
        time.sleep(0.2)
        with httpx_client(server) as http:
            assert http.get("/health").status_code == 200


def test_connections_that_send_nothing_make_room_for_new_ones(predictor, caplog):
    """Slow-loris clients (headers or a body trickling in) hold every slot: a new connection
    closes the one sending least, so /health still answers."""
    app = create_app(predictor=predictor, max_connections=3, header_timeout_s=30)
    with LiveServer(app) as server:
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        trickle = socket.create_connection(("127.0.0.1", server.port))
        trickle.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/"
            b"form-data; boundary=b\r\nContent-Length: 1000000\r\n\r\n-"
        )
        time.sleep(1.5)
        with caplog.at_level("WARNING", logger="agegender.serve"), httpx_client(server) as http:
            for _ in range(3):
                assert http.get("/health", headers={"connection": "close"}).status_code == 200
        assert any("slowest connection" in r.getMessage() for r in caplog.records)
        for s in (*silent, trickle):
            s.close()


def httpx_client(server):
    import httpx

    return httpx.Client(base_url=server.url, timeout=30)


class _Broken(_Slow):
    def locate_all(self, images, aligned=False):
        raise RuntimeError("a bug")


def test_a_500_carries_the_security_headers(predictor):
    app = create_app(predictor=_Broken(predictor))
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as c:
        r = post(c, ASTRONAUT.read_bytes())
        assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(
    "origin", ["http://127.0.0.1:9999", "https://127.0.0.1:8000", "http://127.0.0.1"]
)
def test_the_origin_must_match_scheme_host_and_port(client, origin):
    files = {"image": ("a.jpg", ASTRONAUT.read_bytes())}
    r = client.post("/api/predict", files=files, headers={"Origin": origin})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]


def test_an_allowed_origin_may_post(predictor):
    app = create_app(predictor=predictor, allow_origins=("https://app.example",))
    files = {"image": ("a.jpg", ASTRONAUT.read_bytes())}
    with TestClient(app, base_url=LOCAL) as c:
        ok = c.post("/api/predict", files=files, headers={"Origin": "https://app.example:443"})
        assert ok.status_code == 200
        r = c.post("/api/predict", files=files, headers={"Origin": "http://app.example"})
        assert r.status_code == 403


def test_a_refused_post_is_read_by_every_client(predictor):
    app = create_app(predictor=predictor, api_key="s3cret")
    with LiveServer(app) as server:
        # http.client sends all of its 3 MB before reading: the 401 must still reach it
        status, body = _raw_post(server.port, "/api/predict", b"\xff" * 3_000_000)
        assert status == 401 and "API key" in body["detail"]


def test_api_keys_are_utf8_and_bearer_is_case_insensitive(predictor):
    key = "clé-ü-s3cret"
    files = {"image": ("a.jpg", ASTRONAUT.read_bytes())}
    with TestClient(create_app(predictor=predictor, api_key=key), base_url=LOCAL) as c:
        for given in [
            b"Bearer " + key.encode(),
            b"bearer " + key.encode(),
            b"BEARER  " + key.encode(),
        ]:
            r = c.post("/api/predict", files=files, headers={"Authorization": given})
            assert r.status_code == 200, given
        r = c.post("/api/predict", files=files, headers={"X-API-Key": key.encode()})
        assert r.status_code == 200
        wrong = c.post("/api/predict", files=files, headers={"Authorization": key.encode()})
        assert wrong.status_code == 401  # no scheme


def test_head_answers_on_the_page_and_health(client):
    for path in ("/", "/health"):
        r = client.head(path)
        assert r.status_code == 200 and r.content == b"", path
        assert r.headers["x-frame-options"] == "DENY"


def test_faces_per_image_are_capped_and_the_answer_says_so(predictor):
    one = Image.open(ASTRONAUT)
    two = Image.new("RGB", (one.width * 2, one.height))
    two.paste(one, (0, 0))
    two.paste(one, (one.width, 0))
    data = encode(two)
    with TestClient(create_app(predictor=predictor, max_faces=1), base_url=LOCAL) as c:
        body = post(c, data).json()
        assert len(body["faces"]) == 1 and body["faces_left_out"] == 1
        body = post(c, ASTRONAUT.read_bytes()).json()
        assert len(body["faces"]) == 1 and body["faces_left_out"] == 0
    assert len(predictor.predict(data)) == 2


def test_a_truncated_png_is_a_422_even_in_a_batch(client):
    rng = np.random.default_rng(0)
    full = encode(Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)), "PNG")
    cut = full[: len(full) // 2]
    r = post(client, cut, "cut.png")
    assert r.status_code == 422 and "\n" not in r.json()["detail"]
    files = [("images", ("a.jpg", ASTRONAUT.read_bytes())), ("images", ("cut.png", cut))]
    results = client.post("/api/predict/batch", files=files).json()["results"]
    assert [x["status"] for x in results] == [200, 422] and len(results[0]["faces"]) == 1


def test_uploads_are_booked_before_their_bodies_are_read(predictor):
    """Memory: a request's Content-Length is booked against --max-buffered-mb before its body
    is read; a batch that would not fit is answered 503 at once."""
    import httpx

    slow = _Slow(predictor)
    app = create_app(predictor=slow, max_upload_mb=1, max_batch=2, max_buffered_mb=3)
    junk = ("images", ("junk.jpg", b"\xff" * 1_500_000))  # its own 413, but it is in the body
    files = [("images", ("a.jpg", ASTRONAUT.read_bytes())), junk]
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        first: list = []
        t = threading.Thread(
            target=lambda: first.append(http.post("/api/predict/batch", files=files))
        )
        t.start()
        assert slow.started.wait(10)
        r = http.post("/api/predict/batch", files=files)
        assert r.status_code == 503 and "--max-buffered-mb" in r.json()["detail"]
        assert r.headers["retry-after"] == "1"
        slow.release.set()
        t.join(30)
        assert [x["status"] for x in first[0].json()["results"]] == [200, 413]


def test_a_video_is_budgeted_in_pixels_times_frames(client, predictor, tmp_path):
    from agegender.data.synthetic import write_video

    frames = [decode_upload(f) for f in _face_frames(10, moving=False)]
    clip = write_video(frames, tmp_path / "c.mp4").read_bytes()
    body = client.post("/api/video", files={"video": ("c.mp4", clip)}, data={"fps": "25"}).json()
    h, w = frames[0].shape[:2]
    assert body["cost"] == {"pixel_frames": 10 * w * h, "max_pixel_frames": 2_000_000_000}
    app = create_app(predictor=predictor, max_video_pixels=5 * w * h)
    with TestClient(app, base_url=LOCAL) as c:
        r = c.post("/api/video", files={"video": ("c.mp4", clip)}, data={"fps": "25"})
        assert r.status_code == 422 and "--max-video-pixels" in r.json()["detail"]


def test_a_still_image_is_not_a_video_and_slow_clips_keep_their_rate(client, tmp_path):
    from agegender.data.synthetic import write_video
    from agegender.inference.tracking import sampled

    r = client.post("/api/video", files={"video": ("a.mp4", ASTRONAUT.read_bytes())})
    assert r.status_code == 422 and "a single image, not a video" in r.json()["detail"]
    frames = [decode_upload(f) for f in _face_frames(4, moving=False)]
    clip = write_video(frames, tmp_path / "slow.mp4", fps=0.5)
    got, rate = sampled(clip, None)
    assert rate == pytest.approx(0.5) and [f.time_s for f in got] == pytest.approx([0, 2, 4, 6])
