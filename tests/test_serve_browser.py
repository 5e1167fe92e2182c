"""`tinylm serve`'s page in a real browser: headless Chromium driven by Playwright.

The browser is the Debian `chromium` package (.ci/run installs it), found on PATH;
Playwright's own browser download is never used. Without the playwright package
or a chromium binary the test is skipped, and says which is missing.

The same steps write the documentation's screenshot from a trained checkpoint:

    python tests/test_serve_browser.py --checkpoint runs/shakespeare-char-cpu \\
        --out docs/img/serve.png
"""

from __future__ import annotations

import shutil
import time

import pytest

import tinylm
from tinylm.serve import Engine, running
from tinylm.tokenizer import CharTokenizer

N_TOKENS = 40  # the selectors used below are the page's public hooks (docs/serve.md)


def drive_page(url: str, screenshot, prompt: str = "the ", seed: int = 1,
               max_new_tokens: int = N_TOKENS, select: int = 7) -> dict:
    """Open the page, generate, click token `select`, save a screenshot; returns
    what the page showed, for the test to check."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root; a container's /dev/shm may be too small for Chromium
        browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 820})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            page.wait_for_function("document.querySelector('#model-info').textContent"
                                   ".includes('parameters')", timeout=10_000)
            page.fill("#prompt", prompt)
            page.fill("#seed", str(seed))
            page.fill("#max_new_tokens", str(max_new_tokens))
            page.click("#generate")
            # tokens stream in; the run is over when Generate is enabled again
            page.wait_for_selector("#output .token", timeout=10_000)
            page.wait_for_function("!document.querySelector('#generate').disabled",
                                   timeout=30_000)
            tokens = page.locator("#output .token")
            probs = [float(p) for p in tokens.evaluate_all(
                "els => els.map(el => el.dataset.prob)")]
            tokens.nth(select).click()
            page.wait_for_selector("#candidates .candidate", timeout=10_000)
            page.wait_for_selector("#attention .row", timeout=10_000)
            shown = {
                "probs": probs,
                "candidates": page.locator("#candidates .candidate").count(),
                "chosen": page.locator("#candidates .candidate.chosen").count(),
                "title": page.text_content("#selected-title"),
                "status": page.text_content("#status"),
                "attention_rows": page.locator("#attention .row").count(),
                "errors": errors,
            }
            page.screenshot(path=str(screenshot))
            return shown
        finally:
            browser.close()


def test_page_generates_and_explains_a_token(tmp_path):
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                      "(pip install -e '.[serve-test]')")
    if shutil.which("chromium") is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    tokenizer = CharTokenizer.train("the quick brown fox jumps over the lazy dog.\n")
    config = tinylm.GPTConfig(vocab_size=tokenizer.vocab_size, context_length=32, d_model=32,
                              n_layers=2, n_heads=4)
    engine = Engine(tinylm.GPT(config, seed=0), tokenizer, source="random tiny GPT")
    start = time.perf_counter()
    with running(engine) as server:
        shown = drive_page(server.url, tmp_path / "serve.png")
    seconds = time.perf_counter() - start
    assert shown["errors"] == []
    assert len(shown["probs"]) == N_TOKENS  # one .token per generated token
    assert all(0.0 <= p <= 1.0 for p in shown["probs"])
    assert shown["title"].startswith("Token 8:")
    assert shown["candidates"] >= 10 and shown["chosen"] == 1
    assert shown["attention_rows"] > 0
    assert shown["status"].startswith(f"done: {N_TOKENS} tokens")
    assert (tmp_path / "serve.png").stat().st_size > 10_000
    assert seconds < 60, f"the browser test took {seconds:.1f} s"


def main() -> None:
    import argparse

    from tinylm.checkpoint import load
    from tinylm.generate_cli import _checkpoint_in

    parser = argparse.ArgumentParser(description="write the screenshot of `tinylm serve`")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint or run directory")
    parser.add_argument("--out", default="docs/img/serve.png")
    parser.add_argument("--prompt", default="ROMEO:\n")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=320)
    parser.add_argument("--select", type=int, default=40, help="the token to click (from 0)")
    args = parser.parse_args()
    ckpt = load(_checkpoint_in(args.checkpoint))
    with running(Engine(ckpt.model, ckpt.tokenizer, source=args.checkpoint)) as server:
        shown = drive_page(server.url, args.out, args.prompt, args.seed, args.tokens,
                           args.select)
    print(f"{args.out}: {shown['title']}, {shown['candidates']} candidates, {shown['status']}")


if __name__ == "__main__":
    main()
