"""The console in a real browser: Debian's headless Chromium, driven by Playwright,
against the running stack (API, worker, Redis, PostgreSQL, S3)."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator

import pytest
from PIL import Image, ImageStat
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.support.stack import Stack

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium as root, offline (the machine's closed network refuses its own calls).
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()


# Every page records what its Content-Security-Policy refused (the console and the
# docs must run under it: no inline script or style, images only from where allowed).
RECORD_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`);
});
"""


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    context.add_init_script(RECORD_VIOLATIONS)
    tab = context.new_page()
    refused: list[str] = []
    tab.on(
        "console",
        lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None,
    )
    tab.goto(stack.base_url + "/")
    yield tab
    refused.extend(tab.evaluate("() => window.cspViolations || []"))
    context.close()
    assert not refused, refused


def sign_in(page: Page, key: str) -> None:
    page.fill("#key", key)
    page.click("#sign-in button[type=submit]")


def test_a_wrong_key_is_refused_and_never_put_in_the_url(page: Page) -> None:
    sign_in(page, "sk-not-a-key")
    expect(page.locator("#sign-in-error")).to_have_text("That key was not accepted.")
    assert "sk-not-a-key" not in page.url


def test_sign_in_generate_and_see_the_image_appear(page: Page, stack: Stack) -> None:
    sign_in(page, stack.key_a)
    expect(page.locator("#jobs-table")).to_be_visible()
    assert stack.key_a not in page.url
    page.click("nav >> text=Generate")
    page.select_option("#gen-model", "procedural")
    page.fill("#gen-prompt", "a console lighthouse")
    page.fill("#gen-size", "256x256")
    page.click("#generate button[type=submit]")
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=30_000)
    image = page.locator(".images img").first
    expect(image).to_be_visible()
    # Predicates as functions: an expression string is eval-ed in the page, which its
    # Content-Security-Policy refuses.
    page.wait_for_function("() => document.querySelector('.images img').naturalWidth > 0")
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [256, 256]
    # The new job is listed, with its thumbnail.
    page.click("nav >> text=Jobs")
    row = page.locator("#jobs-table tbody tr").first
    expect(row.locator(".status")).to_have_text("succeeded")
    page.wait_for_function(
        "() => document.querySelector('#jobs-table tbody tr img.thumb').naturalWidth > 0"
    )


def test_a_batch_shows_its_progress_to_the_end(page: Page, stack: Stack) -> None:
    with stack.client() as client:
        batch = client.post(
            "/v1/images/batches",
            json={
                "model": "fake-fast",
                "size": "64x64",
                "prompts": [f"console batch {i} [slow=0.5]" for i in range(6)],
            },
        ).json()
    sign_in(page, stack.key_a)
    expect(page.locator("#jobs-table")).to_be_visible()
    page.click("nav >> text=Batches")
    bar = page.locator(f"progress[data-batch-id='{batch['id']}']")
    expect(bar).to_be_visible()
    row = page.locator(f"tr[data-batch-id='{batch['id']}']")
    expect(row.locator(".status")).to_have_text("completed", timeout=60_000)
    assert bar.evaluate("b => [b.value, b.max]") == [6, 6]
    expect(row.locator(".counts")).to_have_text(" 6 done, 0 failed of 6")
    # The batch's own page: each line with its prompt, status and image.
    row.locator(f"a[href='#/batches/{batch['id']}']").click()
    lines = page.locator("#lines-table tbody tr")
    expect(lines).to_have_count(6)
    expect(lines.first.locator(".status")).to_have_text("succeeded")
    assert lines.first.locator("td").nth(3).inner_text() == "console batch 0 [slow=0.5]"
    page.wait_for_function(
        "() => document.querySelector('#lines-table img.thumb').naturalWidth > 0"
    )
    expect(page.locator("#cancel-batch")).to_have_count(0)  # nothing left to cancel


def test_a_running_job_is_cancelled_from_its_page(page: Page, stack: Stack) -> None:
    job = stack.submit("a long one [slow=30]", model="fake-fast")
    sign_in(page, stack.key_a)
    expect(page.locator("#jobs-table")).to_be_visible()
    page.goto(f"{stack.base_url}/#/jobs/{job['id']}")
    page.click("#cancel-job")
    expect(page.locator("#job-status")).to_have_text("canceled", timeout=10_000)
    with stack.client() as client:
        assert client.get(f"/v1/images/jobs/{job['id']}").json()["status"] == "canceled"
    # Then deleted from the same page (issue 29): asked to confirm, back to the list.
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete-job")
    expect(page.locator("#jobs-table")).to_be_visible()
    with stack.client() as client:
        assert client.get(f"/v1/images/jobs/{job['id']}").status_code == 404


def test_the_jobs_list_pages_back_to_older_jobs(page: Page, stack: Stack) -> None:
    """A page of jobs that never finish (a queue no worker consumes) still pages back:
    live rows must not hold every connection the browser allows a host."""
    with stack.client() as client:
        ids = [
            client.post(
                "/v1/images/generations",
                headers={"Prefer": "respond-async"},
                json={"model": "parked", "prompt": f"page {i}", "size": "64x64"},
            ).json()["id"]
            for i in range(31)
        ]
        first_pages: list[str] = []
        page.on(
            "request",
            lambda r: first_pages.append(r.url) if r.url.endswith("/jobs?limit=30") else None,
        )
        try:
            sign_in(page, stack.key_a)
            rows = page.locator("#jobs-table tbody tr")
            expect(rows).to_have_count(30)
            page.click("button.more")
            expect(rows.nth(30)).to_be_visible()
            shown = rows.evaluate_all("rows => rows.map(r => r.dataset.jobId)")
            assert len(shown) == len(set(shown)) > 30  # the next page, not the first again
            # Signing in draws the list once: a second draw (the hash change routing
            # again) wiped the older page under load.
            assert len(first_pages) == 1
        finally:
            for job_id in ids:
                client.post(f"/v1/images/jobs/{job_id}/cancel").raise_for_status()


def test_the_pages_render(page: Page, stack: Stack) -> None:
    with stack.client() as client:
        client.post(
            "/v1/images/generations",
            json={"model": "procedural", "prompt": "for the chart", "size": "64x64"},
        ).raise_for_status()
    sign_in(page, stack.key_a)
    expect(page.locator("#jobs-table")).to_be_visible()
    page.click("nav >> text=Usage")
    expect(page.locator("#usage-chart")).to_be_visible()
    # What the project stores now (its images at least), against its quota (none).
    storage = page.locator("#storage")
    expect(storage).to_contain_text("(no quota)")
    assert int(storage.get_attribute("data-bytes") or 0) > 0
    # Per day and model: a bar segment and a legend entry for each model used.
    legend = page.locator("#usage-legend li").all_inner_texts()
    assert "procedural" in legend
    models = page.locator("#usage-chart rect").evaluate_all("rs => rs.map(r => r.dataset.model)")
    assert set(models) == set(legend)
    # each model's segment is drawn in its own colour
    fills = page.locator("#usage-chart rect").evaluate_all(
        "rs => rs.map(r => r.dataset.model + '=' + getComputedStyle(r).fill)"
    )
    assert len({f.split("=")[1] for f in fills}) == len(legend)
    # Cost per day and model, and the budgets (issue 26): alpha has none, its spend shows.
    expect(page.locator("#usage-table th").last).to_have_text("cost (USD)")
    day = page.locator('#budgets-table tr[data-scope="project"][data-period="day"] td')
    expect(day.nth(2)).to_have_text("none")
    expect(day.nth(3)).to_have_text("$0.0000")
    expect(page.locator("#budgets-table tbody tr")).to_have_count(2)
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("L")
    assert shot.width == 1200
    # Rendered, not blank: the header bar, text and chart give the page contrast.
    assert ImageStat.Stat(shot).stddev[0] > 20


def test_the_docs_run_under_the_content_security_policy(page: Page, stack: Stack) -> None:
    """Swagger UI at /docs, started from our own script file (no inline script);
    the fixture fails the test on any violation the page reported."""
    with page.expect_response(lambda r: r.url.endswith("/openapi.json")):
        answer = page.goto(stack.base_url + "/docs")
    assert answer is not None
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    # Swagger UI ran (its React tree drawn into the page) and read the document.
    expect(page.locator("#swagger-ui .swagger-ui")).to_be_visible()
    page.wait_for_load_state("networkidle")


def test_the_console_answers_with_the_security_headers(page: Page, stack: Stack) -> None:
    answer = page.goto(stack.base_url + "/")
    assert answer is not None
    policy = answer.headers["content-security-policy"]
    assert "default-src 'self'" in policy
    # The thumbnails' presigned URLs name the S3 endpoint: images from there allowed.
    assert f"img-src 'self' data: {stack.env['IMAGEGEN_S3_ENDPOINT_URL']};" in policy
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["referrer-policy"] == "no-referrer"
