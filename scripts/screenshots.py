"""Screenshots of the web page for the README: docs/web-chat.png, web-compare.png, web-adapters.png, web-runs.png.

    bash scripts/demo.sh                 # once: the demo's tiny pretrained RWKV-4 and its prepared data (out/demo/)
    python scripts/screenshots.py        # headless Chromium (Debian's chromium + chromium-driver) over a live server

It trains two LoRA-only adapters from the demo's base (recipes, fables; kept in out/web-shots/runs, reused on the
next call), serves the base and both with `rwkv-lora serve`'s app on 127.0.0.1 (uploads and training on), starts a
third run from the page's form so that the runs view shows one training, chats, compares, and saves one PNG per view.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's finetune, wherever the script is started from

from finetune.serve.app import create_app  # noqa: E402
from finetune.serve.config import ServeConfig  # noqa: E402

DEMO = ROOT / "out" / "demo"
TOKENIZER = ROOT / "data" / "demo-tokenizer" / "tokenizer.json"
# (name, data, validation data): the demo recipe with LoRA only (the server plugs adapters in per request, so it
# serves no adapter that trains tensors in full)
ADAPTERS = (("recipes", "recipes.json", "recipes-val.json"), ("fables", "fables.json", "fables-val.json"))


def train_adapters(runs: Path) -> dict[str, str]:
    out = {}
    for name, data, val in ADAPTERS:
        run = runs / name
        if not (run / "final").is_dir():
            subprocess.run([sys.executable, "-m", "finetune.cli", "train", "--config", "recipes/demo.yaml",
                            f"--out_dir={run}", f"--data={DEMO / data}", f"--val_data={DEMO / val}",
                            "--lora.train=[]", "--max_steps=150", "--val_every=25", "--save_every=0"],
                           cwd=ROOT, check=True)
        out[name] = str(run / "final")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs"), help="where the PNGs go (default docs/)")
    ap.add_argument("--work", default=str(ROOT / "out" / "web-shots"), help="runs and uploads (default out/web-shots)")
    args = ap.parse_args()
    if not (DEMO / "pretrained.pth").is_file():
        print("screenshots: out/demo/pretrained.pth is missing; run bash scripts/demo.sh first", file=sys.stderr)
        return 1
    work = Path(args.work)
    runs = work / "runs"
    (work / "adapters").mkdir(parents=True, exist_ok=True)
    adapters = train_adapters(runs)
    live = runs / "recipes-r32"
    if live.exists():
        print(f"screenshots: {live} exists from an earlier call; move it away first", file=sys.stderr)
        return 1
    config = ServeConfig(model=str(DEMO / "pretrained.pth"), adapters=adapters, tokenizer=str(TOKENIZER),
                         dtype="fp32", runs_dir=str(runs), adapters_dir=str(work / "adapters"), allow_upload=True,
                         allow_train=True, port=free_port())
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=config.port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--hide-scrollbars"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"), options=opts)
    wait = WebDriverWait(driver, 300, poll_frequency=0.1)
    out = Path(args.out)
    try:
        driver.get(f"http://127.0.0.1:{config.port}/#chat")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-model option")) == 3)
        driver.find_element(By.ID, "chat-model").send_keys("recipes")
        for question in ("Mix the flour", "Then what?"):
            driver.find_element(By.ID, "chat-input").send_keys(question)
            driver.find_element(By.ID, "chat-send").click()
            time.sleep(0.3)
            wait.until(lambda d: d.find_element(By.ID, "chat-send").is_enabled())
        driver.save_screenshot(str(out / "web-chat.png"))

        driver.find_element(By.CSS_SELECTOR, "#tabs [data-view=compare]").click()
        prompt = driver.find_element(By.ID, "cmp-prompt")
        prompt.clear()
        prompt.send_keys("The fox")
        driver.find_element(By.ID, "cmp-run").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".column.done")) == 3)
        driver.save_screenshot(str(out / "web-compare.png"))

        driver.find_element(By.CSS_SELECTOR, "#tabs [data-view=adapters]").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .adapter")) == 2)
        driver.save_screenshot(str(out / "web-adapters.png"))

        driver.find_element(By.CSS_SELECTOR, "#tabs [data-view=runs]").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#train-recipe option"))
        driver.find_element(By.ID, "train-recipe").send_keys("demo")
        driver.find_element(By.ID, "train-name").send_keys(live.name)
        driver.find_element(By.ID, "train-overrides").send_keys(
            f"data={DEMO / 'recipes.json'}\nval_data={DEMO / 'recipes-val.json'}\nlora.train=[]\nlora.r=32\n"
            "max_steps=400\nval_every=20\nsave_every=0")
        driver.find_element(By.CSS_SELECTOR, "#train-form button").click()
        # a few validation points in, while it trains (the table refreshes every 3 s)
        # the table is redrawn every 3 s: read it in the page (an element found here may be gone a moment later)
        row = f"tr[data-run='{live.name}']"
        cell = f"const r = document.querySelector(\"{row}\"); return r ? r.children[%d].textContent : '';"
        wait.until(lambda d: int(d.execute_script(cell % 2).split(" / ")[0] or 0) >= 60)
        time.sleep(3.5)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(out / "web-runs.png"))
        driver.execute_script(f"document.querySelector(\"{row} button.stop\").click()")  # SIGTERM
        wait.until(lambda d: d.execute_script(cell % 1) == "stopped")
    finally:
        driver.quit()
        server.should_exit = True
    print(f"saved: {', '.join(str(out / f'web-{v}.png') for v in ('chat', 'compare', 'adapters', 'runs'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
