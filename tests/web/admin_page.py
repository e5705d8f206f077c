#!/usr/bin/env python3
"""The operator's web page in headless Chromium (selenium), as
tests/tests/web.rs runs it against a node: logs in with the admin token,
checks the page's sections, adds a user through the form, checks that it
is listed, and saves a screenshot.

    admin_page.py --url http://IP:PORT --token TOKEN --add ADDRESS \
        --screenshot OUT.png [--chromium PATH] [--chromedriver PATH] [--profile DIR]

Exits non-zero, with the reason, on the first check that fails.
"""

import argparse
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait


def fail(why):
    print(f"FAILED: {why}", file=sys.stderr)
    sys.exit(1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--add", required=True, help="the address of the user to add")
    p.add_argument("--password", default="web page password")
    p.add_argument("--screenshot", required=True)
    p.add_argument("--chromium")
    p.add_argument("--chromedriver")
    p.add_argument("--profile", help="Chromium's profile directory")
    a = p.parse_args()

    opts = webdriver.ChromeOptions()
    if a.chromium:
        opts.binary_location = a.chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1700", "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    if a.profile:
        opts.add_argument(f"--user-data-dir={a.profile}")
    service = Service(executable_path=a.chromedriver) if a.chromedriver else Service()
    driver = webdriver.Chrome(service=service, options=opts)
    try:
        wait = WebDriverWait(driver, 20)
        base = a.url.rstrip("/")
        driver.get(base + "/")
        # Not logged in: the login form, with its field `token`.
        token = wait.until(EC.presence_of_element_located((By.NAME, "token")))
        token.send_keys(a.token)
        driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button[type=submit]").click()
        wait.until(EC.presence_of_element_located((By.ID, "cluster")))
        for section in ("cluster", "queue", "activity", "domains", "users", "settings"):
            if not driver.find_elements(By.ID, section):
                fail(f"no section #{section} on the page")
        if a.token in driver.current_url:
            fail("the token is in the URL")
        cookies = {c["name"]: c for c in driver.get_cookies()}
        session = cookies.get("quill_session")
        if not session:
            fail(f"no session cookie: {sorted(cookies)}")
        if not session.get("httpOnly") or session.get("sameSite") != "Strict":
            fail(f"session cookie not HttpOnly and SameSite=Strict: {session}")

        # Add a user through the form.
        form = driver.find_element(By.ID, "add-user")
        form.find_element(By.NAME, "address").send_keys(a.add)
        form.find_element(By.NAME, "password").send_keys(a.password)
        form.find_element(By.NAME, "quota").send_keys("2GiB")
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        flash = wait.until(EC.presence_of_element_located((By.ID, "flash")))
        if f"user {a.add} added" not in flash.text:
            fail(f"the page said: {flash.text!r}")
        listed = [r.find_element(By.TAG_NAME, "td").text for r in driver.find_elements(By.CSS_SELECTOR, "tr.user")]
        if a.add not in listed:
            fail(f"{a.add} is not listed: {listed}")
        if a.token in driver.current_url or a.token in driver.page_source:
            fail("the token is in the URL or the page")
        driver.save_screenshot(a.screenshot)
        print(f"ok: logged in, {len(listed)} users listed, {a.add} added, screenshot {a.screenshot}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
