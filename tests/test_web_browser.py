"""The web page in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium), served by a
live uvicorn on 127.0.0.1 running the real create_app over a tiny random RWKV-4 and two tiny adapters. What the page
shows is checked against what the server answers to plain (non-streamed) requests with the same settings.

Without Chromium the tests are skipped on a developer's machine and fail in CI (env CI set): CI must run them
(scripts/setup.sh installs the browser there)."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from finetune.serve.config import ServeConfig
from finetune.train.main import main
from test_lora import VOCAB, config, make_corpus, pattern_tokens
from test_serve import free_port, live_server
from conftest import random_rwkv4_state_dict, write_checkpoint
from web_helpers import ADAPTERS, TOKENIZER, served_model

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
KEY = "page-key-5678"

if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed in CI (apt-get install chromium chromium-driver; "
                    f"scripts/setup.sh does it)", pytrace=False)
    pytest.skip("no Chromium here (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402  (after the check above: selenium is useless without the browser)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A live server (with an API key) over the tiny base and two adapters, its runs_dir holding one real 2-step run."""
    tmp = tmp_path_factory.mktemp("browser")
    base = served_model(tmp)
    ckpt = write_checkpoint(tmp / "train-base.pth", random_rwkv4_state_dict(2, 32, VOCAB, seed=1))
    data = make_corpus(tmp / "train", pattern_tokens())
    val = make_corpus(tmp / "val", pattern_tokens(20, seed=0))
    main(config(tmp, ckpt, data, out_dir=str(tmp / "runs" / "tiny-run"), max_steps=2, val_data=str(val),
                val_every=1), quiet=True)
    cfg = ServeConfig(model=str(base), adapters={n: str(tmp / n) for n in ADAPTERS}, tokenizer=str(TOKENIZER),
                      dtype="fp32", runs_dir=str(tmp / "runs"), api_key=KEY, port=free_port())
    with live_server(cfg) as url:
        yield url


@pytest.fixture(scope="module")
def browser(server):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)
    try:
        driver.get(server + "/")
        # the key, typed into the page's field, stored in localStorage and sent by every fetch from then on
        assert "API key" in wait(driver, lambda d: d.find_element(By.ID, "notice").text)
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
        wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-model option")) == 3)
        yield driver
    finally:
        driver.quit()


def wait(driver, predicate, timeout: float = 60.0):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(predicate)


def api(server: str, path: str, body: dict) -> dict:
    r = httpx.post(server + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def set_value(driver, element_id: str, value: str) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(value)


def test_chat_streams_the_servers_reply(server, browser):
    d = browser
    d.find_element(By.CSS_SELECTOR, "#tabs [data-view=chat]").click()
    d.find_element(By.ID, "chat-model").send_keys(ADAPTERS[0])
    set_value(d, "chat-temperature", "0")
    set_value(d, "chat-max-tokens", "24")
    # watch the reply grow: a MutationObserver counts the text updates the stream makes
    d.execute_script("window.updates = 0; new MutationObserver(() => window.updates++)"
                     ".observe(document.getElementById('chat-log'), {subtree: true, characterData: true, childList: true});")
    d.find_element(By.ID, "chat-input").send_keys("Hello there")
    d.find_element(By.ID, "chat-send").click()
    wait(d, lambda d: d.find_element(By.ID, "chat-send").is_enabled() and d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    assert not d.find_element(By.ID, "chat-error").is_displayed()
    shown = d.find_element(By.CSS_SELECTOR, ".msg.assistant .text").get_attribute("textContent")
    expected = api(server, "/v1/chat/completions", {"model": ADAPTERS[0], "temperature": 0, "max_tokens": 24,
                                                     "messages": [{"role": "user", "content": "Hello there"}]})
    assert shown and shown == expected["choices"][0]["message"]["content"]
    assert d.execute_script("return window.updates") > 3  # the question, the empty reply, then piece by piece


def test_compare_fills_a_column_per_model(server, browser):
    d = browser
    d.find_element(By.CSS_SELECTOR, "#tabs [data-view=compare]").click()
    ticked = [b.get_attribute("value") for b in d.find_elements(By.CSS_SELECTOR, "#cmp-models input") if b.is_selected()]
    assert len(ticked) == 3 and set(ADAPTERS) < set(ticked)  # the base and both adapters, by default
    set_value(d, "cmp-seed", "7")
    set_value(d, "cmp-max-tokens", "20")
    set_value(d, "cmp-prompt", "Once upon a time")
    d.find_element(By.ID, "cmp-run").click()
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".column.done")) == 3)
    texts = {}
    for col in d.find_elements(By.CSS_SELECTOR, ".column"):
        model = col.get_attribute("data-model")
        texts[model] = col.find_element(By.CSS_SELECTOR, ".gen").get_attribute("textContent")
        expected = api(server, "/v1/completions", {"model": model, "prompt": "Once upon a time", "seed": 7,
                                                   "temperature": 1.0, "top_p": 0.85, "max_tokens": 20})
        assert texts[model] and texts[model] == expected["choices"][0]["text"], model
    assert len(set(texts.values())) == 3  # the same seed, three different models: three different texts


def test_gallery_shows_the_adapters(browser):
    d = browser
    d.find_element(By.CSS_SELECTOR, "#tabs [data-view=adapters]").click()
    cards = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .adapter"))
    assert sorted(c.get_attribute("data-name") for c in cards) == sorted(ADAPTERS)
    assert all("r=4" in c.text and "alpha=8" in c.text for c in cards)
    assert not d.find_element(By.ID, "upload-form").is_displayed()  # uploads are off on this server


def test_runs_view_draws_the_loss_curve(browser):
    d = browser
    d.find_element(By.CSS_SELECTOR, "#tabs [data-view=runs]").click()
    row = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#runs-table tr[data-run=tiny-run]"))[0]
    assert "finished" in row.text and "2 / 2" in row.text
    wait(d, lambda d: d.find_element(By.ID, "run-detail").is_displayed())
    assert not d.find_element(By.ID, "train-form").is_displayed()  # training is off on this server
    # the canvas holds the curves: pixels in the train curve's blue and the validation curve's orange
    counts = d.execute_script("""
        const c = document.getElementById('run-chart'), ctx = c.getContext('2d');
        const px = ctx.getImageData(0, 0, c.width, c.height).data;
        let blue = 0, orange = 0, ink = 0;
        for (let i = 0; i < px.length; i += 4) {
          const [r, g, b] = [px[i], px[i + 1], px[i + 2]];
          if (r < 250 || g < 250 || b < 250) ink++;
          if (Math.abs(r - 0x2f) < 20 && Math.abs(g - 0x6f) < 20 && Math.abs(b - 0xdb) < 20) blue++;
          if (Math.abs(r - 0xd9) < 20 && Math.abs(g - 0x48) < 20 && Math.abs(b - 0x0f) < 20) orange++;
        }
        return [ink, blue, orange];""")
    ink, blue, orange = counts
    assert ink > 2000 and blue > 100 and orange > 30, counts
