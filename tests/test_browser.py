"""The supervisor page in a real headless Chromium against a real `fsrecrypt serve`.

Never skipped: tests/support/browser_setup.sh installs Debian's chromium,
its chromedriver and selenium when they are missing. The browser signs in
with an API key (and, in the second test, with a bearer token from the
platform), plays a recording through a signed URL in a plain <audio>,
seeks to the middle (which makes Chromium send a Range request for bytes it
has not fetched) and keeps playing; the access log then shows the stream rows
with their byte ranges.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.support.jwks import AUDIENCE, ISSUER, Issuer, JwksServer
from tests.web.test_web_server import ingest, make_setup, serve

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
RATE = 8000
SECONDS = 20 * 60  # long enough that Chromium cannot have buffered the middle before the seek


def long_wav(seconds: int, rate: int = RATE) -> bytes:
    import struct

    n = seconds * rate * 2
    pattern = bytes((i * 31 + (i >> 3)) & 0xFF for i in range(4096))
    samples = (pattern * (n // len(pattern) + 1))[:n]
    header = b"RIFF" + struct.pack("<I", 36 + n) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    header += b"data" + struct.pack("<I", n)
    return header + samples


@pytest.fixture(scope="module")
def browser_tools() -> None:
    subprocess.run(["bash", str(ROOT / "tests" / "support" / "browser_setup.sh")], check=True)


def _driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-dev-shm-usage",
        "--mute-audio",
        "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow
def test_supervisor_signs_in_plays_and_seeks(browser_tools, pg_dsn: str, tmp_path: Path) -> None:
    services, cfg, tenant, key = make_setup(tmp_path, pg_dsn, pipeline={"frame_size": 65536})
    data = long_wav(SECONDS)
    rid = ingest(services, tmp_path, tenant, data)
    size = len(data)
    log_path = tmp_path / "serve.log"
    with serve(cfg, log_path) as base:
        driver = _driver(tmp_path / "chromium-profile")
        try:
            from selenium.webdriver.common.by import By

            driver.set_page_load_timeout(30)
            driver.get(base + "/")
            driver.find_element(By.ID, "apikey").send_keys(key)
            driver.find_element(By.ID, "signin-button").click()
            _wait(
                lambda: driver.find_elements(By.CSS_SELECTOR, f'tr[data-recording-id="{rid}"]'),
                20,
                "the recording to be listed",
            )
            who = driver.find_element(By.ID, "who").text
            assert tenant in who and "supervisor@example.com" in who
            stored = driver.execute_script("return sessionStorage.getItem('fsrecrypt.apiKey')")
            assert stored == key
            row = driver.find_element(By.CSS_SELECTOR, f'tr[data-recording-id="{rid}"]')
            row.find_element(By.CSS_SELECTOR, "button.play").click()

            def audio(expr: str):
                return driver.execute_script(f"const a = document.getElementById('player'); {expr}")

            _wait(lambda: audio("return a.currentTime") > 0.5, 30, "playback to start")
            src = audio("return a.currentSrc")
            assert "/stream?" in src and "sig=" in src and key not in src
            assert audio("return a.duration") == pytest.approx(SECONDS, abs=1)
            middle = SECONDS / 2
            audio(f"a.currentTime = {middle};")
            _wait(
                lambda: (
                    audio("return a.currentTime") > middle + 0.5 and not audio("return a.paused")
                ),
                30,
                "playback to continue after the seek",
            )
            assert audio("return a.error") is None
        finally:
            driver.quit()

        # Rows are written when each response ends; quitting the browser ends them.
        def stream_rows():
            rows = services.db.audit_rows(recording_id=rid, action="stream")
            return rows if any(r["details"]["range"]["start"] > size // 4 for r in rows) else None

        rows = _wait(stream_rows, 20, "the seek's stream row in the access log")
    assert all(r["success"] for r in rows)
    assert all(r["details"]["via"] == "signed_url" for r in rows)
    assert all(r["user_id"] == "supervisor@example.com" for r in rows)
    seek_rows = [r for r in rows if r["details"]["range"]["start"] > size // 4]
    seek_start = seek_rows[0]["details"]["range"]["start"]
    assert abs(seek_start - (44 + SECONDS // 2 * RATE * 2)) < size // 10
    assert "Chrome" in (seek_rows[0]["user_agent"] or "")
    issued = services.db.audit_rows(recording_id=rid, action="playback_url")
    assert issued and issued[-1]["success"]
    log = log_path.read_text()
    assert f"/v1/recordings/{rid}/stream" in log and " 206 " in log
    services.close()


@pytest.mark.slow
def test_supervisor_signs_in_with_a_bearer_token_as_well_as_an_api_key(
    browser_tools, pg_dsn: str, tmp_path: Path, issuer: Issuer, jwks_server: JwksServer
) -> None:
    """The platform's token works in the page: typed in, or handed over in the URL fragment.

    The ``serve`` child fetches the token keys from the test's JWKS server over
    HTTP, as it would from the identity provider; the stream rows then name the
    token's subject and issuer, and an API key still signs in after sign-out.
    """
    jwks_server.mode, jwks_server.kids = "ok", list(issuer.private)
    auth = {"jwks_url": jwks_server.url, "issuer": ISSUER, "audience": AUDIENCE}
    services, cfg, tenant, key = make_setup(tmp_path, pg_dsn, auth=auth)
    rid = ingest(services, tmp_path, tenant, long_wav(30))
    token = issuer.token(
        tenant, "ec-1", sub="olivia@platform.example", roles=["listen", "download"]
    )
    with serve(cfg, tmp_path / "serve.log") as base:
        driver = _driver(tmp_path / "chromium-profile")
        try:
            from selenium.webdriver.common.by import By

            def listed():
                rows = driver.find_elements(By.CSS_SELECTOR, f'tr[data-recording-id="{rid}"]')
                return [r for r in rows if r.is_displayed()]

            def audio(expr: str):
                return driver.execute_script(f"const a = document.getElementById('player'); {expr}")

            driver.set_page_load_timeout(30)
            driver.get(base + "/")
            driver.find_element(By.ID, "apikey").send_keys(token)
            driver.find_element(By.ID, "signin-button").click()
            _wait(listed, 20, "the recording to be listed for the token")
            who = driver.find_element(By.ID, "who")
            assert "olivia@platform.example" in who.text and ISSUER in who.text
            assert who.get_attribute("data-via") == "jwt"
            storage = (
                "return [sessionStorage.getItem('fsrecrypt.token'),"
                " sessionStorage.getItem('fsrecrypt.apiKey')]"
            )
            assert driver.execute_script(storage) == [token, None]
            listed()[0].find_element(By.CSS_SELECTOR, "button.play").click()
            _wait(lambda: audio("return a.currentTime") > 0.5, 30, "playback with the token")
            src = audio("return a.currentSrc")
            assert "sig=" in src and "kid=jwt" in src and token not in src
            listed()[0].find_element(By.CSS_SELECTOR, "button.download").click()

            def downloaded():
                rows = services.db.audit_rows(recording_id=rid, action="download")
                return [r for r in rows if r["details"].get("completed")]

            (row,) = _wait(downloaded, 20, "the page's download in the access log")
            assert row["user_id"] == "olivia@platform.example" and row["details"]["via"] == "jwt"
            assert "Downloaded" in driver.find_element(By.ID, "status").text

            driver.find_element(By.ID, "signout").click()
            assert driver.execute_script(storage) == [None, None]
            driver.find_element(By.ID, "apikey").send_keys(key)
            driver.find_element(By.ID, "signin-button").click()
            _wait(listed, 20, "the recording to be listed for the API key")
            assert "supervisor@example.com" in driver.find_element(By.ID, "who").text
            # This key holds listen only: no Download button.
            assert not listed()[0].find_elements(By.CSS_SELECTOR, "button.download")
            assert driver.find_element(By.ID, "who").get_attribute("data-via") == "api_key"

            # A platform opens the page with its token in the fragment: signed in at once,
            # and the token is gone from the address bar.
            driver.find_element(By.ID, "signout").click()
            assert not listed()
            driver.get(base + "/#access_token=" + token)
            _wait(listed, 20, "the recording to be listed after the fragment hand-over")
            assert token not in driver.current_url
            assert "olivia@platform.example" in driver.find_element(By.ID, "who").text
            # The same on a fresh page load (not only a fragment change).
            driver.find_element(By.ID, "signout").click()
            driver.get("about:blank")
            driver.get(base + "/#token=" + token)
            _wait(listed, 20, "the recording to be listed after a fresh load with a token")
            assert token not in driver.current_url
        finally:
            driver.quit()

        def token_rows():
            rows = services.db.audit_rows(recording_id=rid, action="stream")
            return [r for r in rows if r["user_id"] == "olivia@platform.example"] or None

        rows = _wait(token_rows, 20, "the token's stream rows in the access log")
    assert all(r["details"]["issuer"] == ISSUER and r["success"] for r in rows)
    assert all(r["details"]["via"] == "signed_url" for r in rows)
    assert jwks_server.requests >= 1
    services.close()


def test_player_timeline_shows_masked_spans(browser_tools, pg_dsn: str, tmp_path: Path) -> None:
    """The captured dialplan-masked call, ingested with its mask events: the span the
    audio shows (1-3 s of 4 s) is drawn on the timeline; a forged span over tone
    in a second recording is drawn as unverified."""
    import uuid

    from fsrecrypt import pipeline

    services, cfg, tenant, key = make_setup(tmp_path, pg_dsn)
    wav = (ROOT / "tests/fixtures/freeswitch/mask/dialplan_mask.wav").read_bytes()
    start = 1796176435995880
    ids = {}
    for name, (mask_at, unmask_at) in {
        "real": (start + 980_286, start + 2_980_013),
        "forged": (start + 3_100_000, start + 3_800_000),
    }.items():
        path = tmp_path / "recordings" / f"{uuid.uuid4()}.wav"
        path.write_bytes(wav)
        channel = str(uuid.uuid4())
        services.db.mask_session_start("core", channel, str(path), start)
        services.db.mask_mark("core", channel, str(path), "mask", "dialplan", mask_at)
        services.db.mask_mark("core", channel, str(path), "unmask", "dialplan", unmask_at)
        # No RECORD_STOP seen (as for a file the sweep adopts): found by its open session.
        outcome = pipeline.ingest_file(services, str(path), tenant, call_uuid=name)
        ids[name] = outcome.recording.id
    assert services.db.recording(ids["real"]).mask_verified is True
    assert services.db.recording(ids["forged"]).mask_verified is False
    with serve(cfg, tmp_path / "serve.log") as base:
        driver = _driver(tmp_path / "chromium-profile")
        try:
            from selenium.webdriver.common.by import By

            driver.set_page_load_timeout(30)
            driver.get(base + "/")
            driver.find_element(By.ID, "apikey").send_keys(key)
            driver.find_element(By.ID, "signin-button").click()
            rows = {}
            for name, rid in ids.items():
                rows[name] = _wait(
                    lambda rid=rid: driver.find_elements(
                        By.CSS_SELECTOR, f'tr[data-recording-id="{rid}"]'
                    ),
                    20,
                    f"the {name} recording to be listed",
                )[0]
            assert "1 span(s), silent" in rows["real"].text
            assert "NOT verified" in rows["forged"].text

            def spans():
                return driver.execute_script(
                    "return [...document.querySelectorAll('#timeline .mask-span')].map(e => ["
                    "e.className, e.dataset.startMs, e.dataset.endMs, e.style.left, e.style.width,"
                    " e.getBoundingClientRect().width])"
                )

            rows["real"].find_element(By.CSS_SELECTOR, "button.play").click()
            drawn = _wait(spans, 20, "the masked span on the timeline")
            ((cls, start_ms, end_ms, left, width, pixels),) = drawn
            assert cls == "mask-span verified" and (start_ms, end_ms) == ("1000", "3000")
            assert (left, width) == ("25%", "50%") and pixels > 10
            assert "digital silence" in driver.find_element(By.ID, "mask-legend").text
            rows["forged"].find_element(By.CSS_SELECTOR, "button.play").click()
            _wait(lambda: spans() and "unverified" in spans()[0][0], 20, "the forged span")
            ((cls, start_ms, end_ms, left, _w, _p),) = spans()
            assert cls == "mask-span unverified" and (start_ms, end_ms) == ("3100", "3800")
            assert "NOT silent" in driver.find_element(By.ID, "mask-legend").text
        finally:
            driver.quit()
    services.close()
