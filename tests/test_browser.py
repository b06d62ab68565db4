"""The web page in headless Chromium against a real uvicorn server on loopback."""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from catalog_fixtures import model_ranking, save_tiny_checkpoint, write_catalog

CATEGORIES = ["Shirts", "Jeans"]


def write_catalog_table(folder: Path, photos: list[Path]) -> Path:
    """A catalog CSV giving each photo a category and attributes: what the page filters on."""
    import csv
    import json

    table = folder / "catalog.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "item_id", "category", "attributes"])
        for i, photo in enumerate(photos):
            attributes = {"colour": ["red", "blue", "green"][i % 3], "sleeve": "long" if i < 5 else "short",
                          "baseColour": "Navy Blue" if i % 2 else "White"}
            writer.writerow([photo.name, photo.stem, CATEGORIES[i % 2], json.dumps(attributes)])
    return table

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="needs Debian chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)"),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """uvicorn on 127.0.0.1 in a thread, serving an ASEN index of 10 photos."""
    import uvicorn

    from fashion_retrieval.index.build import build_index
    from fashion_retrieval.serve.app import create_app
    from fashion_retrieval.serve.embedders import TorchEmbedder

    root = tmp_path_factory.mktemp("browser")
    checkpoint = save_tiny_checkpoint(root / "run", "asen")
    photos = write_catalog(root / "catalog", 10)
    build_index(checkpoint, write_catalog_table(root / "catalog", photos), root / "index", progress=False)
    app = create_app(root / "index", TorchEmbedder(root / "index" / "model"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", checkpoint, photos
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def result_ids(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#results li')].map(li => li.dataset.id)")


def test_upload_search_and_switch_attribute(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, checkpoint, photos = server
    wait = WebDriverWait(browser, 30)
    browser.get(url + "/")
    wait.until(lambda d: "10 items" in d.find_element(By.ID, "status").text)
    options = [(o.text, o.get_attribute("value")) for o in Select(browser.find_element(By.ID, "attribute")).options]
    assert options == [("Colour", "colour"), ("Sleeve", "sleeve")]  # human labels, names sent

    query = photos[4]
    browser.find_element(By.ID, "file").send_keys(str(query))
    wait.until(lambda d: len(result_ids(d)) == 10)
    by_colour = result_ids(browser)
    assert by_colour == model_ranking(checkpoint, query, photos, "colour")
    # every result picture came from /items/<id>/image and decoded in the browser
    wait.until(lambda d: d.execute_script(
        "const imgs = [...document.querySelectorAll('#results img')];"
        "return imgs.length === 10 && imgs.every(i => i.complete && i.naturalWidth > 0)"))
    assert "same colour" in browser.find_element(By.ID, "summary").text

    Select(browser.find_element(By.ID, "attribute")).select_by_visible_text("Sleeve")
    wait.until(lambda d: result_ids(d) != by_colour and len(result_ids(d)) == 10)
    assert result_ids(browser) == model_ranking(checkpoint, query, photos, "sleeve")
    assert "same sleeve" in browser.find_element(By.ID, "summary").text

    screenshot = tmp_path / "search-page.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    if os.environ.get("FASHION_SCREENSHOT_DIR"):  # keep it for a person to look at
        shutil.copy(screenshot, Path(os.environ["FASHION_SCREENSHOT_DIR"]) / screenshot.name)


def filter_select(driver, field: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    return Select(driver.find_element(By.CSS_SELECTOR, f'#filter-fields select[data-field="{field}"]'))


def test_filters_narrow_the_results_and_cards_show_attributes(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, checkpoint, photos = server
    wait = WebDriverWait(browser, 30)
    browser.get(url + "/")
    wait.until(lambda d: "10 items" in d.find_element(By.ID, "status").text)
    fields = browser.execute_script(
        "return [...document.querySelectorAll('#filter-fields label')].map(l => l.firstChild.textContent.trim())")
    assert fields == ["Category", "Base colour", "Colour", "Sleeve"]  # domain has one value: no choice to make
    assert [o.text for o in filter_select(browser, "category").options] == ["any", "Jeans (5)", "Shirts (5)"]

    query = photos[3]
    browser.find_element(By.ID, "file").send_keys(str(query))
    wait.until(lambda d: len(result_ids(d)) == 10)
    filter_select(browser, "category").select_by_value("Shirts")
    shirts = [p.stem for i, p in enumerate(photos) if CATEGORIES[i % 2] == "Shirts"]
    ranking = [s for s in model_ranking(checkpoint, query, photos, "colour") if s in shirts]
    wait.until(lambda d: result_ids(d) == ranking)
    assert "among Category: Shirts" in browser.find_element(By.ID, "summary").text

    filter_select(browser, "baseColour").select_by_value("Navy Blue")  # a value with a space
    navy = [p.stem for i, p in enumerate(photos) if i % 2]
    wait.until(lambda d: result_ids(d) == [s for s in ranking if s in navy])  # Shirts are even: none is Navy Blue
    assert result_ids(browser) == []
    filter_select(browser, "category").select_by_value("")
    wait.until(lambda d: result_ids(d) == [s for s in model_ranking(checkpoint, query, photos, "colour") if s in navy])

    # the attribute switch keeps the filters
    Select(browser.find_element(By.ID, "attribute")).select_by_value("sleeve")
    wait.until(lambda d: result_ids(d) == [s for s in model_ranking(checkpoint, query, photos, "sleeve") if s in navy])

    card = browser.execute_script("""
        const li = document.querySelector('#results li');
        const score = li.querySelector('.score');
        return {terms: [...li.querySelectorAll('dt')].map(e => e.textContent),
                values: [...li.querySelectorAll('dd')].map(e => e.textContent),
                compared: [...li.querySelectorAll('dt.compared')].map(e => e.textContent),
                score: score.textContent, band: score.dataset.band, colour: getComputedStyle(score).backgroundColor,
                legend: [...document.querySelectorAll('#bands li')].map(e => e.textContent)};""")
    first = photos[[p.stem for p in photos].index(result_ids(browser)[0])]
    index = photos.index(first)
    assert card["terms"] == ["Category", "Colour", "Sleeve", "Base colour"]
    assert card["values"] == [CATEGORIES[index % 2], ["red", "blue", "green"][index % 3],
                              "long" if index < 5 else "short", "Navy Blue"]
    assert card["compared"] == ["Sleeve"]
    score = float(card["score"].split()[0])
    expected_band = ("near-identical" if score >= 0.9 else "very similar" if score >= 0.75 else
                     "similar" if score >= 0.5 else "weakly similar")
    assert card["band"] == expected_band and expected_band in card["score"]
    assert card["colour"] not in ("rgba(0, 0, 0, 0)", "transparent")
    assert card["legend"][0] == "0.90–1.00: near-identical" and card["legend"][-1] == "below 0.50: weakly similar"


def test_a_refused_upload_shows_the_error(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, _ = server
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a photo")
    browser.get(url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "items" in d.find_element(By.ID, "status").text)
    browser.find_element(By.ID, "file").send_keys(str(not_an_image))
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "not an image" in browser.find_element(By.ID, "error").text
    assert result_ids(browser) == []
