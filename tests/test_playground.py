"""The playground page (GET /, tdm/serve/playground.html) driven in headless chromium with selenium, against a
real Serve app on the session's Ray cluster: the page generates what the API generates, and shows the
server's errors. Needs Debian's chromium and chromium-driver (.ci/run installs them); without them the
tests fail, saying so."""
import base64
import io
import os
import shutil
import time

import pytest
import requests
from conftest import free_port
from PIL import Image
from test_serve import MODEL, _student_version

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def chrome(width: int = 1100, height: int = 900):
    """A headless chromium through the system chromedriver (selenium-manager never downloads one)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found: install Debian's chromium and chromium-driver "
                           "(apt-get install chromium chromium-driver; .ci/run does)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def open_page(driver, url: str, model_id: str, timeout: float = 60):
    """Load the playground and wait until it shows the served model (and so can generate)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/")
    WebDriverWait(driver, timeout).until(lambda d: d.find_element("id", "model").text.startswith(model_id)
                                         and d.find_element("id", "generate").is_enabled())


def fill(driver, prompt: str, steps: int | None = None, seed: int | None = None, n: int | None = None,
         size: str | None = None):
    """Fill the form; seed None leaves it empty (random), n None leaves it as it is (hidden for a video model)."""
    from selenium.webdriver.support.ui import Select

    for field, value in (("prompt", prompt), ("seed", seed)) + ((("n", n),) if n is not None else ()):
        el = driver.find_element("id", field)
        el.clear()
        if value is not None:
            el.send_keys(str(value))
    if steps is not None:
        Select(driver.find_element("id", "steps")).select_by_value(str(steps))
    if size is not None:
        Select(driver.find_element("id", "size")).select_by_value(size)


def wait_for_images(driver, count: int, timeout: float = 120) -> list:
    """The <img>s in #results once `count` of them have loaded."""
    from selenium.webdriver.support.ui import WebDriverWait

    def loaded(d):
        imgs = d.find_elements("css selector", "#results img")
        ok = len(imgs) == count and all(d.execute_script("return arguments[0].complete && "
                                                         "arguments[0].naturalWidth > 0", i) for i in imgs)
        return imgs if ok else False

    return WebDriverWait(driver, timeout).until(loaded)


def decode_data_url(src: str) -> Image.Image:
    head, _, b64 = src.partition(",")
    assert head == "data:image/png;base64", head
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


@pytest.fixture(scope="module")
def playground(ray_cluster, tdm_home, tiny_toy_dir, tmp_path_factory):
    from ray import serve

    from tdm.serve import build_app

    v = _student_version(tmp_path_factory.mktemp("playground"), 7, tiny_toy_dir)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model_uri": f"models:/{MODEL}/{v.version}", "poll_interval_s": 0, "max_batch_size": 4,
                         "upscale_factors": [1, 4]}), name="playground", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while requests.get(f"{url}/healthz", timeout=30).status_code != 200:
        assert time.time() < deadline, "the playground app did not become healthy"
        time.sleep(1)
    yield {"url": url, "id": f"{MODEL}/{v.version}", "uri": f"models:/{MODEL}/{v.version}"}
    serve.delete("playground")
    serve.shutdown()


@pytest.fixture(scope="module")
def browser():
    try:
        driver = chrome()
    except RuntimeError as e:      # no chromium here: a failure that says what to install, never a skip
        pytest.fail(str(e), pytrace=False)
    yield driver
    driver.quit()


def test_the_page_generates_what_the_api_generates(playground, browser):
    from selenium.webdriver.support.ui import Select

    url, model_id = playground["url"], playground["id"]
    open_page(browser, url, model_id)
    steps = Select(browser.find_element("id", "steps"))
    assert [o.get_attribute("value") for o in steps.options] == ["1", "2", "4"]
    assert steps.first_selected_option.get_attribute("value") == "4"          # the model's default_steps
    assert [o.text for o in Select(browser.find_element("id", "size")).options] == ["8x8", "32x32"]

    fill(browser, "a handwritten digit 3", steps=2, seed=123, size="32x32")
    browser.find_element("id", "generate").click()
    [img] = wait_for_images(browser, 1)
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img) == [32, 32]
    shown = decode_data_url(browser.execute_script("return arguments[0].src", img))

    r = requests.post(f"{url}/v1/images/generations", json={"prompt": "a handwritten digit 3", "steps": 2,
                                                            "seed": 123, "size": "32x32"}, timeout=60)
    assert r.status_code == 200, r.text
    direct = decode_data_url("data:image/png;base64," + r.json()["data"][0]["b64_json"])
    assert shown.size == direct.size == (32, 32) and shown.tobytes() == direct.tobytes()

    # what made it: the response's model and seed, next to the image and in the status line
    status = browser.find_element("id", "status").text
    assert model_id in status and "seed 123" in status and status.endswith(" s"), status
    assert browser.find_element("css selector", "#results figcaption").text == f"{model_id}\nseed 123"
    assert not browser.find_element("id", "error").is_displayed()
    assert browser.find_element("id", "generate").is_enabled()


def test_the_page_shows_the_servers_error(playground, browser):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url = playground["url"]
    open_page(browser, url, playground["id"])
    expected = requests.post(f"{url}/v1/images/generations", json={"prompt": "   "}, timeout=60).json()
    fill(browser, "   ")
    browser.find_element("id", "prompt").send_keys(Keys.CONTROL, Keys.ENTER)      # Ctrl+Enter submits
    error = browser.find_element("id", "error")
    WebDriverWait(browser, 60).until(lambda _: error.is_displayed())
    assert error.text == expected["error"]["message"] == "prompt: must not be empty"
    assert browser.find_elements("css selector", "#results img") == []
    assert browser.find_element("id", "status").text == ""
    WebDriverWait(browser, 10).until(lambda d: d.find_element("id", "generate").is_enabled())


def test_the_page_asks_for_and_sends_the_api_key(playground, browser, tmp_path_factory):
    from ray import serve
    from selenium.webdriver.support.ui import WebDriverWait

    from tdm.serve import build_app

    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text("pg-key-1\n")
    serve.run(build_app({"model_uri": playground["uri"], "poll_interval_s": 0, "api_keys_file": str(keys)}),
              name="playground-keyed", route_prefix="/keyed")
    try:
        url = f"{playground['url']}/keyed"
        deadline = time.time() + 120
        while requests.get(f"{url}/healthz", timeout=30).status_code != 200:      # open without a key
            assert time.time() < deadline, "the keyed app did not become healthy"
            time.sleep(1)
        expected = requests.get(f"{url}/v1/models", timeout=10)
        assert expected.status_code == 401, expected.text
        browser.get(f"{playground['url']}/")
        browser.execute_script("sessionStorage.clear()")
        browser.get(f"{url}/")
        error = browser.find_element("id", "error")
        WebDriverWait(browser, 60).until(lambda _: error.is_displayed())
        assert error.text == expected.json()["error"]["message"]
        assert browser.switch_to.active_element.get_attribute("id") == "api-key"
        assert not browser.find_element("id", "generate").is_enabled()
        browser.find_element("id", "api-key").send_keys("pg-key-1")
        browser.find_element("id", "prompt").click()          # the key field's change event reloads the model
        WebDriverWait(browser, 60).until(lambda d: d.find_element("id", "model").text == playground["id"])
        assert not error.is_displayed()
        fill(browser, "a handwritten digit 1", seed=5)
        browser.find_element("id", "generate").click()
        wait_for_images(browser, 1)
        assert browser.execute_script("return sessionStorage.getItem('tdm-api-key')") == "pg-key-1"
        assert "pg-key" not in browser.current_url
    finally:
        serve.delete("playground-keyed")
